// The cluster coordinator (inside the router): membership, heartbeats, expert placement.
//
// Attention workers, expert hosts and KV stores send pb::ControlMessage frames to its ROUTER
// socket (register, heartbeat, status_request). It answers registrations (expert hosts get
// the experts they must serve), expires silent members, and publishes every new placement
// table — and the current one periodically, for late subscribers — on its PUB socket.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <caf/all.hpp>
#include <prometheus/registry.h>

#include "actors/zmq_bridge.h"
#include "core/live_rebalance.h"

namespace moemesh::actors {

struct CoordinatorConfig {
  std::string model_id;
  std::vector<int32_t> moe_layers;  // layers with routed experts
  int32_t num_experts = 0;
  int32_t expert_hosts = 1;  // expected expert hosts: the number of placement slots
  int32_t replicas = 1;
  std::chrono::milliseconds heartbeat_timeout{2000};
  // When a control connection drops (the control ROUTER's monitor), members whose last heartbeat
  // is older than this at the check, suspect_grace later, are removed at once instead of after
  // heartbeat_timeout: the drop says someone died, the heartbeats say who. 0: off.
  std::chrono::milliseconds suspect_grace{1000};
  std::chrono::milliseconds publish_interval{500};
  // Where the moemesh_coordinator_* metrics go (docs/metrics.md); none without it.
  std::shared_ptr<prometheus::Registry> metrics;
  // The expert load-imbalance gauge looks at the rows the heartbeats reported in this window.
  std::chrono::milliseconds load_window{60000};
  // Live load-driven re-placement (core/live_rebalance.h); interval 0: off. min_replicas is
  // taken from `replicas`.
  RebalanceOptions rebalance;
};

struct AttentionWorker {
  std::string instance;
  std::string endpoint;  // its step socket
  int64_t kv_blocks = 0;
  int64_t kv_free_blocks = 0;
  bool ready = false;
};
using WorkerList = std::shared_ptr<const std::vector<AttentionWorker>>;

using workers_atom = caf::atom_constant<caf::atom("workers")>;
using ready_atom = caf::atom_constant<caf::atom("ready")>;
using status_atom = caf::atom_constant<caf::atom("status")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
using suspect_atom = caf::atom_constant<caf::atom("suspect")>;

// Spawns the coordinator. `control` is a bound ROUTER (opened with monitor = true for the fast
// removal, see suspect_grace) and `publish` a bound PUB socket of `bridge`; `listener` receives (workers_atom,
// WorkerList) whenever the set of ready attention workers changes. Answers (ready_atom) -> bool and (status_atom) ->
// std::string (a serialized pb::ClusterStatus).
caf::actor spawn_coordinator(caf::actor_system& sys, ZmqBridge& bridge, int control, int publish, CoordinatorConfig cfg,
                             caf::actor listener);

}  // namespace moemesh::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::WorkerList)
