// BF16 weights against bf16-rounded x rows with AVX512-BF16's VDPBF16PS (compiled with those
// flags only; chosen at run time from CPUID): each instruction multiplies 32 bf16 pairs exactly
// and adds them into 16 f32 accumulators, twice the work of an f32 FMA and no conversion of the
// weights at all, which is what makes prefill and batched decode of bf16 checkpoints fast.
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

struct Avx512Bf16Vec {
  static constexpr int lanes = 32;  // bf16 columns per step: 16 pairs
  static constexpr int rn_max = 6;
  using reg = __m512;
  using xelem = uint16_t;
  using xreg = __m512bh;
  using wreg = __m512bh;
  static reg zero() { return _mm512_setzero_ps(); }
  static xreg load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  template <DType DT>
  static wreg load_w(const uint16_t* p) {
    static_assert(DT == DType::BF16);
    return (__m512bh)_mm512_loadu_si512(p);
  }
  static reg fma(wreg w, xreg x, reg acc) { return _mm512_dpbf16_ps(acc, w, x); }
  static float hsum(reg a) { return hsum_avx512(a); }
};

}  // namespace

void gemm_block_bf16dot_avx512bf16(const void* w, int64_t in, int64_t ldw, const uint16_t* const* xr, int64_t nrows,
                                   int64_t nout, float* c, int64_t ldc) {
  GemmTiles<Avx512Bf16Vec>::run(w, DType::BF16, in, ldw, xr, nrows, nout, c, ldc);
}

}  // namespace moemesh::cpu
#endif
