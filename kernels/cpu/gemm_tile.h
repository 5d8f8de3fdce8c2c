// The register-tiled inner kernel of kernels/cpu/gemm, written once over a vector type V and
// compiled per ISA (gemm_portable.cpp, gemm_avx2.cpp, gemm_avx512.cpp, gemm_avx512bf16.cpp, each
// with its own -m flags). V provides: reg (f32 accumulators), xelem (the element type of x rows:
// float, or bf16 bits for the bf16 dot product), xreg and wreg (what x and weight loads give),
// lanes (columns per step), rn_max, zero(), load(const xelem*), load_w<DType>(const void*),
// fma(w, x, acc) (acc += w·x per lane, or per lane pair), hsum(reg).
//
// A tile keeps RM weight rows × RN x rows of accumulators in registers; per step of `lanes`
// columns it loads the RN x vectors once and each weight vector once (converted in registers)
// and does RM·RN multiply-adds. Every accumulator sums its columns in the same order with the
// same tail, whatever RM and RN are, so results do not depend on the tiling.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/dtype.h"

// The tile's loops have compile-time trip counts; unrolled, the accumulators live in registers.
#define MOEMESH_UNROLL _Pragma("GCC unroll 32")

namespace moemesh::cpu {

inline constexpr int64_t kCacheLine = 64;  // bytes: what one prefetch brings

// Asks for the cache line at `bytes` past `base` ahead of use. The tiles ask for the next tile's
// rows, which may lie past the matrix: the address is formed in integers (no out-of-bounds
// pointer), and a prefetch never faults.
inline void prefetch_at(const void* base, int64_t bytes) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + uintptr_t(bytes)));
}

template <DType DT>
struct WeightElem;
template <>
struct WeightElem<DType::F32> {
  using type = float;
};
template <>
struct WeightElem<DType::F16> {
  using type = uint16_t;
};
template <>
struct WeightElem<DType::BF16> {
  using type = uint16_t;
};

// f(std::integral_constant<DType, dt>{}) for the three weight types the products take; nothing
// for another (gemm.cpp accepts only the three).
template <class F>
void with_weight_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32:
      return f(std::integral_constant<DType, DType::F32>{});
    case DType::F16:
      return f(std::integral_constant<DType, DType::F16>{});
    case DType::BF16:
      return f(std::integral_constant<DType, DType::BF16>{});
    default:
      return;
  }
}

template <class V>
struct GemmTiles {
  static constexpr int L = V::lanes;
  using R = typename V::reg;
  using X = typename V::xelem;

  template <DType DT, int RM, int RN>
  static void tile(const typename WeightElem<DT>::type* w, int64_t in, int64_t ldw, const X* const* xr, float* c,
                   int64_t ldc) {
    using E = typename WeightElem<DT>::type;
    R acc[RM][RN];
    MOEMESH_UNROLL
    for (int i = 0; i < RM; ++i) {
      MOEMESH_UNROLL
      for (int r = 0; r < RN; ++r) acc[i][r] = V::zero();
    }
    int64_t k = 0;
    for (; k + L <= in; k += L) {
      // The next tile's rows at this offset, a cache line at a time (as QuantTiles does).
      if ((k * int64_t(sizeof(E))) % kCacheLine == 0) {
        MOEMESH_UNROLL
        for (int i = 0; i < RM; ++i) prefetch_at(w, ((RM + i) * ldw + k) * int64_t(sizeof(E)));
      }
      typename V::xreg xv[RN];
      MOEMESH_UNROLL
      for (int r = 0; r < RN; ++r) xv[r] = V::load(xr[r] + k);
      MOEMESH_UNROLL
      for (int i = 0; i < RM; ++i) {
        const typename V::wreg wv = V::template load_w<DT>(w + i * ldw + k);
        MOEMESH_UNROLL
        for (int r = 0; r < RN; ++r) acc[i][r] = V::fma(wv, xv[r], acc[i][r]);
      }
    }
    if (k < in) {  // the last columns, zero-padded to a whole vector
      const int64_t n = in - k;
      alignas(64) X xpad[RN][L] = {};
      alignas(64) E wpad[L] = {};
      for (int r = 0; r < RN; ++r) std::memcpy(xpad[r], xr[r] + k, size_t(n) * sizeof(X));
      for (int i = 0; i < RM; ++i) {
        std::memcpy(wpad, w + i * ldw + k, size_t(n) * sizeof(E));
        const typename V::wreg wv = V::template load_w<DT>(wpad);
        for (int r = 0; r < RN; ++r) acc[i][r] = V::fma(wv, V::load(xpad[r]), acc[i][r]);
      }
    }
    for (int i = 0; i < RM; ++i)
      for (int r = 0; r < RN; ++r) c[r * ldc + i] = V::hsum(acc[i][r]);
  }

  // One weight row block of RM rows against every x row, RN at a time.
  template <DType DT, int RM>
  static void rows_block(const typename WeightElem<DT>::type* w, int64_t in, int64_t ldw, const X* const* xr,
                         int64_t nrows, float* c, int64_t ldc) {
    int64_t r = 0;
    for (; r + V::rn_max <= nrows; r += V::rn_max) tile<DT, RM, V::rn_max>(w, in, ldw, xr + r, c + r * ldc, ldc);
    rest<DT, RM, V::rn_max - 1>(w, in, ldw, xr + r, nrows - r, c + r * ldc, ldc);
  }

  // The last nrows (< RN + 1) rows.
  template <DType DT, int RM, int RN>
  static void rest(const typename WeightElem<DT>::type* w, int64_t in, int64_t ldw, const X* const* xr, int64_t nrows,
                   float* c, int64_t ldc) {
    if constexpr (RN > 0) {
      if (nrows == RN) return tile<DT, RM, RN>(w, in, ldw, xr, c, ldc);
      rest<DT, RM, RN - 1>(w, in, ldw, xr, nrows, c, ldc);
    }
  }

  template <DType DT>
  static void block(const void* wv, int64_t in, int64_t ldw, const X* const* xr, int64_t nrows, int64_t nout, float* c,
                    int64_t ldc) {
    const auto* w = static_cast<const typename WeightElem<DT>::type*>(wv);
    int64_t o = 0;
    if (nrows == 1) {  // decode: 8 weight rows in flight hide the FMA latency
      for (; o + 8 <= nout; o += 8) tile<DT, 8, 1>(w + o * ldw, in, ldw, xr, c + o, ldc);
    } else {
      for (; o + 4 <= nout; o += 4) rows_block<DT, 4>(w + o * ldw, in, ldw, xr, nrows, c + o, ldc);
    }
    for (; o < nout; ++o) rows_block<DT, 1>(w + o * ldw, in, ldw, xr, nrows, c + o, ldc);
  }

  static void run(const void* w, DType dt, int64_t in, int64_t ldw, const X* const* xr, int64_t nrows, int64_t nout,
                  float* c, int64_t ldc) {
    if constexpr (!std::is_same_v<X, float>) {  // bf16 x rows go with bf16 weights only
      (void)dt;
      block<DType::BF16>(w, in, ldw, xr, nrows, nout, c, ldc);
    } else {
      with_weight_dtype(dt, [&](auto t) { block<decltype(t)::value>(w, in, ldw, xr, nrows, nout, c, ldc); });
    }
  }
};

}  // namespace moemesh::cpu
