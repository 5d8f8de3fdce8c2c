// The router's coordinator on loopback TCP (its ROUTER control socket and PUB placement socket
// on free ports), stopped on scope exit, a failed ASSERT included.
#pragma once
#include <string>

#include <caf/all.hpp>

#include "actors/coordinator.h"
#include "actors/zmq_bridge.h"

namespace moemesh::testing {

class LoopbackCoordinator {
 public:
  LoopbackCoordinator(caf::actor_system& sys, actors::CoordinatorConfig cc, caf::actor listener = {}) : bridge_(sys) {
    // Watched, as the router's: a dropped control connection makes the coordinator check at once.
    const int control = bridge_.add({.name = "control",
                                     .type = zmq::socket_type::router,
                                     .endpoint = "tcp://127.0.0.1:*",
                                     .bind = true,
                                     .monitor = true});
    const int publish = bridge_.add(
        {.name = "placement", .type = zmq::socket_type::pub, .endpoint = "tcp://127.0.0.1:*", .bind = true});
    bridge_.start();
    actor_ = actors::spawn_coordinator(sys, bridge_, control, publish, std::move(cc), std::move(listener));
    control_ = bridge_.endpoint(control);
    placement_ = bridge_.endpoint(publish);
  }
  ~LoopbackCoordinator() {
    caf::anon_send_exit(actor_, caf::exit_reason::user_shutdown);
    bridge_.stop();
  }
  const std::string& control() const { return control_; }
  const std::string& placement() const { return placement_; }
  const caf::actor& actor() const { return actor_; }

 private:
  actors::ZmqBridge bridge_;
  caf::actor actor_;
  std::string control_, placement_;
};

}  // namespace moemesh::testing
