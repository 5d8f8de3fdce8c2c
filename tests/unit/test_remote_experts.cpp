// RemoteExpertExecutor against in-process expert hosts (batcher + compute pool + ROUTER bridge
// on loopback TCP), compared with LocalExpertExecutor on the full checkpoint: sharded hosts,
// failover to a replica when a host dies, error replies, placement swaps under load.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <random>
#include <mutex>
#include <span>
#include <thread>

#include <zmq.hpp>

#include "actors/expert_batcher.h"
#include "actors/remote_experts.h"
#include "core/dispatch_codec.h"
#include "core/error.h"
#include "core/moe.h"
#include "tests/support/actor_config.h"
#include "tests/support/eventually.h"
#include "tests/support/fifo_pair_transport.h"
#include "tests/support/in_process_expert_host.h"
#include "tests/support/metrics_text.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;
using namespace moemesh::actors;
namespace fs = std::filesystem;

namespace {

using moemesh::testing::TinyModel;
using moemesh::testing::two_thread_config;

// One expert host, as moemesh-expert wires it, inside this process (2 compute threads).
class Host : public moemesh::testing::InProcessExpertHost {
 public:
  Host(caf::actor_system& sys, const fs::path& model, const std::string& spec, std::string name)
      : InProcessExpertHost(sys, model, spec, std::move(name), 2) {}
};

// A random batch for one layer, routed as the model would route it.
struct LayerCall {
  std::vector<float> h;
  Routing routing;
  std::vector<ExpertGroup> groups;
};

LayerCall random_call(const ModelConfig& c, int64_t rows, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  LayerCall call;
  call.h.resize(size_t(rows * c.hidden_size));
  for (float& x : call.h) x = nd(rng);
  std::vector<float> logits(size_t(rows * c.num_experts));
  for (float& x : logits) x = nd(rng);
  call.routing = route_from_logits(c, logits.data(), rows);
  call.groups = group_by_expert(call.routing);
  return call;
}

// Counts values compared and bit-identical ones across a test.
struct Agreement {
  size_t exact = 0, total = 0;
  double worst = 0;
};

// Each output row within 1e-6 (relative, as a vector) of the local reference.
void expect_close(const std::vector<std::vector<float>>& got, const std::vector<std::vector<float>>& want,
                  int64_t hidden, Agreement& a) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t g = 0; g < got.size(); ++g) {
    ASSERT_EQ(got[g].size(), want[g].size()) << "group " << g;
    for (size_t r = 0; r * size_t(hidden) < got[g].size(); ++r) {
      double err = 0, norm = 0;
      for (int64_t d = 0; d < hidden; ++d) {
        const float x = got[g][r * size_t(hidden) + size_t(d)], y = want[g][r * size_t(hidden) + size_t(d)];
        err += (double(x) - double(y)) * (double(x) - double(y));
        norm += double(y) * double(y);
        a.exact += x == y;
        ++a.total;
      }
      const double rel = std::sqrt(err / norm);
      a.worst = std::max(a.worst, rel);
      EXPECT_LE(rel, 1e-6) << "group " << g << " row " << r;
    }
  }
}

class RemoteExperts : public ::testing::Test {
 protected:
  // hidden 64, 2 layers, 8 experts, top-2
  static void SetUpTestSuite() { model_ = std::make_unique<TinyModel>(Arch::Mixtral, /*seed=*/1, /*vocab=*/64); }
  static void TearDownTestSuite() { model_.reset(); }
  void SetUp() override {
    ckpt_ = Checkpoint::open(model());
    weights_ = std::make_unique<ModelWeights>(ckpt_->load());
    local_ = std::make_unique<LocalExpertExecutor>(*weights_);
  }
  const ModelConfig& cfg() const { return ckpt_->config(); }
  fs::path model() const { return model_->path(); }

  // Runs one random call of `rows` rows on `layer` both ways and compares.
  void check_layer(RemoteExpertExecutor& remote, int64_t layer, int64_t rows, std::mt19937& rng) {
    LayerCall call = random_call(cfg(), rows, rng);
    std::vector<std::vector<float>> got, want;
    remote.run(layer, call.h.data(), cfg().hidden_size, call.groups, got);
    local_->run(layer, call.h.data(), cfg().hidden_size, call.groups, want);
    expect_close(got, want, cfg().hidden_size, agreement_);
  }

