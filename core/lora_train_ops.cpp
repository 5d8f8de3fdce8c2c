#include "core/lora_train_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/error.h"

namespace moemesh::lora_ops {

namespace {

CBLAS_TRANSPOSE tr(bool t) { return t ? CblasTrans : CblasNoTrans; }

}  // namespace

template <>
void gemm<float>(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, const float* b,
                 float beta, float* c) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, tr(ta), tr(tb), int(m), int(n), int(k), alpha, a, int(ta ? m : k), b, int(tb ? k : n),
              beta, c, int(n));
}

template <>
void gemm<double>(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, const double* b,
                  double beta, double* c) {
  if (m == 0 || n == 0) return;
  cblas_dgemm(CblasRowMajor, tr(ta), tr(tb), int(m), int(n), int(k), alpha, a, int(ta ? m : k), b, int(tb ? k : n),
              beta, c, int(n));
}

template <typename T>
void linear_forward(const Linear<T>& l, const T* x, int64_t n, T* y, std::vector<T>& u) {
  gemm<T>(false, true, n, l.out, l.in, T(1), x, l.w, T(0), y);
  if (!l.a) return;
  u.resize(size_t(n * l.r));
  gemm<T>(false, true, n, l.r, l.in, T(1), x, l.a, T(0), u.data());
  gemm<T>(false, true, n, l.out, l.r, l.scale, u.data(), l.b, T(1), y);
}

template <typename T>
void linear_backward(const Linear<T>& l, const T* x, const T* u, const T* dy, int64_t n, T* dx, T* da, T* db) {
  if (dx) gemm<T>(false, false, n, l.in, l.out, T(1), dy, l.w, T(1), dx);
  if (!l.a) return;
  if (db) gemm<T>(true, false, l.out, l.r, n, l.scale, dy, u, T(1), db);  // scale · dyᵀ·u
  std::vector<T> du(size_t(n * l.r));
  gemm<T>(false, false, n, l.r, l.out, l.scale, dy, l.b, T(0), du.data());  // scale · dy·B
  if (da) gemm<T>(true, false, l.r, l.in, n, T(1), du.data(), x, T(1), da);
  if (dx) gemm<T>(false, false, n, l.in, l.r, T(1), du.data(), l.a, T(1), dx);
}

template <typename T>
void rmsnorm_forward(const T* x, const T* w, int64_t n, int64_t d, double eps, T* y, T* inv) {
  for (int64_t r = 0; r < n; ++r) {
    const T* xr = x + r * d;
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += double(xr[i]) * double(xr[i]);
    const T s = T(1.0 / std::sqrt(ss / double(d) + eps));
    inv[r] = s;
    for (int64_t i = 0; i < d; ++i) y[r * d + i] = w[i] * (xr[i] * s);
  }
}

template <typename T>
void rmsnorm_backward(const T* x, const T* w, const T* inv, const T* dy, int64_t n, int64_t d, T* dx) {
  // y_i = w_i x_i s, s = (mean(x²) + eps)^-1/2, ds/dx_j = -s³ x_j / d.
  for (int64_t r = 0; r < n; ++r) {
    const T *xr = x + r * d, *g = dy + r * d;
    const T s = inv[r];
    double dot = 0.0;
    for (int64_t i = 0; i < d; ++i) dot += double(g[i]) * double(w[i]) * double(xr[i]);
    const T c = T(dot * double(s) * double(s) * double(s) / double(d));
    for (int64_t j = 0; j < d; ++j) dx[r * d + j] += g[j] * w[j] * s - c * xr[j];
  }
}

template <typename T>
void rope(T* x, int64_t n, int64_t heads, int64_t head_dim, const double* inv_freq, double attention_factor,
          bool inverse) {
  const int64_t half = head_dim / 2;
  std::vector<T> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < half; ++i) {
      // Rounded to f32 as kernels/cpu/ops.cpp does, so the float forward matches it.
      const double a = double(r) * inv_freq[i];
      cs[size_t(i)] = T(float(std::cos(a) * attention_factor));
      sn[size_t(i)] = T(float(std::sin(a) * attention_factor)) * (inverse ? T(-1) : T(1));
    }
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + (r * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const T a = v[i], b = v[i + half];
        v[i] = a * cs[size_t(i)] - b * sn[size_t(i)];
        v[i + half] = b * cs[size_t(i)] + a * sn[size_t(i)];
      }
    }
  }
}

