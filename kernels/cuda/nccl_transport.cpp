#include "kernels/cuda/nccl_transport.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <string>

#include "core/error.h"
#include "kernels/cuda/api.cuh"

namespace moemesh {
namespace {

void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw Error(std::string("transport nccl: ") + what + ": " + ncclGetErrorString(r));
}
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("transport nccl: ") + what + ": " + cudaGetErrorString(e));
}

static_assert(sizeof(ncclUniqueId) == actors::kNcclUniqueIdBytes, "the control plane carries 128-byte ids");

class NcclTransport final : public actors::Transport {
 public:
  NcclTransport(const std::string& id_bytes, int rank, int device) : peer_(1 - rank) {
    if (cuda::device_count() == 0) throw Error(std::string("no CUDA device: ") + cuda::device_error());
    if (id_bytes.size() != sizeof(ncclUniqueId))
      throw Error("transport nccl: the unique id has " + std::to_string(id_bytes.size()) + " bytes, expected " +
                  std::to_string(sizeof(ncclUniqueId)));
    if (rank != 0 && rank != 1) throw Error("transport nccl: rank must be 0 or 1, got " + std::to_string(rank));
    ncclUniqueId id;
    std::memcpy(&id, id_bytes.data(), sizeof(id));
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    nccl_check(ncclCommInitRank(&comm_, 2, id, rank), "ncclCommInitRank");
  }
  ~NcclTransport() override {
    if (comm_) ncclCommDestroy(comm_);
    if (buf_) cudaFree(buf_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  actors::TransportKind kind() const override { return actors::TransportKind::Nccl; }

  std::vector<std::vector<float>> send(std::vector<std::vector<float>>&& tensors) override {
    for (const auto& t : tensors) {
      float* d = staging(t.size());
      cuda_check(cudaMemcpyAsync(d, t.data(), t.size() * sizeof(float), cudaMemcpyHostToDevice, stream_), "upload");
      nccl_check(ncclSend(d, t.size(), ncclFloat, peer_, comm_, stream_), "ncclSend");
      cuda_check(cudaStreamSynchronize(stream_), "sync");  // the staging buffer is reused
    }
    return {};
  }

  std::vector<std::vector<float>> receive(std::span<const size_t> floats,
                                          std::span<const actors::PayloadFrame> frames) override {
    if (!frames.empty())
      throw Error("transport nccl: " + std::to_string(frames.size()) + " payload frames arrived over ZeroMQ");
    std::vector<std::vector<float>> out;
    for (size_t n : floats) {
      float* d = staging(n);
      nccl_check(ncclRecv(d, n, ncclFloat, peer_, comm_, stream_), "ncclRecv");
      auto& t = out.emplace_back(n);
      cuda_check(cudaMemcpyAsync(t.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost, stream_), "download");
      cuda_check(cudaStreamSynchronize(stream_), "sync");
    }
    return out;
  }

 private:
  float* staging(size_t n) {
    if (n > cap_) {
      cuda_check(cudaStreamSynchronize(stream_), "sync");
      if (buf_) cudaFree(buf_);
      buf_ = nullptr;
      cap_ = std::max(n, cap_ * 2);
      cuda_check(cudaMalloc(&buf_, cap_ * sizeof(float)), "cudaMalloc");
    }
    return buf_;
  }

  int peer_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  float* buf_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId id;
  nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

std::unique_ptr<actors::Transport> make_nccl_transport(const std::string& unique_id, int rank, int device) {
  return std::make_unique<NcclTransport>(unique_id, rank, device);
}

}  // namespace moemesh
