#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/thread_pool.h"

namespace moemesh::cpu {

namespace {

// Σ a[d]·b[d] over eight interleaved partial sums (which the compiler keeps in vector registers),
// combined pairwise.
template <class B>
float dot(const float* a, const B* b, int64_t n) {
  float acc[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[d + l] * float(b[d + l]);
  float tail = 0.0f;
  for (; d < n; ++d) tail += a[d] * float(b[d]);
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// Reads K/V rows of an f32 cache.
struct F32Rows {
  const PagedKV& kv;
  int64_t kv_dim, hd;
  float dot(const float* qh, int64_t j, int64_t kvh) const {
    return cpu::dot(qh, kv.k_blocks[j / kv.block_size] + (j % kv.block_size) * kv_dim + kvh * hd, hd);
  }
  void add_value(float* oh, float p, int64_t j, int64_t kvh) const {
    const float* vr = kv.v_blocks[j / kv.block_size] + (j % kv.block_size) * kv_dim + kvh * hd;
    for (int64_t d = 0; d < hd; ++d) oh[d] += p * vr[d];
  }
};

// Reads K/V rows of an INT8 cache: integer row times its (token, head) scale.
struct Int8Rows {
  const PagedKV& kv;
  int64_t kv_dim, hd, kv_heads;
  float dot(const float* qh, int64_t j, int64_t kvh) const {
    const int64_t b = j / kv.block_size, t = j % kv.block_size;
    return cpu::dot(qh, kv.k_q[b] + t * kv_dim + kvh * hd, hd) * kv.k_scale[b][t * kv_heads + kvh];
  }
  void add_value(float* oh, float p, int64_t j, int64_t kvh) const {
    const int64_t b = j / kv.block_size, t = j % kv.block_size;
    const int8_t* vr = kv.v_q[b] + t * kv_dim + kvh * hd;
    const float ps = p * kv.v_scale[b][t * kv_heads + kvh];
    for (int64_t d = 0; d < hd; ++d) oh[d] += ps * float(vr[d]);
  }
};

// Every (query, head) pair is independent: they are the tasks spread over the compute pool.
template <class Rows>
void attend(const float* q, int64_t n_q, const int32_t* q_pos, const AttentionShape& s, const Rows& rows,
            float* out) {
  const int64_t group = s.n_heads / s.n_kv_heads;
  const int64_t hd = s.head_dim;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  parallel_for(n_q * s.n_heads, [&](int64_t task) {
    const int64_t r = task / s.n_heads, h = task % s.n_heads;
    const int64_t pos = q_pos[r];
    const int64_t first = s.sliding_window > 0 ? std::max<int64_t>(0, pos - s.sliding_window + 1) : 0;
    thread_local std::vector<float> scores;
    scores.resize(size_t(pos - first + 1));
    const int64_t kvh = h / group;
    const float* qh = q + (r * s.n_heads + h) * hd;
    float mx = -INFINITY;
    for (int64_t j = first; j <= pos; ++j) {
      const float sc = rows.dot(qh, j, kvh) * scale;
      scores[size_t(j - first)] = sc;
      mx = std::max(mx, sc);
    }
    double sum = 0.0;
    for (auto& sc : scores) {
      sc = std::exp(sc - mx);
      sum += sc;
    }
    const float inv = float(1.0 / sum);
    float* oh = out + (r * s.n_heads + h) * hd;
    std::fill(oh, oh + hd, 0.0f);
    for (int64_t j = first; j <= pos; ++j) rows.add_value(oh, scores[size_t(j - first)] * inv, j, kvh);
  });
}

}  // namespace

void paged_attention(const float* q, int64_t n_q, const int32_t* q_pos, const AttentionShape& s,
                     const PagedKV& kv, float* out) {
  if (s.n_kv_heads <= 0 || s.n_heads % s.n_kv_heads != 0)
    throw Error("attention: n_heads (" + std::to_string(s.n_heads) + ") is not a multiple of n_kv_heads (" +
                std::to_string(s.n_kv_heads) + ")");
  const int64_t kv_dim = s.n_kv_heads * s.head_dim;
  if (kv.k_blocks) {
    attend(q, n_q, q_pos, s, F32Rows{kv, kv_dim, s.head_dim}, out);
  } else {
    if (!kv.k_q || !kv.v_q || !kv.k_scale || !kv.v_scale)
      throw Error("attention: the KV view has neither f32 nor complete INT8 block pointers");
    attend(q, n_q, q_pos, s, Int8Rows{kv, kv_dim, s.head_dim, s.n_kv_heads}, out);
  }
}

}  // namespace moemesh::cpu