template <typename T>
void attention_forward(const AttentionDims& s, const T* q, const T* k, const T* v, int64_t n, T* out,
                       std::vector<T>& p) {
  const int64_t hd = s.head_dim, qd = s.heads * hd, kd = s.kv_heads * hd, group = s.heads / s.kv_heads;
  p.assign(size_t(s.heads * n * n), T(0));
  std::fill(out, out + n * qd, T(0));
  for (int64_t h = 0; h < s.heads; ++h) {
    const int64_t kh = h / group;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j0 = s.window > 0 ? std::max<int64_t>(0, i - s.window + 1) : 0;
      T* pr = p.data() + (h * n + i) * n;
      const T* qi = q + i * qd + h * hd;
      T mx = -INFINITY;
      for (int64_t j = j0; j <= i; ++j) {
        const T* kj = k + j * kd + kh * hd;
        T dot = 0;
        for (int64_t d = 0; d < hd; ++d) dot += qi[d] * kj[d];
        pr[j] = dot * T(s.scale);
        mx = std::max(mx, pr[j]);
      }
      T sum = 0;
      for (int64_t j = j0; j <= i; ++j) sum += (pr[j] = std::exp(pr[j] - mx));
      T* o = out + i * qd + h * hd;
      for (int64_t j = j0; j <= i; ++j) {
        pr[j] /= sum;
        const T* vj = v + j * kd + kh * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += pr[j] * vj[d];
      }
    }
  }
}

template <typename T>
void attention_backward(const AttentionDims& s, const T* q, const T* k, const T* v, const T* p, const T* dout,
                        int64_t n, T* dq, T* dk, T* dv) {
  const int64_t hd = s.head_dim, qd = s.heads * hd, kd = s.kv_heads * hd, group = s.heads / s.kv_heads;
  std::fill(dq, dq + n * qd, T(0));
  std::fill(dk, dk + n * kd, T(0));
  std::fill(dv, dv + n * kd, T(0));
  std::vector<T> dp(static_cast<size_t>(n));
  for (int64_t h = 0; h < s.heads; ++h) {
    const int64_t kh = h / group;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j0 = s.window > 0 ? std::max<int64_t>(0, i - s.window + 1) : 0;
      const T* pr = p + (h * n + i) * n;
      const T* go = dout + i * qd + h * hd;
      T pdp = 0;  // Σ_j p_j dp_j
      for (int64_t j = j0; j <= i; ++j) {
        const T* vj = v + j * kd + kh * hd;
        T* dvj = dv + j * kd + kh * hd;
        T dot = 0;
        for (int64_t d = 0; d < hd; ++d) {
          dot += go[d] * vj[d];
          dvj[d] += pr[j] * go[d];
        }
        dp[size_t(j)] = dot;
        pdp += pr[j] * dot;
      }
      const T* qi = q + i * qd + h * hd;
      T* dqi = dq + i * qd + h * hd;
      for (int64_t j = j0; j <= i; ++j) {
        const T ds = pr[j] * (dp[size_t(j)] - pdp) * T(s.scale);
        const T* kj = k + j * kd + kh * hd;
        T* dkj = dk + j * kd + kh * hd;
        for (int64_t d = 0; d < hd; ++d) {
          dqi[d] += ds * kj[d];
          dkj[d] += ds * qi[d];
        }
      }
    }
  }
}

