// Both ends of the NCCL bootstrap of dispatch pairs (proto/control.proto: NcclPairId), on top
// of the control client: an attention worker offers a pair to each expert host with which the
// pair rule (choose_transport) picks NCCL, the coordinator relays the unique id, and each side
// switches the pair's entry in its PeerTransports once the communicator exists (the host when
// its join returns, the worker when the host says JOINED). Anything else leaves the pair on
// ZeroMQ: a host or coordinator that refuses, or a join that fails ("no CUDA device: ...").
//
// Joining waits for the peer to join too, at most `join_timeout` (a join that times out is
// reported like a failed one: the pair stays on ZeroMQ), so it runs on its own thread.
#pragma once
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <caf/all.hpp>

#include "actors/transport.h"
#include "proto/control.pb.h"

namespace moemesh::actors {

struct NcclPairOptions {
  std::string instance;  // this process's registered name (workers: also its DEALER routing id)
  pb::Role role = pb::ROLE_UNKNOWN;  // ATTENTION offers and is rank 0; EXPERT answers and is rank 1
  TransportCaps caps;                // what this process registered
  std::function<std::string()> make_id;  // a fresh ncclUniqueId (workers)
  // Joins the pair's two-rank communicator, waiting at most `timeout` for the peer
  // (make_nccl_transport); throws moemesh::Error. Null: built without NCCL.
  std::function<std::shared_ptr<Transport>(const std::string& unique_id, int rank, std::chrono::milliseconds timeout)>
      join;
  std::chrono::milliseconds join_timeout{30000};
  std::function<void(const pb::ControlMessage&)> send;  // to the coordinator (send_to_coordinator)
  std::shared_ptr<PeerTransports> transports;           // where a joined pair is switched
};

// The control client a service spawns after making the callbacks that send through it: what is
// sent before attach() is dropped, as before registration (send_to_coordinator).
class CoordinatorLink {
 public:
  void attach(caf::actor client);
  void send(const pb::ControlMessage& m);

 private:
  std::mutex mu_;
  caf::actor client_;
};

// What a service registers for the pair rule: gpu when it computes on CUDA; nccl only when it
// also can join (built with NCCL) and its --transport is "auto" ("zmq": never offer nor accept);
// gpu_id, the device's UUID (ComputeBackend::device_id), so peers on one GPU keep ZeroMQ.
TransportCaps service_caps(bool cuda, bool built_with_nccl, const std::string& transport_flag,
                           std::string gpu_id = {});

class NcclPairs {
 public:
  explicit NcclPairs(NcclPairOptions opts);

  // Workers: offers a pair to each host of the table that the pair rule gives NCCL, once per host.
  void on_placement(const pb::PlacementTable& table);
  // Both: one relayed bootstrap step (the control client's on_nccl_pair).
  void on_message(const pb::NcclPairId& msg);

  // Where a pair stands, by the peer's instance: "offered", "joined", "rejected: why"; "" if none.
  std::string state(const std::string& peer_instance) const;

 private:
  struct Shared;  // outlives this object in the join threads
  void join_async(const std::string& peer_instance, const std::string& id, int rank,
                  std::function<void(std::shared_ptr<Transport>, const std::string& error)> then);

  NcclPairOptions opts_;
  std::shared_ptr<Shared> shared_;
};

}  // namespace moemesh::actors
