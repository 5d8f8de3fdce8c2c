// The attention's online-softmax step for one query vector and one key tile
// (kernels/cpu/attention.cpp), written once over the vector types of gemm_tile.h and compiled per
// ISA. Beyond gemm_tile.h's operations V provides store, mul, sub, add, max, exp (the portable
// type calls std::exp per lane; the SIMD ones evaluate a polynomial, within 2 ulp), hmax and
// keep(x, j0, lo, hi, fill) (lanes whose index j0 + i lies outside [lo, hi) become fill).
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/cpu/gemm_tile.h"

namespace moemesh::cpu {

// e^x for the SIMD vector types, as Cephes' expf: x = n·ln2 + r with |r| <= ln2/2 (ln2 in two
// parts), a degree-7 polynomial in r, times 2^n (V::times_pow2). x is clamped to [-87.3, 88.3] so
// that 2^n stays a normal number: below, the result is ~1e-38 rather than 0 (softmax weights that
// small vanish in the sum anyway). V adds min, round (to nearest) and times_pow2(p, n) = p·2^n.
template <class V>
typename V::reg poly_exp(typename V::reg x) {
  using R = typename V::reg;
  x = V::min(V::max(x, V::set1(-87.3f)), V::set1(88.3f));
  const R n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  R r = V::fma(n, V::set1(-0.693359375f), x);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  R p = V::set1(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = V::fma(p, r, V::set1(c));
  p = V::fma(p, V::mul(r, r), V::add(r, V::set1(1.0f)));
  return V::times_pow2(p, n);
}

template <class V>
struct SoftmaxTile {
  static constexpr int L = V::lanes;
  using R = typename V::reg;

  // x = f(x, j0) over s[0, n) a vector at a time; the tail through a zero-padded copy.
  template <class F>
  static void over(float* s, int64_t n, F&& f) {
    int64_t j = 0;
    for (; j + L <= n; j += L) V::store(s + j, f(V::load(s + j), j));
    if (j < n) {
      alignas(64) float pad[L] = {};
      std::memcpy(pad, s + j, size_t(n - j) * sizeof(float));
      V::store(pad, f(V::load(pad), j));
      std::memcpy(s + j, pad, size_t(n - j) * sizeof(float));
    }
  }

  static float run(float* s, int64_t n, int64_t a, int64_t b, float scale, float& m) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    const R sc = V::set1(scale);
    R mx = V::set1(m);
    over(s + a, b - a, [&](R x, int64_t j0) {
      x = V::mul(x, sc);
      mx = V::max(mx, V::keep(x, j0, 0, b - a, kNegInf));
      return x;
    });
    m = V::hmax(mx);
    const R top = V::set1(m);
    R sum = V::zero();
    over(s, n, [&](R x, int64_t j0) {
      const R p = V::keep(V::exp(V::sub(x, top)), j0, a, b, 0.0f);
      sum = V::add(sum, p);
      return p;
    });
    return V::hsum(sum);
  }
};

}  // namespace moemesh::cpu
