// How the tensor payloads of a dispatch message (the rows sent to an expert host, the results
// sent back) travel between one pair of peers. The header frame (core/wire.h: ids, tensor
// descriptors, metadata) always goes over ZeroMQ; the payloads follow it as ZeroMQ frames
// (ZmqTransport) or go GPU to GPU with NCCL send/recv (kernels/cuda/nccl_transport.h), in the
// order of the header's descriptors. The choice is per peer pair (choose_transport), so a cluster
// can mix CPU and GPU hosts. No ZeroMQ types here, so the NCCL side builds without actors/.
#pragma once
#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

namespace moemesh::actors {

enum class TransportKind { Zmq, Nccl };
std::string_view transport_name(TransportKind k);

class Transport {
 public:
  virtual ~Transport() = default;
  virtual TransportKind kind() const = 0;
  // Sender: takes the message's tensors; returns the payloads to send as ZeroMQ frames after
  // the header (ZeroMQ: all of them; NCCL: none, they went over the communicator).
  virtual std::vector<std::vector<float>> send(std::vector<std::vector<float>>&& tensors) = 0;
  // Receiver: the message's tensors, `floats[i]` long (from the header's descriptors), out of
  // the payload frames that followed the header (ZeroMQ) or the communicator (NCCL). Throws
  // moemesh::Error when they do not match the header.
  virtual std::vector<std::vector<float>> receive(std::span<const size_t> floats,
                                                  std::vector<std::vector<float>>&& frames) = 0;
};

// Payloads as ZeroMQ frames (what every peer pair can do).
class ZmqTransport final : public Transport {
 public:
  TransportKind kind() const override { return TransportKind::Zmq; }
  std::vector<std::vector<float>> send(std::vector<std::vector<float>>&& tensors) override;
  std::vector<std::vector<float>> receive(std::span<const size_t> floats,
                                          std::vector<std::vector<float>>&& frames) override;
};

// What one side of a pair offers (from its registration with the coordinator).
struct TransportCaps {
  bool gpu = false;   // computes on a CUDA device
  bool nccl = false;  // built with NCCL and willing to join a communicator
};
// NCCL only when both peers are GPU processes with NCCL; ZeroMQ otherwise.
TransportKind choose_transport(const TransportCaps& self, const TransportCaps& peer);

}  // namespace moemesh::actors
