// INT4 weights against int8 activations with AVX512-VNNI's VPDPBUSD (compiled with those flags
// only; chosen at run time from CPUID), for one x row at a time (gemm.cpp decides when). One
// instruction multiplies 64 unsigned weight codes by 64 signed activation codes and adds them in
// fours into 16 int32 lanes: four times the products of an f32 FMA, and an INT4 weight needs no
// conversion to float at all (a shift and a mask), which brings INT4 decode near memory bound.
//
// x comes as two int8 planes per unit (gemm_block.h: QuantizedRow, made by gemm.cpp), so a unit's integer sums are
// exact and the only error is x's quantization, |Δx| ≤ max|x over the unit| / 32512: per output
//   y = Σ_u scale[g(u)]·d[u]·(256·Σ q·q1 + Σ q·q2) - Σ_g scaled_zero[g]·sum[g].
#if defined(__x86_64__)
// GCC 12's avx512fintrin.h builds _mm512_undefined_* as `__m512 __Y = __Y;` (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/cpu/avx512_hsum.h"
#include "kernels/cpu/gemm_block.h"
#include "kernels/cpu/gemm_tile.h"

namespace moemesh::cpu {
namespace {

constexpr int64_t B = QuantMatrix::kBlock;

// 64 INT4 weight codes (two blocks) as unsigned bytes, in the planes' order.
inline __m512i codes64(const uint8_t* p) {
  // Both blocks' 32 bytes twice; the upper copy shifted right by 4: low nibbles, then high ones.
  const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i shifted = _mm512_srlv_epi64(both, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0));
  return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
}

// One block's 32 codes in the low half (the high half is zero: x's is too).
inline __m512i codes32(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i nibbles = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
  return _mm512_zextsi256_si512(_mm256_and_si256(nibbles, _mm256_set1_epi8(0x0F)));
}

inline __m512i x32(const int8_t* p) {
  return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// c[r * ldc + i] = row o0 + i of m · xr[r], for RM weight rows and RN x rows.
template <int RM, int RN>
void tile(const QuantMatrix& m, int64_t o0, const QuantizedRow* xr, float* c, int64_t ldc) {
  const int64_t groups = m.groups(), row_bytes = m.row_bytes(), units = m.units();
  const uint8_t* q = m.q.data() + o0 * row_bytes;
  __m512 total[RM][RN];
  MOEMESH_UNROLL
  for (int i = 0; i < RM; ++i) {
    MOEMESH_UNROLL
    for (int r = 0; r < RN; ++r) total[i][r] = _mm512_setzero_ps();
  }
  for (int64_t u = 0; u < units; ++u) {
    const int64_t a = m.unit_start[size_t(u)], b = m.unit_start[size_t(u + 1)];
    __m512i s1[RM][RN], s2[RM][RN];
    MOEMESH_UNROLL
    for (int i = 0; i < RM; ++i) {
      MOEMESH_UNROLL
      for (int r = 0; r < RN; ++r) s1[i][r] = s2[i][r] = _mm512_setzero_si512();
    }
    // Pairs of blocks, then the unit's odd last block in the low halves (the same steps: a
    // select inside one loop made the kernel a third slower).
    int64_t k = a;
    for (; k + 2 * B <= b; k += 2 * B) {
      __m512i x1[RN], x2[RN];
      MOEMESH_UNROLL
      for (int r = 0; r < RN; ++r) x1[r] = _mm512_loadu_si512(xr[r].q1 + k), x2[r] = _mm512_loadu_si512(xr[r].q2 + k);
      MOEMESH_UNROLL
      for (int i = 0; i < RM; ++i) {
        const __m512i w = codes64(q + i * row_bytes + k / 2);
        MOEMESH_UNROLL
        for (int r = 0; r < RN; ++r) {
          s1[i][r] = _mm512_dpbusd_epi32(s1[i][r], w, x1[r]);
          s2[i][r] = _mm512_dpbusd_epi32(s2[i][r], w, x2[r]);
        }
      }
    }
    if (k < b) {
      __m512i x1[RN], x2[RN];
      MOEMESH_UNROLL
      for (int r = 0; r < RN; ++r) x1[r] = x32(xr[r].q1 + k), x2[r] = x32(xr[r].q2 + k);
      MOEMESH_UNROLL
      for (int i = 0; i < RM; ++i) {
        const __m512i w = codes32(q + i * row_bytes + k / 2);
        MOEMESH_UNROLL
        for (int r = 0; r < RN; ++r) {
          s1[i][r] = _mm512_dpbusd_epi32(s1[i][r], w, x1[r]);
          s2[i][r] = _mm512_dpbusd_epi32(s2[i][r], w, x2[r]);
        }
      }
    }
    // A lane adds kUnit / 16 · 4 products of at most 255·127, so 256·s1 + s2 stays below 2^31.
    const int64_t g = m.unit_group[size_t(u)];
    MOEMESH_UNROLL
    for (int i = 0; i < RM; ++i) {
      const float scale = m.scale[size_t((o0 + i) * groups + g)];
      MOEMESH_UNROLL
      for (int r = 0; r < RN; ++r) {
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(s1[i][r], 8), s2[i][r]);
        total[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(scale * xr[r].d[u]), total[i][r]);
      }
    }
  }
  for (int i = 0; i < RM; ++i) {
    const float* zero = m.scaled_zero.data() + (o0 + i) * groups;
    for (int r = 0; r < RN; ++r) {
      __m512 z = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; g += 16) {
        const __mmask16 live = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
        z = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, zero + g), _mm512_maskz_loadu_ps(live, xr[r].sum + g), z);
      }
      c[r * ldc + i] = hsum_avx512(total[i][r]) - hsum_avx512(z);
    }
  }
}

}  // namespace

void gemm_quant_i8_block_avx512vnni(const QuantMatrix& m, int64_t o0, int64_t nout, const QuantizedRow* xr,
                                    int64_t nrows, float* c, int64_t ldc) {
  for (int64_t r = 0; r < nrows; ++r) {
    int64_t o = 0;
    for (; o + 4 <= nout; o += 4) tile<4, 1>(m, o0 + o, xr + r, c + r * ldc + o, ldc);
    for (; o < nout; ++o) tile<1, 1>(m, o0 + o, xr + r, c + r * ldc + o, ldc);
  }
}

}  // namespace moemesh::cpu
#endif
