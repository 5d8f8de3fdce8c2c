// The attention every CPU/GPU kernel is checked against: softmax(q·kᵀ / sqrt(head_dim)) · v in
// double, causal, with an optional sliding window, one loop per (query row, head).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace moemesh::testing {

// q [rows, heads, hd] at positions pos[rows]; k, v [positions, kv_heads, hd] row-major; query
// head h reads kv head h / (heads / kv_heads); a query at p sees keys (p - window, p] (0: all <= p).
inline std::vector<double> naive_attention(const std::vector<float>& q, const std::vector<int32_t>& pos, int64_t heads,
                                           int64_t kv_heads, int64_t hd, int64_t window, const std::vector<float>& k,
                                           const std::vector<float>& v) {
  const int64_t kv_dim = kv_heads * hd, n_q = int64_t(pos.size());
  std::vector<double> out(size_t(n_q * heads * hd));
  std::vector<double> s;
  for (int64_t i = 0; i < n_q; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t g = h / (heads / kv_heads), p = pos[size_t(i)];
      const int64_t first = window ? std::max<int64_t>(0, p - window + 1) : 0;
      s.clear();
      for (int64_t j = first; j <= p; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < hd; ++d)
          dot += double(q[size_t((i * heads + h) * hd + d)]) * k[size_t(j * kv_dim + g * hd + d)];
        s.push_back(dot / std::sqrt(double(hd)));
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double z = 0;
      for (auto& e : s) z += (e = std::exp(e - mx));
      for (int64_t d = 0; d < hd; ++d) {
        double acc = 0;
        for (int64_t j = first; j <= p; ++j) acc += s[size_t(j - first)] / z * v[size_t(j * kv_dim + g * hd + d)];
        out[size_t((i * heads + h) * hd + d)] = acc;
      }
    }
  return out;
}

}  // namespace moemesh::testing
