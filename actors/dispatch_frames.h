// dispatch::Message <-> ZeroMQ frames, shared by the expert host and its clients; the tensor
// payloads of dispatch messages go through the peer pair's Transport (actors/transport.h).
#pragma once
#include <mutex>
#include <string>
#include <vector>

#include "actors/transport.h"
#include "actors/zmq_bridge.h"
#include "core/dispatch_codec.h"

namespace moemesh::actors {

// The message as frames (tensor payloads moved in, zero-copy), preceded by a ROUTER peer's
// routing id when `peer` is not empty.
inline FramesPtr to_frames(dispatch::Message&& m, const std::string& peer = {}) {
  auto frames = std::make_shared<Frames>();
  if (!peer.empty()) frames->emplace_back(peer.data(), peer.size());
  frames->push_back(frame_of(m.header));
  for (auto& t : m.tensors) frames->push_back(frame_of(std::move(t)));
  return frames;
}

// The message as frames with its payloads sent by `transport` (ZeroMQ: every tensor as a
// frame, byte for byte what the overload above makes; NCCL: the header alone).
inline FramesPtr to_frames(dispatch::Message&& m, Transport& transport, const std::string& peer = {}) {
  m.tensors = transport.send(std::move(m.tensors));
  return to_frames(std::move(m), peer);
}

// Sends `m` to `peer`: its payloads through `transport`, then `enqueue(frames)` queues the header
// (with the ZeroMQ payload frames) on the socket, both under the pair's send lock: two threads
// dispatching to one host cannot swap the order of headers and payloads on the pair. (ZeroMQ
// payloads travel inside their message: no lock.)
template <class Enqueue>
void send_message(dispatch::Message&& m, Transport& transport, const std::string& peer, Enqueue&& enqueue) {
  std::unique_lock<std::mutex> lk(transport.send_order(), std::defer_lock);
  if (!transport.payload_in_frames()) lk.lock();
  enqueue(to_frames(std::move(m), transport, peer));
}

inline dispatch::Payload payload_of(const Transport& transport) {
  return transport.payload_in_frames() ? dispatch::Payload::InFrames : dispatch::Payload::Elsewhere;
}

// A decoded message's one tensor (`floats` long) through `transport`: copied out of its frame
// (ZeroMQ: `frame` is the codec's rows/outputs view) or received from the peer (NCCL).
inline std::vector<float> receive_tensor(Transport& transport, size_t floats, wire::Frame frame) {
  const size_t sizes[] = {floats};
  const PayloadFrame frames[] = {frame};
  return std::move(
      transport.receive(sizes, transport.payload_in_frames() ? std::span(frames) : std::span<const PayloadFrame>{})
          .at(0));
}

// Read-only views of frames[first..], for the dispatch decoders.
inline std::vector<wire::Frame> frame_views(const Frames& frames, size_t first = 0) {
  std::vector<wire::Frame> out;
  for (size_t i = first; i < frames.size(); ++i)
    out.emplace_back(static_cast<const uint8_t*>(frames[i].data()), frames[i].size());
  return out;
}

}  // namespace moemesh::actors
