// The attention side of expert dispatch: an ExpertExecutor whose experts live on expert hosts.
//
// For each layer call, the expert groups are assigned to hosts from the placement table (a
// replica is picked by load within the call, ties rotated per (layer, expert) and per client,
// hosts that failed recently last), and ONE DispatchRequest goes to each host with all of its
// experts' rows. Replies are awaited with a deadline; a host that times out or answers with an
// error has its experts retried on another replica, and when none is left run() throws
// moemesh::Error naming the host and the layer.
//
// Failure detection (docs/operations.md, "Failure detection"): every host connection carries
// ZeroMQ heartbeats and is watched by a socket monitor. When a connection drops (the host died,
// or stopped answering pings), every request in flight to it fails at once and goes to a
// replica, and the host is not chosen again until it reconnects. The deadline adapts to the
// measured round trips (core/adaptive_deadline.h: a multiple of the recent p99, between
// min_deadline and deadline). An expert none of whose hosts is usable (none in the table, all
// disconnected, or all answering not_ready while they load) is waited for, up to
// uncovered_wait, until a new table or a reconnection makes one usable: with one replica, a
// step that needs a dead host's experts waits for its replacement instead of failing. Results are placed per group, so
// the caller's combine() never sees arrival order. Rows and results go through each host's Transport (ZeroMQ frames
// unless a pair transport is set in `transports`); the header is always ZeroMQ.
//
// Each request names the traces of the sequences whose rows it carries (at most
// dispatch::kMaxTraces; the engine's current_forward_inputs() says whose rows are whose), so the
// expert host can log its span under theirs. The time run() spends blocked on replies is
// recorded in `waits` (the step's expert_wait phase, actors/step_phases.h).
//
// run() blocks its calling (compute) thread on a condition variable, fulfilled by the bridge's I/O
// thread as a reply arrives (or, for a reply whose payload comes over a pair transport, by a small
// actor that takes the payload off); never call it from inside an actor.
// set_placement() may be called at any time from any thread.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <mutex>
#include <string>

#include <caf/all.hpp>
#include <prometheus/registry.h>

#include "actors/step_phases.h"
#include "actors/transport.h"
#include "actors/zmq_bridge.h"
#include "core/adaptive_deadline.h"
#include "core/moe.h"
#include "core/placement.h"

namespace moemesh::pb {
class PlacementTable;
}

namespace moemesh::actors {

struct RemoteExpertsOptions {
  std::chrono::milliseconds deadline{10000};        // per round of requests: the adaptive deadline's maximum
  std::chrono::milliseconds min_deadline{250};      // the adaptive deadline's minimum
  double deadline_p99_multiple = 8.0;               // adaptive deadline = this x p99 of recent round trips
  std::chrono::milliseconds uncovered_wait{20000};  // how long a call waits for an expert with no usable host
  std::chrono::milliseconds retry_backoff{100};     // a host that answered not_ready is tried again after this
  std::chrono::milliseconds suspect_for{10000};     // a host that failed is tried last for this long
  // Hedged requests: a host that has not answered after this multiple of the recent p99 round
  // trip (at least hedge_min) gets a duplicate of its rows sent to another replica holding them;
  // the first good reply wins. 0: off.
  double hedge_p99_multiple = 0;
  std::chrono::milliseconds hedge_min{5};
  std::string identity;  // DEALER routing id prefix (empty: ZeroMQ picks)
  uint64_t salt = 0;     // spreads replica choice across clients
  // Where the moemesh_attention_dispatch_* metrics go (docs/metrics.md); none without it.
  std::shared_ptr<prometheus::Registry> metrics;
  std::shared_ptr<ExpertWaitLog> waits;  // where run() records its blocked time; null: not recorded
  // How rows and results travel with each host (keyed by its endpoint); null: ZeroMQ frames.
  std::shared_ptr<PeerTransports> transports;
};

struct RemoteExpertsStats {
  std::atomic<uint64_t> requests{0};         // DispatchRequests sent
  std::atomic<uint64_t> retries{0};          // groups re-sent to another replica
  std::atomic<uint64_t> host_failures{0};    // timeouts and error replies
  std::atomic<uint64_t> late_replies{0};     // replies after their deadline (dropped)
  std::atomic<uint64_t> bad_replies{0};      // undecodable replies (dropped)
  std::atomic<uint64_t> disconnects{0};      // requests failed at once because their host's connection dropped
  std::atomic<uint64_t> uncovered_waits{0};  // calls that waited for an expert with no usable host
  std::atomic<int64_t> waiting{0};           // calls waiting for one now
  std::atomic<uint64_t> hedge_wins{0};       // hedged duplicates that answered first
  std::atomic<uint64_t> hedge_losses{0};     // hedged duplicates the original beat (or both failed)
};

// The core placement table from the coordinator's protobuf (hosts not marked live are left out).
PlacementTable placement_from_proto(const pb::PlacementTable& msg);

class RemoteExpertExecutor : public ExpertExecutor {
 public:
  explicit RemoteExpertExecutor(caf::actor_system& sys, RemoteExpertsOptions opts = {});
  ~RemoteExpertExecutor() override;
  RemoteExpertExecutor(const RemoteExpertExecutor&) = delete;
  RemoteExpertExecutor& operator=(const RemoteExpertExecutor&) = delete;

  void set_placement(PlacementTable table);
  std::shared_ptr<const PlacementTable> placement() const;

  void run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
           std::vector<std::vector<float>>& outputs) override;

  const RemoteExpertsStats& stats() const { return *stats_; }
  // The deadline the next round of requests gets.
  std::chrono::milliseconds current_deadline() const { return deadline_.current(); }
  // When a slow request gets a hedged duplicate; nullopt when hedging is off or no round trip
  // has been measured yet.
  std::optional<std::chrono::nanoseconds> hedge_after() const;
  // Whether the connection to the host at `endpoint` is down (it dropped and has not come back).
  bool disconnected(const std::string& endpoint) const;
  PeerTransports& transports() { return *opts_.transports; }

  struct Inflight;  // requests awaiting replies (shared with the bridge's handler and the receiving actor)
  struct Metrics;   // per-host series, made on first use

 private:
  int socket_for(const std::string& endpoint);
  bool suspect(const std::string& endpoint);
  void mark_failed(const std::string& endpoint);

  caf::actor_system& sys_;
  RemoteExpertsOptions opts_;
  std::shared_ptr<RemoteExpertsStats> stats_;
  std::shared_ptr<Inflight> inflight_;
  std::shared_ptr<Metrics> metrics_;  // null without a registry; shared with the receiving side
  ZmqBridge bridge_;
  caf::actor receiver_;
  std::atomic<uint64_t> next_id_;
  AdaptiveDeadline deadline_;

  std::mutex sockets_mu_;
  std::map<std::string, int> sockets_;  // endpoint -> bridge socket

  mutable std::mutex table_mu_;
  std::shared_ptr<const PlacementTable> table_;

  std::mutex suspects_mu_;
  std::map<std::string, std::chrono::steady_clock::time_point> suspect_until_;
};

}  // namespace moemesh::actors