  static inline std::unique_ptr<TinyModel> model_;
  std::shared_ptr<Checkpoint> ckpt_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<LocalExpertExecutor> local_;
  Agreement agreement_;
};

}  // namespace

TEST_F(RemoteExperts, TwoHostsWithHalfTheExpertsEachMatchTheLocalExecutor) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "*:0-3", "host-a"), b(sys, model(), "*:4-7", "host-b");
  // Each maps only its half: 2 layers x 4 experts x 3 tensors.
  const uint64_t per_expert = uint64_t(3 * cfg().hidden_size * cfg().moe_intermediate_size * 4);
  EXPECT_EQ(a.experts().mapped_bytes(), 8 * per_expert);
  EXPECT_EQ(b.experts().mapped_bytes(), 8 * per_expert);

  RemoteExpertExecutor remote(sys);
  remote.set_placement({1, {a.entry(), b.entry()}});
  std::mt19937 rng(11);
  for (int64_t layer = 0; layer < cfg().num_hidden_layers; ++layer)
    for (int64_t rows : {1, 5, 33}) check_layer(remote, layer, rows, rng);
  EXPECT_GT(a.requests(), 0);
  EXPECT_GT(b.requests(), 0);
  // One request per host per call: at most 2 x 6 calls.
  EXPECT_LE(remote.stats().requests.load(), 12u);
  EXPECT_EQ(remote.stats().host_failures.load(), 0u);
  std::printf("remote vs local: %zu/%zu values bit-identical, worst relative row error %.3g\n", agreement_.exact,
              agreement_.total, agreement_.worst);
}

TEST_F(RemoteExperts, ADeadHostsExpertsAreServedByTheirReplica) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "all", "host-a"), b(sys, model(), "all", "host-b");
  RemoteExpertsOptions o;
  o.deadline = std::chrono::milliseconds(10000);  // the drop is seen from the connection, not the deadline
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry(), b.entry()}});
  std::mt19937 rng(5);
  check_layer(remote, 0, 16, rng);  // both hosts take part (replicas are balanced by rows)
  EXPECT_GT(a.requests(), 0);
  EXPECT_GT(b.requests(), 0);

  b.kill();  // its sockets close, as when the process dies
  const auto t0 = std::chrono::steady_clock::now();
  check_layer(remote, 1, 16, rng);  // b's share goes to a without waiting for the deadline
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(took, std::chrono::milliseconds(1000));
  ASSERT_TRUE(moemesh::testing::eventually([&] { return remote.disconnected(b.entry().endpoint); }));
  // Known down: later calls do not try it at all.
  const uint64_t failures = remote.stats().host_failures.load();
  for (int i = 0; i < 3; ++i) check_layer(remote, i % 2, 9, rng);
  EXPECT_EQ(remote.stats().host_failures.load(), failures);
}

// A bare ROUTER that takes requests and never answers: a host that is connected but silent.
struct SilentHost {
  zmq::context_t ctx{1};
  zmq::socket_t socket{ctx, zmq::socket_type::router};
  std::string endpoint;
  SilentHost() {
    socket.set(zmq::sockopt::linger, 0);
    socket.bind("tcp://127.0.0.1:*");
    endpoint = socket.get(zmq::sockopt::last_endpoint);
  }
};

