// The router's coordinator on loopback, against members that are plain DEALER sockets driven by
// the test (speaking pb::ControlMessage) and a plain SUB socket: expert placement through
// registration, tables published to late subscribers, expiry of silent members, ready attention
// workers announced to the listener, bad control messages, cluster status.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <zmq.hpp>

#include "actors/coordinator.h"
#include "proto/control.pb.h"
#include "tests/support/actor_config.h"
#include "tests/support/eventually.h"
#include "tests/support/loopback_coordinator.h"
#include "tests/support/metrics_text.h"

using namespace moemesh;
using namespace moemesh::actors;
using namespace std::chrono_literals;

namespace {

using moemesh::testing::eventually;
using moemesh::testing::LoopbackCoordinator;
using moemesh::testing::series_value;
using moemesh::testing::two_thread_config;

using Experts = std::set<std::pair<int32_t, int32_t>>;

template <class List>
Experts experts_of(const List& ids) {
  Experts out;
  for (const auto& id : ids) out.insert({id.layer(), id.expert()});
  return out;
}

// A cluster member's control socket: a DEALER whose routing id is its instance name.
class FakeMember {
 public:
  FakeMember(const std::string& control, std::string instance) : instance_(std::move(instance)) {
    dealer_.set(zmq::sockopt::routing_id, instance_);
    dealer_.set(zmq::sockopt::linger, 0);
    dealer_.connect(control);
  }

