// How the tensor payloads of a dispatch message (the rows sent to an expert host, the results
// sent back) travel between one pair of peers. The header frame (core/wire.h: ids, tensor
// descriptors, metadata) always goes over ZeroMQ; the payloads follow it as ZeroMQ frames
// (ZmqTransport) or go GPU to GPU with NCCL send/recv (actors/nccl_transport.h), in the
// order of the header's descriptors. The choice is per peer pair (choose_transport), so a cluster
// can mix CPU and GPU hosts. No ZeroMQ types here, so the NCCL side (actors/nccl_transport)
// builds without the rest of actors/ (moemesh_actors).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moemesh::actors {

enum class TransportKind { Zmq, Nccl };
std::string_view transport_name(TransportKind k);

// The bytes of one received ZeroMQ payload frame (possibly unaligned for floats).
using PayloadFrame = std::span<const uint8_t>;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual TransportKind kind() const = 0;
  // Whether the payloads follow the header as ZeroMQ frames (else the header comes alone).
  bool payload_in_frames() const { return kind() == TransportKind::Zmq; }
  // Sender: takes the message's tensors; returns the payloads to send as ZeroMQ frames after
  // the header (ZeroMQ: all of them, moved; NCCL: none, they went over the communicator).
  virtual std::vector<std::vector<float>> send(std::vector<std::vector<float>>&& tensors) = 0;
  // Receiver: the message's tensors, `floats[i]` long (from the header's descriptors), copied
  // out of the payload frames that followed the header (ZeroMQ) or received from the
  // communicator (NCCL, `frames` empty). Throws moemesh::Error when they do not match the header.
  virtual std::vector<std::vector<float>> receive(std::span<const size_t> floats,
                                                  std::span<const PayloadFrame> frames) = 0;

  // Held from a message's payload send until its header is queued on the ZeroMQ socket
  // (dispatch_frames.h: send_message), so that concurrent senders to one peer put headers and
  // payloads on the pair in the same order; the receiver takes payloads in header order.
  std::mutex& send_order() { return send_order_; }

 private:
  std::mutex send_order_;
};

// Payloads as ZeroMQ frames (what every peer pair can do).
class ZmqTransport final : public Transport {
 public:
  TransportKind kind() const override { return TransportKind::Zmq; }
  std::vector<std::vector<float>> send(std::vector<std::vector<float>>&& tensors) override;
  std::vector<std::vector<float>> receive(std::span<const size_t> floats,
                                          std::span<const PayloadFrame> frames) override;
};

// The transport of each peer of one process, by the name the process knows it by (the attention
// side: the expert host's endpoint; the expert side: the worker's ROUTER routing id, its
// instance name). ZeroMQ unless a pair transport was set (an NCCL communicator, once both sides
// agreed through the coordinator). Thread-safe; a transport stays alive while a caller holds it.
class PeerTransports {
 public:
  PeerTransports();
  std::shared_ptr<Transport> of(const std::string& peer) const;
  // What carries the payloads of a message received from `peer` in `frames` ZeroMQ frames
  // (header included): ZeroMQ when payload frames followed the header, else the pair's transport.
  // Decided per message, so a message sent just before the pair switched is still read right.
  std::shared_ptr<Transport> carrying(const std::string& peer, size_t frames) const;
  // Null goes back to ZeroMQ.
  void set(const std::string& peer, std::shared_ptr<Transport> transport);

 private:
  std::shared_ptr<Transport> zmq_;  // stateless: shared by every peer without a pair transport
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Transport>> pairs_;
};

// What one side of a pair offers (from its registration with the coordinator).
struct TransportCaps {
  bool gpu = false;    // computes on a CUDA device
  bool nccl = false;   // built with NCCL and willing to join a communicator
  std::string gpu_id{};  // the device's UUID; empty: unknown
};
// The size of an NCCL unique id (NCCL_UNIQUE_ID_BYTES), checked wherever one travels.
inline constexpr size_t kNcclUniqueIdBytes = 128;

// NCCL only when both peers are GPU processes with NCCL on different GPUs (NCCL cannot put two
// ranks of a communicator on one device); ZeroMQ otherwise.
TransportKind choose_transport(const TransportCaps& self, const TransportCaps& peer);

}  // namespace moemesh::actors
