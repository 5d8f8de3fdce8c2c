#include "actors/control_client.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>

#include <spdlog/spdlog.h>

namespace moemesh::actors {
namespace {

using register_tick_atom = caf::atom_constant<caf::atom("ctlreg")>;
using heartbeat_tick_atom = caf::atom_constant<caf::atom("ctlhb")>;
using control_send_atom = caf::atom_constant<caf::atom("ctlsend")>;

struct ControlState {
  ControlClientOptions opts;
  ControlCallbacks cb;
  caf::actor bridge;
  int dealer = -1, sub = -1;
  bool registered = false;
  bool register_armed = false, heartbeat_armed = false;  // one timer loop of each kind at most
  std::chrono::milliseconds retry{0};
  uint64_t seq = 0;
  uint64_t placement_version = 0;
  uint64_t bad_messages = 0;
};

using Self = caf::stateful_actor<ControlState>;

void send_bytes(Self* self, const std::string& bytes) {
  auto frames = std::make_shared<Frames>();
  frames->emplace_back(bytes.data(), bytes.size());
  self->send(self->state.bridge, zmq_send_atom::value, self->state.dealer, std::move(frames));
}

void send_control(Self* self, const pb::ControlMessage& msg) { send_bytes(self, msg.SerializeAsString()); }

void send_register(Self* self) {
  auto& s = self->state;
  pb::ControlMessage msg;
  *msg.mutable_register_() = s.opts.registration;
  send_control(self, msg);
  if (!s.register_armed) {
    s.register_armed = true;
    self->delayed_send(self, s.retry, register_tick_atom::value);
    s.retry = std::min(s.retry * 2, s.opts.max_register_retry);
  }
}

uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * uint64_t(sysconf(_SC_PAGESIZE));
}

void send_heartbeat(Self* self) {
  auto& s = self->state;
  pb::ControlMessage msg;
  pb::Heartbeat& hb = *msg.mutable_heartbeat();
  hb.set_instance(s.opts.registration.instance());
  hb.set_role(s.opts.registration.role());
  hb.set_seq(++s.seq);
  hb.set_placement_version(s.placement_version);
  hb.set_ready(true);
  hb.set_resident_bytes(resident_bytes());  // `moemesh status` shows it for every member
  if (s.cb.fill_heartbeat) s.cb.fill_heartbeat(hb);
  send_control(self, msg);
  if (!s.heartbeat_armed) {
    s.heartbeat_armed = true;
    self->delayed_send(self, s.opts.heartbeat_interval, heartbeat_tick_atom::value);
  }
}

void on_register_reply(Self* self, const pb::RegisterReply& reply) {
  auto& s = self->state;
  if (!reply.ok()) {
    spdlog::warn("coordinator refused registration of {}: {}; retrying", s.opts.registration.instance(),
                 reply.error().empty() ? "no reason given" : reply.error());
    s.registered = false;
    if (!s.register_armed) send_register(self);
    return;
  }
  bool first = !s.registered;
  s.registered = true;
  s.retry = s.opts.register_retry;
  if (first) {
    spdlog::info("registered with the coordinator at {} (placement version {})", s.opts.control_endpoint,
                 reply.placement_version());
    if (s.cb.on_registered) s.cb.on_registered(reply);
    send_heartbeat(self);  // say "ready" now rather than one interval later
  }
}

void on_placement(Self* self, const pb::PlacementTable& table) {
  auto& s = self->state;
  if (table.version() <= s.placement_version) return;  // a repeat or an older table
  s.placement_version = table.version();
  spdlog::debug("placement version {} ({} hosts)", table.version(), table.hosts_size());
  if (s.cb.on_placement) s.cb.on_placement(table);
}

caf::behavior control_client(Self* self, ControlClientOptions opts, ControlCallbacks cb, caf::actor bridge, int dealer,
                             int sub) {
  auto& s = self->state;
  s.opts = std::move(opts);
  s.cb = std::move(cb);
  s.bridge = std::move(bridge);
  s.dealer = dealer;
  s.sub = sub;
  s.retry = s.opts.register_retry;
  send_register(self);
  return {
      [self](register_tick_atom) {
        self->state.register_armed = false;
        if (!self->state.registered) send_register(self);
      },
      [self](heartbeat_tick_atom) {
        self->state.heartbeat_armed = false;
        if (self->state.registered) send_heartbeat(self);
      },
      [self](control_send_atom, const std::string& bytes) {
        if (!self->state.registered) {
          spdlog::warn("control: not registered yet, a message to the coordinator was dropped");
          return;
        }
        send_bytes(self, bytes);
      },
      [self](zmq_recv_atom, int socket, FramesPtr frames) {
        auto& s = self->state;
        // One frame is the message; a ROUTER peer may put an empty delimiter before it, a PUB
        // a topic: the last frame is the payload either way.
        pb::ControlMessage msg;
        if (!frames || frames->empty() || !msg.ParseFromArray(frames->back().data(), int(frames->back().size()))) {
          ++s.bad_messages;
          spdlog::warn("control: undecodable message from the coordinator ignored ({} so far)", s.bad_messages);
          return;
        }
        if (socket == s.dealer && msg.has_register_reply())
          on_register_reply(self, msg.register_reply());
        else if (socket == s.dealer && msg.has_nccl_pair_id()) {
          if (s.cb.on_nccl_pair) s.cb.on_nccl_pair(msg.nccl_pair_id());
        } else if (socket == s.dealer && msg.has_assign_experts()) {
          if (s.cb.on_assign_experts) s.cb.on_assign_experts(msg.assign_experts());
        } else if (msg.has_placement())
          on_placement(self, msg.placement());
        else
          spdlog::debug("control: unexpected message (body case {}) ignored", int(msg.body_case()));
      },
  };
}

}  // namespace

caf::actor spawn_control_client(caf::actor_system& sys, ZmqBridge& bridge, ControlClientOptions opts,
                                ControlCallbacks callbacks) {
  // Few queued messages: while the coordinator is away, old registers are worthless.
  int dealer = bridge.add({.name = "control",
                           .type = zmq::socket_type::dealer,
                           .endpoint = opts.control_endpoint,
                           .send_hwm = 16,
                           .heartbeats = kDataPlaneHeartbeats});
  if (const char* n = std::getenv("MOEMESH_RESTART_COUNT"); n && opts.registration.restarts() == 0)
    opts.registration.set_restarts(uint32_t(std::strtoul(n, nullptr, 10)));
  int sub = -1;
  if (!opts.placement_endpoint.empty())
    sub = bridge.add(
        {.name = "placement", .type = zmq::socket_type::sub, .endpoint = opts.placement_endpoint, .subscribe = {""}});
  auto actor = sys.spawn(control_client, std::move(opts), std::move(callbacks), bridge.actor(), dealer, sub);
  bridge.route(dealer, actor);
  if (sub >= 0) bridge.route(sub, actor);
  return actor;
}

void send_to_coordinator(const caf::actor& client, const pb::ControlMessage& msg) {
  caf::anon_send(client, control_send_atom::value, msg.SerializeAsString());
}

}  // namespace moemesh::actors
