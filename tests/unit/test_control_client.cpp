// The control client against a fake coordinator (a ROUTER and a PUB socket driven by the
// test): registration retried until answered, heartbeats filled by the callback, newer
// placement tables handed on in order, garbage ignored, re-registration on ok=false, and a
// coordinator that starts after the client.
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "actors/control_client.h"
#include "tests/support/actor_config.h"

using namespace moemesh;
using namespace moemesh::actors;

namespace {

using moemesh::testing::two_thread_config;

// The coordinator's side, on the test thread.
struct FakeCoordinator {
  zmq::context_t ctx{1};
  zmq::socket_t router{ctx, zmq::socket_type::router};
  zmq::socket_t pub{ctx, zmq::socket_type::pub};
  std::string router_ep, pub_ep;

  explicit FakeCoordinator(const std::string& router_at = "tcp://127.0.0.1:*") {
    router.set(zmq::sockopt::linger, 0);
    router.set(zmq::sockopt::rcvtimeo, 10000);
    pub.set(zmq::sockopt::linger, 0);
    router.bind(router_at);
    pub.bind("tcp://127.0.0.1:*");
    router_ep = router.get(zmq::sockopt::last_endpoint);
    pub_ep = pub.get(zmq::sockopt::last_endpoint);
  }

  // Next message from a client: its routing id and the decoded ControlMessage.
  std::pair<std::string, pb::ControlMessage> recv() {
    zmq::message_t id, body;
    if (!router.recv(id)) throw std::runtime_error("coordinator: nothing received within 10 s");
    EXPECT_TRUE(id.more());
    (void)router.recv(body);
    EXPECT_FALSE(body.more()) << "a control message is one frame";
    pb::ControlMessage msg;
    EXPECT_TRUE(msg.ParseFromArray(body.data(), int(body.size())));
    return {id.to_string(), msg};
  }
  pb::ControlMessage recv_kind(pb::ControlMessage::BodyCase kind) {
    for (int i = 0; i < 1000; ++i) {
      auto [id, msg] = recv();
      last_id = id;
      if (msg.body_case() == kind) return msg;
    }
    throw std::runtime_error("coordinator: expected message never came");
  }
  void reply(const std::string& bytes) {
    router.send(zmq::buffer(last_id), zmq::send_flags::sndmore);
    router.send(zmq::buffer(bytes), zmq::send_flags::none);
  }
  void reply_register(bool ok, const std::string& error = {}) {
    pb::ControlMessage msg;
    msg.mutable_register_reply()->set_ok(ok);
    msg.mutable_register_reply()->set_error(error);
    msg.mutable_register_reply()->set_placement_version(1);
    reply(msg.SerializeAsString());
  }
  void publish(uint64_t version) {
    pb::ControlMessage msg;
    auto* t = msg.mutable_placement();
    t->set_version(version);
    t->set_num_layers(2);
    auto* h = t->add_hosts();
    h->set_instance("expert-0");
    h->set_data_endpoint("tcp://127.0.0.1:6000");
    pub.send(zmq::buffer(msg.SerializeAsString()), zmq::send_flags::none);
  }

  std::string last_id;
};

// What the client's callbacks saw, shared with the actor's thread.
struct Seen {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint64_t> placements;
  int registered = 0;

  bool wait_for_placement(uint64_t v, FakeCoordinator& coord) {
    std::unique_lock<std::mutex> lk(mu);
    for (int i = 0; i < 500; ++i) {  // SUB joins late: publish until it arrives
      lk.unlock();
      coord.publish(v);
      lk.lock();
      if (cv.wait_for(lk, std::chrono::milliseconds(20), [&] {
            return !placements.empty() && placements.back() >= v;
          }))
        return true;
    }
    return false;
  }
};

ControlClientOptions options(const FakeCoordinator& coord) {
  ControlClientOptions o;
  o.control_endpoint = coord.router_ep;
  o.placement_endpoint = coord.pub_ep;
  o.registration.set_instance("attn-0");
  o.registration.set_role(pb::ATTENTION);
  o.registration.set_data_endpoint("tcp://127.0.0.1:7000");
  o.heartbeat_interval = std::chrono::milliseconds(20);
  o.register_retry = std::chrono::milliseconds(20);
  o.max_register_retry = std::chrono::milliseconds(100);
  return o;
}

ControlCallbacks callbacks(Seen& seen) {
  ControlCallbacks cb;
  cb.fill_heartbeat = [](pb::Heartbeat& hb) {
    hb.set_ready(false);
    hb.set_kv_free_blocks(42);
    hb.set_resident_bytes(1234);
  };
  cb.on_registered = [&seen](const pb::RegisterReply&) {
    std::lock_guard<std::mutex> lk(seen.mu);
    ++seen.registered;
    seen.cv.notify_all();
  };
  cb.on_placement = [&seen](const pb::PlacementTable& t) {
    std::lock_guard<std::mutex> lk(seen.mu);
    seen.placements.push_back(t.version());
    seen.cv.notify_all();
  };
  return cb;
}

}  // namespace

