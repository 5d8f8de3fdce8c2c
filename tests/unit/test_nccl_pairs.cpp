// The NCCL bootstrap of dispatch pairs through a real coordinator and real control clients: the
// Register capabilities reach the placement table, the worker offers a pair only where the pair
// rule picks NCCL, the coordinator relays the unique id verbatim to the host and refuses pairs
// that break the rule, and both sides switch the pair's transport once joined. The communicator
// is a stand-in that pairs two ranks by id (no NCCL init happens without GPUs).
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "actors/control_client.h"
#include "actors/coordinator.h"
#include "actors/nccl_pairs.h"
#include "actors/transport.h"
#include "actors/zmq_bridge.h"
#include "core/error.h"
#include "tests/support/eventually.h"
#include "tests/support/loopback_coordinator.h"

using namespace moemesh;
using namespace moemesh::actors;
using namespace std::chrono_literals;

namespace {

caf::actor_system_config& config() {
  static caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  return cfg;
}

using moemesh::testing::eventually;
using moemesh::testing::LoopbackCoordinator;

class FakeCommunicator final : public Transport {
 public:
  explicit FakeCommunicator(int rank) : rank(rank) {}
  TransportKind kind() const override { return TransportKind::Nccl; }
  std::vector<std::vector<float>> send(std::vector<std::vector<float>>&&) override { return {}; }
  std::vector<std::vector<float>> receive(std::span<const size_t>, std::span<const PayloadFrame>) override {
    return {};
  }
  int rank;
};

// Pairs two ranks that join with the same id, waiting like make_nccl_transport until both came
// or the timeout passed.
class FakeNccl {
 public:
  std::shared_ptr<Transport> join(const std::string& id, int rank, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lk(mu_);
    joined_[id] |= 1 << rank;
    ++joins_;
    cv_.notify_all();
    if (!cv_.wait_for(lk, timeout, [&] { return joined_[id] == 3; }))
      throw Error("transport nccl: the peer did not join within " + std::to_string(timeout.count()) + " ms");
    return std::make_shared<FakeCommunicator>(rank);
  }
  int joins() {
    std::lock_guard<std::mutex> lk(mu_);
    return joins_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, int> joined_;  // id -> ranks that joined (bits)
  int joins_ = 0;
};

// One cluster member: a bridge, a control client, and its side of the NCCL bootstrap.
class Member {
 public:
  Member(caf::actor_system& sys, const std::string& control, const std::string& placement, std::string instance,
         pb::Role role, TransportCaps caps, FakeNccl* nccl)
      : transports(std::make_shared<PeerTransports>()), bridge_(sys) {
    ControlClientOptions co;
    co.control_endpoint = control;
    co.placement_endpoint = placement;
    co.registration.set_instance(instance);
    co.registration.set_role(role);
    co.registration.set_data_endpoint("tcp://" + instance + ":7000");
    co.registration.set_gpu(caps.gpu);
    co.registration.set_nccl(caps.nccl);
    co.registration.set_gpu_id(caps.gpu_id);
    co.heartbeat_interval = 50ms;
    co.register_retry = 20ms;
    NcclPairOptions no;
    no.instance = instance;
    no.role = role;
    no.caps = caps;
    int next = 0;
    no.make_id = [instance, next]() mutable {  // recognisable, and of ncclUniqueId's size
      std::string id = instance + "#" + std::to_string(next++);
      id.resize(kNcclUniqueIdBytes, '\0');
      return id;
    };
    if (nccl)
      no.join = [nccl](const std::string& id, int rank, std::chrono::milliseconds timeout) {
        return nccl->join(id, rank, timeout);
      };
    no.send = [this](const pb::ControlMessage& m) { send_to_coordinator(client_, m); };
    no.transports = transports;
    pairs = std::make_unique<NcclPairs>(std::move(no));
    ControlCallbacks cb;
    cb.on_placement = [this](const pb::PlacementTable& t) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        table_ = t;
      }
      pairs->on_placement(t);
    };
    cb.on_nccl_pair = [this](const pb::NcclPairId& m) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen_.push_back(m);
      }
      pairs->on_message(m);
    };
    cb.on_registered = [this](const pb::RegisterReply&) { registered_ = true; };
    client_ = spawn_control_client(sys, bridge_, co, cb);
    bridge_.start();
  }
  ~Member() {
    caf::anon_send_exit(client_, caf::exit_reason::user_shutdown);
    bridge_.stop();
  }
  void send(const pb::ControlMessage& m) { send_to_coordinator(client_, m); }
  bool registered() const { return registered_; }
  std::vector<pb::NcclPairId> seen() {
    std::lock_guard<std::mutex> lk(mu_);
    return seen_;
  }
  pb::PlacementTable table() {
    std::lock_guard<std::mutex> lk(mu_);
    return table_;
  }

  std::shared_ptr<PeerTransports> transports;
  std::unique_ptr<NcclPairs> pairs;

 private:
  ZmqBridge bridge_;
  caf::actor client_;
  std::atomic<bool> registered_{false};
  std::mutex mu_;
  std::vector<pb::NcclPairId> seen_;
  pb::PlacementTable table_;
};

