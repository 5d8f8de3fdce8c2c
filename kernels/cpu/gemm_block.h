// The per-ISA inner kernels of kernels/cpu (internal to it): the products behind gemm.h, the
// expand half of its low-rank products, and the attention's softmax tile.
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

// c[r * ldc + o] = Σ_k tr[r][k] · W[k, o] for r < nrows, o < nout, k < rank: W [rank, nout] of
// type dt, rows ldw elements apart (the expand half of a low-rank product; gemm_expand_tile.h).
using GemmExpandFn = void (*)(const void* w, DType dt, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows,
                              int64_t nout, float* c, int64_t ldc);
void gemm_expand_portable(const void* w, DType dt, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows,
                          int64_t nout, float* c, int64_t ldc);
void gemm_expand_avx2(const void* w, DType dt, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows,
                      int64_t nout, float* c, int64_t ldc);
void gemm_expand_avx512(const void* w, DType dt, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows,
                        int64_t nout, float* c, int64_t ldc);

// c[r * ldc + o] = Σ_k xr[r][k] · wt[k, o], k < in, with the bits the block kernel gives for the
// same products (ExpandTiles::dots: the keys of an attention tile as lanes, no horizontal sums).
// wt's rows and the x rows hold zeros from in up to in rounded up to 16; rows of wt have nout
// rounded up to 16 readable floats.
using GemmDotsTransposedFn = void (*)(const float* wt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                                      int64_t nout, float* c, int64_t ldc);
void gemm_dots_transposed_portable(const float* wt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                                   int64_t nout, float* c, int64_t ldc);
void gemm_dots_transposed_avx2(const float* wt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                               int64_t nout, float* c, int64_t ldc);
void gemm_dots_transposed_avx512(const float* wt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                                 int64_t nout, float* c, int64_t ldc);

// The attention's online-softmax step (softmax_tile.h): s[0, n) are one query vector's scores
// against a key tile, [a, b) the visible ones (0 <= a < b <= n). Scales the visible scores by
// `scale` in place, raises m to their max, then writes s[j] = e^(s[j] - m) where visible and 0
// elsewhere; returns the sum.
using SoftmaxTileFn = float (*)(float* s, int64_t n, int64_t a, int64_t b, float scale, float& m);
float softmax_tile_portable(float* s, int64_t n, int64_t a, int64_t b, float scale, float& m);
float softmax_tile_avx2(float* s, int64_t n, int64_t a, int64_t b, float scale, float& m);
float softmax_tile_avx512(float* s, int64_t n, int64_t a, int64_t b, float scale, float& m);

// An ISA's kernels. bf16dot is null where the ISA has none: BF16 weights then go through block
// with x rows rounded to bf16 and widened back to f32 (the same products).
struct GemmKernels {
  GemmBlockFn block;
  GemmBf16DotFn bf16dot;
  GemmQuantFn quant;
  GemmExpandFn expand;
  GemmDotsTransposedFn dots_transposed;
  SoftmaxTileFn softmax;
};
GemmKernels gemm_kernels_for(Isa isa);

}  // namespace moemesh::cpu
