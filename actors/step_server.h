// The attention worker's data-plane endpoint: StepRequests arrive on a bound ROUTER socket,
// run on the compute pool (one step at a time: the StepWorker is not thread-safe), and the
// StepResponse (or an Error reply for a bad frame) goes back to the sender.
#pragma once
#include <atomic>
#include <memory>

#include <caf/all.hpp>

#include "actors/step_worker.h"
#include "actors/zmq_bridge.h"
#include "core/wire.h"

namespace moemesh::actors {

class ComputePool;

struct StepServerStats {
  std::atomic<uint64_t> steps{0}, bad_frames{0};
  std::atomic<int64_t> kv_free_blocks{0};  // after the latest step
};

caf::actor spawn_step_server(caf::actor_system& sys, ZmqBridge& bridge, int socket, std::shared_ptr<StepWorker> worker,
                             std::shared_ptr<ComputePool> pool, std::shared_ptr<StepServerStats> stats);

// Frames of a data-plane message: [peer id if any], header, tensors (moved in, zero-copy).
FramesPtr message_frames(const std::string& peer, wire::Kind kind, uint64_t request_id, const std::string& meta,
                         std::vector<std::vector<float>> tensors, const uint8_t* trace_id = nullptr);
FramesPtr error_frames(const std::string& peer, uint64_t request_id, const std::string& code, const std::string& message);

}  // namespace moemesh::actors
