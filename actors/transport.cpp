#include "actors/transport.h"

#include <string>

#include "core/error.h"

namespace moemesh::actors {

std::string_view transport_name(TransportKind k) { return k == TransportKind::Nccl ? "nccl" : "zmq"; }

std::vector<std::vector<float>> ZmqTransport::send(std::vector<std::vector<float>>&& tensors) {
  return std::move(tensors);
}

std::vector<std::vector<float>> ZmqTransport::receive(std::span<const size_t> floats,
                                                      std::vector<std::vector<float>>&& frames) {
  if (frames.size() != floats.size())
    throw Error("transport zmq: " + std::to_string(frames.size()) + " payload frames for " +
                std::to_string(floats.size()) + " tensors in the header");
  for (size_t i = 0; i < frames.size(); ++i)
    if (frames[i].size() != floats[i])
      throw Error("transport zmq: tensor " + std::to_string(i) + " has " + std::to_string(frames[i].size()) +
                  " floats, the header says " + std::to_string(floats[i]));
  return std::move(frames);
}

TransportKind choose_transport(const TransportCaps& self, const TransportCaps& peer) {
  return self.gpu && self.nccl && peer.gpu && peer.nccl ? TransportKind::Nccl : TransportKind::Zmq;
}

}  // namespace moemesh::actors
