// Micro-benchmark of the memory-bound CUDA kernels against the memory roofline: the device-to-
// device copy bandwidth measured first is the ceiling; each kernel's floor is the bytes it must
// move divided by that. Prints a Markdown table. Run by tests/gpu/run.sh (needs a GPU).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/cuda/api.cuh"

namespace mc = moemesh::cuda;
using moemesh::DType;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "bench_gpu_kernels: %s\n", what.c_str());
  std::exit(1);
}
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) die(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(const mc::Status& s) {
  if (!s.ok()) die(s.message());
}

// Device buffer filled with a tiled random pattern of `t` values in [-1, 1) (never NaN/inf, and
// not zeros: tensor cores run faster on zeros).
void* device_random(size_t n, DType t) {
  static std::mt19937 rng(7);
  const size_t es = moemesh::dtype_size(t), pattern_n = std::min<size_t>(n, size_t(1) << 22);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> f(pattern_n);
  for (auto& v : f) v = dist(rng);
  std::vector<uint8_t> bytes(pattern_n * es);
  moemesh::from_f32(t, f.data(), bytes.data(), pattern_n);
  void* p = nullptr;
  check(cudaMalloc(&p, n * es), "cudaMalloc");
  for (size_t off = 0; off < n; off += pattern_n)
    check(cudaMemcpy(static_cast<uint8_t*>(p) + off * es, bytes.data(), std::min(pattern_n, n - off) * es,
                     cudaMemcpyHostToDevice),
          "cudaMemcpy");
  return p;
}

// Mean milliseconds per call of f on stream s, after warm-up.
double time_ms(cudaStream_t s, const std::function<void()>& f, int iters = 20) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "event");
  check(cudaEventCreate(&b), "event");
  check(cudaEventRecord(a, s), "record");
  for (int i = 0; i < iters; ++i) f();
  check(cudaEventRecord(b, s), "record");
  check(cudaEventSynchronize(b), "sync");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, a, b), "elapsed");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  check(cudaGetLastError(), "kernel");
  return ms / iters;
}

const char* name(DType t) { return t == DType::F32 ? "f32" : t == DType::F16 ? "f16" : "bf16"; }

void row(const std::string& kernel, const std::string& shape, double ms, double bytes, double flops,
         double bw) {
  const double floor_ms = bytes / bw * 1e3;
  std::printf("| %-12s | %-24s | %9.4f | %9.1f | %7.1f%% | %8.2f |\n", kernel.c_str(), shape.c_str(),
              ms * 1e3, bytes / (ms * 1e-3) / 1e9, 100.0 * floor_ms / ms,
              flops > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0);
}

}  // namespace

int main() {
  if (mc::device_count() == 0) {
    std::printf("no CUDA device: %s\n", mc::device_error());
    return 0;
  }
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "properties");
  cudaStream_t s;
  check(cudaStreamCreate(&s), "stream");

  // Ceiling: device-to-device copy of 1 GiB, counting bytes read and written.
  const size_t copy_bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  check(cudaMalloc(&src, copy_bytes), "cudaMalloc");
  check(cudaMalloc(&dst, copy_bytes), "cudaMalloc");
  check(cudaMemset(src, 1, copy_bytes), "memset");
  const double copy_ms = time_ms(s, [&] { cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, s); });
  const double bw = 2.0 * double(copy_bytes) / (copy_ms * 1e-3);
  cudaFree(src);
  cudaFree(dst);
  std::printf("device: %s, %d SMs; measured copy bandwidth (read + write): %.0f GB/s\n\n", prop.name,
              prop.multiProcessorCount, bw / 1e9);
  std::printf("| kernel       | shape                    | time (us) | GB/s      | roofline | TFLOP/s  |\n");
  std::printf("|--------------|--------------------------|-----------|-----------|----------|----------|\n");

  struct NormCase {
    int rows, dim;
    DType w;
    bool residual;
  };
  for (const NormCase c : {NormCase{1, 4096, DType::BF16, false}, NormCase{64, 4096, DType::BF16, false},
                           NormCase{4096, 4096, DType::BF16, false}, NormCase{16384, 8192, DType::F32, false},
                           NormCase{4096, 4096, DType::BF16, true}, NormCase{16384, 7168, DType::BF16, true}}) {
    const size_t n = size_t(c.rows) * c.dim;
    auto* x = static_cast<float*>(device_random(n, DType::F32));
    auto* r = static_cast<float*>(device_random(n, DType::F32));
    auto* y = static_cast<float*>(device_random(n, DType::F32));
    void* w = device_random(size_t(c.dim), c.w);
    const double bytes = double(n) * 4 * (c.residual ? 4 : 2) + double(c.dim) * moemesh::dtype_size(c.w);
    const double ms = time_ms(s, [&] {
      check(c.residual ? mc::add_rmsnorm(x, r, w, c.w, c.rows, c.dim, 1e-6, y, s)
                       : mc::rmsnorm(x, w, c.w, c.rows, c.dim, 1e-6, y, s));
    });
    row(c.residual ? "add_rmsnorm" : "rmsnorm",
        std::to_string(c.rows) + "x" + std::to_string(c.dim) + " w:" + name(c.w), ms, bytes, 0, bw);
    cudaFree(x), cudaFree(r), cudaFree(y), cudaFree(w);
  }

  mc::Blas blas;
  check(blas.init());
  struct GemmCase {
    int rows, in, out;
    DType w;
  };
  for (const GemmCase c : {GemmCase{1, 4096, 14336, DType::BF16}, GemmCase{16, 4096, 14336, DType::BF16},
                           GemmCase{128, 4096, 14336, DType::BF16}, GemmCase{1, 4096, 4096, DType::F32},
                           GemmCase{64, 4096, 4096, DType::F32}, GemmCase{4096, 4096, 4096, DType::BF16},
                           GemmCase{4096, 4096, 4096, DType::F32}}) {
    auto* x = static_cast<float*>(device_random(size_t(c.rows) * c.in, DType::F32));
    auto* y = static_cast<float*>(device_random(size_t(c.rows) * c.out, DType::F32));
    void* w = device_random(size_t(c.out) * c.in, c.w);
    const size_t ws_bytes = mc::matmul_workspace_bytes(c.rows, c.in, c.w);
    void* ws = nullptr;
    if (ws_bytes) check(cudaMalloc(&ws, ws_bytes), "cudaMalloc");
    // Bytes that must move at least once: W, x, y (the x conversion pass is overhead on top).
    const double bytes = double(c.out) * c.in * moemesh::dtype_size(c.w) + 4.0 * c.rows * (c.in + c.out);
    const double ms = time_ms(s, [&] {
      check(mc::matmul(blas.get(), x, c.rows, c.in, w, c.w, c.out, y, ws, ws_bytes, s));
    });
    row("matmul", std::to_string(c.rows) + "x" + std::to_string(c.in) + "x" + std::to_string(c.out) + " w:" + name(c.w),
        ms, bytes, 2.0 * c.rows * c.in * c.out, bw);
    cudaFree(x), cudaFree(y), cudaFree(w), cudaFree(ws);
  }
  std::printf("\nroofline = (bytes / measured copy bandwidth) / time: 100%% is memory-bound at the ceiling;\n"
              "large matmuls are compute-bound, read their TFLOP/s instead (f32 is plain FP32, no TF32).\n");
  cudaStreamDestroy(s);
  return 0;
}
