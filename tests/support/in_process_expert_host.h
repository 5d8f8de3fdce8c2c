// One expert host inside a test process, wired as moemesh-expert wires it: the experts it
// serves mapped from the checkpoint, an expert batcher on a compute pool, and a ROUTER bridge on
// loopback TCP. Tests of the attention-side dispatch talk to it over real ZeroMQ.
#pragma once
#include <filesystem>
#include <memory>
#include <string>

#include <caf/all.hpp>
#include <prometheus/registry.h>

#include "actors/expert_batcher.h"
#include "actors/expert_compute.h"
#include "actors/transport.h"
#include "actors/zmq_bridge.h"
#include "core/checkpoint.h"
#include "core/expert_set.h"
#include "core/placement.h"

namespace moemesh::testing {

class InProcessExpertHost {
 public:
  // transports: how rows and results travel with each attention worker (null: ZeroMQ frames).
  InProcessExpertHost(caf::actor_system& sys, const std::filesystem::path& model, const std::string& spec,
                      std::string name, int compute_threads = 1,
                      const actors::PeerTransports* transports = nullptr)
      : sys_(sys),
        name_(std::move(name)),
        ckpt_(Checkpoint::open(model)),
        experts_(ckpt_, parse_expert_spec(spec, ckpt_->config())),
        metrics_(registry_),
        pool_(compute_threads),
        bridge_(sys) {
    int s = bridge_.add({.name = name_, .type = zmq::socket_type::router, .endpoint = "tcp://127.0.0.1:*", .bind = true});
    actors::ExpertBatcherDeps deps{&experts_, &pool_, &metrics_, nullptr, bridge_.actor(), s, {}};
    deps.transports = transports;
    batcher_ = actors::spawn_expert_batcher(sys, std::move(deps));
    bridge_.route(s, batcher_);
    bridge_.start();
    endpoint_ = bridge_.endpoint(s);
  }
  ~InProcessExpertHost() { kill(); }

  // Stops answering, as a dead process would: the port goes away.
  void kill() {
    if (!batcher_) return;
    bridge_.stop();
    actors::stop_expert_batcher(sys_, batcher_);
    batcher_ = nullptr;
  }
  // What it tells the placement it serves (which may be a lie, for error tests).
  PlacementHost entry(const std::string& claimed_spec = "") const {
    return {name_, endpoint_,
            claimed_spec.empty() ? experts_.experts() : parse_expert_spec(claimed_spec, experts_.config())};
  }
  const actors::HostedExperts& experts() const { return experts_; }
  double bad_requests(const std::string& reason) { return metrics_.bad_requests.Add({{"reason", reason}}).Value(); }
  double requests() const { return metrics_.requests.Value(); }
  double received_bytes() const { return metrics_.received_bytes.Value(); }  // ZeroMQ frames only

 private:
  caf::actor_system& sys_;
  std::string name_;
  std::shared_ptr<Checkpoint> ckpt_;
  actors::HostedExperts experts_;
  prometheus::Registry registry_;
  actors::ExpertHostMetrics metrics_;
  actors::ComputePool pool_;
  actors::ZmqBridge bridge_;
  caf::actor batcher_;
  std::string endpoint_;
};

}  // namespace moemesh::testing