pb::ControlMessage offer(const std::string& worker, const std::string& host, std::string id) {
  pb::ControlMessage m;
  auto* p = m.mutable_nccl_pair_id();
  p->set_stage(pb::NcclPairId::OFFER);
  p->set_attention_instance(worker);
  p->set_expert_instance(host);
  p->set_unique_id(std::move(id));
  return m;
}

// The last message of `stage` about `host` that `m` was sent, if any.
std::optional<pb::NcclPairId> last_about(Member& m, const std::string& host, pb::NcclPairId::Stage stage) {
  std::optional<pb::NcclPairId> found;
  for (const auto& s : m.seen())
    if (s.expert_instance() == host && s.stage() == stage) found = s;
  return found;
}

// The coordinator under test: two MoE layers of four experts, two expert host slots.
CoordinatorConfig coordinator_config() {
  CoordinatorConfig cc;
  cc.moe_layers = {0, 1};
  cc.num_experts = 4;
  cc.expert_hosts = 2;
  cc.heartbeat_timeout = 60s;
  cc.publish_interval = 50ms;
  return cc;
}

}  // namespace

TEST(NcclPairs, CoordinatorRelaysTheIdAndOnlyGpuNcclPairsSwitch) {
  caf::actor_system sys{config()};
  LoopbackCoordinator coordinator(sys, coordinator_config());
  const std::string ctl = coordinator.control(), pub = coordinator.placement();

  FakeNccl nccl;
  const TransportCaps on_gpu1{true, true, "GPU-1"}, on_gpu0{true, true, "GPU-0"}, cpu{false, false};
  Member gpu_host(sys, ctl, pub, "exp-gpu", pb::EXPERT, on_gpu1, &nccl);
  Member cpu_host(sys, ctl, pub, "exp-cpu", pb::EXPERT, cpu, nullptr);
  Member twin_host(sys, ctl, pub, "exp-twin", pb::EXPERT, on_gpu0, &nccl);  // on the worker's GPU
  ASSERT_TRUE(eventually([&] { return gpu_host.registered() && cpu_host.registered() && twin_host.registered(); }));
  Member worker(sys, ctl, pub, "attn-0", pb::ATTENTION, on_gpu0, &nccl);

  // The Register capabilities reach the placement table.
  ASSERT_TRUE(eventually([&] { return worker.table().hosts_size() == 3; }));
  const pb::PlacementTable table = worker.table();
  for (const auto& h : table.hosts()) {
    EXPECT_EQ(h.gpu(), h.instance() != "exp-cpu") << h.instance();
    EXPECT_EQ(h.nccl(), h.instance() != "exp-cpu") << h.instance();
    EXPECT_EQ(h.gpu_id(), h.instance() == "exp-gpu" ? "GPU-1" : h.instance() == "exp-twin" ? "GPU-0" : "");
  }

  // GPU+NCCL on both sides: offered, relayed, joined by both ranks, switched on both sides.
  ASSERT_TRUE(eventually([&] { return worker.pairs->state("exp-gpu") == "joined"; })) << worker.pairs->state("exp-gpu");
  EXPECT_EQ(worker.transports->of("tcp://exp-gpu:7000")->kind(), TransportKind::Nccl);
  EXPECT_EQ(gpu_host.pairs->state("attn-0"), "joined");
  EXPECT_EQ(gpu_host.transports->of("attn-0")->kind(), TransportKind::Nccl);
  EXPECT_EQ(nccl.joins(), 2);
  const auto relayed = last_about(gpu_host, "exp-gpu", pb::NcclPairId::OFFER);
  ASSERT_TRUE(relayed);
  EXPECT_EQ(relayed->unique_id().size(), kNcclUniqueIdBytes);
  EXPECT_EQ(relayed->unique_id().substr(0, 9), std::string("attn-0#0\0", 9)) << "the worker's id, verbatim";
  EXPECT_TRUE(last_about(worker, "exp-gpu", pb::NcclPairId::JOINED));

  // The CPU host, and the host on the worker's own GPU: never offered, the pairs stay ZeroMQ.
  EXPECT_EQ(worker.pairs->state("exp-cpu"), "");
  EXPECT_EQ(worker.transports->of("tcp://exp-cpu:7000")->kind(), TransportKind::Zmq);
  EXPECT_TRUE(cpu_host.seen().empty());
  EXPECT_EQ(worker.pairs->state("exp-twin"), "");
  EXPECT_EQ(worker.transports->of("tcp://exp-twin:7000")->kind(), TransportKind::Zmq);
  EXPECT_EQ(nccl.joins(), 2) << "only the pair on two GPUs joined";

  // An offer that breaks the pair rule is refused by the coordinator, never relayed.
  worker.send(offer("attn-0", "exp-cpu", std::string(kNcclUniqueIdBytes, 'x')));
  ASSERT_TRUE(eventually([&] { return bool(last_about(worker, "exp-cpu", pb::NcclPairId::REJECTED)); }));
  EXPECT_NE(last_about(worker, "exp-cpu", pb::NcclPairId::REJECTED)->error().find("pair rule picks ZeroMQ"),
            std::string::npos);
  worker.send(offer("attn-0", "exp-twin", std::string(kNcclUniqueIdBytes, 'x')));
  ASSERT_TRUE(eventually([&] { return bool(last_about(worker, "exp-twin", pb::NcclPairId::REJECTED)); }));
  EXPECT_NE(last_about(worker, "exp-twin", pb::NcclPairId::REJECTED)->error().find("on different GPUs"),
            std::string::npos);
  EXPECT_TRUE(twin_host.seen().empty());
  // A malformed id and an unknown host are refused too.
  worker.send(offer("attn-0", "exp-gpu", "short"));
  worker.send(offer("attn-0", "exp-nobody", std::string(kNcclUniqueIdBytes, 'x')));
  ASSERT_TRUE(eventually([&] { return bool(last_about(worker, "exp-nobody", pb::NcclPairId::REJECTED)); }));
  EXPECT_NE(last_about(worker, "exp-nobody", pb::NcclPairId::REJECTED)->error().find("no expert host exp-nobody"),
            std::string::npos);
  ASSERT_TRUE(eventually([&] { return bool(last_about(worker, "exp-gpu", pb::NcclPairId::REJECTED)); }));
  EXPECT_NE(last_about(worker, "exp-gpu", pb::NcclPairId::REJECTED)->error().find("has 5 bytes"), std::string::npos);
  EXPECT_TRUE(cpu_host.seen().empty()) << "nothing refused reaches a host";
  EXPECT_EQ(worker.transports->of("tcp://exp-gpu:7000")->kind(), TransportKind::Nccl)
      << "a later refused offer does not undo a joined pair";

}

