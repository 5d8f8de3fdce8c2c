// Attention over a paged f32 KV cache (layout and semantics: api.cuh). One block per (query row,
// query head), 4 warps splitting the attended tokens 32 at a time, online softmax in f32; the
// warps' partial (max, sum, acc) are merged at the end (flash-decoding within one block).
#include <algorithm>
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// kPerLane = ceil(head_dim / 32), as a template so the accumulator stays in registers.
template <int kPerLane>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(const float* __restrict__ q, const int32_t* __restrict__ row_seq,
                           const int32_t* __restrict__ row_pos,
                           const int32_t* __restrict__ block_tables, int n_seqs,
                           const float* __restrict__ k_cache, const float* __restrict__ v_cache,
                           float* __restrict__ out, int n_heads, int group, int n_kv_heads,
                           int head_dim, int num_blocks, int max_blocks_per_seq, float scale,
                           int sliding_window) {
  __shared__ __align__(16) float q_s[kMaxAttentionHeadDim];
  __shared__ float part_m[kWarps], part_l[kWarps];
  __shared__ float part_acc[kWarps][kMaxAttentionHeadDim];
  __shared__ int bad;

  const int row = blockIdx.x, h = blockIdx.y, kvh = h / group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t q_off = (size_t(row) * n_heads + h) * head_dim;
  const int seq = row_seq[row], pos = row_pos[row];

  if (threadIdx.x == 0) bad = seq < 0 || seq >= n_seqs || pos < 0 ||
                              pos >= max_blocks_per_seq * int(kKvBlockTokens);
  for (int d = threadIdx.x; d < head_dim; d += kThreads) q_s[d] = q[q_off + d];
  __syncthreads();
  if (bad) {
    for (int d = threadIdx.x; d < head_dim; d += kThreads) out[q_off + d] = __int_as_float(0x7fc00000);
    return;
  }

  const int32_t* table = block_tables + size_t(seq) * max_blocks_per_seq;
  const int start = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0;
  const size_t kv_stride = size_t(n_kv_heads) * head_dim;  // floats per token slot
  const float4* q4 = reinterpret_cast<const float4*>(q_s);

  float m = -INFINITY, l = 0.0f, acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) acc[j] = 0.0f;

  for (int base = start + warp * 32; base <= pos; base += kWarps * 32) {
    // Scores: lane i takes token base + i and reads its whole K row (16-byte loads).
    const int t = base + lane;
    int slot = -1;
    float s = -INFINITY;
    if (t <= pos) {
      const int blk = table[t / kKvBlockTokens];
      if (blk < 0 || blk >= num_blocks) {
        bad = 1;  // benign race: every writer stores 1
      } else {
        slot = blk * int(kKvBlockTokens) + t % int(kKvBlockTokens);
        const float4* k4 = reinterpret_cast<const float4*>(k_cache + slot * kv_stride + size_t(kvh) * head_dim);
        float dot = 0.0f;
        for (int d = 0; d < head_dim / 4; ++d) {
          const float4 a = q4[d], b = k4[d];
          dot += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
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
      const float* vrow = v_cache + si * kv_stride + size_t(kvh) * head_dim;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) acc[j] += pi * vrow[d];
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
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w) o += part_acc[w][d] * f[w];
    out[q_off + d] = bad ? __int_as_float(0x7fc00000) : o / L;
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

Status paged_attention(const PagedAttentionConfig& cfg, const float* q, int64_t rows,
                       const int32_t* row_seq, const int32_t* row_pos, const int32_t* block_tables,
                       int64_t n_seqs, const float* k_cache, const float* v_cache, float* out,
                       cudaStream_t stream) {
  MOEMESH_CUDA_RETURN_IF_ERROR(cfg.validate());
  MOEMESH_CUDA_REQUIRE_PTR(q);
  MOEMESH_CUDA_REQUIRE_PTR(row_seq);
  MOEMESH_CUDA_REQUIRE_PTR(row_pos);
  MOEMESH_CUDA_REQUIRE_PTR(block_tables);
  MOEMESH_CUDA_REQUIRE_PTR(k_cache);
  MOEMESH_CUDA_REQUIRE_PTR(v_cache);
  MOEMESH_CUDA_REQUIRE_PTR(out);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n_seqs);
  MOEMESH_CUDA_REQUIRE_INT(n_seqs);
  const dim3 grid{unsigned(rows), unsigned(cfg.n_heads)};
  const int per_lane = int((cfg.head_dim + 31) / 32);
  auto launch = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(
        q, row_seq, row_pos, block_tables, int(n_seqs), k_cache, v_cache, out, int(cfg.n_heads),
        int(cfg.n_heads / cfg.n_kv_heads), int(cfg.n_kv_heads), int(cfg.head_dim),
        int(cfg.num_blocks), int(cfg.max_blocks_per_seq), cfg.scale, int(cfg.sliding_window));
  };
  if (per_lane <= 1) launch(paged_attention_kernel<1>);
  else if (per_lane <= 2) launch(paged_attention_kernel<2>);
  else if (per_lane <= 4) launch(paged_attention_kernel<4>);
  else launch(paged_attention_kernel<8>);
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

}  // namespace moemesh::cuda
