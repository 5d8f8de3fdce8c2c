#include "actors/step_server.h"

#include <cstring>

#include <spdlog/spdlog.h>

#include "actors/dispatch_frames.h"
#include "actors/expert_compute.h"
#include "core/wire.h"

namespace moemesh::actors {

FramesPtr message_frames(const std::string& peer, wire::Kind kind, uint64_t request_id, const std::string& meta,
                         std::vector<std::vector<float>> tensors, const uint8_t* trace_id) {
  wire::Header h;
  h.kind = kind;
  h.request_id = request_id;
  if (trace_id) std::memcpy(h.trace_id, trace_id, sizeof h.trace_id);
  h.meta = meta;
  for (const auto& t : tensors) h.tensors.push_back({DType::F32, {int64_t(t.size())}});
  auto frames = std::make_shared<Frames>();
  if (!peer.empty()) frames->emplace_back(peer.data(), peer.size());
  frames->push_back(frame_of(wire::encode_header(h)));
  for (auto& t : tensors) frames->push_back(frame_of(std::move(t)));
  return frames;
}

FramesPtr error_frames(const std::string& peer, uint64_t request_id, const std::string& code, const std::string& message) {
  pb::ErrorReply e;
  e.set_code(code);
  e.set_message(message);
  return message_frames(peer, wire::Kind::Error, request_id, e.SerializeAsString(), {});
}

namespace {

// Decodes and runs one step; returns the reply frames. Never throws.
FramesPtr handle(const Frames& in, StepWorker& worker, StepServerStats& stats) {
  std::string peer = in.empty() ? std::string() : in[0].to_string();
  uint64_t request_id = 0;
  try {
    wire::Header h = wire::decode(frame_views(in, 1));
    request_id = h.request_id;
    if (h.kind != wire::Kind::StepRequest)
      return ++stats.bad_frames,
             error_frames(peer, request_id, "bad_request",
                          std::string("attention worker expects StepRequest, got ") + wire::kind_name(h.kind));
    pb::StepRequest req;
    if (!req.ParseFromString(h.meta))
      return ++stats.bad_frames, error_frames(peer, request_id, "bad_meta", "StepRequest metadata does not parse");
    std::vector<std::vector<float>> logits;
    pb::StepResponse resp = worker.run(req, logits);
    ++stats.steps;
    stats.kv_free_blocks = worker.free_blocks();
    return message_frames(peer, wire::Kind::StepResponse, request_id, resp.SerializeAsString(), std::move(logits),
                          h.trace_id);
  } catch (const wire::WireError& e) {
    ++stats.bad_frames;
    spdlog::warn("attention: bad frame from router: {}", e.what());
    return error_frames(peer, request_id, wire::error_code_name(e.code()), e.what());
  } catch (const std::exception& e) {
    spdlog::error("attention: step failed: {}", e.what());
    return error_frames(peer, request_id, "internal", e.what());
  }
}

}  // namespace

caf::actor spawn_step_server(caf::actor_system& sys, ZmqBridge& bridge, int socket, std::shared_ptr<StepWorker> worker,
                             std::shared_ptr<ComputePool> pool, std::shared_ptr<StepServerStats> stats) {
  caf::actor out = bridge.actor();
  caf::actor a = sys.spawn([=](caf::event_based_actor*) -> caf::behavior {
    return {[=](zmq_recv_atom, int, FramesPtr frames) {
      // Compute off the actor threads; the reply goes straight to the bridge.
      pool->submit([=] { caf::anon_send(out, zmq_send_atom::value, socket, handle(*frames, *worker, *stats)); });
    }};
  });
  bridge.route(socket, a);
  return a;
}

}  // namespace moemesh::actors
