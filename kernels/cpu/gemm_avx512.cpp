// AVX-512 (F/BW/VL) kernel (compiled with those flags only; chosen at run time from CPUID).
#if defined(__x86_64__)
// GCC 12's avx512fintrin.h builds _mm512_undefined_* as `__m512 __Y = __Y;`, which -Wuninitialized
// reports at every inlined use (GCC bug 105593); the value is never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels/cpu/avx512_hsum.h"
#include "kernels/cpu/gemm_block.h"
#include "kernels/cpu/gemm_tile.h"

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
  static float hsum(reg a) { return hsum_avx512(a); }
};

}  // namespace

void gemm_block_avx512(const void* w, DType dt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows,
                       int64_t nout, float* c, int64_t ldc) {
  GemmTiles<Avx512Vec>::run(w, dt, in, ldw, xr, nrows, nout, c, ldc);
}

}  // namespace moemesh::cpu
#endif
