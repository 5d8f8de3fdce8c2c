// The control-plane client of attention workers, expert hosts and KV stores.
//
// It talks to the router's coordinator over the process's ZmqBridge: a DEALER connected to
// the coordinator's ROUTER carries Register (retried with backoff until a RegisterReply
// accepts it: the coordinator may start later) and then a Heartbeat every interval; a SUB
// connected to the coordinator's PUB receives placement tables, and each table newer than the
// last one is handed on. Every message is one frame: a serialized pb::ControlMessage.
//
// The control DEALER carries ZeroMQ heartbeats (kDataPlaneHeartbeats), so a frozen member's
// connection drops at the coordinator too. A registration carries MOEMESH_RESTART_COUNT (set by
// `moemesh up` when it restarts a process) as Register.restarts.
//
// A RegisterReply with ok=false, at any time, makes the client register again (after a
// rejection, or when a restarted coordinator no longer knows this instance).
#pragma once
#include <chrono>
#include <functional>
#include <string>

#include <caf/all.hpp>

#include "actors/zmq_bridge.h"
#include "proto/control.pb.h"

namespace moemesh::actors {

struct ControlClientOptions {
  std::string control_endpoint;    // the coordinator's ROUTER, e.g. tcp://router:5501
  std::string placement_endpoint;  // the coordinator's PUB; empty: no placement subscription
  pb::Register registration;       // sent as is: instance, role, endpoints, model, ...
  // Four a second: the coordinator's fast removal (CoordinatorConfig::suspect_grace, 1 s) needs a
  // live member to have sent one well within the grace.
  std::chrono::milliseconds heartbeat_interval{250};
  std::chrono::milliseconds register_retry{500};  // first retry; doubles up to max_register_retry
  std::chrono::milliseconds max_register_retry{5000};
};

// Run inside the client actor: keep them short and thread-safe with respect to the rest of
// the process (e.g. read atomics, or anon_send to another actor).
struct ControlCallbacks {
  // Fills ready, load, kv_free_blocks, resident_bytes, ... (instance, role, seq and
  // placement_version are already set). Without one, heartbeats say ready=true.
  std::function<void(pb::Heartbeat&)> fill_heartbeat;
  std::function<void(const pb::RegisterReply&)> on_registered;
  std::function<void(const pb::PlacementTable&)> on_placement;  // each newer table, in order
  std::function<void(const pb::NcclPairId&)> on_nccl_pair;      // relayed NCCL bootstrap steps
  // Expert hosts: a live re-placement (answer with an ExpertsLoaded through send_to_coordinator).
  std::function<void(const pb::AssignExperts&)> on_assign_experts;
};

// Adds the DEALER (and SUB) sockets to `bridge`, which must not be started yet, and spawns the
// client actor, which starts registering at once (messages wait in the bridge until it runs).
// Stop it with anon_send_exit. Throws moemesh::Error on a bad endpoint.
caf::actor spawn_control_client(caf::actor_system& sys, ZmqBridge& bridge, ControlClientOptions opts,
                                ControlCallbacks callbacks);

// Sends one message to the coordinator on the client's DEALER (from any thread), e.g. an
// NcclPairId step. Dropped while the client is not registered (the coordinator would not
// know the sender).
void send_to_coordinator(const caf::actor& client, const pb::ControlMessage& msg);

}  // namespace moemesh::actors
