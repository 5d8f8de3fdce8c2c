#include "actors/transport.h"

#include <cstring>
#include <string>

#include "core/error.h"

namespace moemesh::actors {

std::string_view transport_name(TransportKind k) { return k == TransportKind::Nccl ? "nccl" : "zmq"; }

std::vector<std::vector<float>> ZmqTransport::send(std::vector<std::vector<float>>&& tensors) {
  return std::move(tensors);
}

std::vector<std::vector<float>> ZmqTransport::receive(std::span<const size_t> floats,
                                                      std::span<const PayloadFrame> frames) {
  if (frames.size() != floats.size())
    throw Error("transport zmq: " + std::to_string(frames.size()) + " payload frames for " +
                std::to_string(floats.size()) + " tensors in the header");
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < frames.size(); ++i) {
    if (frames[i].size() != floats[i] * sizeof(float))
      throw Error("transport zmq: tensor " + std::to_string(i) + " frame has " + std::to_string(frames[i].size()) +
                  " bytes, the header says " + std::to_string(floats[i]) + " floats");
    auto& t = out.emplace_back(floats[i]);
    std::memcpy(t.data(), frames[i].data(), frames[i].size());  // frames need not be float-aligned
  }
  return out;
}

PeerTransports::PeerTransports() : zmq_(std::make_shared<ZmqTransport>()) {}

std::shared_ptr<Transport> PeerTransports::of(const std::string& peer) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = pairs_.find(peer);
  return it == pairs_.end() ? zmq_ : it->second;
}

std::shared_ptr<Transport> PeerTransports::carrying(const std::string& peer, size_t frames) const {
  return frames > 1 ? zmq_ : of(peer);
}

void PeerTransports::set(const std::string& peer, std::shared_ptr<Transport> transport) {
  std::lock_guard<std::mutex> lk(mu_);
  if (transport)
    pairs_[peer] = std::move(transport);
  else
    pairs_.erase(peer);
}

TransportKind choose_transport(const TransportCaps& self, const TransportCaps& peer) {
  const bool same_gpu = !self.gpu_id.empty() && self.gpu_id == peer.gpu_id;
  return self.gpu && self.nccl && peer.gpu && peer.nccl && !same_gpu ? TransportKind::Nccl : TransportKind::Zmq;
}

}  // namespace moemesh::actors