// A host whose connection drops while it holds a request (it took the rows and died): the
// request fails at once, long before the deadline, and its groups are computed by the replica.
TEST_F(RemoteExperts, ARequestInFlightToAHostThatDiesFailsOverAtOnce) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "all", "host-a");
  SilentHost victim_host;  // takes the request and dies holding it
  zmq::socket_t& silent = victim_host.socket;
  const std::string silent_ep = victim_host.endpoint;
  RemoteExpertsOptions o;
  o.deadline = std::chrono::milliseconds(20000);
  RemoteExpertExecutor remote(sys, o);
  PlacementHost victim{"host-silent", silent_ep, a.entry().experts};
  remote.set_placement({1, {a.entry(), victim}});

  std::mt19937 rng(8);
  LayerCall call = random_call(cfg(), 24, rng);
  std::vector<std::vector<float>> got, want;
  std::atomic<bool> done{false};
  std::thread caller([&] {
    remote.run(0, call.h.data(), cfg().hidden_size, call.groups, got);
    done = true;
  });
  zmq::pollitem_t item{silent.handle(), 0, ZMQ_POLLIN, 0};
  zmq::poll(&item, 1, std::chrono::milliseconds(10000));
  ASSERT_TRUE(item.revents & ZMQ_POLLIN) << "the silent host got no request (the balancing changed?)";
  EXPECT_FALSE(done.load());
  const auto died = std::chrono::steady_clock::now();
  silent.close();  // dies holding the request
  caller.join();
  const auto took = std::chrono::steady_clock::now() - died;
  EXPECT_LT(took, std::chrono::milliseconds(1000)) << "failed over after the deadline, not from the drop";
  local_->run(0, call.h.data(), cfg().hidden_size, call.groups, want);
  expect_close(got, want, cfg().hidden_size, agreement_);
  EXPECT_GE(remote.stats().disconnects.load(), 1u);
  EXPECT_TRUE(remote.disconnected(silent_ep));
}

// Hedged requests: a host that takes the rows and sits on them (alive, connected, silent) has
// them sent to the replica once the hedge delay passes; the duplicate's reply completes the call
// (equal to the local computation) instead of the silent host timing out.
TEST_F(RemoteExperts, ASlowHostGetsAHedgedDuplicateThatWins) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "all", "host-a");
  SilentHost slow;
  zmq::socket_t& silent = slow.socket;
  const std::string silent_ep = slow.endpoint;
  auto reg = std::make_shared<prometheus::Registry>();
  RemoteExpertsOptions o;
  o.deadline = std::chrono::milliseconds(20000);
  o.min_deadline = std::chrono::milliseconds(20000);  // a timeout would take 20 s
  o.hedge_p99_multiple = 3;
  o.metrics = reg;
  RemoteExpertExecutor remote(sys, o);
  std::mt19937 rng(9);
  EXPECT_FALSE(remote.hedge_after().has_value());  // nothing measured yet
  remote.set_placement({1, {a.entry()}});
  check_layer(remote, 0, 8, rng);  // round trips to measure
  ASSERT_TRUE(remote.hedge_after().has_value());

  remote.set_placement({2, {a.entry(), PlacementHost{"host-silent", silent_ep, a.entry().experts}}});
  LayerCall call = random_call(cfg(), 24, rng);
  std::vector<std::vector<float>> got, want;
  remote.run(0, call.h.data(), cfg().hidden_size, call.groups, got);
  zmq::pollitem_t item{silent.handle(), 0, ZMQ_POLLIN, 0};
  zmq::poll(&item, 1, std::chrono::milliseconds(0));
  ASSERT_TRUE(item.revents & ZMQ_POLLIN) << "the silent host got no request (the balancing changed?)";
  local_->run(0, call.h.data(), cfg().hidden_size, call.groups, want);
  expect_close(got, want, cfg().hidden_size, agreement_);
  EXPECT_EQ(remote.stats().hedge_wins.load(), 1u);
  EXPECT_EQ(remote.stats().host_failures.load(), 0u);  // the silent host was not timed out
  EXPECT_EQ(moemesh::testing::series_value(*reg, "moemesh_attention_dispatch_hedges_total", {{"outcome", "won"}}), 1);
  EXPECT_FALSE(remote.disconnected(silent_ep));
}

// Without hedging, or when the host answers in time, no duplicate is sent.
TEST_F(RemoteExperts, NoHedgeWhenHostsAnswerOrHedgingIsOff) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "all", "host-a"), b(sys, model(), "all", "host-b");
  RemoteExpertsOptions o;
  o.hedge_p99_multiple = 3;
  o.hedge_min = std::chrono::milliseconds(2000);  // hosts answer well within it, however loaded the machine
  o.min_deadline = std::chrono::milliseconds(5000);
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry(), b.entry()}});
  std::mt19937 rng(10);
  for (int i = 0; i < 4; ++i) check_layer(remote, i % 2, 12, rng);
  EXPECT_EQ(remote.stats().hedge_wins.load() + remote.stats().hedge_losses.load(), 0u);
  RemoteExpertsOptions off;
  RemoteExpertExecutor plain(sys, off);
  plain.set_placement({1, {a.entry(), b.entry()}});
  check_layer(plain, 0, 12, rng);
  EXPECT_FALSE(plain.hedge_after().has_value());
}

