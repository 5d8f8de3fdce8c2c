// The expert host's request path: DispatchRequests arrive from the bridge's ROUTER socket,
// are validated, merged per layer into batches, computed on the compute pool (run_batch) and
// answered through the bridge. Never blocks: compute results come back as messages. The rows
// and the results go through the peer's Transport (ZeroMQ frames unless a pair transport is set).
//
// Each request that names traces gets a span ("dispatch", peer: the attention worker) from its
// arrival to its reply, under the first trace, with the others as links.
//
// Batching (BatchQueue): requests for the same layer from several attention workers are
// merged, so each expert runs one grouped GEMM over all their rows. A layer's open batch runs
//   - at once when every peer that sent anything within `peer_memory` is already in it
//     (nobody else is expected: one attention worker pays no batching latency), or
//   - at once when it holds `max_batch_rows` rows (bounded batches), or
//   - when `window` has passed since its first request.
#pragma once
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <caf/all.hpp>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "actors/lora_metrics.h"
#include "actors/expert_compute.h"
#include "actors/transport.h"
#include "actors/zmq_bridge.h"

namespace moemesh::actors {

struct BatcherOptions {
  std::chrono::microseconds window{200};
  int64_t max_batch_rows = 8192;
  std::chrono::milliseconds peer_memory{1000};
};

// The batching policy alone, driven by explicit times (deterministic tests).
class BatchQueue {
 public:
  using Clock = std::chrono::steady_clock;
  explicit BatchQueue(BatcherOptions opts) : opts_(opts) {}

  // Queues a request; returns the layer's batch when it must run now, else null.
  BatchJobPtr add(int32_t layer, PendingRequest req, Clock::time_point now);
  // Batches whose window has passed by `now`.
  std::vector<BatchJobPtr> take_due(Clock::time_point now);
  size_t open_batches() const { return open_.size(); }
  size_t queued_requests() const;

 private:
  struct Open {
    BatchJobPtr job;
    int64_t rows = 0;
    std::set<std::string> peers;
  };
  BatcherOptions opts_;
  std::map<int32_t, Open> open_;
  std::map<std::string, Clock::time_point> last_seen_;  // per peer
};

// Rows per (layer, expert) since the last drain: the load an expert host reports in heartbeats.
class ExpertLoad {
 public:
  void add(int32_t layer, int32_t expert, uint64_t rows);
  std::map<ExpertKey, uint64_t> drain();

 private:
  std::mutex mu_;
  std::map<ExpertKey, uint64_t> rows_;
};

struct ExpertHostMetrics {
  explicit ExpertHostMetrics(prometheus::Registry& reg);
  void bad_request(const std::string& reason) { bad_requests.Add({{"reason", reason}}).Increment(); }

  prometheus::Family<prometheus::Counter>& bad_requests;  // moemesh_expert_bad_requests_total{reason}
  prometheus::Counter& requests;                          // moemesh_expert_requests_total
  prometheus::Family<prometheus::Counter>& rows;          // moemesh_expert_rows_total{layer, expert}
  prometheus::Counter& batches;                           // moemesh_expert_batches_total
  prometheus::Histogram& batch_requests;                  // moemesh_expert_batch_requests
  prometheus::Histogram& batch_rows;                      // moemesh_expert_batch_rows
  prometheus::Histogram& queue_seconds;                   // moemesh_expert_queue_wait_seconds
  prometheus::Histogram& compute_seconds;                 // moemesh_expert_compute_seconds
  prometheus::Counter& busy_seconds;                      // moemesh_expert_busy_seconds_total
  prometheus::Gauge& queued_requests;                     // moemesh_expert_queued_requests
  prometheus::Gauge& mapped_weight_bytes;                 // moemesh_expert_mapped_weight_bytes
  prometheus::Counter& received_bytes;                    // moemesh_expert_received_bytes_total
  prometheus::Counter& sent_bytes;                        // moemesh_expert_sent_bytes_total
  LoraCacheMetrics lora;                                  // moemesh_expert_lora_cache_*
};

struct ExpertBatcherDeps {
  const HostedExperts* experts = nullptr;  // these three outlive the actor
  ComputePool* pool = nullptr;
  ExpertHostMetrics* metrics = nullptr;
  ExpertLoad* load = nullptr;  // optional
  caf::actor bridge;           // sends replies on `socket` (the ROUTER)
  int socket = 0;
  BatcherOptions options;
  bool per_expert_rows = true;  // moemesh_expert_rows_total{layer, expert} (off: --no-expert-metrics)
  // How rows and results travel with each attention worker (keyed by its routing id); null:
  // ZeroMQ frames with every peer. Outlives the actor.
  const PeerTransports* transports = nullptr;
};

// Route the ROUTER socket's inbound messages to the returned actor.
caf::actor spawn_expert_batcher(caf::actor_system& sys, ExpertBatcherDeps deps);
// Until the batcher runs (the host still loads its experts), the ROUTER's requests go to this
// actor, which answers each with an Error reply `not_ready` at once: the attention worker tries a
// replica, or asks again shortly (actors/remote_experts.h), instead of waiting for a deadline.
caf::actor spawn_not_ready_replier(caf::actor_system& sys, caf::actor bridge, int socket);
// Stops the batcher and waits until it has terminated: after this the pool, the experts and
// the metrics may go (stop the bridge first, so nothing new arrives).
void stop_expert_batcher(caf::actor_system& sys, const caf::actor& batcher);

}  // namespace moemesh::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::BatchJobPtr)
