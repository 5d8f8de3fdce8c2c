// The per-ISA inner kernel behind kernels/cpu/gemm.h (internal to kernels/cpu).
#pragma once
#include <cstdint>

#include "core/dtype.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/quant_matrix.h"

namespace moemesh::cpu {

// c[r * ldc + o] = Σ_k W[o, k] · xr[r][k] for r < nrows, o < nout, k < in; W's rows are `ldw`
// elements of type dt apart, starting at w. Writes c; never reads it.
using GemmBlockFn = void (*)(const void* w, DType dt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                             int64_t nout, float* c, int64_t ldc);

void gemm_block_portable(const void* w, DType dt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                         int64_t nout, float* c, int64_t ldc);
void gemm_block_avx2(const void* w, DType dt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                     int64_t nout, float* c, int64_t ldc);
void gemm_block_avx512(const void* w, DType dt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                       int64_t nout, float* c, int64_t ldc);

// The same for BF16 weights against x rows already rounded to bf16 (AVX512-BF16 only).
using GemmBf16DotFn = void (*)(const void* w, int64_t in, int64_t ldw, const uint16_t* const* xr, int64_t nrows,
                               int64_t nout, float* c, int64_t ldc);
void gemm_block_bf16dot_avx512bf16(const void* w, int64_t in, int64_t ldw, const uint16_t* const* xr, int64_t nrows,
                                   int64_t nout, float* c, int64_t ldc);

// The same for a quantized matrix: rows [o0, o0 + nout) of m against x rows in m's padded order.
using GemmQuantFn = void (*)(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows,
                             float* c, int64_t ldc);
void gemm_quant_block_portable(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows,
                               float* c, int64_t ldc);
void gemm_quant_block_avx2(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows,
                           float* c, int64_t ldc);
void gemm_quant_block_avx512(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows,
                             float* c, int64_t ldc);

// An ISA's kernels. bf16dot is null where the ISA has none: BF16 weights then go through block
// with x rows rounded to bf16 and widened back to f32 (the same products).
struct GemmKernels {
  GemmBlockFn block;
  GemmBf16DotFn bf16dot;
  GemmQuantFn quant;
};
GemmKernels gemm_kernels_for(Isa isa);

}  // namespace moemesh::cpu