  void send(const pb::ControlMessage& m) { send_frames({m.SerializeAsString()}); }
  void send_frames(const std::vector<std::string>& frames) {
    for (size_t i = 0; i < frames.size(); ++i)
      dealer_.send(zmq::buffer(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
  }

  // The coordinator's next message to this member; none within `limit`.
  std::optional<pb::ControlMessage> recv(std::chrono::milliseconds limit = 5s) {
    dealer_.set(zmq::sockopt::rcvtimeo, int(limit.count()));
    zmq::message_t body;
    if (!dealer_.recv(body)) return std::nullopt;
    EXPECT_FALSE(body.more()) << "a control message is one frame";
    pb::ControlMessage m;
    EXPECT_TRUE(m.ParseFromArray(body.data(), int(body.size())));
    return m;
  }

  pb::RegisterReply register_as(pb::Role role, const std::string& data_endpoint, int64_t kv_blocks = 0,
                                const std::string& model_id = "tiny-moe", uint32_t restarts = 0) {
    pb::ControlMessage m;
    auto* r = m.mutable_register_();
    r->set_instance(instance_);
    r->set_role(role);
    r->set_data_endpoint(data_endpoint);
    r->set_admin_endpoint(instance_ + ":9100");
    r->set_model_id(model_id);
    r->set_kv_blocks(kv_blocks);
    r->set_restarts(restarts);
    send(m);
    return reply_of(pb::ControlMessage::kRegisterReply).register_reply();
  }

  void heartbeat(bool ready, const std::function<void(pb::Heartbeat&)>& fill = {}) {
    pb::ControlMessage m;
    auto* hb = m.mutable_heartbeat();
    hb->set_instance(instance_);
    hb->set_ready(ready);
    hb->set_seq(++seq_);
    if (fill) fill(*hb);
    send(m);
  }

  // A status round trip. The coordinator handles one member's messages in order, so everything
  // sent before was handled when this returns.
  pb::ClusterStatus status() {
    pb::ControlMessage m;
    m.mutable_status_request();
    send(m);
    return reply_of(pb::ControlMessage::kStatus).status();
  }

 private:
  pb::ControlMessage reply_of(pb::ControlMessage::BodyCase kind) {
    auto m = recv();
    if (!m) {
      ADD_FAILURE() << instance_ << ": no reply within 5 s";
      return {};
    }
    EXPECT_EQ(m->body_case(), kind) << m->DebugString();
    return *m;
  }

  std::string instance_;
  uint64_t seq_ = 0;
  zmq::context_t ctx_{1};
  zmq::socket_t dealer_{ctx_, zmq::socket_type::dealer};

 public:
  void die() { dealer_.close(); }  // the process is gone: its connection drops
};

// A subscriber to the placement tables.
class PlacementWatcher {
 public:
  explicit PlacementWatcher(const std::string& endpoint) {
    sub_.set(zmq::sockopt::linger, 0);
    sub_.set(zmq::sockopt::subscribe, "");
    sub_.connect(endpoint);
  }

  // The first table published within `limit` for which `want` holds.
  template <class Pred>
  std::optional<pb::PlacementTable> wait_for(Pred want, std::chrono::milliseconds limit = 5s) {
    std::optional<pb::PlacementTable> found;
    eventually(
        [&] {
          if (auto t = next(20ms); t && want(*t)) found = t;
          return found.has_value();
        },
        limit);
    return found;
  }

  std::optional<pb::PlacementTable> next(std::chrono::milliseconds limit) {
    sub_.set(zmq::sockopt::rcvtimeo, int(limit.count()));
    zmq::message_t body;
    if (!sub_.recv(body)) return std::nullopt;
    pb::ControlMessage m;
    EXPECT_TRUE(m.ParseFromArray(body.data(), int(body.size())));
    EXPECT_EQ(m.body_case(), pb::ControlMessage::kPlacement);
    return m.placement();
  }

 private:
  zmq::context_t ctx_{1};
  zmq::socket_t sub_{ctx_, zmq::socket_type::sub};
};

bool lists(const pb::PlacementTable& t, const std::string& instance) {
  for (const auto& h : t.hosts())
    if (h.instance() == instance) return true;
  return false;
}

const pb::ServiceStatus* service(const pb::ClusterStatus& s, const std::string& instance) {
  for (const auto& o : s.services())
    if (o.instance() == instance) return &o;
  return nullptr;
}

// Two MoE layers (1 and 3) of six experts.
CoordinatorConfig config(int32_t expert_hosts, int32_t replicas, std::chrono::milliseconds heartbeat_timeout = 60s) {
  CoordinatorConfig cc;
  cc.model_id = "tiny-moe";
  cc.moe_layers = {1, 3};
  cc.num_experts = 6;
  cc.expert_hosts = expert_hosts;
  cc.replicas = replicas;
  cc.heartbeat_timeout = heartbeat_timeout;
  cc.publish_interval = 50ms;
  cc.metrics = std::make_shared<prometheus::Registry>();
  return cc;
}

// The next worker list told to `listener`; none within `limit`.
std::optional<std::vector<AttentionWorker>> next_workers(caf::scoped_actor& listener, std::chrono::milliseconds limit) {
  std::optional<std::vector<AttentionWorker>> got;
  listener->receive([&](workers_atom, WorkerList l) { got = *l; }, caf::after(limit) >> [] {});
  return got;
}

bool cluster_ready(caf::scoped_actor& self, const caf::actor& coordinator) {
  bool ready = false;
  self->request(coordinator, 5s, ready_atom::value)
      .receive([&](bool r) { ready = r; }, [&](caf::error& e) { ADD_FAILURE() << self->system().render(e); });
  return ready;
}

}  // namespace

// Each expert host that registers is told the experts of its slot; together the expected hosts
// serve every (MoE layer, expert) exactly `replicas` times. A repeated registration (a lost
// reply) gets the same answer without a new placement version.
TEST(Coordinator, ExpertHostsShareEveryExpertReplicasTimes) {
  caf::actor_system sys{two_thread_config()};
  const CoordinatorConfig cc = config(/*expert_hosts=*/3, /*replicas=*/2);
  LoopbackCoordinator coord(sys, cc);

  std::map<std::pair<int32_t, int32_t>, int> copies;
  std::map<std::string, Experts> assigned;
  uint64_t version = 0;
  for (const std::string name : {"exp-0", "exp-1", "exp-2"}) {
    FakeMember host(coord.control(), name);
    const auto reply = host.register_as(pb::EXPERT, "tcp://127.0.0.1:710" + name.substr(4));
    ASSERT_TRUE(reply.ok()) << reply.error();
    EXPECT_GT(reply.placement_version(), version);
    version = reply.placement_version();
    assigned[name] = experts_of(reply.assigned());
    EXPECT_EQ(assigned[name].size(), size_t(reply.assigned_size())) << "no expert twice on one host";
    EXPECT_EQ(assigned[name].size(), 8u) << "12 experts x 2 copies over 3 hosts";
    for (const auto& k : assigned[name]) ++copies[k];
    if (name == "exp-0") {
      ASSERT_TRUE(
          eventually([&] { return series_value(*cc.metrics, "moemesh_coordinator_uncovered_experts", {}) == 4; }, 5s))
          << "one host of three covers 8 of 12";
    }
    if (name == "exp-1") {
      const auto again = host.register_as(pb::EXPERT, "tcp://127.0.0.1:7101");
      EXPECT_EQ(experts_of(again.assigned()), assigned[name]);
      EXPECT_EQ(again.placement_version(), version);
    }
  }
  ASSERT_EQ(copies.size(), 12u);
  for (int32_t layer : {1, 3})
    for (int32_t e = 0; e < 6; ++e) EXPECT_EQ((copies[{layer, e}]), 2) << "layer " << layer << " expert " << e;
  EXPECT_NE(assigned["exp-0"], assigned["exp-1"]);
  EXPECT_TRUE(
      eventually([&] { return series_value(*cc.metrics, "moemesh_coordinator_uncovered_experts", {}) == 0; }, 5s));
}

// A subscriber that connects after the registrations still gets the current table (it is
// republished periodically): every host with its endpoint and experts, at the newest version; a
// new registration is published as a newer table.
TEST(Coordinator, PlacementTablesReachLateSubscribers) {
  caf::actor_system sys{two_thread_config()};
  LoopbackCoordinator coord(sys, config(2, 1));
  FakeMember a(coord.control(), "exp-a"), b(coord.control(), "exp-b");
  const auto ra = a.register_as(pb::EXPERT, "tcp://127.0.0.1:7201");
  const auto rb = b.register_as(pb::EXPERT, "tcp://127.0.0.1:7202");
  ASSERT_TRUE(ra.ok() && rb.ok());

  PlacementWatcher watcher(coord.placement());
  const auto table = watcher.wait_for([](const auto&) { return true; });
  ASSERT_TRUE(table) << "nothing published within 5 s";
  EXPECT_EQ(table->version(), rb.placement_version());
  EXPECT_EQ(table->num_layers(), 2);
  EXPECT_EQ(table->num_experts(), 6);
  ASSERT_EQ(table->hosts_size(), 2);
  EXPECT_EQ(table->hosts(0).instance(), "exp-a");
  EXPECT_EQ(table->hosts(0).data_endpoint(), "tcp://127.0.0.1:7201");
  EXPECT_EQ(experts_of(table->hosts(0).experts()), experts_of(ra.assigned()));
  EXPECT_EQ(table->hosts(1).data_endpoint(), "tcp://127.0.0.1:7202");
  EXPECT_EQ(experts_of(table->hosts(1).experts()), experts_of(rb.assigned()));
  for (const auto& h : table->hosts()) EXPECT_TRUE(h.live());

  FakeMember c(coord.control(), "exp-c");  // more hosts than slots: an extra copy of a slot
  const auto rc = c.register_as(pb::EXPERT, "tcp://127.0.0.1:7203");
  ASSERT_TRUE(rc.ok());
  EXPECT_TRUE(experts_of(rc.assigned()) == experts_of(ra.assigned()) ||
              experts_of(rc.assigned()) == experts_of(rb.assigned()));
  const auto newer = watcher.wait_for([](const auto& t) { return t.hosts_size() == 3; });
  ASSERT_TRUE(newer);
  EXPECT_EQ(newer->version(), rc.placement_version());
  EXPECT_GT(newer->version(), table->version());
}

// A host that stops heartbeating is dropped from the published table (the live one stays), is
// counted as expired, is asked to register again when it speaks up, and a new host takes its slot.
TEST(Coordinator, SilentMembersExpireAndANewHostTakesTheirSlot) {
  caf::actor_system sys{two_thread_config()};
  const CoordinatorConfig cc = config(2, 1, /*heartbeat_timeout=*/1s);
  LoopbackCoordinator coord(sys, cc);
  FakeMember live(coord.control(), "exp-live"), silent(coord.control(), "exp-silent");
  const auto rl = live.register_as(pb::EXPERT, "tcp://127.0.0.1:7301");
  const auto rs = silent.register_as(pb::EXPERT, "tcp://127.0.0.1:7302");
  ASSERT_TRUE(rl.ok() && rs.ok());

  PlacementWatcher watcher(coord.placement());
  std::optional<pb::PlacementTable> table;
  ASSERT_TRUE(eventually(
      [&] {
        live.heartbeat(true);
        table = watcher.next(50ms);
        return table && !lists(*table, "exp-silent");
      },
      5s))
      << "the silent host was never dropped";
  EXPECT_TRUE(lists(*table, "exp-live"));
  EXPECT_GT(table->version(), rs.placement_version());
  EXPECT_EQ(series_value(*cc.metrics, "moemesh_coordinator_expired_members_total", {{"role", "expert"}}), 1);
  EXPECT_EQ(service(live.status(), "exp-silent"), nullptr);
  EXPECT_TRUE(
      eventually([&] { return series_value(*cc.metrics, "moemesh_coordinator_uncovered_experts", {}) == 6; }, 5s))
      << "the silent host's half of the experts";

  silent.heartbeat(true);
  const auto asked = silent.recv();
  ASSERT_TRUE(asked);
  EXPECT_FALSE(asked->register_reply().ok());
  EXPECT_NE(asked->register_reply().error().find("register again"), std::string::npos);

  live.heartbeat(true);  // its slot stays taken
  FakeMember replacement(coord.control(), "exp-new");
  const auto rn = replacement.register_as(pb::EXPERT, "tcp://127.0.0.1:7303");
  EXPECT_EQ(experts_of(rn.assigned()), experts_of(rs.assigned())) << "the dead host's slot";
}

// A member whose control connection drops is removed one suspect grace later, long before the
// heartbeat timeout; members that keep sending heartbeats stay. A registration's restart count
// shows in the status and the metric.
TEST(Coordinator, AMemberWhoseConnectionDropsIsRemovedAfterTheGraceNotTheTimeout) {
  caf::actor_system sys{two_thread_config()};
  CoordinatorConfig cc = config(2, 1, /*heartbeat_timeout=*/60s);
  cc.suspect_grace = 400ms;
  cc.publish_interval = 1h;  // no tick after the first: what the metric shows, registration set
  LoopbackCoordinator coord(sys, cc);
  FakeMember live(coord.control(), "exp-live"), dying(coord.control(), "exp-dying");
  ASSERT_TRUE(live.register_as(pb::EXPERT, "tcp://127.0.0.1:7311").ok());
  ASSERT_TRUE(dying.register_as(pb::EXPERT, "tcp://127.0.0.1:7312", 0, "tiny-moe", /*restarts=*/3).ok());
  const pb::ServiceStatus* d = nullptr;
  auto before = live.status();
  ASSERT_NE(d = service(before, "exp-dying"), nullptr);
  EXPECT_EQ(d->restarts(), 3u);
  // Set by the registration itself, not a later tick: a scrape after the reply already shows it.
  EXPECT_EQ(
      series_value(*cc.metrics, "moemesh_coordinator_member_restarts", {{"role", "expert"}, {"host", "exp-dying"}}), 3);

  const auto died = std::chrono::steady_clock::now();
  dying.die();
  bool gone = false;
  while (!gone && std::chrono::steady_clock::now() - died < 10s) {
    live.heartbeat(true);
    gone = service(live.status(), "exp-dying") == nullptr;
    std::this_thread::sleep_for(50ms);
  }
  const auto took = std::chrono::steady_clock::now() - died;
  ASSERT_TRUE(gone) << "the member whose connection dropped was never removed";
  EXPECT_LT(took, 3s) << "removed by the heartbeat timeout, not the drop";
  EXPECT_GE(took, 400ms) << "removed before its grace";
  const auto after = live.status();
  EXPECT_NE(service(after, "exp-live"), nullptr) << "a member that kept its heartbeats was removed";
  EXPECT_EQ(after.expired_members(), 1u);
  EXPECT_EQ(after.uncovered_size(), 6) << "the dead host's half of the experts";
  EXPECT_EQ(after.replicas(), 1);
}

// Two members die one after the other, the second while the check for the first is pending (it
// sent heartbeats until then, so that check finds it silent for less than the grace): it gets a
// check of its own one grace after its drop, not the whole heartbeat timeout.
TEST(Coordinator, ASecondDropWhileACheckIsPendingGetsItsOwnCheck) {
  caf::actor_system sys{two_thread_config()};
  CoordinatorConfig cc = config(3, 1, /*heartbeat_timeout=*/60s);
  cc.suspect_grace = 400ms;
  cc.publish_interval = 1h;
  LoopbackCoordinator coord(sys, cc);
  FakeMember live(coord.control(), "exp-live"), first(coord.control(), "exp-first"),
      second(coord.control(), "exp-second");
  ASSERT_TRUE(live.register_as(pb::EXPERT, "tcp://127.0.0.1:7321").ok());
  ASSERT_TRUE(first.register_as(pb::EXPERT, "tcp://127.0.0.1:7322").ok());
  ASSERT_TRUE(second.register_as(pb::EXPERT, "tcp://127.0.0.1:7323").ok());

  first.die();
  const auto first_died = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - first_died < 200ms) {  // the second lives on a while
    live.heartbeat(true);
    second.heartbeat(true);
    std::this_thread::sleep_for(20ms);
  }
  second.die();
  const auto second_died = std::chrono::steady_clock::now();
  bool first_gone = false, second_gone = false;
  while (!second_gone && std::chrono::steady_clock::now() - second_died < 10s) {
    live.heartbeat(true);
    const auto st = live.status();
    first_gone = service(st, "exp-first") == nullptr;
    second_gone = service(st, "exp-second") == nullptr;
    std::this_thread::sleep_for(50ms);
  }
  const auto took = std::chrono::steady_clock::now() - second_died;
  EXPECT_TRUE(first_gone);
  ASSERT_TRUE(second_gone) << "the second member whose connection dropped was never removed";
  EXPECT_LT(took, 3s) << "the second was removed by the heartbeat timeout, not its drop";
  EXPECT_GE(took, 400ms) << "removed before its grace";
  EXPECT_NE(service(live.status(), "exp-live"), nullptr) << "a member that kept its heartbeats was removed";
}

// Scaling out: an expert host beyond the slots registers after the heartbeats reported skewed
// load, and is assigned the hot experts (not a round-robin copy of a slot); the status counts them.
TEST(Coordinator, AHostBeyondTheSlotsGetsTheHotExperts) {
  caf::actor_system sys{two_thread_config()};
  const CoordinatorConfig cc = config(2, 1);
  LoopbackCoordinator coord(sys, cc);
  FakeMember a(coord.control(), "exp-a"), b(coord.control(), "exp-b"), c(coord.control(), "exp-c");
  const auto ra = a.register_as(pb::EXPERT, "tcp://127.0.0.1:7321");
  const auto rb = b.register_as(pb::EXPERT, "tcp://127.0.0.1:7322");
  ASSERT_TRUE(ra.ok() && rb.ok());
  // Layer 3 expert 4 is hot, wherever it lives.
  for (FakeMember* m : {&a, &b})
    m->heartbeat(true, [&](pb::Heartbeat& hb) {
      const Experts mine = experts_of(m == &a ? ra.assigned() : rb.assigned());
      for (const auto& [layer, expert] : mine) {
        auto* l = hb.add_load();
        l->set_layer(layer);
        l->set_expert(expert);
        l->set_rows(layer == 3 && expert == 4 ? 5000 : 10);
      }
    });
  (void)a.status();  // the heartbeats were handled
  (void)b.status();
  const auto rc = c.register_as(pb::EXPERT, "tcp://127.0.0.1:7323");
  ASSERT_TRUE(rc.ok());
  const Experts got = experts_of(rc.assigned());
  EXPECT_TRUE(got.count({3, 4})) << "the hot expert is on the new host";
  // Placed by load (not the round-robin copy of a slot it gets before any load is known).
  EXPECT_EQ(c.status().placement_moves(), got.size());
}

// The listener hears of attention workers once they are registered and report ready, with their
// step endpoint and KV size, again when the set changes (a second worker, one that goes silent,
// one no longer ready), and never for heartbeats that change nothing. The cluster is ready once
// every expert has a host and a worker is ready.
TEST(Coordinator, ReadyAttentionWorkersAreAnnouncedToTheListener) {
  caf::actor_system sys{two_thread_config()};
  caf::scoped_actor listener{sys};
  LoopbackCoordinator coord(sys, config(1, 1, /*heartbeat_timeout=*/1s), caf::actor_cast<caf::actor>(listener));
  caf::scoped_actor self{sys};
  FakeMember w0(coord.control(), "attn-0"), w1(coord.control(), "attn-1"), host(coord.control(), "exp-0");

  ASSERT_TRUE(w0.register_as(pb::ATTENTION, "tcp://127.0.0.1:7400", /*kv_blocks=*/256).ok());
  w0.heartbeat(false);
  w0.status();
  EXPECT_FALSE(next_workers(listener, 0ms)) << "registered but not ready";

  w0.heartbeat(true, [](pb::Heartbeat& hb) { hb.set_kv_free_blocks(200); });
  auto list = next_workers(listener, 5s);
  ASSERT_TRUE(list);
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].instance, "attn-0");
  EXPECT_EQ((*list)[0].endpoint, "tcp://127.0.0.1:7400");
  EXPECT_EQ((*list)[0].kv_blocks, 256);
  EXPECT_EQ((*list)[0].kv_free_blocks, 200);
  EXPECT_TRUE((*list)[0].ready);
  w0.heartbeat(true);
  w0.status();
  EXPECT_FALSE(next_workers(listener, 0ms)) << "nothing changed";
  EXPECT_FALSE(cluster_ready(self, coord.actor())) << "no expert host yet";
  ASSERT_TRUE(host.register_as(pb::EXPERT, "tcp://127.0.0.1:7401").ok());
  EXPECT_TRUE(cluster_ready(self, coord.actor()));

  w0.heartbeat(true);  // still alive when the next list is made
  ASSERT_TRUE(w1.register_as(pb::ATTENTION, "tcp://127.0.0.1:7402", 128).ok());
  w1.heartbeat(true);
  list = next_workers(listener, 5s);
  ASSERT_TRUE(list);
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[1].instance, "attn-1");

  // attn-0 goes silent; the others keep heartbeating until it is dropped.
  list.reset();
  ASSERT_TRUE(eventually(
      [&] {
        w1.heartbeat(true);
        host.heartbeat(true);
        list = next_workers(listener, 20ms);
        return list.has_value();
      },
      5s));
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].instance, "attn-1");

  w1.heartbeat(false);
  list = next_workers(listener, 5s);
  ASSERT_TRUE(list);
  EXPECT_TRUE(list->empty()) << "a worker that reports not ready is withdrawn";
  EXPECT_FALSE(cluster_ready(self, coord.actor()));
}

