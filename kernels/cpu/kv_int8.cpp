#include "kernels/cpu/kv_int8.h"

#include <algorithm>
#include <cmath>

namespace moemesh::cpu {

void quantize_kv_int8(const float* x, int64_t n_rows, int64_t kv_heads, int64_t head_dim, int8_t* q,
                      float* scales) {
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float* xh = x + (r * kv_heads + h) * head_dim;
      int8_t* qh = q + (r * kv_heads + h) * head_dim;
      float amax = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(xh[d]));
      const float scale = amax / 127.0f;
      scales[r * kv_heads + h] = scale;
      // Multiplying by the reciprocal would round differently from the CUDA kernel's division.
      for (int64_t d = 0; d < head_dim; ++d)
        qh[d] = scale > 0.0f ? int8_t(std::clamp(std::nearbyint(xh[d] / scale), -127.0f, 127.0f)) : int8_t(0);
    }
}

void dequantize_kv_int8(const int8_t* q, const float* scales, int64_t n_rows, int64_t kv_heads, int64_t head_dim,
                        float* x) {
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float scale = scales[r * kv_heads + h];
      const int64_t off = (r * kv_heads + h) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) x[off + d] = float(q[off + d]) * scale;
    }
}

}  // namespace moemesh::cpu
