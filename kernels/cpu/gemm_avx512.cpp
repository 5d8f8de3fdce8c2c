// AVX-512 (F/BW/VL) kernel (compiled with those flags only; chosen at run time from CPUID).
#if defined(__x86_64__)
// GCC 12's avx512fintrin.h builds _mm512_undefined_* as `__m512 __Y = __Y;`, which -Wuninitialized
// reports at every inlined use (GCC bug 105593); the value is never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/cpu/avx512_hsum.h"
#include "kernels/cpu/gemm_block.h"
#include "kernels/cpu/gemm_expand_tile.h"
#include "kernels/cpu/gemm_quant_tile.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/softmax_tile.h"

namespace moemesh::cpu {
namespace {

struct Avx512Vec {
  static constexpr int lanes = 16;
  static constexpr int rn_max = 6;  // 4×6 accumulators + 6 x vectors + 1 weight fit 32 registers
  using reg = __m512;
  using xelem = float;
  using xreg = reg;
  using wreg = reg;
  static reg zero() { return _mm512_setzero_ps(); }
  static void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  template <DType DT>
  static reg load_w(const typename WeightElem<DT>::type* p) {
    if constexpr (DT == DType::F32) {
      return _mm512_loadu_ps(p);
    } else if constexpr (DT == DType::F16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    } else {  // bf16 is the high half of an f32
      const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
  }
  static reg fma(reg a, reg b, reg acc) { return _mm512_fmadd_ps(a, b, acc); }
  static constexpr int rn_quant = 4;  // 4×4 accumulators + 4 x + 4 scales + 4 zeros + 1 weight
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg fmsub(reg a, reg b, reg c) { return _mm512_fmsub_ps(a, b, c); }
  template <int BITS>
  static constexpr bool has_table = BITS == 4;
  template <int BITS>
  static reg quant(const uint8_t* block, int h) {  // INT8: values 16h .. 16h + 15 of the block
    static_assert(BITS == 8);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * h))));
  }
  // INT4: the 16 values a nibble can stand for in this row and group, q · scale - zero · scale.
  static reg table(float scale, float scaled_zero) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_fmsub_ps(q, _mm512_set1_ps(scale), _mm512_set1_ps(scaled_zero));
  }
  // Values 16h .. 16h + 15 of an INT4 block: byte j's low nibble (h 0) or high nibble (h 1) picks
  // from the table; VPERMPS reads only the low 4 bits of each index.
  static reg lookup(const uint8_t* block, int h, reg table) {
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    if (h) idx = _mm512_srli_epi32(idx, 4);
    return _mm512_permutexvar_ps(idx, table);
  }
  static float hsum(reg a) { return hsum_avx512(a); }
  // The softmax tile's operations (softmax_tile.h).
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static float hmax(reg a) { return _mm512_reduce_max_ps(a); }
  static reg keep(reg x, int64_t j0, int64_t lo, int64_t hi, float fill) {
    const __m512 idx =
        _mm512_add_ps(_mm512_set1_ps(float(j0)), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __mmask16 in = _mm512_cmp_ps_mask(idx, _mm512_set1_ps(float(lo)), _CMP_GE_OQ) &
                         _mm512_cmp_ps_mask(idx, _mm512_set1_ps(float(hi)), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), in, x);
  }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg times_pow2(reg p, reg n) { return _mm512_scalef_ps(p, n); }
  static reg exp(reg x) { return poly_exp<Avx512Vec>(x); }
};

}  // namespace

void gemm_block_avx512(const void* w, DType dt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                       int64_t nout, float* c, int64_t ldc) {
  GemmTiles<Avx512Vec>::run(w, dt, in, ldw, xr, nrows, nout, c, ldc);
}

float softmax_tile_avx512(float* s, int64_t n, int64_t a, int64_t b, float scale, float& m) {
  return SoftmaxTile<Avx512Vec>::run(s, n, a, b, scale, m);
}

void gemm_dots_transposed_avx512(const float* wt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                                 int64_t nout, float* c, int64_t ldc) {
  ExpandTiles<Avx512Vec>::dots(wt, in, ldw, xr, nrows, nout, c, ldc);
}

void gemm_expand_avx512(const void* w, DType dt, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows,
                        int64_t nout, float* c, int64_t ldc) {
  ExpandTiles<Avx512Vec>::run(w, dt, rank, ldw, tr, nrows, nout, c, ldc);
}

void gemm_quant_block_avx512(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows,
                             float* c, int64_t ldc) {
  QuantTiles<Avx512Vec>::run(m, o0, nout, xr, nrows, c, ldc);
}

}  // namespace moemesh::cpu
#endif
