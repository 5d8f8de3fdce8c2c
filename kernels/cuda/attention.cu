// Attention over a paged KV cache, f32 or INT8 (layout and semantics: api.cuh). One block per
// (query row, query head), 4 warps splitting the attended tokens 32 at a time, online softmax in
// f32; the warps' partial (max, sum, acc) are merged at the end (flash-decoding within one block).
// Split-K (PagedAttentionConfig::kv_splits > 1): grid z splits each row's attended tokens further,
// every block writes its (max, sum, unnormalised acc) to the workspace and a second kernel merges
// the splits by log-sum-exp, so a few decode rows over a long context fill the whole GPU.
// The cache type is a template parameter (F32Cache / Int8Cache): one kernel body for both.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// f32 rows: K dot products with 16-byte loads.
struct F32Cache {
  const float* __restrict__ k;
  const float* __restrict__ v;
  __device__ __forceinline__ float k_dot(const float4* q4, size_t off, int slot_head, int head_dim) const {
    (void)slot_head;
    const float4* k4 = reinterpret_cast<const float4*>(k + off);
    float dot = 0.0f;
    for (int d = 0; d < head_dim / 4; ++d) {
      const float4 a = q4[d], b = k4[d];
      dot += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
    }
    return dot;
  }
  __device__ __forceinline__ float v_scale(int slot_head) const {
    (void)slot_head;
    return 1.0f;
  }
  __device__ __forceinline__ float v_at(size_t off) const { return v[off]; }
};

// INT8 rows: 4-byte loads of 4 values, the (token, head) scale applied once per dot product.
struct Int8Cache {
  const int8_t* __restrict__ k;
  const int8_t* __restrict__ v;
  const float* __restrict__ ks;
  const float* __restrict__ vs;
  __device__ __forceinline__ float k_dot(const float4* q4, size_t off, int slot_head, int head_dim) const {
    const char4* k4 = reinterpret_cast<const char4*>(k + off);
    float dot = 0.0f;
    for (int d = 0; d < head_dim / 4; ++d) {
      const float4 a = q4[d];
      const char4 b = k4[d];
      dot += a.x * float(b.x) + a.y * float(b.y) + a.z * float(b.z) + a.w * float(b.w);
    }
    return dot * ks[slot_head];
  }
  __device__ __forceinline__ float v_scale(int slot_head) const { return vs[slot_head]; }
  __device__ __forceinline__ float v_at(size_t off) const { return float(v[off]); }
};

