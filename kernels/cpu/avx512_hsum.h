// The sum of an AVX-512 register's 16 floats, pairwise (256 + 256, then 128 + 128, ...), for the
// files compiled with AVX-512 flags. `static`: each such file keeps its own copy, compiled for
// its own flags (an inline function shared between them could be emitted with either file's).
#pragma once
#include <immintrin.h>

namespace moemesh::cpu {

static inline float hsum_avx512(__m512 a) {
  const __m256 h =
      _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace moemesh::cpu
