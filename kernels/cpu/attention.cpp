#include "kernels/cpu/attention.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/gemm_block.h"
#include "kernels/cpu/thread_pool.h"

namespace moemesh::cpu {

namespace {

// A kv head's keys and values block by block, as f32 rows: an F32 cache's rows in place, an INT8
// cache's dequantized (integer times its (token, head) scale) into the caller's buffer.
struct KvSlice {
  const PagedKV& kv;
  int64_t kv_dim, hd, kv_heads;
  // Rows [j0, j0 + n) of kv head kvh (one cache block), `kv_dim` floats apart, or hd when copied.
  const float* keys(int64_t j0, int64_t n, int64_t kvh, std::vector<float>& buf, int64_t& ld) const {
    return rows(kv.k_blocks, kv.k_q, kv.k_scale, j0, n, kvh, buf, ld);
  }
  const float* values(int64_t j0, int64_t n, int64_t kvh, std::vector<float>& buf, int64_t& ld) const {
    return rows(kv.v_blocks, kv.v_q, kv.v_scale, j0, n, kvh, buf, ld);
  }
  const float* rows(const float* const* f32, const int8_t* const* q, const float* const* scale, int64_t j0, int64_t n,
                    int64_t kvh, std::vector<float>& buf, int64_t& ld) const {
    const int64_t b = j0 / kv.block_size, t0 = j0 % kv.block_size;
    if (f32) {
      ld = kv_dim;
      return f32[b] + t0 * kv_dim + kvh * hd;
    }
    ld = hd;
    buf.resize(size_t(n * hd));
    for (int64_t t = 0; t < n; ++t) {
      const int8_t* r = q[b] + (t0 + t) * kv_dim + kvh * hd;
      const float sc = scale[b][(t0 + t) * kv_heads + kvh];
      for (int64_t d = 0; d < hd; ++d) buf[size_t(t * hd + d)] = sc * float(r[d]);
    }
    return buf.data();
  }
};

// Scores in this many floats per task at most: bounds the query rows of a task at long context.
constexpr int64_t kScoreBudget = 1 << 20;
constexpr int64_t kMaxQueryRows = 16;

// A task is (a block of query rows, a kv head): its query vectors (rows × the heads sharing that
// kv head) are the rows of two small matrix products per cache block, Q·Kᵀ for the scores and
// P·V for the outputs, run by the same register tiles as the weight products (gemm_block.h), so
// each key and value row is loaded once per task rather than once per query head.
void attend(const float* q, int64_t n_q, const int32_t* q_pos, const AttentionShape& s, const KvSlice& kv, float* out) {
  const int64_t group = s.n_heads / s.n_kv_heads, hd = s.head_dim, bs = kv.kv.block_size;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  int32_t max_pos = 0;
  for (int64_t r = 0; r < n_q; ++r) max_pos = std::max(max_pos, q_pos[r]);
  const int64_t rows_per_task =
      std::clamp<int64_t>(kScoreBudget / std::max<int64_t>(1, group * (int64_t(max_pos) + 1)), 1, kMaxQueryRows);
  const int64_t row_blocks = (n_q + rows_per_task - 1) / rows_per_task;
  const GemmBlockFn product = gemm_kernels_for(active_isa()).block;
  parallel_for(row_blocks * s.n_kv_heads, [&](int64_t task) {
    const int64_t r0 = (task / s.n_kv_heads) * rows_per_task, r1 = std::min(n_q, r0 + rows_per_task);
    const int64_t kvh = task % s.n_kv_heads, nv = (r1 - r0) * group;
    int64_t lo = INT64_MAX, hi = 0;  // the keys any of the rows sees
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t pos = q_pos[r];
      lo = std::min(lo, s.sliding_window > 0 ? std::max<int64_t>(0, pos - s.sliding_window + 1) : 0);
      hi = std::max(hi, pos + 1);
    }
    const int64_t nk = hi - lo;
    thread_local std::vector<const float*> qv, pv;
    thread_local std::vector<float> scores, kbuf, vbuf, vt, part;
    qv.resize(size_t(nv));
    pv.resize(size_t(nv));
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < group; ++g) qv[size_t((r - r0) * group + g)] = q + (r * s.n_heads + kvh * group + g) * hd;
    scores.resize(size_t(nv * nk));
    for (int64_t j0 = lo; j0 < hi; j0 = (j0 / bs + 1) * bs) {
      const int64_t n = std::min(hi, (j0 / bs + 1) * bs) - j0;
      int64_t ld = 0;
      const float* k = kv.keys(j0, n, kvh, kbuf, ld);
      product(k, DType::F32, hd, ld, qv.data(), nv, n, scores.data() + (j0 - lo), nk);
    }
    // Softmax per query vector over the keys its row may see (the rest get probability 0).
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t pos = q_pos[r0 + v / group];
      const int64_t first = s.sliding_window > 0 ? std::max<int64_t>(0, pos - s.sliding_window + 1) : 0;
      float* sv = scores.data() + v * nk;
      float mx = -INFINITY;
      for (int64_t j = first; j <= pos; ++j) mx = std::max(mx, sv[j - lo] *= scale);
      double sum = 0.0;
      for (int64_t j = first; j <= pos; ++j) sum += sv[j - lo] = std::exp(sv[j - lo] - mx);
      const float inv = float(1.0 / sum);
      for (int64_t j = lo; j < hi; ++j) sv[j - lo] = (j >= first && j <= pos) ? sv[j - lo] * inv : 0.0f;
      pv[size_t(v)] = sv;
      std::fill(out + (r0 + v / group) * s.n_heads * hd + (kvh * group + v % group) * hd,
                out + (r0 + v / group) * s.n_heads * hd + (kvh * group + v % group + 1) * hd, 0.0f);
    }
    // out += P[:, block] · V[block]: V's slice transposed, so that its rows are the output dims.
    part.resize(size_t(nv * hd));
    for (int64_t j0 = lo; j0 < hi; j0 = (j0 / bs + 1) * bs) {
      const int64_t n = std::min(hi, (j0 / bs + 1) * bs) - j0;
      int64_t ld = 0;
      const float* v = kv.values(j0, n, kvh, vbuf, ld);
      vt.resize(size_t(hd * n));
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < hd; ++d) vt[size_t(d * n + t)] = v[t * ld + d];
      for (int64_t i = 0; i < nv; ++i) pv[size_t(i)] = scores.data() + i * nk + (j0 - lo);
      product(vt.data(), DType::F32, n, n, pv.data(), nv, hd, part.data(), hd);
      for (int64_t i = 0; i < nv; ++i) {
        float* o = out + (r0 + i / group) * s.n_heads * hd + (kvh * group + i % group) * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] += part[size_t(i * hd + d)];
      }
    }
  });
}

}  // namespace

void paged_attention(const float* q, int64_t n_q, const int32_t* q_pos, const AttentionShape& s, const PagedKV& kv,
                     float* out) {
  if (s.n_kv_heads <= 0 || s.n_heads % s.n_kv_heads != 0)
    throw Error("attention: n_heads (" + std::to_string(s.n_heads) + ") is not a multiple of n_kv_heads (" +
                std::to_string(s.n_kv_heads) + ")");
  if (!kv.k_blocks && (!kv.k_q || !kv.v_q || !kv.k_scale || !kv.v_scale))
    throw Error("attention: the KV view has neither f32 nor complete INT8 block pointers");
  if (n_q == 0) return;
  attend(q, n_q, q_pos, s, KvSlice{kv, s.n_kv_heads * s.head_dim, s.head_dim, s.n_kv_heads}, out);
}

}  // namespace moemesh::cpu
