// RemoteExpertExecutor against in-process expert hosts (batcher + compute pool + ROUTER bridge
// on loopback TCP), compared with LocalExpertExecutor on the full checkpoint: sharded hosts,
// failover to a replica when a host dies, error replies, placement swaps under load.
#include <gtest/gtest.h>

#include <cmath>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <memory>
#include <random>
#include <mutex>
#include <span>
#include <thread>

#include "actors/expert_batcher.h"
#include "actors/remote_experts.h"
#include "core/error.h"
#include "core/moe.h"
#include "tests/support/actor_config.h"
#include "tests/support/in_process_expert_host.h"
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
  o.deadline = std::chrono::milliseconds(1500);
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry(), b.entry()}});
  std::mt19937 rng(5);
  check_layer(remote, 0, 16, rng);  // both hosts take part (replicas are balanced by rows)
  EXPECT_GT(a.requests(), 0);
  EXPECT_GT(b.requests(), 0);

  b.kill();
  check_layer(remote, 1, 16, rng);  // b's share times out and is retried on a
  EXPECT_EQ(remote.stats().host_failures.load(), 1u);
  EXPECT_GT(remote.stats().retries.load(), 0u);
  // b is now tried last, so later calls do not wait for it again.
  for (int i = 0; i < 3; ++i) check_layer(remote, i % 2, 9, rng);
  EXPECT_EQ(remote.stats().host_failures.load(), 1u);
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
  for (int32_t e = 4; e < 8; ++e) call.groups.push_back({e, {e - 4}, {0}});
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
  call.groups = {{1, {0}, {0}}, {6, {1}, {0}}};
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
  call.groups = {{1, {0, 1}, {0, 0}}};
  std::vector<std::vector<float>> want;
  remote.run(0, call.h.data(), cfg().hidden_size, call.groups, got);
  local_->run(0, call.h.data(), cfg().hidden_size, call.groups, want);
  expect_close(got, want, cfg().hidden_size, agreement_);
}

TEST_F(RemoteExperts, AnExpertWithNoHostIsAnError) {
  caf::actor_system sys{two_thread_config()};
  RemoteExpertExecutor remote(sys);
  std::mt19937 rng(4);
  LayerCall call = random_call(cfg(), 3, rng);
  std::vector<std::vector<float>> got;
  try {
    remote.run(1, call.h.data(), cfg().hidden_size, call.groups, got);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1: no expert host serves expert"), std::string::npos) << e.what();
  }
}

TEST_F(RemoteExperts, PlacementSwapsWhileCallsRun) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "all", "host-a"), b(sys, model(), "all", "host-b");
  RemoteExpertExecutor remote(sys);
  const std::vector<PlacementTable> tables{{1, {a.entry()}}, {2, {b.entry()}}, {3, {a.entry(), b.entry()}},
                                           {4, {a.entry("*:0-3"), b.entry("*:4-7")}}};
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

namespace {

// One end of an in-memory pair transport (what an NCCL communicator is to a peer pair): send
// queues the tensors for the other end and leaves nothing for ZeroMQ; receive takes them in order.
class LoopbackEnd final : public Transport {
 public:
  struct Queue {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::vector<float>> tensors;
  };
  LoopbackEnd(std::shared_ptr<Queue> out, std::shared_ptr<Queue> in) : out_(std::move(out)), in_(std::move(in)) {}
  TransportKind kind() const override { return TransportKind::Nccl; }
  std::vector<std::vector<float>> send(std::vector<std::vector<float>>&& tensors) override {
    {
      std::lock_guard<std::mutex> lk(out_->mu);
      for (auto& t : tensors) out_->tensors.push_back(std::move(t));
    }
    out_->cv.notify_all();
    return {};
  }
  std::vector<std::vector<float>> receive(std::span<const size_t> floats,
                                          std::span<const PayloadFrame> frames) override {
    if (!frames.empty()) throw Error("loopback: payload frames came over ZeroMQ");
    std::vector<std::vector<float>> got;
    std::unique_lock<std::mutex> lk(in_->mu);
    for (size_t n : floats) {
      in_->cv.wait(lk, [&] { return !in_->tensors.empty(); });
      got.push_back(std::move(in_->tensors.front()));
      in_->tensors.pop_front();
      if (got.back().size() != n) throw Error("loopback: tensor of the wrong size");
    }
    received += got.size();
    return got;
  }
  size_t received = 0;

 private:
  std::shared_ptr<Queue> out_, in_;
};

}  // namespace

// The payloads go through the pair's Transport: with a pair transport set on both sides, only
// the headers cross ZeroMQ and the results still equal the local executor's.
TEST_F(RemoteExperts, PayloadsTravelThroughThePairTransport) {
  caf::actor_system sys{two_thread_config()};
  auto to_host = std::make_shared<LoopbackEnd::Queue>(), to_worker = std::make_shared<LoopbackEnd::Queue>();
  auto worker_end = std::make_shared<LoopbackEnd>(to_host, to_worker);
  auto host_end = std::make_shared<LoopbackEnd>(to_worker, to_host);
  PeerTransports host_side;
  host_side.set("worker-1", host_end);  // the worker's DEALER routing id
  Host zmq_host(sys, model(), "all", "host-zmq");
  moemesh::testing::InProcessExpertHost pair_host(sys, model(), "all", "host-pair", 2, &host_side);

  RemoteExpertsOptions o;
  o.identity = "worker-1";
  RemoteExpertExecutor remote(sys, o);
  remote.transports().set(pair_host.entry().endpoint, worker_end);
  std::mt19937 rng(21);
  remote.set_placement({1, {pair_host.entry()}});
  for (int64_t rows : {1, 7, 40}) check_layer(remote, rows % 2, rows, rng);
  EXPECT_EQ(remote.stats().host_failures.load(), 0u);
  EXPECT_EQ(pair_host.requests(), 3);
  EXPECT_EQ(host_end->received, 3u);
  EXPECT_EQ(worker_end->received, 3u);
  const double pair_bytes = pair_host.received_bytes();

  // The same calls over plain ZeroMQ carry the rows in frames.
  remote.set_placement({2, {zmq_host.entry()}});
  for (int64_t rows : {1, 7, 40}) check_layer(remote, rows % 2, rows, rng);
  EXPECT_EQ(zmq_host.requests(), 3);
  const double rows_bytes = double((1 + 7 + 40) * cfg().hidden_size * 4);
  EXPECT_GE(zmq_host.received_bytes(), pair_bytes + rows_bytes) << "ZeroMQ: headers and rows";
  EXPECT_LT(pair_bytes, rows_bytes) << "pair transport: only headers on ZeroMQ";
}
