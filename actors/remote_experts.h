// The attention side of expert dispatch: an ExpertExecutor whose experts live on expert hosts.
//
// For each layer call, the expert groups are assigned to hosts from the placement table (a
// replica is picked by load within the call, ties rotated per (layer, expert) and per client,
// hosts that failed recently last), and ONE DispatchRequest goes to each host with all of its
// experts' rows. Replies are awaited with a deadline; a host that times out or answers with an
// error has its experts retried on another replica, and when none is left run() throws
// moemesh::Error naming the host and the layer. Results are placed per group, so the caller's
// combine() never sees arrival order. Rows and results go through each host's Transport
// (ZeroMQ frames unless a pair transport is set in `transports`); the header is always ZeroMQ.
//
// Each request names the traces of the sequences whose rows it carries (at most
// dispatch::kMaxTraces; the engine's current_forward_inputs() says whose rows are whose), so the
// expert host can log its span under theirs. The time run() spends blocked on replies is
// recorded in `waits` (the step's expert_wait phase, actors/step_phases.h).
//
// run() blocks its calling (compute) thread on a condition variable, fulfilled by a small
// actor that receives the replies from the bridge; never call it from inside an actor.
// set_placement() may be called at any time from any thread.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <caf/all.hpp>
#include <prometheus/registry.h>

#include "actors/step_phases.h"
#include "actors/transport.h"
#include "actors/zmq_bridge.h"
#include "core/moe.h"
#include "core/placement.h"

namespace moemesh::pb {
class PlacementTable;
}

namespace moemesh::actors {

struct RemoteExpertsOptions {
  std::chrono::milliseconds deadline{10000};     // per round of requests
  std::chrono::milliseconds suspect_for{10000};  // a host that failed is tried last for this long
  std::string identity;                          // DEALER routing id prefix (empty: ZeroMQ picks)
  uint64_t salt = 0;                             // spreads replica choice across clients
  // Where the moemesh_attention_dispatch_* metrics go (docs/metrics.md); none without it.
  std::shared_ptr<prometheus::Registry> metrics;
  std::shared_ptr<ExpertWaitLog> waits;  // where run() records its blocked time; null: not recorded
  // How rows and results travel with each host (keyed by its endpoint); null: ZeroMQ frames.
  std::shared_ptr<PeerTransports> transports;
};

struct RemoteExpertsStats {
  std::atomic<uint64_t> requests{0};      // DispatchRequests sent
  std::atomic<uint64_t> retries{0};       // groups re-sent to another replica
  std::atomic<uint64_t> host_failures{0}; // timeouts and error replies
  std::atomic<uint64_t> late_replies{0};  // replies after their deadline (dropped)
  std::atomic<uint64_t> bad_replies{0};   // undecodable replies (dropped)
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
  PeerTransports& transports() { return *opts_.transports; }

  struct Inflight;  // requests awaiting replies (shared with the receiving actor)
  struct Metrics;   // per-host series, made on first use

 private:
  int socket_for(const std::string& endpoint);
  bool suspect(const std::string& endpoint);
  void mark_failed(const std::string& endpoint);

  caf::actor_system& sys_;
  RemoteExpertsOptions opts_;
  std::shared_ptr<RemoteExpertsStats> stats_;
  std::shared_ptr<Inflight> inflight_;
  std::shared_ptr<Metrics> metrics_;  // null without a registry; shared with the receiving actor
  ZmqBridge bridge_;
  caf::actor receiver_;
  std::atomic<uint64_t> next_id_;

  std::mutex sockets_mu_;
  std::map<std::string, int> sockets_;  // endpoint -> bridge socket

  mutable std::mutex table_mu_;
  std::shared_ptr<const PlacementTable> table_;

  std::mutex suspects_mu_;
  std::map<std::string, std::chrono::steady_clock::time_point> suspect_until_;
};

}  // namespace moemesh::actors