// With one replica, a step that needs an expert no live host serves waits (bounded) for a table
// that covers it, instead of failing: the replacement registers, the step completes.
TEST_F(RemoteExperts, AStepWaitsForAReplacementHostWithinTheBound) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "*:0-3", "host-a"), b(sys, model(), "*:4-7", "host-b");
  RemoteExpertsOptions o;
  o.uncovered_wait = std::chrono::milliseconds(20000);
  auto reg = std::make_shared<prometheus::Registry>();
  o.metrics = reg;
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry()}});  // experts 4-7 have no host yet
  std::mt19937 rng(9);
  LayerCall call = random_call(cfg(), 32, rng);
  std::vector<std::vector<float>> got, want;
  std::atomic<bool> done{false};
  std::thread caller([&] {
    remote.run(1, call.h.data(), cfg().hidden_size, call.groups, got);
    done = true;
  });
  ASSERT_TRUE(moemesh::testing::eventually([&] { return remote.stats().waiting.load() == 1; }));
  EXPECT_FALSE(done.load());
  EXPECT_EQ(remote.stats().uncovered_waits.load(), 1u);
  remote.set_placement({2, {a.entry(), b.entry()}});  // the replacement registered
  caller.join();
  local_->run(1, call.h.data(), cfg().hidden_size, call.groups, want);
  expect_close(got, want, cfg().hidden_size, agreement_);
  EXPECT_EQ(remote.stats().waiting.load(), 0);
  EXPECT_EQ(remote.stats().host_failures.load(), 0u);
}

TEST_F(RemoteExperts, AnErrorReplyIsRetriedOnAReplica) {
  caf::actor_system sys{two_thread_config()};
  // a claims layer 0's experts 4-7 as well but holds only 0-3: it answers unknown_expert.
  Host a(sys, model(), "0:0-3", "host-a"), b(sys, model(), "0:4-7", "host-b");
  RemoteExpertExecutor remote(sys);
  remote.set_placement({1, {a.entry("0:*"), b.entry()}});
  // One row for each of experts 4..7: balancing sends some of them to a.
  std::mt19937 rng(2);
  LayerCall call = random_call(cfg(), 4, rng);
  call.groups.clear();
  for (int32_t e = 4; e < 8; ++e) call.groups.push_back({e, {e - 4}, {0}, {}});
  std::vector<std::vector<float>> got, want;
  remote.run(0, call.h.data(), cfg().hidden_size, call.groups, got);
  local_->run(0, call.h.data(), cfg().hidden_size, call.groups, want);
  expect_close(got, want, cfg().hidden_size, agreement_);
  EXPECT_EQ(a.bad_requests("unknown_expert"), 1);
  EXPECT_EQ(remote.stats().host_failures.load(), 1u);
}

TEST_F(RemoteExperts, AnErrorReplyWithoutReplicaNamesTheHostAndLayer) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "0:0-3", "host-a");
  RemoteExpertExecutor remote(sys);
  remote.set_placement({1, {a.entry("0:*")}});
  std::mt19937 rng(4);
  LayerCall call = random_call(cfg(), 2, rng);
  call.groups = {{1, {0}, {0}, {}}, {6, {1}, {0}, {}}};
  std::vector<std::vector<float>> got;
  try {
    remote.run(0, call.h.data(), cfg().hidden_size, call.groups, got);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("layer 0"), std::string::npos) << m;
    EXPECT_NE(m.find("host-a"), std::string::npos) << m;
    EXPECT_NE(m.find("unknown_expert"), std::string::npos) << m;
  }
  EXPECT_EQ(a.bad_requests("unknown_expert"), 1);
  // Still serving what it has.
  call.groups = {{1, {0, 1}, {0, 0}, {}}};
  std::vector<std::vector<float>> want;
  remote.run(0, call.h.data(), cfg().hidden_size, call.groups, got);
  local_->run(0, call.h.data(), cfg().hidden_size, call.groups, want);
  expect_close(got, want, cfg().hidden_size, agreement_);
}

