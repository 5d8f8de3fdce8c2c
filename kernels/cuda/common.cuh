// Private helpers shared by the .cu files of the CUDA backend (not part of the API surface).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <string>

#include "kernels/cuda/api.cuh"

namespace moemesh::cuda::detail {

// ---- argument checks (host): each returns a Status naming the argument and the caller's line.

#define MOEMESH_CUDA_REQUIRE(cond, msg) \
  do {                                  \
    if (!(cond)) return MOEMESH_CUDA_ERROR(std::string(__func__) + ": " + (msg)); \
  } while (0)
#define MOEMESH_CUDA_REQUIRE_PTR(p) MOEMESH_CUDA_REQUIRE((p) != nullptr, #p " is null")
#define MOEMESH_CUDA_REQUIRE_POSITIVE(n) \
  MOEMESH_CUDA_REQUIRE((n) > 0, #n " must be > 0 (got " + std::to_string(n) + ")")
// Grid dimensions and per-row indices are 32-bit in the kernels.
#define MOEMESH_CUDA_REQUIRE_INT(n) \
  MOEMESH_CUDA_REQUIRE((n) <= INT_MAX, #n " too large (" + std::to_string(n) + " > INT_MAX)")
#define MOEMESH_CUDA_REQUIRE_FLOAT_DTYPE(t)                                         \
  MOEMESH_CUDA_REQUIRE((t) == DType::F32 || (t) == DType::F16 || (t) == DType::BF16, \
                       std::string(#t " must be F32, F16 or BF16 (got ") +          \
                           std::string(dtype_name(t)) + ")")
// After a launch: launch-configuration errors surface here, with this line.
#define MOEMESH_CUDA_CHECK_LAUNCH() MOEMESH_CUDA_TRY(cudaGetLastError())

// ---- device helpers

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// out[b] = rows index[b] of src[n_src, dim], converted from S to D; one block per output row. An
// index outside [0, n_src) gives a row of NaN: loud, never an out-of-bounds read (indices live on
// the device). The embedding lookup and the experts' row gather.
template <typename S, typename D>
__global__ void gather_rows_kernel(const S* __restrict__ src, int64_t n_src, int dim, const int32_t* __restrict__ index,
                                   D* __restrict__ out) {
  const int32_t r = index[blockIdx.x];
  D* o = out + size_t(blockIdx.x) * dim;
  if (r < 0 || r >= n_src) {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = from_f32<D>(__int_as_float(0x7fc00000));
    return;
  }
  const S* row = src + size_t(r) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = from_f32<D>(to_f32(row[i]));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : 0.0f;
  return warp_sum(v);
}

// Calls f(Type<T>{}) with T the C++ type of a float dtype (checked beforehand); inside a generic
// lambda, `using T = typename decltype(tag)::type;` (C++17: nvcc here builds .cu files as C++17).
template <typename T>
struct Type {
  using type = T;
};
template <typename F>
void dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::F16: f(Type<__half>{}); break;
    case DType::BF16: f(Type<__nv_bfloat16>{}); break;
    default: f(Type<float>{}); break;
  }
}

inline unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace moemesh::cuda::detail
