// The expand half of a low-rank product (kernels/cpu/gemm.h's LowRankJob), written once over the
// vector types of gemm_tile.h and compiled per ISA: c[r · ldc + o] = Σ_k t_r[k] · W[k, o] with W
// [rank, nout] (rows ldw elements apart), i.e. B·t with B stored transposed. Each output column
// is a lane that sums over k in order, so there are no horizontal sums (a dot-product kernel would
// reduce a whole vector for each of the many outputs of a short rank) and a row's result does not
// depend on which other rows share the call.
#pragma once
#include <cstdint>
#include <cstring>

#include "core/dtype.h"
#include "kernels/cpu/gemm_tile.h"

namespace moemesh::cpu {

template <class V>
struct ExpandTiles {
  static constexpr int L = V::lanes;
  using R = typename V::reg;

  // Output columns [o, o + U·L) of one row.
  template <DType DT, int U>
  static void columns(const typename WeightElem<DT>::type* w, int64_t rank, int64_t ldw, const float* t, float* y) {
    R acc[U];
    MOEMESH_UNROLL
    for (int u = 0; u < U; ++u) acc[u] = V::zero();
    for (int64_t k = 0; k < rank; ++k) {
      const R tk = V::set1(t[k]);
      MOEMESH_UNROLL
      for (int u = 0; u < U; ++u) acc[u] = V::fma(V::template load_w<DT>(w + k * ldw + u * L), tk, acc[u]);
    }
    MOEMESH_UNROLL
    for (int u = 0; u < U; ++u) V::store(y + u * L, acc[u]);
  }

  template <DType DT>
  static void block(const void* wv, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows, int64_t nout,
                    float* c, int64_t ldc) {
    using E = typename WeightElem<DT>::type;
    const auto* w = static_cast<const E*>(wv);
    constexpr int U = 4;  // output vectors per pass: independent FMA chains
    for (int64_t r = 0; r < nrows; ++r) {
      float* y = c + r * ldc;
      int64_t o = 0;
      for (; o + U * L <= nout; o += U * L) columns<DT, U>(w + o, rank, ldw, tr[r], y + o);
      for (; o + L <= nout; o += L) columns<DT, 1>(w + o, rank, ldw, tr[r], y + o);
      if (o < nout) {  // the last columns, through zero-padded copies of each weight row's tail
        const int64_t n = nout - o;
        alignas(64) E wpad[L] = {};
        alignas(64) float ypad[L];
        R acc = V::zero();
        for (int64_t k = 0; k < rank; ++k) {
          std::memcpy(wpad, w + k * ldw + o, size_t(n) * sizeof(E));
          acc = V::fma(V::template load_w<DT>(wpad), V::set1(tr[r][k]), acc);
        }
        V::store(ypad, acc);
        std::memcpy(y + o, ypad, size_t(n) * sizeof(float));
      }
    }
  }

  // c[r · ldc + o] = Σ_k xr[r][k] · wt[k, o], k < in, summed exactly as GemmTiles sums x·w (for
  // each lane l, the products of the k ≡ l mod L in order, then the lanes pairwise, L/2 apart
  // first, as every V::hsum adds them), so each value has the bits the dot-product tiles give;
  // the keys of an attention tile are the columns. wt's rows and the x rows must hold zeros from
  // k = in up to in rounded up to 16, and each wt row nout rounded up to 16 readable floats.
  static void dots(const float* wt, int64_t in, int64_t ldw, const float* const* xr, int64_t nrows, int64_t nout,
                   float* c, int64_t ldc) {
    const int64_t kp = (in + L - 1) / L * L;
    for (int64_t r = 0; r < nrows; ++r) {
      const float* x = xr[r];
      for (int64_t o = 0; o < nout; o += L) {
        R acc[L];
        MOEMESH_UNROLL
        for (int l = 0; l < L; ++l) acc[l] = V::zero();
        for (int64_t k = 0; k < kp; k += L) {
          MOEMESH_UNROLL
          for (int l = 0; l < L; ++l) acc[l] = V::fma(V::load(wt + (k + l) * ldw + o), V::set1(x[k + l]), acc[l]);
        }
        MOEMESH_UNROLL
        for (int w = L / 2; w >= 1; w /= 2) {
          MOEMESH_UNROLL
          for (int l = 0; l < w; ++l) acc[l] = V::add(acc[l], acc[l + w]);
        }
        if (o + L <= nout) {
          V::store(c + r * ldc + o, acc[0]);
        } else {
          alignas(64) float pad[L];
          V::store(pad, acc[0]);
          std::memcpy(c + r * ldc + o, pad, size_t(nout - o) * sizeof(float));
        }
      }
    }
  }

  static void run(const void* w, DType dt, int64_t rank, int64_t ldw, const float* const* tr, int64_t nrows,
                  int64_t nout, float* c, int64_t ldc) {
    with_weight_dtype(dt, [&](auto t) { block<decltype(t)::value>(w, rank, ldw, tr, nrows, nout, c, ldc); });
  }
};

}  // namespace moemesh::cpu
