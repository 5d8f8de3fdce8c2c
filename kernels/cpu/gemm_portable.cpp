// The portable kernel: plain C++ on 8-float vectors, the reference the SIMD kernels are tested
// against and what runs on CPUs without AVX2.
#include <algorithm>
#include <cmath>

#include "kernels/cpu/gemm_block.h"
#include "kernels/cpu/gemm_expand_tile.h"
#include "kernels/cpu/gemm_quant_tile.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/softmax_tile.h"

namespace moemesh::cpu {
namespace {

struct PortableVec {
  static constexpr int lanes = 8;
  static constexpr int rn_max = 4;
  struct reg {
    float v[lanes];
  };
  using xelem = float;
  using xreg = reg;
  using wreg = reg;
  static reg zero() { return reg{}; }
  static void store(float* p, reg a) {
    for (int i = 0; i < lanes; ++i) p[i] = a.v[i];
  }
  static reg load(const float* p) {
    reg r;
    for (int i = 0; i < lanes; ++i) r.v[i] = p[i];
    return r;
  }
  template <DType DT>
  static reg load_w(const typename WeightElem<DT>::type* p) {
    reg r;
    for (int i = 0; i < lanes; ++i) {
      if constexpr (DT == DType::F32)
        r.v[i] = p[i];
      else if constexpr (DT == DType::F16)
        r.v[i] = f16_to_f32(p[i]);
      else
        r.v[i] = bf16_to_f32(p[i]);
    }
    return r;
  }
  static reg fma(reg a, reg b, reg acc) {
    for (int i = 0; i < lanes; ++i) acc.v[i] += a.v[i] * b.v[i];
    return acc;
  }
  static constexpr int rn_quant = 2;
  static reg set1(float v) {
    reg r;
    for (int i = 0; i < lanes; ++i) r.v[i] = v;
    return r;
  }
  static reg fmsub(reg a, reg b, reg c) {
    for (int i = 0; i < lanes; ++i) a.v[i] = a.v[i] * b.v[i] - c.v[i];
    return a;
  }
  template <int BITS>
  static constexpr bool has_table = false;
  template <int BITS>
  static reg quant(const uint8_t* block, int h) {  // values 8h .. 8h + 7 of the block
    reg r;
    for (int i = 0; i < lanes; ++i) {
      const int k = 8 * h + i;
      r.v[i] = BITS == 8 ? float(block[k]) : float(k < 16 ? block[k] & 0x0F : block[k - 16] >> 4);
    }
    return r;
  }
  static float hsum(reg a) {  // pairwise, like the SIMD reductions
    for (int w = lanes / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) a.v[i] += a.v[i + w];
    return a.v[0];
  }
  // The softmax tile's operations (softmax_tile.h).
  template <class F>
  static reg each(reg a, reg b, F f) {
    for (int i = 0; i < lanes; ++i) a.v[i] = f(a.v[i], b.v[i]);
    return a;
  }
  static reg mul(reg a, reg b) {
    return each(a, b, [](float x, float y) { return x * y; });
  }
  static reg sub(reg a, reg b) {
    return each(a, b, [](float x, float y) { return x - y; });
  }
  static reg add(reg a, reg b) {
    return each(a, b, [](float x, float y) { return x + y; });
  }
  static reg max(reg a, reg b) {
    return each(a, b, [](float x, float y) { return std::max(x, y); });
  }
  static float hmax(reg a) { return *std::max_element(a.v, a.v + lanes); }
  static reg keep(reg x, int64_t j0, int64_t lo, int64_t hi, float fill) {
    for (int i = 0; i < lanes; ++i)
      if (j0 + i < lo || j0 + i >= hi) x.v[i] = fill;
    return x;
  }
  static reg exp(reg x) {
    for (float& v : x.v) v = std::exp(v);
    return x;
  }
};

}  // namespace

void gemm_block_portable(const void* w, DType dt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                         int64_t nout, float* c, int64_t ldc) {
  GemmTiles<PortableVec>::run(w, dt, in, ldw, xr, nrows, nout, c, ldc);
}

float softmax_tile_portable(float* s, int64_t n, int64_t a, int64_t b, float scale, float& m) {
  return SoftmaxTile<PortableVec>::run(s, n, a, b, scale, m);
}

void gemm_dots_transposed_portable(const float* wt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                                   int64_t nout, float* c, int64_t ldc) {
  ExpandTiles<PortableVec>::dots(wt, in, ldw, xr, nrows, nout, c, ldc);
}

void gemm_expand_portable(const void* w, DType dt, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows,
                          int64_t nout, float* c, int64_t ldc) {
  ExpandTiles<PortableVec>::run(w, dt, rank, ldw, tr, nrows, nout, c, ldc);
}

void gemm_quant_block_portable(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows,
                               float* c, int64_t ldc) {
  QuantTiles<PortableVec>::run(m, o0, nout, xr, nrows, c, ldc);
}

GemmKernels gemm_kernels_for(Isa isa) {
  switch (isa) {
#if defined(__x86_64__)
    case Isa::Avx512Bf16:
      return {gemm_block_avx512,  gemm_block_bf16dot_avx512bf16, gemm_quant_block_avx512,
              gemm_expand_avx512, gemm_dots_transposed_avx512,   softmax_tile_avx512};
    case Isa::Avx512:
      return {gemm_block_avx512,  nullptr, gemm_quant_block_avx512, gemm_expand_avx512, gemm_dots_transposed_avx512,
              softmax_tile_avx512};
    case Isa::Avx2:
      return {gemm_block_avx2,           nullptr,          gemm_quant_block_avx2, gemm_expand_avx2,
              gemm_dots_transposed_avx2, softmax_tile_avx2};
#endif
    default:
      return {gemm_block_portable,           nullptr,
              gemm_quant_block_portable,     gemm_expand_portable,
              gemm_dots_transposed_portable, softmax_tile_portable};
  }
}

}  // namespace moemesh::cpu