// kPerLane = ceil(head_dim / 32), as a template so the accumulator stays in registers.
template <int kPerLane, class Cache>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(const float* __restrict__ q, const int32_t* __restrict__ row_seq,
                           const int32_t* __restrict__ row_pos, const int32_t* __restrict__ block_tables, int n_seqs,
                           Cache cache, float* __restrict__ out, int n_heads, int group, int n_kv_heads, int head_dim,
                           int num_blocks, int max_blocks_per_seq, float scale, int sliding_window, int splits,
                           float* __restrict__ partials) {
  __shared__ __align__(16) float q_s[kMaxAttentionHeadDim];
  __shared__ float part_m[kWarps], part_l[kWarps];
  __shared__ float part_acc[kWarps][kMaxAttentionHeadDim];
  __shared__ int bad, bad_block;  // bad: read once after the first sync, never written after it

  const int row = blockIdx.x, h = blockIdx.y, kvh = h / group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t q_off = (size_t(row) * n_heads + h) * head_dim;
  const int seq = row_seq[row], pos = row_pos[row];

  if (threadIdx.x == 0) {
    bad = seq < 0 || seq >= n_seqs || pos < 0 || pos >= max_blocks_per_seq * int(kKvBlockTokens);
    bad_block = 0;
  }
  for (int d = threadIdx.x; d < head_dim; d += kThreads) q_s[d] = q[q_off + d];
  __syncthreads();
  if (bad) {
    for (int d = threadIdx.x; d < head_dim; d += kThreads) out[q_off + d] = __int_as_float(0x7fc00000);
    if (splits > 1 && threadIdx.x == 0) {  // the merge must keep the NaN
      float* p = partials + ((size_t(row) * n_heads + h) * splits + blockIdx.z) * (head_dim + 2);
      p[0] = 0.0f, p[1] = __int_as_float(0x7fc00000);
    }
    return;
  }

  const int32_t* table = block_tables + size_t(seq) * max_blocks_per_seq;
  const int first = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0;
  // This split's share of [first, pos]: whole chunks of 32 tokens.
  const int split = blockIdx.z, span = pos - first + 1;
  const int chunk = ((span + splits - 1) / splits + 31) / 32 * 32;
  const int start = first + split * chunk, last = min(pos, start + chunk - 1);
  const size_t kv_stride = size_t(n_kv_heads) * head_dim;  // floats per token slot
  const float4* q4 = reinterpret_cast<const float4*>(q_s);

  float m = -INFINITY, l = 0.0f, acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) acc[j] = 0.0f;

  for (int base = start + warp * 32; base <= last; base += kWarps * 32) {
    // Scores: lane i takes token base + i and reads its whole K row (16-byte loads).
    const int t = base + lane;
    int slot = -1;
    float s = -INFINITY;
    if (t <= last) {
      const int blk = table[t / kKvBlockTokens];
      if (blk < 0 || blk >= num_blocks) {
        bad_block = 1;  // every writer stores 1; read only after the merge's __syncthreads
      } else {
        slot = blk * int(kKvBlockTokens) + t % int(kKvBlockTokens);
        const float dot =
            cache.k_dot(q4, slot * kv_stride + size_t(kvh) * head_dim, slot * n_kv_heads + kvh, head_dim);
        s = dot * scale;
      }
    }
    // Online softmax update for these 32 tokens.
    const float m_new = fmaxf(m, detail::warp_max(s));
    if (m_new == -INFINITY) continue;  // nothing valid in this chunk (only with bad blocks)
    const float corr = expf(m - m_new);  // 0 on the first chunk (m = -inf)
    const float p = slot >= 0 ? expf(s - m_new) : 0.0f;
    l = l * corr + detail::warp_sum(p);
    m = m_new;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[j] *= corr;
    // Values: the warp walks the 32 tokens, lanes spread over head_dim (coalesced rows).
    for (int i = 0; i < 32; ++i) {
      const int si = __shfl_sync(0xffffffffu, slot, i);
      const float pi = __shfl_sync(0xffffffffu, p, i);
      if (si < 0) continue;  // uniform across the warp
      const size_t vrow = si * kv_stride + size_t(kvh) * head_dim;
      const float pv = pi * cache.v_scale(si * n_kv_heads + kvh);  // f32: pi * 1.0f == pi
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) acc[j] += pv * cache.v_at(vrow + d);
      }
    }
  }

  // Merge the warps: out = sum_w acc_w e^(m_w - M) / sum_w l_w e^(m_w - M).
  if (lane == 0) part_m[warp] = m, part_l[warp] = l;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int d = lane + 32 * j;
    if (d < head_dim) part_acc[warp][d] = acc[j];
  }
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, part_m[w]);
  float L = 0.0f;
  float f[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    f[w] = part_m[w] == -INFINITY ? 0.0f : expf(part_m[w] - M);
    L += part_l[w] * f[w];
  }
  if (splits == 1) {
    for (int d = threadIdx.x; d < head_dim; d += kThreads) {
      float o = 0.0f;
      for (int w = 0; w < kWarps; ++w) o += part_acc[w][d] * f[w];
      out[q_off + d] = bad_block ? __int_as_float(0x7fc00000) : o / L;
    }
    return;
  }
  // Split-K: (M, L, acc) of this split; an empty split has M = -inf, L = 0.
  float* p = partials + ((size_t(row) * n_heads + h) * splits + split) * (head_dim + 2);
  if (threadIdx.x == 0) p[0] = M, p[1] = bad_block ? __int_as_float(0x7fc00000) : L;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w) o += part_acc[w][d] * f[w];
    p[2 + d] = o;
  }
}

