// dispatch::Message <-> ZeroMQ frames, shared by the expert host and its clients.
#pragma once
#include <string>
#include <vector>

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

// Read-only views of frames[first..], for the dispatch decoders.
inline std::vector<wire::Frame> frame_views(const Frames& frames, size_t first = 0) {
  std::vector<wire::Frame> out;
  for (size_t i = first; i < frames.size(); ++i)
    out.emplace_back(static_cast<const uint8_t*>(frames[i].data()), frames[i].size());
  return out;
}

}  // namespace moemesh::actors
