// Host-only parts of the CUDA backend: device probing, Status translation, the cuBLAS handle.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/cuda/api.cuh"

namespace moemesh::cuda {

namespace {

struct Probe {
  int count = 0;
  cudaError_t err = cudaSuccess;
};

const Probe& probe() {
  // Once per process: without a driver cudaGetDeviceCount fails (e.g. "CUDA driver version is
  // insufficient"); that is a normal answer here, not a crash.
  static const Probe p = [] {
    Probe r;
    r.err = cudaGetDeviceCount(&r.count);
    if (r.err != cudaSuccess) {
      r.count = 0;
      (void)cudaGetLastError();  // don't leave the probe's error for the next caller
    } else if (r.count == 0) {
      r.err = cudaErrorNoDevice;
    }
    return r;
  }();
  return p;
}

}  // namespace

int device_count() { return probe().count; }

const char* device_error() {
  const Probe& p = probe();
  return p.count > 0 ? "" : cudaGetErrorString(p.err);
}

Status from_cuda(cudaError_t err, const char* file, int line, const char* what) {
  if (err == cudaSuccess) return {};
  return Status::error(file, line,
                       std::string(what) + " failed: " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

Status from_cublas(cublasStatus_t st, const char* file, int line, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return {};
  return Status::error(file, line,
                       std::string(what) + " failed: " + cublasGetStatusName(st) + ": " +
                           cublasGetStatusString(st));
}

Status check_last_error() { return from_cuda(cudaGetLastError(), __FILE__, __LINE__, "kernel"); }

Blas::~Blas() {
  if (handle_) cublasDestroy(handle_);
}

Status Blas::init() {
  if (handle_) return {};
  MOEMESH_CUBLAS_TRY(cublasCreate(&handle_));
  // Default math: with CUBLAS_COMPUTE_32F (what matmul asks for) that is plain f32 accumulation,
  // no TF32 (that needs CUBLAS_COMPUTE_32F_FAST_TF32 or CUBLAS_TF32_TENSOR_OP_MATH).
  MOEMESH_CUBLAS_TRY(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH));
  return {};
}

}  // namespace moemesh::cuda
