// The expert path's row movement: gather the rows each expert computes into one expert-ordered
// block in the weights' dtype (the grouped GEMM's input), and widen results back to f32.
#include <algorithm>

#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {
namespace {

template <typename T>
__global__ void widen_kernel(const T* __restrict__ in, float* __restrict__ out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = detail::to_f32(in[i]);
}

}  // namespace

Status gather_rows(const float* x, int64_t x_rows, int64_t dim, const int32_t* index, int64_t n, void* out,
                   DType out_dtype, cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(x);
  MOEMESH_CUDA_REQUIRE_PTR(index);
  MOEMESH_CUDA_REQUIRE_PTR(out);
  MOEMESH_CUDA_REQUIRE_POSITIVE(x_rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(dim);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n);
  MOEMESH_CUDA_REQUIRE_INT(dim);
  MOEMESH_CUDA_REQUIRE(n <= INT_MAX, "n too large (" + std::to_string(n) + ")");
  MOEMESH_CUDA_REQUIRE_FLOAT_DTYPE(out_dtype);
  const int threads = int(std::min<int64_t>(256, (dim + 31) / 32 * 32));
  detail::dispatch_float(out_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    detail::gather_rows_kernel<float, T><<<unsigned(n), threads, 0, stream>>>(x, x_rows, int(dim), index,
                                                                         static_cast<T*>(out));
  });
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

Status widen_to_f32(const void* in, DType dtype, int64_t n, float* out, cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(in);
  MOEMESH_CUDA_REQUIRE_PTR(out);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n);
  MOEMESH_CUDA_REQUIRE_FLOAT_DTYPE(dtype);
  constexpr int kThreads = 256;
  const unsigned blocks = unsigned(std::min<int64_t>(detail::blocks_for(n, kThreads), 65536));
  detail::dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    widen_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(in), out, n);
  });
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

}  // namespace moemesh::cuda