// One block per (row, head): out = Σ_s acc_s e^(M_s - M) / Σ_s L_s e^(M_s - M). A NaN L (bad
// block) propagates to the output.
__global__ void merge_splits_kernel(const float* __restrict__ partials, int splits, int head_dim,
                                    float* __restrict__ out) {
  const size_t rh = size_t(blockIdx.x);
  const float* base = partials + rh * splits * (head_dim + 2);
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, base[s * (head_dim + 2)]);
  float L = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float m = base[s * (head_dim + 2)];
    if (m != -INFINITY) L += base[s * (head_dim + 2) + 1] * expf(m - M);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float m = base[s * (head_dim + 2)];
      if (m != -INFINITY) o += base[s * (head_dim + 2) + 2 + d] * expf(m - M);
    }
    out[rh * head_dim + d] = o / L;
  }
}

__global__ void paged_kv_write_kernel(const float* __restrict__ k, const float* __restrict__ v,
                                      const int32_t* __restrict__ slots, int row_floats,
                                      int64_t n_slots, float* __restrict__ k_cache,
                                      float* __restrict__ v_cache) {
  const int32_t slot = slots[blockIdx.x];
  if (slot < 0 || slot >= n_slots) return;  // padding row, or out of the cache: skipped
  const size_t src = size_t(blockIdx.x) * row_floats, dst = size_t(slot) * row_floats;
  for (int i = threadIdx.x; i < row_floats; i += blockDim.x) {
    k_cache[dst + i] = k[src + i];
    v_cache[dst + i] = v[src + i];
  }
}

// One warp per (row, kv head): the head's max |x| over the warp, then each lane quantises its
// values (round half to even, as std::nearbyint on the CPU).
__global__ void paged_kv_write_int8_kernel(const float* __restrict__ k, const float* __restrict__ v,
                                           const int32_t* __restrict__ slots, int n_kv_heads, int head_dim,
                                           int64_t n_slots, Int8KvCache cache) {
  const int32_t slot = slots[blockIdx.x];
  if (slot < 0 || slot >= n_slots) return;
  const int h = blockIdx.y, lane = threadIdx.x;
  const size_t src = (size_t(blockIdx.x) * n_kv_heads + h) * head_dim;
  const size_t dst = (size_t(slot) * n_kv_heads + h) * head_dim;
  for (int which = 0; which < 2; ++which) {
    const float* x = (which == 0 ? k : v) + src;
    int8_t* qd = (which == 0 ? cache.k_q : cache.v_q) + dst;
    float amax = 0.0f;
    for (int d = lane; d < head_dim; d += 32) amax = fmaxf(amax, fabsf(x[d]));
    amax = detail::warp_max(amax);
    const float s = amax / 127.0f;
    if (lane == 0) (which == 0 ? cache.k_scale : cache.v_scale)[size_t(slot) * n_kv_heads + h] = s;
    for (int d = lane; d < head_dim; d += 32)
      qd[d] = s > 0.0f ? int8_t(fminf(fmaxf(rintf(x[d] / s), -127.0f), 127.0f)) : int8_t(0);
  }
}

}  // namespace

