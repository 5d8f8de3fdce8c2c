// MoE gating: softmax(logits / temperature), top-k with ties to the lower expert id, optional
// renormalisation. One warp per row; the row's probabilities live in shared memory.
#include <climits>
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // one warp each

// (weight, id) ordering used for the selection: larger weight first, then lower id.
// A NaN weight ranks below every real one (but above already-taken slots, marked -1).
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia < ib);
}

__global__ void topk_gating_kernel(const float* __restrict__ logits, int rows, int n, int k,
                                   float temperature, bool renormalize, int32_t* __restrict__ ids,
                                   float* __restrict__ weights) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kRowsPerBlock + warp;
  if (row >= rows) return;  // whole warps leave together: the shuffles below stay full-warp
  float* p = smem + size_t(warp) * n;
  const float* l = logits + size_t(row) * n;

  // Softmax, same order of operations as the CPU reference: divide, subtract max, exp, normalise.
  float m = -INFINITY;
  for (int i = lane; i < n; i += 32) {
    const float v = l[i] / temperature;
    p[i] = v;
    m = fmaxf(m, v);
  }
  m = detail::warp_max(m);
  float s = 0.0f;
  for (int i = lane; i < n; i += 32) {
    const float e = expf(p[i] - m);
    p[i] = e;
    s += e;
  }
  s = detail::warp_sum(s);
  for (int i = lane; i < n; i += 32) p[i] /= s;
  __syncwarp();

  // k rounds of warp argmax; each lane scans its experts in increasing id order, so a strict '>'
  // keeps the lower id among equal weights; the shuffle reduction breaks ties by id as well.
  int32_t* row_ids = ids + size_t(row) * k;
  float* row_w = weights + size_t(row) * k;
  float chosen_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    float best = -2.0f;
    int best_id = INT_MAX;
    for (int i = lane; i < n; i += 32) {
      float v = p[i];
      if (v != v) v = -0.5f;  // NaN: rank it low but still selectable
      if (v > best) best = v, best_id = i;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (better(ob, oi, best, best_id)) best = ob, best_id = oi;
    }
    const float w = p[best_id];  // the real weight (NaN stays NaN)
    __syncwarp();
    if (lane == 0) {
      row_ids[j] = best_id;
      row_w[j] = w;
      p[best_id] = -1.0f;  // taken
    }
    __syncwarp();
    chosen_sum += w;  // in selection order (descending), like the reference
  }
  if (renormalize) {
    for (int j = lane; j < k; j += 32) row_w[j] /= chosen_sum;
  }
}

}  // namespace

Status topk_gating(const float* logits, int64_t rows, int64_t n_experts, int64_t k,
                   float temperature, bool renormalize, int32_t* ids, float* weights,
                   cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(logits);
  MOEMESH_CUDA_REQUIRE_PTR(ids);
  MOEMESH_CUDA_REQUIRE_PTR(weights);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n_experts);
  MOEMESH_CUDA_REQUIRE(n_experts <= kMaxGatingExperts,
                       "n_experts " + std::to_string(n_experts) + " > " +
                           std::to_string(kMaxGatingExperts));
  MOEMESH_CUDA_REQUIRE(k >= 1 && k <= n_experts,
                       "k must be in [1, n_experts] (got " + std::to_string(k) + ")");
  MOEMESH_CUDA_REQUIRE(temperature > 0.0f && std::isfinite(temperature),
                       "temperature must be finite and > 0");
  const unsigned blocks = detail::blocks_for(rows, kRowsPerBlock);
  const size_t smem = size_t(kRowsPerBlock) * size_t(n_experts) * sizeof(float);  // <= 32 KiB
  topk_gating_kernel<<<blocks, kRowsPerBlock * 32, smem, stream>>>(
      logits, int(rows), int(n_experts), int(k), temperature, renormalize, ids, weights);
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

}  // namespace moemesh::cuda