TEST_F(RemoteExperts, AnExpertWithNoHostIsAnErrorAfterTheBoundedWait) {
  caf::actor_system sys{two_thread_config()};
  RemoteExpertsOptions o;
  o.uncovered_wait = std::chrono::milliseconds(300);
  RemoteExpertExecutor remote(sys, o);
  std::mt19937 rng(4);
  LayerCall call = random_call(cfg(), 3, rng);
  std::vector<std::vector<float>> got;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    remote.run(1, call.h.data(), cfg().hidden_size, call.groups, got);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1: no usable expert host for expert"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("within 300 ms"), std::string::npos) << e.what();
  }
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(300));
  EXPECT_EQ(remote.stats().waiting.load(), 0);
}

TEST_F(RemoteExperts, PlacementSwapsWhileCallsRun) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "all", "host-a"), b(sys, model(), "all", "host-b");
  RemoteExpertExecutor remote(sys);
  const std::vector<PlacementTable> tables{
      {1, {a.entry()}}, {2, {b.entry()}}, {3, {a.entry(), b.entry()}}, {4, {a.entry("*:0-3"), b.entry("*:4-7")}}};
  remote.set_placement(tables[0]);
  std::atomic<bool> stop{false};
  std::thread swapper([&] {
    for (size_t i = 0; !stop; ++i) {
      remote.set_placement(tables[i % tables.size()]);
      std::this_thread::yield();
    }
  });
  // Two compute threads calling at once (micro-batches), as an attention worker does.
  std::vector<Agreement> agree(2);
  std::vector<std::thread> callers;
  for (int t = 0; t < 2; ++t)
    callers.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      for (int i = 0; i < 20; ++i) {
        LayerCall call = random_call(cfg(), 1 + i % 7, rng);
        std::vector<std::vector<float>> got, want;
        remote.run(i % 2, call.h.data(), cfg().hidden_size, call.groups, got);
        local_->run(i % 2, call.h.data(), cfg().hidden_size, call.groups, want);
        expect_close(got, want, cfg().hidden_size, agree[size_t(t)]);
      }
    });
  for (auto& c : callers) c.join();
  stop = true;
  swapper.join();
  EXPECT_EQ(remote.stats().host_failures.load(), 0u);
  EXPECT_GE(remote.placement()->version, 1u);
}

using moemesh::testing::FifoPair;

// The worker's DEALER routing id: what the host side's PeerTransports know it by.
constexpr const char* kPairWorker = "worker-1";

// The payloads go through the pair's Transport: with a pair transport set on both sides, only
// the headers cross ZeroMQ and the results still equal the local executor's.
TEST_F(RemoteExperts, PayloadsTravelThroughThePairTransport) {
  caf::actor_system sys{two_thread_config()};
  FifoPair pair;
  PeerTransports host_side;
  host_side.set(kPairWorker, pair.host);
  Host zmq_host(sys, model(), "all", "host-zmq");
  moemesh::testing::InProcessExpertHost pair_host(sys, model(), "all", "host-pair", 2, &host_side);

  RemoteExpertsOptions o;
  o.identity = kPairWorker;
  RemoteExpertExecutor remote(sys, o);
  remote.transports().set(pair_host.entry().endpoint, pair.worker);
  std::mt19937 rng(21);
  remote.set_placement({1, {pair_host.entry()}});
  for (int64_t rows : {1, 7, 40}) check_layer(remote, rows % 2, rows, rng);
  EXPECT_EQ(remote.stats().host_failures.load(), 0u);
  EXPECT_EQ(pair_host.requests(), 3);
  EXPECT_EQ(pair.host->received(), 3u);
  EXPECT_EQ(pair.worker->received(), 3u);
  const double pair_bytes = pair_host.received_bytes();

  // The same calls over plain ZeroMQ carry the rows in frames.
  remote.set_placement({2, {zmq_host.entry()}});
  for (int64_t rows : {1, 7, 40}) check_layer(remote, rows % 2, rows, rng);
  EXPECT_EQ(zmq_host.requests(), 3);
  const double rows_bytes = double((1 + 7 + 40) * cfg().hidden_size * 4);
  EXPECT_GE(zmq_host.received_bytes(), pair_bytes + rows_bytes) << "ZeroMQ: headers and rows";
  EXPECT_LT(pair_bytes, rows_bytes) << "pair transport: only headers on ZeroMQ";
  EXPECT_EQ(pair.unreceived(), 0u);
}