// Without a GPU (here): a host asked to join answers REJECTED with the join's reason, the worker
// keeps ZeroMQ; a host built without NCCL refuses at once.
TEST(NcclPairs, AFailedJoinLeavesThePairOnZeroMq) {
  std::vector<pb::ControlMessage> sent;
  std::mutex mu;
  auto transports = std::make_shared<PeerTransports>();
  NcclPairOptions o;
  o.instance = "exp-0";
  o.role = pb::EXPERT;
  o.caps = {true, true};
  o.join = [](const std::string&, int, std::chrono::milliseconds) -> std::shared_ptr<Transport> {
    throw Error("no CUDA device: CUDA driver version is insufficient");
  };
  o.send = [&](const pb::ControlMessage& m) {
    std::lock_guard<std::mutex> lk(mu);
    sent.push_back(m);
  };
  o.transports = transports;
  NcclPairs host(o);
  const pb::ControlMessage to_host = offer("attn-0", "exp-0", std::string(kNcclUniqueIdBytes, 'i'));
  host.on_message(to_host.nccl_pair_id());
  ASSERT_TRUE(eventually([&] {
    std::lock_guard<std::mutex> lk(mu);
    return !sent.empty();
  }));
  {
    std::lock_guard<std::mutex> lk(mu);
    ASSERT_EQ(sent.size(), 1u);
    const auto& a = sent[0].nccl_pair_id();
    EXPECT_EQ(a.stage(), pb::NcclPairId::REJECTED);
    EXPECT_EQ(a.attention_instance(), "attn-0");
    EXPECT_TRUE(a.unique_id().empty()) << "answers do not echo the id";
    EXPECT_NE(a.error().find("no CUDA device: "), std::string::npos) << a.error();
  }
  EXPECT_EQ(transports->of("attn-0")->kind(), TransportKind::Zmq);
  EXPECT_NE(host.state("attn-0").find("no CUDA device"), std::string::npos);

  // Built without NCCL: refused without trying.
  o.join = nullptr;
  NcclPairs plain(o);
  const pb::ControlMessage to_plain = offer("attn-1", "exp-0", std::string(kNcclUniqueIdBytes, 'i'));
  plain.on_message(to_plain.nccl_pair_id());
  std::lock_guard<std::mutex> lk(mu);
  ASSERT_EQ(sent.size(), 2u);
  EXPECT_EQ(sent[1].nccl_pair_id().error(), "this expert host was built without NCCL");
}

