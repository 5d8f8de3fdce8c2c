// RemoteExpertExecutor against in-process expert hosts (batcher + compute pool + ROUTER bridge
// on loopback TCP), compared with LocalExpertExecutor on the full checkpoint: sharded hosts,
// failover to a replica when a host dies, error replies, placement swaps under load.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <random>
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
