// What a sampler needs of each row of logits, computed where the logits are (core/logits_summary.h
// is the host reference): the k largest (value descending, ties lowest id), the log-normalisers at
// temperature 1 and at the row's temperature, and the logits of watched ids. One block per row;
// the k largest are found by k block-wide arg-max passes, each over the values strictly after the
// previous pick in (value desc, id asc) order, so nothing is written to the logits.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {
namespace {

constexpr int kThreads = 256;

// (v, id) better than (bv, bid): larger value, ties the lower id. NaN is never better.
__device__ __forceinline__ bool better(float v, int id, float bv, int bid) { return v > bv || (v == bv && id < bid); }
// Strictly after (pv, pid) in the order: smaller value, or the same value with a larger id.
__device__ __forceinline__ bool after(float v, int id, float pv, int pid) { return v < pv || (v == pv && id > pid); }

// The block's best (v, id); every thread gets it.
__device__ void block_best(float& v, int& id) {
  __shared__ float vs[32];
  __shared__ int ids[32];
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oid = __shfl_xor_sync(0xffffffffu, id, o);
    if (better(ov, oid, v, id)) v = ov, id = oid;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // vs/ids may still be read by the previous call
  if (lane == 0) vs[warp] = v, ids[warp] = id;
  __syncthreads();
  v = lane < warps ? vs[lane] : -INFINITY;
  id = lane < warps ? ids[lane] : INT_MAX;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oid = __shfl_xor_sync(0xffffffffu, id, o);
    if (better(ov, oid, v, id)) v = ov, id = oid;
  }
}

__global__ void __launch_bounds__(kThreads)
    summary_kernel(const float* __restrict__ logits, int vocab, int k, const float* __restrict__ temperature,
                   const int32_t* __restrict__ watch_ids, const int32_t* __restrict__ watch_offsets,
                   int32_t* __restrict__ top_ids, float* __restrict__ top_values, float* __restrict__ lse,
                   float* __restrict__ lse_scaled, float* __restrict__ watch_values) {
  const int row = blockIdx.x;
  const float* x = logits + size_t(row) * vocab;

  // Normalisers: max, then Σ exp(x - max) and Σ exp((x - max) / t).
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, x[i]);
  int unused = 0;
  block_best(mx, unused);
  const float t = temperature[row] > 0.0f ? temperature[row] : 1.0f;
  float s1 = 0.0f, st = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    s1 += expf(x[i] - mx);
    st += expf((x[i] - mx) / t);
  }
  s1 = detail::block_sum(s1);
  st = detail::block_sum(st);
  if (threadIdx.x == 0) {  // an infinite maximum is its own log-sum (as the host reference says)
    lse[row] = isfinite(mx) ? mx + logf(s1) : mx;
    lse_scaled[row] = isfinite(mx) ? mx / t + logf(st) : mx / t;
  }

  // The k largest, one block-wide pass each.
  float pv = INFINITY;
  int pid = -1;
  for (int pass = 0; pass < k; ++pass) {
    float bv = -INFINITY;
    int bid = INT_MAX;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
      if (after(x[i], i, pv, pid) && better(x[i], i, bv, bid)) bv = x[i], bid = i;
    block_best(bv, bid);
    if (threadIdx.x == 0) {
      top_ids[size_t(row) * k + pass] = bid == INT_MAX ? -1 : bid;  // -1: only NaN left
      top_values[size_t(row) * k + pass] = bv;
    }
    pv = bv;
    pid = bid;
  }

  for (int j = watch_offsets[row] + threadIdx.x; j < watch_offsets[row + 1]; j += blockDim.x) {
    const int32_t id = watch_ids[j];
    watch_values[j] = id >= 0 && id < vocab ? x[id] : -INFINITY;
  }
}

}  // namespace

Status logits_summary(const float* logits, int64_t rows, int64_t vocab, int64_t k, const float* temperature,
                      const int32_t* watch_ids, const int32_t* watch_offsets, int32_t* top_ids, float* top_values,
                      float* lse, float* lse_scaled, float* watch_values, cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(logits);
  MOEMESH_CUDA_REQUIRE_PTR(temperature);
  MOEMESH_CUDA_REQUIRE_PTR(watch_offsets);
  MOEMESH_CUDA_REQUIRE_PTR(top_ids);
  MOEMESH_CUDA_REQUIRE_PTR(top_values);
  MOEMESH_CUDA_REQUIRE_PTR(lse);
  MOEMESH_CUDA_REQUIRE_PTR(lse_scaled);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(vocab);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  MOEMESH_CUDA_REQUIRE_INT(vocab);
  MOEMESH_CUDA_REQUIRE(k >= 1 && k <= std::min(vocab, kMaxSummaryTopK),
                       "k must be in [1, min(vocab, " + std::to_string(kMaxSummaryTopK) + ")] (got " +
                           std::to_string(k) + ")");
  summary_kernel<<<unsigned(rows), kThreads, 0, stream>>>(logits, int(vocab), int(k), temperature, watch_ids,
                                                           watch_offsets, top_ids, top_values, lse, lse_scaled,
                                                           watch_values);
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

}  // namespace moemesh::cuda