// Up to 30 s for what another thread does.
template <class F>
bool eventually(F done) {
  return moemesh::testing::eventually(done, std::chrono::seconds(30));
}

// The worker side of a FifoPair dispatch: its routing id is the host side's key for the pair.
std::unique_ptr<RemoteExpertExecutor> pair_worker(caf::actor_system& sys, const std::string& endpoint,
                                                  std::shared_ptr<Transport> end,
                                                  std::chrono::milliseconds deadline = std::chrono::seconds(30)) {
  RemoteExpertsOptions o;
  o.identity = kPairWorker;
  o.deadline = deadline;
  auto remote = std::make_unique<RemoteExpertExecutor>(sys, o);
  remote->transports().set(endpoint, std::move(end));
  return remote;
}

// The attention worker's two micro-batches dispatch to the same host at once: headers and
// payloads stay in one order on the pair, so every result is right and nothing is left over.
TEST_F(RemoteExperts, TwoMicroBatchThreadsShareOnePair) {
  caf::actor_system sys{two_thread_config()};
  FifoPair pair;
  PeerTransports host_side;
  host_side.set(kPairWorker, pair.host);
  moemesh::testing::InProcessExpertHost host(sys, model(), "all", "host-pair", 2, &host_side);
  auto remote = pair_worker(sys, host.entry().endpoint, pair.worker);
  remote->set_placement({1, {host.entry()}});

  constexpr int kCalls = 15;
  std::vector<std::thread> micro_batches;
  std::vector<Agreement> agreements(2);
  for (int m = 0; m < 2; ++m)
    micro_batches.emplace_back([&, m] {
      std::mt19937 rng(100 + m);
      for (int i = 0; i < kCalls; ++i) {
        LayerCall call = random_call(cfg(), 1 + (i * 7 + m * 3) % 23, rng);  // sizes differ between the threads
        std::vector<std::vector<float>> got, want;
        remote->run(i % 2, call.h.data(), cfg().hidden_size, call.groups, got);
        local_->run(i % 2, call.h.data(), cfg().hidden_size, call.groups, want);
        expect_close(got, want, cfg().hidden_size, agreements[size_t(m)]);
      }
    });
  for (auto& t : micro_batches) t.join();
  EXPECT_EQ(remote->stats().host_failures.load(), 0u);
  EXPECT_EQ(host.requests(), 2 * kCalls);
  EXPECT_EQ(pair.host->received(), size_t(2 * kCalls));
  EXPECT_EQ(pair.worker->received(), size_t(2 * kCalls));
  EXPECT_EQ(pair.unreceived(), 0u);
}

// Payloads of 4 MB and more each way (NCCL would not send these eagerly).
TEST_F(RemoteExperts, LargePayloadsCrossThePair) {
  caf::actor_system sys{two_thread_config()};
  FifoPair pair;
  PeerTransports host_side;
  host_side.set(kPairWorker, pair.host);
  moemesh::testing::InProcessExpertHost host(sys, model(), "all", "host-pair", 2, &host_side);
  auto remote = pair_worker(sys, host.entry().endpoint, pair.worker);
  remote->set_placement({1, {host.entry()}});
  std::mt19937 rng(5);
  // top-2: 2 * 8192 rows of 64 floats = 4 MiB of rows to the host, the same back.
  const int64_t rows = 8192;
  ASSERT_GE(2 * rows * cfg().hidden_size * int64_t(sizeof(float)), int64_t(4) << 20);
  for (int i = 0; i < 2; ++i) check_layer(*remote, i, rows, rng);
  EXPECT_EQ(remote->stats().host_failures.load(), 0u);
  EXPECT_EQ(pair.host->received(), 2u);
  EXPECT_EQ(pair.unreceived(), 0u);
}