Status PagedAttentionConfig::validate() const {
  MOEMESH_CUDA_REQUIRE_POSITIVE(n_heads);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n_kv_heads);
  MOEMESH_CUDA_REQUIRE(n_heads <= 65535, "n_heads > 65535 (grid y limit)");
  MOEMESH_CUDA_REQUIRE(n_heads % n_kv_heads == 0,
                       "n_heads (" + std::to_string(n_heads) + ") must be a multiple of n_kv_heads (" +
                           std::to_string(n_kv_heads) + ")");
  MOEMESH_CUDA_REQUIRE(head_dim > 0 && head_dim <= kMaxAttentionHeadDim && head_dim % 4 == 0,
                       "head_dim must be a multiple of 4 in [4, " +
                           std::to_string(kMaxAttentionHeadDim) + "] (got " +
                           std::to_string(head_dim) + ")");
  MOEMESH_CUDA_REQUIRE_POSITIVE(num_blocks);
  MOEMESH_CUDA_REQUIRE(num_blocks <= INT_MAX / kKvBlockTokens,
                       "num_blocks too large: slots must fit in int32");
  MOEMESH_CUDA_REQUIRE_POSITIVE(max_blocks_per_seq);
  MOEMESH_CUDA_REQUIRE(max_blocks_per_seq <= INT_MAX / kKvBlockTokens,
                       "max_blocks_per_seq too large: positions must fit in int32");
  MOEMESH_CUDA_REQUIRE(std::isfinite(scale) && scale > 0.0f, "scale must be finite and > 0");
  MOEMESH_CUDA_REQUIRE(sliding_window >= 0 && sliding_window <= INT_MAX,
                       "sliding_window must be in [0, INT_MAX] (0: none)");
  MOEMESH_CUDA_REQUIRE(
      kv_splits >= 1 && kv_splits <= kMaxKvSplits,
      "kv_splits must be in [1, " + std::to_string(kMaxKvSplits) + "] (got " + std::to_string(kv_splits) + ")");
  return {};
}

Status paged_kv_write(const PagedAttentionConfig& cfg, const float* k, const float* v, int64_t rows,
                      const int32_t* slots, float* k_cache, float* v_cache, cudaStream_t stream) {
  MOEMESH_CUDA_RETURN_IF_ERROR(cfg.validate());
  MOEMESH_CUDA_REQUIRE_PTR(k);
  MOEMESH_CUDA_REQUIRE_PTR(v);
  MOEMESH_CUDA_REQUIRE_PTR(slots);
  MOEMESH_CUDA_REQUIRE_PTR(k_cache);
  MOEMESH_CUDA_REQUIRE_PTR(v_cache);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  const int row_floats = int(cfg.kv_row_floats());
  const int threads = std::min(256, (row_floats + 31) / 32 * 32);
  paged_kv_write_kernel<<<unsigned(rows), threads, 0, stream>>>(
      k, v, slots, row_floats, cfg.num_blocks * kKvBlockTokens, k_cache, v_cache);
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

namespace {

// Shared checks and launch of paged_attention_kernel for either cache type.
template <class Cache>
Status launch_paged_attention(const PagedAttentionConfig& cfg, const float* q, int64_t rows, const int32_t* row_seq,
                              const int32_t* row_pos, const int32_t* block_tables, int64_t n_seqs, Cache cache,
                              float* out, float* workspace, cudaStream_t stream) {
  MOEMESH_CUDA_RETURN_IF_ERROR(cfg.validate());
  MOEMESH_CUDA_REQUIRE_PTR(q);
  MOEMESH_CUDA_REQUIRE_PTR(row_seq);
  MOEMESH_CUDA_REQUIRE_PTR(row_pos);
  MOEMESH_CUDA_REQUIRE_PTR(block_tables);
  MOEMESH_CUDA_REQUIRE_PTR(out);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n_seqs);
  MOEMESH_CUDA_REQUIRE_INT(n_seqs);
  if (cfg.kv_splits > 1) MOEMESH_CUDA_REQUIRE(workspace != nullptr, "kv_splits > 1 needs a workspace");
  const dim3 grid{unsigned(rows), unsigned(cfg.n_heads), unsigned(cfg.kv_splits)};
  const int per_lane = int((cfg.head_dim + 31) / 32);
  auto launch = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(q, row_seq, row_pos, block_tables, int(n_seqs), cache, out, int(cfg.n_heads),
                                          int(cfg.n_heads / cfg.n_kv_heads), int(cfg.n_kv_heads), int(cfg.head_dim),
                                          int(cfg.num_blocks), int(cfg.max_blocks_per_seq), cfg.scale,
                                          int(cfg.sliding_window), int(cfg.kv_splits), workspace);
  };
  if (per_lane <= 1) launch(paged_attention_kernel<1, Cache>);
  else if (per_lane <= 2) launch(paged_attention_kernel<2, Cache>);
  else if (per_lane <= 4) launch(paged_attention_kernel<4, Cache>);
  else launch(paged_attention_kernel<8, Cache>);
  MOEMESH_CUDA_CHECK_LAUNCH();
  if (cfg.kv_splits > 1) {
    merge_splits_kernel<<<unsigned(rows * cfg.n_heads), 64, 0, stream>>>(workspace, int(cfg.kv_splits),
                                                                         int(cfg.head_dim), out);
    MOEMESH_CUDA_CHECK_LAUNCH();
  }
  return {};
}

}  // namespace

