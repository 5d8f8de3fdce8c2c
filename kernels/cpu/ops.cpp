#include "kernels/cpu/ops.h"

#include "core/error.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_block.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace moemesh::cpu {
namespace {

// Half -> float through one 64K-entry table, built once: exact for every bit pattern and
// cheaper than converting bit by bit (embedding rows, norm weights).
const float* f16_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = f16_to_f32(uint16_t(i));
    return t;
  }();
  return table.data();
}

// Widens n elements of a float-typed buffer to f32.
void widen(DType t, const void* src, float* dst, int64_t n) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case DType::F16: {
      const float* table = f16_table();
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
    case DType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    default:
      throw Error("cpu kernels: weights must be F32, F16 or BF16 (got dtype code " + std::to_string(int(t)) + ")");
  }
}

}  // namespace

void rmsnorm(const float* x, const void* weight, DType wdtype, int64_t rows, int64_t dim, double eps, float* y) {
  std::vector<float> wf(static_cast<size_t>(dim));
  widen(wdtype, weight, wf.data(), dim);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double ss = 0.0;
    for (int64_t i = 0; i < dim; ++i) ss += double(xr[i]) * double(xr[i]);
    // HF: normalise in f32, then multiply by the weight.
    const float inv = float(1.0 / std::sqrt(ss / double(dim) + eps));
    for (int64_t i = 0; i < dim; ++i) yr[i] = wf[size_t(i)] * (xr[i] * inv);
  }
}

void rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, const int32_t* positions, const double* inv_freq,
          double attention_factor) {
  const int64_t half = head_dim / 2;
  std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < half; ++i) {
      const double a = double(positions[r]) * inv_freq[i];
      cs[size_t(i)] = float(std::cos(a) * attention_factor);
      sn[size_t(i)] = float(std::sin(a) * attention_factor);
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + (r * n_heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        v[i] = a * cs[size_t(i)] - b * sn[size_t(i)];
        v[i + half] = b * cs[size_t(i)] + a * sn[size_t(i)];
      }
    }
  }
}

void rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, const int32_t* positions, double theta) {
  const int64_t half = head_dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) inv_freq[size_t(i)] = 1.0 / std::pow(theta, double(2 * i) / double(head_dim));
  rope(x, rows, n_heads, head_dim, positions, inv_freq.data(), 1.0);
}

void silu_mul(const float* gate, const float* up, int64_t rows, int64_t n, float* out) {
  const int64_t total = rows * n;
  for (int64_t i = 0; i < total; ++i) {
    out[i] = silu(gate[i]) * up[i];
  }
}

void softmax(float* x, int64_t rows, int64_t n, float temperature) {
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      xr[i] /= temperature;
      mx = std::max(mx, xr[i]);
    }
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      xr[i] = std::exp(xr[i] - mx);
      sum += xr[i];
    }
    const float inv = float(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) xr[i] *= inv;
  }
}

double log_sum_exp(const float* x, int64_t n, float scale) {
  constexpr int64_t kChunk = 2048;
  alignas(64) float chunk[kChunk];  // the tile kernel works in place
  const SoftmaxTileFn tile = gemm_kernels_for(active_isa()).softmax;
  float m = -INFINITY;
  double sum = 0;
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t len = std::min(kChunk, n - i);
    std::memcpy(chunk, x + i, size_t(len) * sizeof(float));
    const float before = m;
    const float part = tile(chunk, len, 0, len, scale, m);  // m becomes the running max
    if (!std::isfinite(m)) continue;                        // all -inf so far
    if (m > before && sum > 0) sum *= std::exp(double(before) - double(m));
    sum += double(part);
  }
  if (!std::isfinite(m)) return m;
  return double(m) + std::log(sum);
}

void topk_gating(const float* logits, int64_t rows, int64_t n_experts, int64_t k, float temperature, bool renormalize,
                 int32_t* ids, float* weights) {
  std::vector<float> p(static_cast<size_t>(n_experts));
  std::vector<int32_t> order(static_cast<size_t>(n_experts));
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(logits + r * n_experts, logits + (r + 1) * n_experts, p.begin());
    softmax(p.data(), 1, n_experts, temperature);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return p[size_t(a)] != p[size_t(b)] ? p[size_t(a)] > p[size_t(b)] : a < b;
    });
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += p[size_t(order[size_t(j)])];
    for (int64_t j = 0; j < k; ++j) {
      ids[r * k + j] = order[size_t(j)];
      weights[r * k + j] = renormalize ? p[size_t(order[size_t(j)])] / sum : p[size_t(order[size_t(j)])];
    }
  }
}

void embedding(const void* table, DType dtype, int64_t dim, const int32_t* ids, int64_t n, float* out) {
  const auto* base = static_cast<const uint8_t*>(table);
  const size_t es = dtype_size(dtype);
  for (int64_t i = 0; i < n; ++i) widen(dtype, base + size_t(ids[i]) * size_t(dim) * es, out + i * dim, dim);
}

}  // namespace moemesh::cpu
