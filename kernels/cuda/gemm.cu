// y = x · W^T through cublasGemmEx with f32 accumulation. cuBLAS wants both inputs in one type,
// so with a 16-bit W the activations are first rounded to W's type (a small, memory-bound pass).
// INT4/INT8 weights (QuantWeight): a warp-per-output GEMV for decode, dequantize + cuBLAS above.
#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {
namespace {

template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = detail::from_f32<T>(src[i]);
}

// Value k (in the padded order) of row `row` of m, dequantized.
__device__ __forceinline__ float quant_value(const QuantWeight& m, int64_t o, int64_t k) {
  const int64_t row_bytes = m.padded_in * m.bits / 8;
  const uint8_t* row = m.q + o * row_bytes;
  int code;
  if (m.bits == 8) {
    code = row[k];
  } else {
    const uint8_t b = row[(k / 32) * 16 + (k % 32) % 16];
    code = (k % 32) < 16 ? (b & 0x0F) : (b >> 4);
  }
  const int64_t g = m.group_of[k];
  return float(code) * m.scale[o * m.groups + g] - m.scaled_zero[o * m.groups + g];
}

// One warp per (output o, x row r); lanes stride the padded positions, then reduce.
__global__ void quant_gemv_kernel(const float* __restrict__ x, int64_t rows, QuantWeight m, float* __restrict__ y) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= m.out * rows) return;
  const int64_t o = warp % m.out, r = warp / m.out;
  const float* xr = x + r * m.in;
  float acc = 0.0f;
  for (int64_t k = lane; k < m.padded_in; k += 32) {
    const int32_t c = m.source[k];
    if (c >= 0) acc = fmaf(quant_value(m, o, k), xr[c], acc);
  }
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) y[r * m.out + o] = acc;
}

// w[out, in] (f32, HF layout) = dequantized m.
__global__ void quant_dequantize_kernel(QuantWeight m, float* __restrict__ w) {
  const int64_t n = m.out * m.padded_in;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i / m.padded_in, k = i % m.padded_in;
    const int32_t c = m.source[k];
    if (c >= 0) w[o * m.in + c] = quant_value(m, o, k);
  }
}

Status check_quant(const QuantWeight& m) {
  MOEMESH_CUDA_REQUIRE(m.bits == 4 || m.bits == 8, "quantized weight of " + std::to_string(m.bits) + " bits");
  MOEMESH_CUDA_REQUIRE_PTR(m.q);
  MOEMESH_CUDA_REQUIRE_PTR(m.scale);
  MOEMESH_CUDA_REQUIRE_PTR(m.scaled_zero);
  MOEMESH_CUDA_REQUIRE_PTR(m.group_of);
  MOEMESH_CUDA_REQUIRE_PTR(m.source);
  MOEMESH_CUDA_REQUIRE_POSITIVE(m.out);
  MOEMESH_CUDA_REQUIRE_POSITIVE(m.in);
  MOEMESH_CUDA_REQUIRE_POSITIVE(m.groups);
  MOEMESH_CUDA_REQUIRE(m.padded_in >= m.in && m.padded_in % 32 == 0,
                       "padded_in " + std::to_string(m.padded_in) + " for in " + std::to_string(m.in));
  MOEMESH_CUDA_REQUIRE_INT(m.out);
  MOEMESH_CUDA_REQUIRE_INT(m.in);
  return {};
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F16: return CUDA_R_16F;
    case DType::BF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

}  // namespace

size_t matmul_workspace_bytes(int64_t rows, int64_t in, DType wdtype) {
  if (wdtype != DType::F16 && wdtype != DType::BF16) return 0;
  if (rows <= 0 || in <= 0) return 0;
  return size_t(rows) * size_t(in) * 2;
}