// Control messages that do not parse, have the wrong number of frames or the wrong kind are
// dropped; a registration without name or role, or for another model, and a heartbeat from an
// unknown instance are answered with ok=false and why. The coordinator keeps answering, and
// nothing bad was registered.
TEST(Coordinator, BadControlMessagesAreRefusedOrDroppedAndItKeepsAnswering) {
  caf::actor_system sys{two_thread_config()};
  LoopbackCoordinator coord(sys, config(1, 1));
  FakeMember peer(coord.control(), "bad-0");

  peer.send_frames({"\xff\xff\xff garbage"});
  peer.send_frames({std::string("\x0a\x80", 2)});  // a truncated length-delimited field
  peer.send_frames({"one", "two"});
  peer.send_frames({""});  // parses, but has no body
  pb::ControlMessage wrong_way;
  wrong_way.mutable_register_reply()->set_ok(true);
  peer.send(wrong_way);
  auto st = peer.status();
  EXPECT_EQ(st.services_size(), 0);
  EXPECT_EQ(st.model_id(), "tiny-moe");

  auto refused = [&](const std::function<void(pb::Register&)>& edit) {
    pb::ControlMessage m;
    auto* r = m.mutable_register_();
    r->set_instance("bad-0");
    r->set_role(pb::ATTENTION);
    r->set_model_id("tiny-moe");
    edit(*r);
    peer.send(m);
    auto reply = peer.recv();
    EXPECT_TRUE(reply && reply->has_register_reply()) << "no answer";
    return reply ? reply->register_reply() : pb::RegisterReply{};
  };
  auto r = refused([](pb::Register& reg) { reg.clear_instance(); });
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.error(), "register needs an instance name and a role");
  r = refused([](pb::Register& reg) { reg.set_role(pb::ROLE_UNKNOWN); });
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.error(), "register needs an instance name and a role");
  r = refused([](pb::Register& reg) { reg.set_model_id("other-model"); });
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.error(), "model mismatch: coordinator serves tiny-moe, bad-0 has other-model");

  peer.heartbeat(true);
  const auto hb = peer.recv();
  ASSERT_TRUE(hb);
  EXPECT_FALSE(hb->register_reply().ok());
  EXPECT_EQ(hb->register_reply().error(), "unknown instance bad-0: register again");

  st = peer.status();
  EXPECT_EQ(st.services_size(), 0);
  EXPECT_FALSE(peer.recv(50ms)) << "one reply per answered message, none for the dropped ones";
}