// A request the host rejects (an expert it does not hold) still has its rows taken off the
// pair: the next request's rows are its own and its results right.
TEST_F(RemoteExperts, ARejectedRequestsPayloadIsDrained) {
  caf::actor_system sys{two_thread_config()};
  FifoPair pair;
  PeerTransports host_side;
  host_side.set(kPairWorker, pair.host);
  moemesh::testing::InProcessExpertHost half(sys, model(), "0:0-3,1:0-3", "host-half", 2, &host_side);
  Host rest(sys, model(), "0:4-7,1:4-7", "host-rest");
  auto remote = pair_worker(sys, half.entry().endpoint, pair.worker);
  std::mt19937 rng(9);
  // The half host claims every expert: its requests name experts 4-7 too and are rejected.
  remote->set_placement({1, {half.entry("all")}});
  LayerCall call = random_call(cfg(), 24, rng);
  std::vector<std::vector<float>> got;
  EXPECT_THROW(remote->run(0, call.h.data(), cfg().hidden_size, call.groups, got), Error);
  EXPECT_EQ(half.bad_requests(std::string(dispatch::kUnknownExpert)), 1);
  EXPECT_EQ(pair.host->received(), 1u) << "the rejected request's rows were taken off the pair";

  remote->set_placement({2, {half.entry(), rest.entry()}});
  for (int i = 0; i < 3; ++i) check_layer(*remote, i % 2, 24, rng);
  EXPECT_EQ(half.bad_requests(std::string(dispatch::kUnknownExpert)), 1);
  EXPECT_EQ(pair.unreceived(), 0u);
}

// A reply that comes after the caller's deadline still has its results taken off the pair (and
// dropped): the next step's results are right. While the pair's receive is held, the host's
// actor keeps serving a ZeroMQ worker (no receive blocks it).
TEST_F(RemoteExperts, ALateReplysPayloadIsDrained) {
  caf::actor_system sys{two_thread_config()};
  FifoPair pair;
  PeerTransports host_side;
  host_side.set(kPairWorker, pair.host);
  moemesh::testing::InProcessExpertHost host(sys, model(), "all", "host-pair", 2, &host_side);
  auto remote = pair_worker(sys, host.entry().endpoint, pair.worker, std::chrono::milliseconds(2000));
  remote->set_placement({1, {host.entry()}});
  RemoteExpertsOptions zo;
  zo.identity = "worker-zmq";
  RemoteExpertExecutor zmq_worker(sys, zo);
  zmq_worker.set_placement({1, {host.entry()}});
  std::mt19937 rng(13);

  pair.host->hold();  // the host cannot take the rows off the pair yet
  LayerCall call = random_call(cfg(), 16, rng);
  std::vector<std::vector<float>> got;
  try {
    remote->run(1, call.h.data(), cfg().hidden_size, call.groups, got);
    FAIL() << "answered while the host could not receive";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no reply within 2000 ms"), std::string::npos) << e.what();
  }
  check_layer(zmq_worker, 1, 16, rng);  // the host's actor is not stuck in the pair's receive
  EXPECT_EQ(zmq_worker.stats().host_failures.load(), 0u);

  // Without another replica the host was asked again after each timeout, then given up.
  const uint64_t timed_out = remote->stats().host_failures.load();
  EXPECT_GE(timed_out, 1u);
  pair.host->resume();  // the requests are served now, their replies are late
  ASSERT_TRUE(eventually([&] { return remote->stats().late_replies.load() == timed_out; }));
  EXPECT_EQ(pair.unreceived(), 0u) << "the late reply's results were taken off the pair";
  for (int i = 0; i < 3; ++i) check_layer(*remote, 1, 16, rng);  // same sizes: a stale payload would fit
  EXPECT_EQ(pair.unreceived(), 0u);
}

// Around a switch the two sides' tables differ for a moment: a message whose payload came in
// frames is read from the frames and answered the same way, whatever the receiver's pair is.
TEST_F(RemoteExperts, AMessageSentBeforeThePairSwitchedIsReadFromItsFrames) {
  caf::actor_system sys{two_thread_config()};
  FifoPair pair;
  PeerTransports host_side;
  host_side.set(kPairWorker, pair.host);  // the host switched, the worker not yet
  moemesh::testing::InProcessExpertHost host(sys, model(), "all", "host-pair", 2, &host_side);
  RemoteExpertsOptions o;
  o.identity = kPairWorker;
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {host.entry()}});
  std::mt19937 rng(17);
  for (int i = 0; i < 2; ++i) check_layer(remote, i, 12, rng);
  EXPECT_EQ(remote.stats().host_failures.load(), 0u);
  EXPECT_EQ(pair.host->received() + pair.worker->received() + pair.unreceived(), 0u) << "nothing went over the pair";
}
