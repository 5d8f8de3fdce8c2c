// Row and elementwise kernels: RMSNorm (+ fused residual add), RoPE, SiLU-and-multiply, embedding.
// All are memory-bound: one pass over the data, coalesced, 16-byte accesses where rows allow.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {
namespace {

using detail::from_f32;
using detail::to_f32;

// ---- RMSNorm: one block per row. With kResidual, x += r is written back before normalising.
// kVec4: dim % 4 == 0, so rows are 16-byte aligned (cudaMalloc'd bases) and read as float4.
template <typename W, bool kResidual, bool kVec4>
__global__ void rmsnorm_kernel(float* x, const float* __restrict__ r, const W* __restrict__ w,
                               int dim, float eps, float* y) {
  const size_t base = size_t(blockIdx.x) * size_t(dim);
  float* xr = x + base;
  float* yr = y + base;
  float ss = 0.0f;
  if constexpr (kVec4) {
    const int n4 = dim / 4;
    auto* x4 = reinterpret_cast<float4*>(xr);
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
      float4 v = x4[i];
      if constexpr (kResidual) {
        const float4 a = reinterpret_cast<const float4*>(r + base)[i];
        v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
        x4[i] = v;
      }
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
      float v = xr[i];
      if constexpr (kResidual) {
        v += r[base + i];
        xr[i] = v;
      }
      ss += v * v;
    }
  }
  ss = detail::block_sum(ss);
  // 1/sqrtf, not rsqrtf: IEEE sqrt keeps us within an ulp or two of the CPU reference.
  const float inv = 1.0f / sqrtf(ss / float(dim) + eps);
  // Second pass re-reads x from L1/L2 (each thread reads back what it wrote: no barrier needed).
  if constexpr (kVec4) {
    const int n4 = dim / 4;
    const auto* x4 = reinterpret_cast<const float4*>(xr);
    auto* y4 = reinterpret_cast<float4*>(yr);
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
      const float4 v = x4[i];
      const int j = 4 * i;
      y4[i] = make_float4(v.x * inv * to_f32(w[j]), v.y * inv * to_f32(w[j + 1]),
                          v.z * inv * to_f32(w[j + 2]), v.w * inv * to_f32(w[j + 3]));
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * inv * to_f32(w[i]);
  }
}

Status launch_rmsnorm(float* x, const float* residual, const void* weight, DType wdtype,
                      int64_t rows, int64_t dim, double eps, float* y, cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(x);
  MOEMESH_CUDA_REQUIRE_PTR(weight);
  MOEMESH_CUDA_REQUIRE_PTR(y);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(dim);
  MOEMESH_CUDA_REQUIRE_INT(rows);
  MOEMESH_CUDA_REQUIRE_INT(dim);
  MOEMESH_CUDA_REQUIRE_FLOAT_DTYPE(wdtype);
  MOEMESH_CUDA_REQUIRE(eps >= 0.0 && std::isfinite(eps), "eps must be finite and >= 0");
  MOEMESH_CUDA_REQUIRE(!residual || y != x, "y may not alias x when a residual is added");
  const bool vec4 = dim % 4 == 0;
  const int64_t work = vec4 ? dim / 4 : dim;
  const int threads = work >= 256 ? 256 : int((work + 31) / 32 * 32);
  const unsigned grid = unsigned(rows);
  detail::dispatch_float(wdtype, [&](auto tag) {
    using W = typename decltype(tag)::type;
    const W* w = static_cast<const W*>(weight);
    const float e = float(eps);
    const int d = int(dim);
    if (residual) {
      if (vec4) rmsnorm_kernel<W, true, true><<<grid, threads, 0, stream>>>(x, residual, w, d, e, y);
      else rmsnorm_kernel<W, true, false><<<grid, threads, 0, stream>>>(x, residual, w, d, e, y);
    } else {
      if (vec4) rmsnorm_kernel<W, false, true><<<grid, threads, 0, stream>>>(x, nullptr, w, d, e, y);
      else rmsnorm_kernel<W, false, false><<<grid, threads, 0, stream>>>(x, nullptr, w, d, e, y);
    }
  });
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

// ---- RoPE: one thread per (row, head, pair). HF rotate_half: (x1, x2) = (x[i], x[i + half]),
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, angle = pos * theta^(-2i / head_dim).
// As in the CPU reference, the angle and its sine/cosine are in double (at positions in the
// thousands a float angle is already off by ~1e-4 rad), then rounded to f32 for the rotation.
__global__ void rope_kernel(float* x, int64_t pairs_per_row, int half, const int32_t* __restrict__ positions,
                            RopeFrequencies freqs, int64_t total) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total) return;
  const int64_t row = t / pairs_per_row;
  const int64_t rem = t % pairs_per_row;
  const int64_t head = rem / half;
  const int i = int(rem % half);
  double sd, cd;
  sincos(double(positions[row]) * freqs.inv_freq[i], &sd, &cd);
  const float s = float(sd * freqs.attention_factor), c = float(cd * freqs.attention_factor);
  float* h = x + row * pairs_per_row * 2 + head * (2 * half);
  const float x1 = h[i], x2 = h[i + half];
  h[i] = x1 * c - x2 * s;
  h[i + half] = x2 * c + x1 * s;
}

template <typename T>
__global__ void silu_mul_kernel(const T* gate, const T* up, T* out, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float g = to_f32(gate[i]);
    out[i] = from_f32<T>(g / (1.0f + expf(-g)) * to_f32(up[i]));
  }
}

__global__ void add_inplace_kernel(float* x, const float* y, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

}  // namespace