// The worker's side of the rule: no offer to a host without GPU+NCCL, nor from a CPU worker.
TEST(NcclPairs, WorkersOfferOnlyWhereThePairRulePicksNccl) {
  int offers = 0;
  NcclPairOptions o;
  o.instance = "attn-0";
  o.role = pb::ATTENTION;
  o.caps = {true, true};
  o.make_id = [] { return std::string(kNcclUniqueIdBytes, 'z'); };
  o.join = [](const std::string&, int, std::chrono::milliseconds) -> std::shared_ptr<Transport> {
    throw Error("no CUDA device: none");
  };
  o.send = [&](const pb::ControlMessage& m) { offers += m.nccl_pair_id().stage() == pb::NcclPairId::OFFER; };
  o.transports = std::make_shared<PeerTransports>();
  pb::PlacementTable t;
  t.set_version(1);
  for (auto [name, gpu, nccl] : {std::tuple{"a", true, true}, {"b", true, false}, {"c", false, true}}) {
    auto* h = t.add_hosts();
    h->set_instance(name);
    h->set_data_endpoint(std::string("tcp://") + name);
    h->set_live(true);
    h->set_gpu(gpu);
    h->set_nccl(nccl);
  }
  NcclPairs gpu_worker(o);
  gpu_worker.on_placement(t);
  gpu_worker.on_placement(t);  // once per host
  EXPECT_EQ(offers, 1);
  EXPECT_EQ(gpu_worker.state("b"), "");
  EXPECT_EQ(gpu_worker.state("c"), "");
  ASSERT_TRUE(eventually([&] { return gpu_worker.state("a").rfind("rejected: no CUDA device", 0) == 0; }))
      << gpu_worker.state("a");

  o.caps = {false, false};
  NcclPairs cpu_worker(o);
  cpu_worker.on_placement(t);
  EXPECT_EQ(offers, 1) << "a CPU worker offers nothing";
}

// A host that never joins (it refused, or never got the offer): the worker's join gives up at
// the configured timeout and the pair stays on ZeroMQ, as after a failed join.
TEST(NcclPairs, AJoinWhosePeerNeverComesTimesOut) {
  FakeNccl nccl;
  int offers = 0;
  NcclPairOptions o;
  o.instance = "attn-0";
  o.role = pb::ATTENTION;
  o.caps = {true, true};
  o.make_id = [] { return std::string(kNcclUniqueIdBytes, 't'); };
  o.join = [&nccl](const std::string& id, int rank, std::chrono::milliseconds timeout) {
    return nccl.join(id, rank, timeout);
  };
  o.join_timeout = 200ms;
  o.send = [&](const pb::ControlMessage& m) { offers += m.nccl_pair_id().stage() == pb::NcclPairId::OFFER; };
  o.transports = std::make_shared<PeerTransports>();
  EXPECT_EQ(NcclPairOptions{}.join_timeout, 30s) << "the default";
  pb::PlacementTable t;
  t.set_version(1);
  auto* h = t.add_hosts();
  h->set_instance("exp-silent");
  h->set_data_endpoint("tcp://exp-silent");
  h->set_live(true);
  h->set_gpu(true);
  h->set_nccl(true);
  NcclPairs worker(o);
  worker.on_placement(t);
  EXPECT_EQ(offers, 1);
  ASSERT_TRUE(eventually([&] { return worker.state("exp-silent") != "offered"; })) << worker.state("exp-silent");
  EXPECT_EQ(worker.state("exp-silent"), "rejected: transport nccl: the peer did not join within 200 ms");
  EXPECT_EQ(o.transports->of("tcp://exp-silent")->kind(), TransportKind::Zmq);
  // A JOINED arriving after the timeout does not switch the pair.
  pb::NcclPairId joined;
  joined.set_stage(pb::NcclPairId::JOINED);
  joined.set_attention_instance("attn-0");
  joined.set_expert_instance("exp-silent");
  worker.on_message(joined);
  EXPECT_EQ(o.transports->of("tcp://exp-silent")->kind(), TransportKind::Zmq);
  EXPECT_EQ(nccl.joins(), 1);
}
