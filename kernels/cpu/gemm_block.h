// The per-ISA inner kernel behind kernels/cpu/gemm.h (internal to kernels/cpu).
#pragma once
#include <cstdint>

#include "core/dtype.h"
#include "kernels/cpu/cpu_features.h"

namespace moemesh::cpu {

// c[r * ldc + o] = Σ_k W[o, k] · xr[r][k] for r < nrows, o < nout; W's rows are `in` elements of
// type dt apart, starting at w. Writes c; never reads it.
using GemmBlockFn = void (*)(const void* w, DType dt, int64_t in, const float* const* xr, int64_t nrows, int64_t nout,
                             float* c, int64_t ldc);

void gemm_block_portable(const void* w, DType dt, int64_t in, const float* const* xr, int64_t nrows, int64_t nout,
                         float* c, int64_t ldc);
void gemm_block_avx2(const void* w, DType dt, int64_t in, const float* const* xr, int64_t nrows, int64_t nout,
                     float* c, int64_t ldc);
void gemm_block_avx512(const void* w, DType dt, int64_t in, const float* const* xr, int64_t nrows, int64_t nout,
                       float* c, int64_t ldc);

GemmBlockFn gemm_block_for(Isa isa);

}  // namespace moemesh::cpu
