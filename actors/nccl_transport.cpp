#include "actors/nccl_transport.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "kernels/cuda/api.cuh"

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;

void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess && r != ncclInProgress)
    throw Error(std::string("transport nccl: ") + what + ": " + ncclGetErrorString(r));
}
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("transport nccl: ") + what + ": " + cudaGetErrorString(e));
}

// A non-blocking communicator's calls may return ncclInProgress: poll until the call is done.
// Returns false when `deadline` passed first.
bool settle(ncclComm_t comm, const char* what, Clock::time_point deadline = Clock::time_point::max()) {
  for (;;) {
    ncclResult_t state = ncclSuccess;
    nccl_check(ncclCommGetAsyncError(comm, &state), what);
    if (state == ncclSuccess) return true;
    nccl_check(state, what);  // throws unless still in progress
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

static_assert(sizeof(ncclUniqueId) == actors::kNcclUniqueIdBytes, "the control plane carries 128-byte ids");

// Device staging for one tensor in flight: reused only after `done` (recorded after its send).
struct Slot {
  float* device = nullptr;
  float* host = nullptr;  // pinned, so the upload is truly asynchronous
  size_t cap = 0;         // floats
  cudaEvent_t done = nullptr;
  bool used = false;      // an event was recorded
};

class NcclTransport final : public actors::Transport {
 public:
  NcclTransport(const std::string& id_bytes, int rank, int device, std::chrono::milliseconds join_timeout) {
    if (cuda::device_count() == 0) throw Error(std::string("no CUDA device: ") + cuda::device_error());
    if (id_bytes.size() != sizeof(ncclUniqueId))
      throw Error("transport nccl: the unique id has " + std::to_string(id_bytes.size()) + " bytes, expected " +
                  std::to_string(sizeof(ncclUniqueId)));
    if (rank != 0 && rank != 1) throw Error("transport nccl: rank must be 0 or 1, got " + std::to_string(rank));
    ncclUniqueId id;
    std::memcpy(&id, id_bytes.data(), sizeof(id));
    device_ = device;
    peer_ = 1 - rank;
    try {
      cuda_check(cudaSetDevice(device), "cudaSetDevice");
      cuda_check(cudaStreamCreateWithFlags(&send_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
      cuda_check(cudaStreamCreateWithFlags(&recv_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
      // Non-blocking init, so a peer that never comes (a rejected offer) cannot hold us for good.
      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 0;
      const auto deadline = Clock::now() + join_timeout;
      nccl_check(ncclCommInitRankConfig(&base_, 2, id, rank, &config), "ncclCommInitRankConfig");
      if (!settle(base_, "ncclCommInitRankConfig", deadline)) timed_out(join_timeout);
      // A second communicator for the other direction: on one communicator NCCL runs operations
      // in issue order, so a send queued behind a receive (or the reverse) could wait on the
      // peer's opposite queue for good.
      nccl_check(ncclCommSplit(base_, 0, rank, &split_, &config), "ncclCommSplit");
      if (!settle(split_, "ncclCommSplit", deadline)) timed_out(join_timeout);
      // base_ carries rank 0 -> 1, split_ rank 1 -> 0.
      send_comm_ = rank == 0 ? base_ : split_;
      recv_comm_ = rank == 0 ? split_ : base_;
    } catch (...) {
      release(true);
      throw;
    }
  }
  ~NcclTransport() override { release(false); }

  actors::TransportKind kind() const override { return actors::TransportKind::Nccl; }

  // Queues each tensor's upload and ncclSend on the send stream; returns without waiting for them.
  std::vector<std::vector<float>> send(std::vector<std::vector<float>>&& tensors) override {
    std::lock_guard<std::mutex> lk(send_mu_);
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    for (const auto& t : tensors) {
      if (t.empty()) continue;  // the receiver skips empty tensors too
      Slot& s = free_slot(t.size());
      std::memcpy(s.host, t.data(), t.size() * sizeof(float));
      cuda_check(cudaMemcpyAsync(s.device, s.host, t.size() * sizeof(float), cudaMemcpyHostToDevice, send_stream_),
                 "upload");
      nccl_check(ncclSend(s.device, t.size(), ncclFloat, peer_, send_comm_, send_stream_), "ncclSend");
      settle(send_comm_, "ncclSend");  // the call's enqueueing, not the transfer
      cuda_check(cudaEventRecord(s.done, send_stream_), "cudaEventRecord");
      s.used = true;
    }
    return {};
  }

  // Receives the peer's next payloads in the order they were sent; blocks until they are here.
  std::vector<std::vector<float>> receive(std::span<const size_t> floats,
                                          std::span<const actors::PayloadFrame> frames) override {
    if (!frames.empty())
      throw Error("transport nccl: " + std::to_string(frames.size()) + " payload frames arrived over ZeroMQ");
    std::lock_guard<std::mutex> lk(recv_mu_);
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    std::vector<std::vector<float>> out;
    for (size_t n : floats) {
      auto& t = out.emplace_back(n);
      if (n == 0) continue;
      if (n > recv_cap_) {  // stream-ordered: a cudaFree would wait for this rank's pending sends
        if (recv_buf_) cuda_check(cudaFreeAsync(recv_buf_, recv_stream_), "cudaFreeAsync");
        recv_buf_ = nullptr;
        recv_cap_ = std::max(n, recv_cap_ * 2);
        cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&recv_buf_), recv_cap_ * sizeof(float), recv_stream_),
                   "cudaMallocAsync");
      }
      nccl_check(ncclRecv(recv_buf_, n, ncclFloat, peer_, recv_comm_, recv_stream_), "ncclRecv");
      settle(recv_comm_, "ncclRecv");
      cuda_check(cudaMemcpyAsync(t.data(), recv_buf_, n * sizeof(float), cudaMemcpyDeviceToHost, recv_stream_),
                 "download");
      cuda_check(cudaStreamSynchronize(recv_stream_), "sync");
    }
    return out;
  }

 private:
  // Beyond this many tensors in flight, send waits for the oldest one's send to complete. That
  // cannot deadlock: its header already went out, so the peer will post the matching receive.
  static constexpr size_t kMaxSlots = 16;

  Slot& free_slot(size_t floats) {
    Slot* pick = nullptr;
    for (Slot& s : slots_)
      if (!s.used || cudaEventQuery(s.done) == cudaSuccess) {
        pick = &s;
        break;
      }
    if (!pick && slots_.size() < kMaxSlots) {
      pick = &slots_.emplace_back();
      cuda_check(cudaEventCreateWithFlags(&pick->done, cudaEventDisableTiming), "cudaEventCreate");
    }
    if (!pick) {  // all in flight: the least recently used is the oldest
      pick = &slots_.front();
      cuda_check(cudaEventSynchronize(pick->done), "cudaEventSynchronize");
    }
    // Most recently used last, so the front is the oldest.
    if (pick != &slots_.back()) {
      Slot s = *pick;
      slots_.erase(slots_.begin() + (pick - &slots_.front()));
      pick = &slots_.emplace_back(s);
    }
    if (floats > pick->cap) {
      // No cudaFree / cudaFreeHost while sends may be pending: both synchronise the device, and
      // a pending ncclSend waits for the peer, which may itself be waiting on us. The device
      // buffer is freed in stream order; the pinned one is kept until the transport goes.
      if (pick->device) cuda_check(cudaFreeAsync(pick->device, send_stream_), "cudaFreeAsync");
      if (pick->host) retired_host_.push_back(pick->host);
      pick->device = nullptr;
      pick->host = nullptr;
      pick->cap = std::max(floats, pick->cap * 2);
      cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&pick->device), pick->cap * sizeof(float), send_stream_),
                 "cudaMallocAsync");
      cuda_check(cudaMallocHost(&pick->host, pick->cap * sizeof(float)), "cudaMallocHost");
    }
    return *pick;
  }

  [[noreturn]] void timed_out(std::chrono::milliseconds join_timeout) {
    std::ostringstream s;  // "30 s", "0.5 s"
    s << "transport nccl: the peer did not join within " << std::chrono::duration<double>(join_timeout).count()
      << " s";
    throw Error(s.str());
  }

  // `abort`: after a failed or timed-out join (ncclCommDestroy would wait for the peer). Sends
  // still pending after kDrainTimeout (a peer that went away) abort the communicators too.
  static constexpr auto kDrainTimeout = std::chrono::seconds(10);
  void release(bool abort) {
    cudaSetDevice(device_);
    if (!abort && send_stream_) {
      const auto deadline = Clock::now() + kDrainTimeout;
      while (cudaStreamQuery(send_stream_) == cudaErrorNotReady && Clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      abort = cudaStreamQuery(send_stream_) == cudaErrorNotReady;
    }
    for (ncclComm_t* c : {&split_, &base_})
      if (*c) {
        if (abort)
          ncclCommAbort(*c);
        else
          ncclCommDestroy(*c);
        *c = nullptr;
      }
    for (Slot& s : slots_) {
      if (s.device) cudaFree(s.device);
      if (s.host) cudaFreeHost(s.host);
      if (s.done) cudaEventDestroy(s.done);
    }
    slots_.clear();
    for (float* h : retired_host_) cudaFreeHost(h);
    retired_host_.clear();
    if (recv_buf_) cudaFree(recv_buf_);
    recv_buf_ = nullptr;
    for (cudaStream_t* s : {&send_stream_, &recv_stream_})
      if (*s) cudaStreamDestroy(*s), *s = nullptr;
  }

  int device_ = 0;
  int peer_ = 1;
  ncclComm_t base_ = nullptr, split_ = nullptr;
  ncclComm_t send_comm_ = nullptr, recv_comm_ = nullptr;
  cudaStream_t send_stream_ = nullptr, recv_stream_ = nullptr;
  std::mutex send_mu_;  // send_comm_, send_stream_, slots_
  std::deque<Slot> slots_;
  std::vector<float*> retired_host_;  // pinned buffers outgrown while sends were pending
  std::mutex recv_mu_;  // recv_comm_, recv_stream_, recv_buf_
  float* recv_buf_ = nullptr;
  size_t recv_cap_ = 0;
};

}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId id;
  nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

std::unique_ptr<actors::Transport> make_nccl_transport(const std::string& unique_id, int rank, int device,
                                                       std::chrono::milliseconds join_timeout) {
  return std::make_unique<NcclTransport>(unique_id, rank, device, join_timeout);
}

}  // namespace moemesh