template <typename T>
void swiglu_forward(const T* g, const T* u, int64_t n, T* act) {
  for (int64_t i = 0; i < n; ++i) act[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
}

template <typename T>
void swiglu_backward(const T* g, const T* u, const T* dact, int64_t n, T* dg, T* du) {
  for (int64_t i = 0; i < n; ++i) {
    const T sig = T(1) / (T(1) + std::exp(-g[i]));
    du[i] = dact[i] * g[i] * sig;
    dg[i] = dact[i] * u[i] * sig * (T(1) + g[i] * (T(1) - sig));
  }
}

template <typename T>
void gating_forward(const ModelConfig& cfg, const T* logits, int64_t n, Gating<T>& g) {
  const int64_t e = cfg.num_experts, k = cfg.num_experts_per_tok;
  if (k <= 0 || k > e)
    throw Error("lora: num_experts_per_tok " + std::to_string(k) + " is not in 1.." + std::to_string(e));
  g.n = n, g.experts = e, g.k = k;
  g.p.resize(size_t(n * e));
  g.ids.resize(size_t(n * k));
  g.w.resize(size_t(n * k));
  const T temp = T(cfg.gating_temperature);
  std::vector<int32_t> order(static_cast<size_t>(e));
  for (int64_t r = 0; r < n; ++r) {
    T* p = g.p.data() + r * e;
    T mx = -INFINITY;
    for (int64_t i = 0; i < e; ++i) {
      const T bias = cfg.router_bias.empty() ? T(0) : T(cfg.router_bias[size_t(i)]);
      p[i] = (logits[r * e + i] + bias) / temp;
      mx = std::max(mx, p[i]);
    }
    double sum = 0.0;
    for (int64_t i = 0; i < e; ++i) sum += (p[i] = std::exp(p[i] - mx));
    const T inv = T(1.0 / sum);
    for (int64_t i = 0; i < e; ++i) p[i] *= inv;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int32_t a, int32_t b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
    T s = 0;
    for (int64_t j = 0; j < k; ++j) s += p[order[size_t(j)]];
    for (int64_t j = 0; j < k; ++j) {
      g.ids[size_t(r * k + j)] = order[size_t(j)];
      T w = p[order[size_t(j)]];
      if (cfg.arch == Arch::Mixtral) {
        w /= s;
      } else {
        if (cfg.norm_topk_prob && k > 1) w /= (s + T(1e-20));
        w *= T(cfg.routed_scaling_factor);
      }
      g.w[size_t(r * k + j)] = w;
    }
  }
}

template <typename T>
void gating_backward(const ModelConfig& cfg, const Gating<T>& g, const T* dw, T* dlogits) {
  const int64_t e = g.experts, k = g.k;
  std::vector<T> dsel(static_cast<size_t>(k));
  for (int64_t r = 0; r < g.n; ++r) {
    const T* p = g.p.data() + r * e;
    const int32_t* ids = g.ids.data() + r * k;
    const T* dwr = dw + r * k;
    T s = 0;
    for (int64_t j = 0; j < k; ++j) s += p[ids[j]];
    // d/dp of the selected probabilities.
    const bool mixtral = cfg.arch == Arch::Mixtral;
    const T rsf = mixtral ? T(1) : T(cfg.routed_scaling_factor);
    if (mixtral || (cfg.norm_topk_prob && k > 1)) {
      const T den = mixtral ? s : s + T(1e-20);  // w_j = p_j / den
      T cross = 0;
      for (int64_t j = 0; j < k; ++j) cross += rsf * dwr[j] * p[ids[j]];
      for (int64_t j = 0; j < k; ++j) dsel[size_t(j)] = rsf * dwr[j] / den - cross / (den * den);
    } else {
      for (int64_t j = 0; j < k; ++j) dsel[size_t(j)] = rsf * dwr[j];
    }
    // Softmax: dz_i = p_i (dp_i - Σ_j p_j dp_j), then the temperature.
    T pdp = 0;
    for (int64_t j = 0; j < k; ++j) pdp += p[ids[j]] * dsel[size_t(j)];
    T* dl = dlogits + r * e;
    for (int64_t i = 0; i < e; ++i) dl[i] = -p[i] * pdp;
    for (int64_t j = 0; j < k; ++j) dl[ids[j]] += p[ids[j]] * dsel[size_t(j)];
    const T inv_t = T(1.0 / cfg.gating_temperature);
    for (int64_t i = 0; i < e; ++i) dl[i] *= inv_t;
  }
}

template <typename T>
double cross_entropy(const T* logits, const int32_t* targets, int64_t n, int64_t vocab, T grad_scale, T* dlogits) {
  double loss = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    const T* z = logits + r * vocab;
    const int32_t t = targets[r];
    if (t < 0 || t >= vocab) throw Error("lora: target token " + std::to_string(t) + " outside the vocabulary");
    const T mx = *std::max_element(z, z + vocab);
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(z[i] - mx));
    const double lse = double(mx) + std::log(sum);
    loss += lse - double(z[t]);
    if (!dlogits) continue;
    T* d = dlogits + r * vocab;
    for (int64_t i = 0; i < vocab; ++i) d[i] = T(std::exp(double(z[i]) - lse)) * grad_scale;
    d[t] -= grad_scale;
  }
  return loss;
}

#define MOEMESH_LORA_OPS(T)                                                                                            \
  template void linear_forward<T>(const Linear<T>&, const T*, int64_t, T*, std::vector<T>&);                           \
  template void linear_backward<T>(const Linear<T>&, const T*, const T*, const T*, int64_t, T*, T*, T*);               \
  template void rmsnorm_forward<T>(const T*, const T*, int64_t, int64_t, double, T*, T*);                              \
  template void rmsnorm_backward<T>(const T*, const T*, const T*, const T*, int64_t, int64_t, T*);                     \
  template void rope<T>(T*, int64_t, int64_t, int64_t, const double*, double, bool);                                   \
  template void attention_forward<T>(const AttentionDims&, const T*, const T*, const T*, int64_t, T*,                  \
                                     std::vector<T>&);                                                                 \
  template void attention_backward<T>(const AttentionDims&, const T*, const T*, const T*, const T*, const T*, int64_t, \
                                      T*, T*, T*);                                                                     \
  template void swiglu_forward<T>(const T*, const T*, int64_t, T*);                                                    \
  template void swiglu_backward<T>(const T*, const T*, const T*, int64_t, T*, T*);                                     \
  template void gating_forward<T>(const ModelConfig&, const T*, int64_t, Gating<T>&);                                  \
  template void gating_backward<T>(const ModelConfig&, const Gating<T>&, const T*, T*);                                \
  template double cross_entropy<T>(const T*, const int32_t*, int64_t, int64_t, T, T*);

MOEMESH_LORA_OPS(float)
MOEMESH_LORA_OPS(double)
#undef MOEMESH_LORA_OPS

}  // namespace moemesh::lora_ops