TEST(ControlClient, RegistersHeartbeatsAndFollowsPlacement) {
  FakeCoordinator coord;
  caf::actor_system sys{two_thread_config()};
  ZmqBridge bridge(sys);
  Seen seen;
  auto client = spawn_control_client(sys, bridge, options(coord), callbacks(seen));
  bridge.start();

  // Unanswered registrations are retried.
  auto first = coord.recv_kind(pb::ControlMessage::kRegister);
  EXPECT_EQ(first.register_().instance(), "attn-0");
  EXPECT_EQ(first.register_().role(), pb::ATTENTION);
  auto again = coord.recv_kind(pb::ControlMessage::kRegister);
  EXPECT_EQ(again.register_().data_endpoint(), "tcp://127.0.0.1:7000");
  coord.reply_register(true);

  uint64_t last_seq = 0;
  for (int i = 0; i < 3; ++i) {
    auto hb = coord.recv_kind(pb::ControlMessage::kHeartbeat).heartbeat();
    EXPECT_EQ(hb.instance(), "attn-0");
    EXPECT_EQ(hb.role(), pb::ATTENTION);
    EXPECT_FALSE(hb.ready());  // from the callback, not the default
    EXPECT_EQ(hb.kv_free_blocks(), 42);
    EXPECT_EQ(hb.resident_bytes(), 1234u);
    EXPECT_GT(hb.seq(), last_seq);
    last_seq = hb.seq();
  }
  {
    std::lock_guard<std::mutex> lk(seen.mu);
    EXPECT_EQ(seen.registered, 1);
  }

  // Newer tables only, in order.
  ASSERT_TRUE(seen.wait_for_placement(2, coord));
  coord.publish(1);  // older: ignored
  ASSERT_TRUE(seen.wait_for_placement(3, coord));
  {
    std::lock_guard<std::mutex> lk(seen.mu);
    EXPECT_EQ(seen.placements, (std::vector<uint64_t>{2, 3}));
  }
  // Heartbeats report the applied version.
  bool reported = false;
  for (int i = 0; i < 100 && !reported; ++i)
    reported = coord.recv_kind(pb::ControlMessage::kHeartbeat).heartbeat().placement_version() == 3;
  EXPECT_TRUE(reported);

  // Garbage from the coordinator is ignored; heartbeats go on.
  coord.reply("\xff\xff\xff garbage");
  coord.reply(std::string("\x12\x80", 2));  // a truncated length-delimited field
  coord.recv_kind(pb::ControlMessage::kHeartbeat);

  // A coordinator that forgot us (ok=false) gets a new registration.
  coord.reply_register(false, "unknown instance");
  auto re = coord.recv_kind(pb::ControlMessage::kRegister);
  EXPECT_EQ(re.register_().instance(), "attn-0");
  coord.reply_register(true);
  coord.recv_kind(pb::ControlMessage::kHeartbeat);
  {
    std::unique_lock<std::mutex> lk(seen.mu);
    ASSERT_TRUE(seen.cv.wait_for(lk, std::chrono::seconds(10), [&] { return seen.registered == 2; }));
  }

  caf::anon_send_exit(client, caf::exit_reason::user_shutdown);
  bridge.stop();
}

TEST(ControlClient, WaitsForACoordinatorThatStartsLater) {
  std::string endpoint;
  {  // find a free port, then leave it empty
    FakeCoordinator probe;
    endpoint = probe.router_ep;
  }
  caf::actor_system sys{two_thread_config()};
  ZmqBridge bridge(sys);
  Seen seen;
  ControlClientOptions opts;
  opts.control_endpoint = endpoint;
  opts.registration.set_instance("kv-0");
  opts.registration.set_role(pb::KVSTORE);
  opts.heartbeat_interval = std::chrono::milliseconds(20);
  opts.register_retry = std::chrono::milliseconds(20);
  opts.max_register_retry = std::chrono::milliseconds(50);
  auto client = spawn_control_client(sys, bridge, opts, callbacks(seen));
  bridge.start();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // several attempts go nowhere

  FakeCoordinator coord(endpoint);
  auto reg = coord.recv_kind(pb::ControlMessage::kRegister);
  EXPECT_EQ(reg.register_().role(), pb::KVSTORE);
  coord.reply_register(true);
  auto hb = coord.recv_kind(pb::ControlMessage::kHeartbeat).heartbeat();
  EXPECT_EQ(hb.instance(), "kv-0");
  caf::anon_send_exit(client, caf::exit_reason::user_shutdown);
  bridge.stop();
}
