// The attention worker's data-plane endpoint: StepRequests arrive on a bound ROUTER socket,
// run on the compute pool (one step at a time: the StepWorker is not thread-safe), and the
// StepResponse (or an Error reply for a bad frame) goes back to the sender. The bridge hands each
// step to the pool itself: an actor between would only forward it, at the cost of one more thread
// hand-off on every step.
#pragma once
#include <atomic>
#include <memory>

#include <caf/all.hpp>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "actors/lora_metrics.h"
#include "actors/kv_client.h"
#include "actors/tiered_prefix_store.h"
#include "actors/step_worker.h"
#include "actors/zmq_bridge.h"
#include "core/wire.h"

namespace moemesh::actors {

class ComputePool;

struct StepServerStats {
  std::atomic<uint64_t> steps{0}, bad_frames{0};
  std::atomic<int64_t> kv_free_blocks{0};  // after the latest step
};

// The worker's prefix-cache and micro-batch counters as Prometheus metrics, brought up to date
// after each step (on the compute thread).
class StepServerMetrics {
 public:
  // kv: the KV store client whose failures are exported (null: none); tier: the prefix cache's
  // memory tier whose size and hits are exported (null: none).
  StepServerMetrics(prometheus::Registry& registry, std::shared_ptr<const KvClient> kv = nullptr,
                    std::shared_ptr<const TieredPrefixStore> tier = nullptr);
  void update(const StepWorkerCounts& c);
  // One step's wall time and the KV pool after it.
  void observe_step(double seconds, int64_t free_blocks, int64_t total_blocks);
  // The same step's wall time split into phases (actors/step_phases.h).
  void observe_phases(const StepPhases& p);

 private:
  std::shared_ptr<const KvClient> kv_;
  std::shared_ptr<const TieredPrefixStore> tier_;
  prometheus::Gauge& tier_bytes_;
  prometheus::Counter& tier_hits_;
  uint64_t seen_tier_hits_ = 0;
  prometheus::Counter &query_tokens_, &hit_tokens_, &computed_, &skipped_, &published_;
  prometheus::Counter &fetch_failures_, &publish_failures_, &cut_fetches_;
  prometheus::Counter &sampled_summary_, &sampled_full_row_;
  prometheus::Counter &mb_step_seconds_, &mb_overlap_seconds_;
  prometheus::Gauge& overlap_ratio_;
  prometheus::Histogram& step_seconds_;
  prometheus::Histogram &phase_attention_, &phase_expert_wait_, &phase_sampling_, &phase_prefix_lookup_;
  prometheus::Gauge &kv_used_, &kv_free_, &kv_usage_;
  LoraCacheMetrics lora_;
  StepWorkerCounts seen_;  // what the counters already show
  uint64_t seen_fetch_failures_ = 0, seen_publish_failures_ = 0, seen_cut_fetches_ = 0;
};

// Serves the steps that arrive on the bridge's `socket` on `pool` (give it one thread). To stop:
// stop_serving_steps, then close the pool off the actor threads (it finishes the step in flight,
// whose reply still goes out), then stop the bridge.
void serve_steps(ZmqBridge& bridge, int socket, std::shared_ptr<StepWorker> worker, std::shared_ptr<ComputePool> pool,
                 std::shared_ptr<StepServerStats> stats, std::shared_ptr<StepServerMetrics> metrics = nullptr);
// No step is queued after this returns, but one the bridge is handing over right now (the pool
// refuses it once closed).
void stop_serving_steps(ZmqBridge& bridge, int socket);

// Frames of a data-plane message: [peer id if any], header, tensors (moved in, zero-copy).
FramesPtr message_frames(const std::string& peer, wire::Kind kind, uint64_t request_id, const std::string& meta,
                         std::vector<std::vector<float>> tensors, const uint8_t* trace_id = nullptr);
FramesPtr error_frames(const std::string& peer, uint64_t request_id, const std::string& code,
                       const std::string& message);

}  // namespace moemesh::actors