// A status request, over the control socket or as a message, describes every member: role,
// endpoints, readiness, experts, rows computed (summed over heartbeats), KV free blocks, memory.
TEST(Coordinator, StatusDescribesEveryMember) {
  caf::actor_system sys{two_thread_config()};
  LoopbackCoordinator coord(sys, config(1, 1));
  FakeMember host(coord.control(), "exp-0"), worker(coord.control(), "attn-0"), kv(coord.control(), "kv-0");
  const auto rh = host.register_as(pb::EXPERT, "tcp://127.0.0.1:7501");
  ASSERT_TRUE(worker.register_as(pb::ATTENTION, "tcp://127.0.0.1:7502", 64).ok());
  ASSERT_TRUE(kv.register_as(pb::KVSTORE, "tcp://127.0.0.1:7503").ok());
  for (int i = 0; i < 2; ++i)
    host.heartbeat(true, [](pb::Heartbeat& hb) {
      for (auto [layer, expert, rows] : {std::tuple{1, 0, 5}, {3, 2, 7}}) {
        auto* l = hb.add_load();
        l->set_layer(layer);
        l->set_expert(expert);
        l->set_rows(rows);
      }
      hb.set_resident_bytes(1000);
      hb.set_mapped_weight_bytes(2000);
    });
  worker.heartbeat(true, [](pb::Heartbeat& hb) { hb.set_kv_free_blocks(40); });
  kv.heartbeat(false);
  host.status();
  worker.status();
  const pb::ClusterStatus st = kv.status();

  EXPECT_EQ(st.model_id(), "tiny-moe");
  EXPECT_EQ(st.placement_version(), rh.placement_version());
  EXPECT_TRUE(st.ready());
  ASSERT_EQ(st.services_size(), 3);
  const auto* h = service(st, "exp-0");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->role(), pb::EXPERT);
  EXPECT_EQ(h->data_endpoint(), "tcp://127.0.0.1:7501");
  EXPECT_EQ(h->admin_endpoint(), "exp-0:9100");
  EXPECT_TRUE(h->ready());
  EXPECT_EQ(h->rows_total(), 24u);
  EXPECT_EQ(h->resident_bytes(), 1000u);
  EXPECT_EQ(h->mapped_weight_bytes(), 2000u);
  EXPECT_EQ(experts_of(h->experts()), experts_of(rh.assigned()));
  EXPECT_EQ(h->experts_size(), 12);
  const auto* w = service(st, "attn-0");
  ASSERT_TRUE(w);
  EXPECT_EQ(w->role(), pb::ATTENTION);
  EXPECT_TRUE(w->ready());
  EXPECT_EQ(w->kv_free_blocks(), 40);
  EXPECT_EQ(w->experts_size(), 0);
  const auto* k = service(st, "kv-0");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->role(), pb::KVSTORE);
  EXPECT_FALSE(k->ready());
  for (const auto& s : st.services()) {
    EXPECT_TRUE(s.live());
    EXPECT_GE(s.last_heartbeat_age_s(), 0);
    EXPECT_LT(s.last_heartbeat_age_s(), 5);
  }

  // The same answer as a message (the router's admin endpoint asks this way).
  caf::scoped_actor self{sys};
  pb::ClusterStatus direct;
  self->request(coord.actor(), 5s, status_atom::value)
      .receive([&](const std::string& bytes) { ASSERT_TRUE(direct.ParseFromString(bytes)); },
               [&](caf::error& e) { FAIL() << sys.render(e); });
  ASSERT_EQ(direct.services_size(), 3);
  for (int i = 0; i < 3; ++i) {
    auto a = direct.services(i), b = st.services(i);
    a.clear_last_heartbeat_age_s();
    b.clear_last_heartbeat_age_s();
    EXPECT_EQ(a.SerializeAsString(), b.SerializeAsString()) << a.DebugString() << b.DebugString();
  }
  EXPECT_EQ(direct.ready(), st.ready());
}