Status paged_attention(const PagedAttentionConfig& cfg, const float* q, int64_t rows, const int32_t* row_seq,
                       const int32_t* row_pos, const int32_t* block_tables, int64_t n_seqs, const float* k_cache,
                       const float* v_cache, float* out, cudaStream_t stream, float* workspace) {
  MOEMESH_CUDA_REQUIRE_PTR(k_cache);
  MOEMESH_CUDA_REQUIRE_PTR(v_cache);
  return launch_paged_attention(cfg, q, rows, row_seq, row_pos, block_tables, n_seqs, F32Cache{k_cache, v_cache}, out,
                                workspace, stream);
}

Status paged_attention_int8(const PagedAttentionConfig& cfg, const float* q, int64_t rows, const int32_t* row_seq,
                            const int32_t* row_pos, const int32_t* block_tables, int64_t n_seqs,
                            const Int8KvCache& cache, float* out, cudaStream_t stream, float* workspace) {
  MOEMESH_CUDA_REQUIRE_PTR(cache.k_q);
  MOEMESH_CUDA_REQUIRE_PTR(cache.v_q);
  MOEMESH_CUDA_REQUIRE_PTR(cache.k_scale);
  MOEMESH_CUDA_REQUIRE_PTR(cache.v_scale);
  return launch_paged_attention(cfg, q, rows, row_seq, row_pos, block_tables, n_seqs,
                                Int8Cache{cache.k_q, cache.v_q, cache.k_scale, cache.v_scale}, out, workspace, stream);
}

Status paged_kv_write_int8(const PagedAttentionConfig& cfg, const float* k, const float* v, int64_t rows,
                           const int32_t* slots, const Int8KvCache& cache, cudaStream_t stream) {
  MOEMESH_CUDA_RETURN_IF_ERROR(cfg.validate());
  MOEMESH_CUDA_REQUIRE_PTR(k);
  MOEMESH_CUDA_REQUIRE_PTR(v);
  MOEMESH_CUDA_REQUIRE_PTR(slots);
  MOEMESH_CUDA_REQUIRE_PTR(cache.k_q);
  MOEMESH_CUDA_REQUIRE_PTR(cache.v_q);
  MOEMESH_CUDA_REQUIRE_PTR(cache.k_scale);
  MOEMESH_CUDA_REQUIRE_PTR(cache.v_scale);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  const dim3 grid{unsigned(rows), unsigned(cfg.n_kv_heads)};
  paged_kv_write_int8_kernel<<<grid, 32, 0, stream>>>(k, v, slots, int(cfg.n_kv_heads), int(cfg.head_dim),
                                                      cfg.num_blocks * kKvBlockTokens, cache);
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

}  // namespace moemesh::cuda