Status rmsnorm(const float* x, const void* weight, DType wdtype, int64_t rows, int64_t dim,
               double eps, float* y, cudaStream_t stream) {
  // The kernel only writes x when a residual is given.
  return launch_rmsnorm(const_cast<float*>(x), nullptr, weight, wdtype, rows, dim, eps, y, stream);
}

Status add_rmsnorm(float* x, const float* residual, const void* weight, DType wdtype, int64_t rows,
                   int64_t dim, double eps, float* y, cudaStream_t stream) {
  if (!residual) return MOEMESH_CUDA_ERROR("add_rmsnorm: residual is null");
  return launch_rmsnorm(x, residual, weight, wdtype, rows, dim, eps, y, stream);
}

Status rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, const int32_t* positions,
            const RopeFrequencies& freqs, cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(x);
  MOEMESH_CUDA_REQUIRE_PTR(positions);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n_heads);
  MOEMESH_CUDA_REQUIRE_POSITIVE(head_dim);
  MOEMESH_CUDA_REQUIRE(head_dim % 2 == 0, "head_dim must be even (got " + std::to_string(head_dim) + ")");
  MOEMESH_CUDA_REQUIRE(head_dim / 2 <= kMaxRopePairs, "head_dim must be at most " + std::to_string(2 * kMaxRopePairs) +
                                                          " (got " + std::to_string(head_dim) + ")");
  MOEMESH_CUDA_REQUIRE(std::isfinite(freqs.attention_factor) && freqs.attention_factor > 0.0,
                       "attention_factor must be finite and > 0");
  const int64_t pairs_per_row = n_heads * (head_dim / 2);
  const int64_t total = rows * pairs_per_row;
  MOEMESH_CUDA_REQUIRE(total / rows == pairs_per_row && total < (int64_t(1) << 40),
                       "rows * n_heads * head_dim too large");
  constexpr int kThreads = 256;
  rope_kernel<<<detail::blocks_for(total, kThreads), kThreads, 0, stream>>>(x, pairs_per_row, int(head_dim / 2),
                                                                            positions, freqs, total);
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

Status rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, const int32_t* positions, double theta,
            cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE(theta > 1.0 && std::isfinite(theta), "theta must be finite and > 1");
  MOEMESH_CUDA_REQUIRE(head_dim > 0 && head_dim % 2 == 0 && head_dim / 2 <= kMaxRopePairs,
                       "head_dim must be even and at most " + std::to_string(2 * kMaxRopePairs) + " (got " +
                           std::to_string(head_dim) + ")");
  RopeFrequencies f;
  for (int64_t i = 0; i < head_dim / 2; ++i) f.inv_freq[i] = 1.0 / std::pow(theta, double(2 * i) / double(head_dim));
  return rope(x, rows, n_heads, head_dim, positions, f, stream);
}

Status silu_mul(const float* gate, const float* up, int64_t rows, int64_t n, float* out, cudaStream_t stream) {
  return silu_mul_as(gate, up, rows, n, out, DType::F32, stream);
}

Status silu_mul_as(const void* gate, const void* up, int64_t rows, int64_t n, void* out, DType dtype,
                   cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_FLOAT_DTYPE(dtype);
  MOEMESH_CUDA_REQUIRE_PTR(gate);
  MOEMESH_CUDA_REQUIRE_PTR(up);
  MOEMESH_CUDA_REQUIRE_PTR(out);
  MOEMESH_CUDA_REQUIRE_POSITIVE(rows);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n);
  const int64_t total = rows * n;
  MOEMESH_CUDA_REQUIRE(total / rows == n, "rows * n overflows");
  constexpr int kThreads = 256;
  // Grid-stride loop; a few waves of blocks are enough to saturate memory.
  const unsigned blocks = unsigned(std::min<int64_t>(detail::blocks_for(total, kThreads), 65536));
  detail::dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    silu_mul_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(gate), static_cast<const T*>(up),
                                                     static_cast<T*>(out), total);
  });
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

Status add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(x);
  MOEMESH_CUDA_REQUIRE_PTR(y);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n);
  constexpr int kThreads = 256;
  const unsigned blocks = unsigned(std::min<int64_t>(detail::blocks_for(n, kThreads), 65536));
  add_inplace_kernel<<<blocks, kThreads, 0, stream>>>(x, y, n);
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

Status embedding(const void* table, DType dtype, int64_t vocab, int64_t dim, const int32_t* ids,
                 int64_t n, float* out, cudaStream_t stream) {
  MOEMESH_CUDA_REQUIRE_PTR(table);
  MOEMESH_CUDA_REQUIRE_PTR(ids);
  MOEMESH_CUDA_REQUIRE_PTR(out);
  MOEMESH_CUDA_REQUIRE_POSITIVE(vocab);
  MOEMESH_CUDA_REQUIRE_POSITIVE(dim);
  MOEMESH_CUDA_REQUIRE_POSITIVE(n);
  MOEMESH_CUDA_REQUIRE_INT(dim);
  MOEMESH_CUDA_REQUIRE_INT(n);
  MOEMESH_CUDA_REQUIRE_FLOAT_DTYPE(dtype);
  const int threads = dim >= 256 ? 256 : int((dim + 31) / 32 * 32);
  detail::dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    detail::gather_rows_kernel<T, float><<<unsigned(n), threads, 0, stream>>>(static_cast<const T*>(table), vocab,
                                                             int(dim), ids, out);
  });
  MOEMESH_CUDA_CHECK_LAUNCH();
  return {};
}

}  // namespace moemesh::cuda
