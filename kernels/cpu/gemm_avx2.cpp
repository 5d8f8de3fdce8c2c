// AVX2 + FMA + F16C kernel (compiled with those flags only; chosen at run time from CPUID).
#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels/cpu/gemm_block.h"
#include "kernels/cpu/gemm_expand_tile.h"
#include "kernels/cpu/gemm_quant_tile.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/softmax_tile.h"

namespace moemesh::cpu {
namespace {

struct Avx2Vec {
  static constexpr int lanes = 8;
  static constexpr int rn_max = 3;  // 4×3 accumulators + 3 x vectors + 1 weight fit 16 registers
  using reg = __m256;
  using xelem = float;
  using xreg = reg;
  using wreg = reg;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  template <DType DT>
  static reg load_w(const typename WeightElem<DT>::type* p) {
    if constexpr (DT == DType::F32) {
      return _mm256_loadu_ps(p);
    } else if constexpr (DT == DType::F16) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {  // bf16 is the high half of an f32
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
  }
  static reg fma(reg a, reg b, reg acc) { return _mm256_fmadd_ps(a, b, acc); }
  static constexpr int rn_quant = 2;  // + a scale and a zero per weight row
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg fmsub(reg a, reg b, reg c) { return _mm256_fmsub_ps(a, b, c); }
  template <int BITS>
  static constexpr bool has_table = false;
  template <int BITS>
  static reg quant(const uint8_t* block, int h) {  // values 8h .. 8h + 7 of the block
    __m128i b;
    if constexpr (BITS == 8) {
      b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8 * h));
    } else {  // values 16-31 are the high nibbles of bytes 0-15
      b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8 * (h % 2)));
      if (h >= 2) b = _mm_srli_epi16(b, 4);
      b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }
  static float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // The softmax tile's operations (softmax_tile.h).
  static void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static float hmax(reg a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static reg keep(reg x, int64_t j0, int64_t lo, int64_t hi, float fill) {
    const __m256 idx = _mm256_add_ps(_mm256_set1_ps(float(j0)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 in = _mm256_and_ps(_mm256_cmp_ps(idx, _mm256_set1_ps(float(lo)), _CMP_GE_OQ),
                                    _mm256_cmp_ps(idx, _mm256_set1_ps(float(hi)), _CMP_LT_OQ));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), x, in);
  }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg times_pow2(reg p, reg n) {  // 2^n built in the exponent bits (n is a normal exponent)
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static reg exp(reg x) { return poly_exp<Avx2Vec>(x); }
};

}  // namespace

void gemm_block_avx2(const void* w, DType dt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                     int64_t nout, float* c, int64_t ldc) {
  GemmTiles<Avx2Vec>::run(w, dt, in, ldw, xr, nrows, nout, c, ldc);
}

float softmax_tile_avx2(float* s, int64_t n, int64_t a, int64_t b, float scale, float& m) {
  return SoftmaxTile<Avx2Vec>::run(s, n, a, b, scale, m);
}

void gemm_dots_transposed_avx2(const float* wt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                               int64_t nout, float* c, int64_t ldc) {
  ExpandTiles<Avx2Vec>::dots(wt, in, ldw, xr, nrows, nout, c, ldc);
}

void gemm_expand_avx2(const void* w, DType dt, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows,
                      int64_t nout, float* c, int64_t ldc) {
  ExpandTiles<Avx2Vec>::run(w, dt, rank, ldw, tr, nrows, nout, c, ldc);
}

void gemm_quant_block_avx2(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows,
                           float* c, int64_t ldc) {
  QuantTiles<Avx2Vec>::run(m, o0, nout, xr, nrows, c, ldc);
}

}  // namespace moemesh::cpu
#endif