Status matmul(cublasHandle_t blas, const float* x, int64_t rows, int64_t in, const void* w,
              DType wdtype, int64_t out, float* y, void* workspace, size_t workspace_bytes,
              cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(blas);
  MOEMESH_CUDA_REQUIRE_PTR(x);
  MOEMESH_CUDA_REQUIRE_PTR(w);
  MOEMESH_CUDA_REQUIRE_PTR(y);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(in);
  MOEMESH_CUDA_REQUIRE_POSITIVE(out);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  MOEMESH_CUDA_REQUIRE_INT(in);
  MOEMESH_CUDA_REQUIRE_INT(out);
  MOEMESH_CUDA_REQUIRE_FLOAT_DTYPE(wdtype);
  const size_t need = matmul_workspace_bytes(rows, in, wdtype);
  MOEMESH_CUDA_REQUIRE(workspace_bytes >= need && (need == 0 || workspace != nullptr),
                       "workspace of " + std::to_string(workspace_bytes) + " bytes at " +
                           (workspace ? "non-null" : "null") + " pointer; need " +
                           std::to_string(need) + " (matmul_workspace_bytes)");

  const void* b = x;
  if (need > 0) {
    const int64_t n = rows * in;
    constexpr int kThreads = 256;
    const unsigned blocks = unsigned(std::min<int64_t>(detail::blocks_for(n, kThreads), 65536));
    if (wdtype == DType::F16)
      convert_kernel<<<blocks, kThreads, 0, stream>>>(x, static_cast<__half*>(workspace), n);
    else
      convert_kernel<<<blocks, kThreads, 0, stream>>>(x, static_cast<__nv_bfloat16*>(workspace), n);
    MOEMESH_CUDA_CHECK_LAUNCH();
    b = workspace;
  }

  // Row-major y[rows, out] is column-major y^T[out, rows] = W[out, in] · x^T, where W (row-major
  // [out, in]) reads as column-major [in, out] (op T) and x as column-major [in, rows] (op N).
  const cudaDataType_t t = cuda_type(wdtype);
  const float alpha = 1.0f, beta = 0.0f;
  MOEMESH_CUBLAS_TRY(cublasSetStream(blas, stream));
  MOEMESH_CUBLAS_TRY(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(out), int(rows), int(in),
                                  &alpha, w, t, int(in), b, t, int(in), &beta, y, CUDA_R_32F,
                                  int(out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return {};
}

Status grouped_matmul(cublasHandle_t blas, int64_t groups, const int64_t* rows, int64_t in, int64_t out,
                      const void* const* x, const void* const* w, void* const* y, DType dtype,
                      void** device_pointers, cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(blas);
  MOEMESH_CUDA_REQUIRE_PTR(rows);
  MOEMESH_CUDA_REQUIRE_PTR(x);
  MOEMESH_CUDA_REQUIRE_PTR(w);
  MOEMESH_CUDA_REQUIRE_PTR(y);
  MOEMESH_CUDA_REQUIRE_PTR(device_pointers);
  MOEMESH_CUDA_REQUIRE_POSITIVE(groups);
  MOEMESH_CUDA_REQUIRE_POSITIVE(in);
  MOEMESH_CUDA_REQUIRE_POSITIVE(out);
  MOEMESH_CUDA_REQUIRE_INT(groups);
  MOEMESH_CUDA_REQUIRE_INT(in);
  MOEMESH_CUDA_REQUIRE_INT(out);
  MOEMESH_CUDA_REQUIRE_FLOAT_DTYPE(dtype);
  const size_t g = size_t(groups);
  // The problem descriptions are host arrays; the matrix pointers must be on the device.
  std::vector<cublasOperation_t> op_w(g, CUBLAS_OP_T), op_x(g, CUBLAS_OP_N);
  std::vector<int> m(g, int(out)), n(g), k(g, int(in)), ld_w(g, int(in)), ld_x(g, int(in)), ld_y(g, int(out)),
      size(g, 1);
  std::vector<float> alpha(g, 1.0f), beta(g, 0.0f);
  std::vector<const void*> pointers(3 * g);
  for (size_t i = 0; i < g; ++i) {
    MOEMESH_CUDA_REQUIRE(rows[i] > 0 && rows[i] <= INT_MAX,
                         "group " + std::to_string(i) + " has " + std::to_string(rows[i]) + " rows");
    MOEMESH_CUDA_REQUIRE(x[i] && w[i] && y[i], "group " + std::to_string(i) + " has a null matrix");
    n[i] = int(rows[i]);
    pointers[i] = w[i];
    pointers[g + i] = x[i];
    pointers[2 * g + i] = y[i];
  }
  // Pageable source: the copy is staged before cudaMemcpyAsync returns, so `pointers` may go.
  MOEMESH_CUDA_TRY(cudaMemcpyAsync(device_pointers, pointers.data(), pointers.size() * sizeof(void*),
                                   cudaMemcpyHostToDevice, stream));
  const void* const* d = device_pointers;
  // Per group, as matmul(): column-major y^T[out, rows] = W[out, in] (op T) · x^T[in, rows] (op N).
  const cudaDataType_t t = cuda_type(dtype);
  MOEMESH_CUBLAS_TRY(cublasSetStream(blas, stream));
  MOEMESH_CUBLAS_TRY(cublasGemmGroupedBatchedEx(blas, op_w.data(), op_x.data(), m.data(), n.data(), k.data(),
                                                alpha.data(), d, t, ld_w.data(), d + g, t, ld_x.data(), beta.data(),
                                                device_pointers + 2 * g, t, ld_y.data(), int(groups), size.data(),
                                                CUBLAS_COMPUTE_32F));
  return {};
}


size_t quant_matmul_workspace_bytes(int64_t rows, const QuantWeight& m) {
  return rows > kQuantGemvRows ? size_t(m.out) * size_t(m.in) * sizeof(float) : 0;
}

Status quant_matmul(cublasHandle_t blas, const float* x, int64_t rows, const QuantWeight& m, float* y,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  MOEMESH_CUDA_RETURN_IF_ERROR(check_quant(m));
  MOEMESH_CUDA_REQUIRE_PTR(x);
  MOEMESH_CUDA_REQUIRE_PTR(y);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  constexpr int kThreads = 256;
  if (rows <= kQuantGemvRows) {
    const int64_t threads = m.out * rows * 32;
    quant_gemv_kernel<<<detail::blocks_for(threads, kThreads), kThreads, 0, stream>>>(x, rows, m, y);
    MOEMESH_CUDA_CHECK_LAUNCH();
    return {};
  }
  const size_t need = quant_matmul_workspace_bytes(rows, m);
  MOEMESH_CUDA_REQUIRE(workspace != nullptr && workspace_bytes >= need,
                       "workspace of " + std::to_string(workspace_bytes) + " bytes; need " + std::to_string(need) +
                           " (quant_matmul_workspace_bytes)");
  float* w = static_cast<float*>(workspace);
  // Padding channels are never written: every input channel appears once in `source`.
  const unsigned blocks = unsigned(std::min<int64_t>(detail::blocks_for(m.out * m.padded_in, kThreads), 65536));
  quant_dequantize_kernel<<<blocks, kThreads, 0, stream>>>(m, w);
  MOEMESH_CUDA_CHECK_LAUNCH();
  return matmul(blas, x, rows, m.in, w, DType::F32, m.out, y, nullptr, 0, stream);
}

}  // namespace moemesh::cuda
