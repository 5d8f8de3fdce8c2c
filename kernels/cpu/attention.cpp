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

constexpr int64_t kMaxQueryRows = 16;
// Keys per tile: a task's scores are [its query vectors, one tile], whatever the context length.
constexpr int64_t kKeyTile = 512;
// Split-K: a split covers at least this many keys (fewer make the merge cost more than it saves).
constexpr int64_t kMinSplitKeys = 1024;
// Query vectors per task from which scores are formed with the keys as columns (see attend).
constexpr int64_t kColumnScoresMinVectors = 8;

// The first key a query at `pos` sees.
inline int64_t first_key(int64_t pos, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
}

// A task is (a block of query rows, a kv head, a split of the keys those rows see): its query
// vectors (rows × the heads sharing that kv head) are the rows of two small matrix products per
// cache block, Q·Kᵀ for the scores and P·V for the outputs, run by the same register tiles as the
// weight products (gemm_block.h), so each key and value row is loaded once per task rather than
// once per query head. Keys go tile by tile (kKeyTile) with an online softmax: a running max m,
// sum l and unnormalised output acc per query vector, rescaled when the max grows (flash
// attention), so a prefill tile needs scores for one key tile only. With one split the task
// writes acc / l; with several (split-K / flash-decoding: decode rows over a long context would
// otherwise be n_kv_heads tasks) each writes (m, l, acc) and a second pass merges them by
// log-sum-exp: out = Σ_s acc_s e^(m_s - M) / Σ_s l_s e^(m_s - M), M = max_s m_s.
void attend(const float* q, int64_t n_q, const int32_t* q_pos, const AttentionShape& s, const KvSlice& kv, float* out) {
  const int64_t group = s.n_heads / s.n_kv_heads, hd = s.head_dim, bs = kv.kv.block_size;
  const float scale = float(s.scale > 0 ? s.scale : 1.0 / std::sqrt(double(hd)));
  const int64_t rows_per_task = std::min<int64_t>(n_q, kMaxQueryRows);
  const int64_t row_blocks = (n_q + rows_per_task - 1) / rows_per_task;
  // The keys each row block sees: [lo, hi).
  std::vector<int64_t> lo(size_t(row_blocks), INT64_MAX), hi(size_t(row_blocks), 0);
  int64_t widest = 0;
  for (int64_t r = 0; r < n_q; ++r) {
    const int64_t b = r / rows_per_task;
    lo[size_t(b)] = std::min(lo[size_t(b)], first_key(q_pos[r], s.sliding_window));
    hi[size_t(b)] = std::max<int64_t>(hi[size_t(b)], int64_t(q_pos[r]) + 1);
  }
  for (int64_t b = 0; b < row_blocks; ++b) widest = std::max(widest, hi[size_t(b)] - lo[size_t(b)]);
  // Splits: enough tasks for every thread of the pool (twice over, for balance), each split at
  // least kMinSplitKeys keys; s.kv_splits > 0 sets the number (tests).
  int64_t splits = 1;
  if (s.kv_splits > 0) {
    splits = s.kv_splits;
  } else {
    const int64_t tasks = row_blocks * s.n_kv_heads, want = 2 * int64_t(compute_threads());
    if (tasks < want) splits = std::min((want + tasks - 1) / tasks, widest / kMinSplitKeys);
  }
  splits = std::max<int64_t>(1, std::min(splits, std::max<int64_t>(1, widest)));
  const int64_t nv_max = rows_per_task * group;
  // Split partials: [row_block][kvh][split] × nv_max × (m, l, acc[hd]).
  const int64_t part_stride = hd + 2;
  std::vector<float> partials;
  if (splits > 1) partials.assign(size_t(row_blocks * s.n_kv_heads * splits * nv_max * part_stride), 0.0f);
  const GemmKernels kernels = gemm_kernels_for(active_isa());
  const GemmBlockFn product = kernels.block;
  // Scores as dot products (a key row against each query vector: one horizontal sum per score)
  // or, for many query vectors, with the keys of the tile transposed into lanes (no horizontal
  // sums, at the price of transposing the tile once per task). Both give the same bits, so a
  // query's scores do not depend on how many rows share its step.
  const bool keys_as_columns = nv_max >= kColumnScoresMinVectors;
  const int64_t hdp = (hd + 15) / 16 * 16;  // a query vector and a key zero-padded for those tiles

  parallel_for(row_blocks * s.n_kv_heads * splits, [&](int64_t task) {
    const int64_t split = task % splits, kvh = (task / splits) % s.n_kv_heads, rb = task / splits / s.n_kv_heads;
    const int64_t r0 = rb * rows_per_task, r1 = std::min(n_q, r0 + rows_per_task), nv = (r1 - r0) * group;
    // This split's keys: an even share of [lo, hi), in whole cache blocks.
    const int64_t blo = lo[size_t(rb)] / bs, bhi = (hi[size_t(rb)] + bs - 1) / bs, nb = bhi - blo;
    const int64_t k0 = std::max(lo[size_t(rb)], (blo + nb * split / splits) * bs);
    const int64_t k1 = std::min(hi[size_t(rb)], (blo + nb * (split + 1) / splits) * bs);
    thread_local std::vector<const float*> qv, pv, qpad;
    thread_local std::vector<float> scores, kbuf, kt, qbuf, vbuf, vt, part, m, l, acc;
    qv.resize(size_t(nv));
    pv.resize(size_t(nv));
    m.assign(size_t(nv), -INFINITY);
    l.assign(size_t(nv), 0.0f);
    acc.assign(size_t(nv * hd), 0.0f);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < group; ++g) qv[size_t((r - r0) * group + g)] = q + (r * s.n_heads + kvh * group + g) * hd;
    if (keys_as_columns) {
      qbuf.assign(size_t(nv * hdp), 0.0f);
      qpad.resize(size_t(nv));
      for (int64_t v = 0; v < nv; ++v) {
        std::copy_n(qv[size_t(v)], hd, qbuf.data() + v * hdp);
        qpad[size_t(v)] = qbuf.data() + v * hdp;
      }
    }
    for (int64_t t0 = k0; t0 < k1;) {
      // A tile: up to kKeyTile keys, ending on a cache block boundary (or at k1).
      const int64_t t1 = std::min(k1, (t0 / bs + std::max<int64_t>(1, kKeyTile / bs)) * bs), nt = t1 - t0;
      scores.resize(size_t(nv * nt));
      const int64_t ntp = (nt + 15) / 16 * 16;
      if (keys_as_columns) {
        // The keys below overwrite columns 0..nt of rows 0..hd: only the padding needs zeros.
        kt.resize(size_t(hdp * ntp));
        std::fill(kt.begin() + hd * ntp, kt.end(), 0.0f);
        for (int64_t d = 0; d < hd; ++d) std::fill(kt.begin() + d * ntp + nt, kt.begin() + (d + 1) * ntp, 0.0f);
      }
      for (int64_t j0 = t0; j0 < t1; j0 = (j0 / bs + 1) * bs) {
        const int64_t n = std::min(t1, (j0 / bs + 1) * bs) - j0;
        int64_t ld = 0;
        const float* k = kv.keys(j0, n, kvh, kbuf, ld);
        if (!keys_as_columns) {
          product(k, DType::F32, hd, ld, qv.data(), nv, n, scores.data() + (j0 - t0), nt);
          continue;
        }
        for (int64_t t = 0; t < n; ++t)
          for (int64_t d = 0; d < hd; ++d) kt[size_t(d * ntp + (j0 - t0) + t)] = k[t * ld + d];
      }
      if (keys_as_columns) kernels.dots_transposed(kt.data(), hd, ntp, qpad.data(), nv, nt, scores.data(), nt);
      // Online softmax per query vector over the keys of this tile its row may see.
      bool any = false;
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t pos = q_pos[r0 + v / group];
        const int64_t a = std::max(t0, first_key(pos, s.sliding_window)), b = std::min(t1, pos + 1);
        float* sv = scores.data() + v * nt;
        pv[size_t(v)] = sv;
        if (a >= b) {  // nothing visible here: probability 0 for the whole tile
          std::fill(sv, sv + nt, 0.0f);
          continue;
        }
        any = true;
        const float before = m[size_t(v)];
        const float sum = kernels.softmax(sv, nt, a - t0, b - t0, scale, m[size_t(v)]);
        const float corr = std::exp(before - m[size_t(v)]);  // 0 on the first visible tile
        l[size_t(v)] = l[size_t(v)] * corr + sum;
        float* o = acc.data() + v * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] *= corr;
      }
      if (any) {
        // acc += P[:, block] · V[block]: V's slice transposed, so that its rows are the output dims.
        part.resize(size_t(nv * hd));
        for (int64_t j0 = t0; j0 < t1; j0 = (j0 / bs + 1) * bs) {
          const int64_t n = std::min(t1, (j0 / bs + 1) * bs) - j0;
          int64_t ld = 0;
          const float* v = kv.values(j0, n, kvh, vbuf, ld);
          vt.resize(size_t(hd * n));
          for (int64_t t = 0; t < n; ++t)
            for (int64_t d = 0; d < hd; ++d) vt[size_t(d * n + t)] = v[t * ld + d];
          for (int64_t i = 0; i < nv; ++i) pv[size_t(i)] = scores.data() + i * nt + (j0 - t0);
          product(vt.data(), DType::F32, n, n, pv.data(), nv, hd, part.data(), hd);
          for (int64_t i = 0; i < nv * hd; ++i) acc[size_t(i)] += part[size_t(i)];
        }
      }
      t0 = t1;
    }
    for (int64_t v = 0; v < nv; ++v) {
      const float* o = acc.data() + v * hd;
      if (splits == 1) {
        float* dst = out + (r0 + v / group) * s.n_heads * hd + (kvh * group + v % group) * hd;
        const float inv = l[size_t(v)] > 0 ? 1.0f / l[size_t(v)] : 0.0f;
        for (int64_t d = 0; d < hd; ++d) dst[d] = o[d] * inv;
      } else {
        float* p = partials.data() + ((task * nv_max) + v) * part_stride;
        p[0] = m[size_t(v)];
        p[1] = l[size_t(v)];
        std::copy_n(o, hd, p + 2);
      }
    }
  });
  if (splits == 1) return;
  // Merge the splits of each (row, head) by log-sum-exp.
  parallel_for(n_q * s.n_kv_heads, [&](int64_t i) {
    const int64_t r = i / s.n_kv_heads, kvh = i % s.n_kv_heads, rb = r / rows_per_task;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t v = (r - rb * rows_per_task) * group + g;
      auto at = [&](int64_t split) {
        return partials.data() + (((rb * s.n_kv_heads + kvh) * splits + split) * nv_max + v) * part_stride;
      };
      float M = -INFINITY;
      for (int64_t sp = 0; sp < splits; ++sp) M = std::max(M, at(sp)[0]);
      float* dst = out + r * s.n_heads * hd + (kvh * group + g) * hd;
      std::fill(dst, dst + hd, 0.0f);
      float L = 0.0f;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float* p = at(sp);
        if (p[0] == -INFINITY) continue;  // this split saw none of the row's keys
        const float f = std::exp(p[0] - M);
        L += p[1] * f;
        for (int64_t d = 0; d < hd; ++d) dst[d] += p[2 + d] * f;
      }
      const float inv = L > 0 ? 1.0f / L : 0.0f;
      for (int64_t d = 0; d < hd; ++d) dst[d] *= inv;
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
