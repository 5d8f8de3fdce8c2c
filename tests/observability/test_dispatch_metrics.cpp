// The attention side's dispatch metrics (moemesh_attention_dispatch_*, docs/metrics.md) against
// in-process expert hosts: requests and round trips per host, failures and failovers by reason
// when a host dies or answers with an error, and given-up dispatches when no host is left.
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <random>

#include <prometheus/text_serializer.h>

#include "actors/expert_batcher.h"
#include "actors/remote_experts.h"
#include "core/error.h"
#include "core/moe.h"
#include "tests/support/actor_config.h"
#include "tests/support/in_process_expert_host.h"
#include "tests/support/metrics_text.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;
using namespace moemesh::actors;
namespace fs = std::filesystem;

namespace {

using moemesh::testing::series_value;
using moemesh::testing::TinyModel;
using moemesh::testing::two_thread_config;
// One expert host, as moemesh-expert wires it, inside this process (1 compute thread).
using Host = moemesh::testing::InProcessExpertHost;

class DispatchMetrics : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { model_ = std::make_unique<TinyModel>(Arch::Mixtral, /*seed=*/1, /*vocab=*/64); }
  static void TearDownTestSuite() { model_.reset(); }
  fs::path model() const { return model_->path(); }
  int64_t hidden() const { return Checkpoint::open(model())->config().hidden_size; }

  // One row for each of the given experts of `layer`.
  void call(RemoteExpertExecutor& remote, int64_t layer, std::vector<int32_t> experts) {
    std::vector<float> h(experts.size() * size_t(hidden()), 0.5f);
    std::vector<ExpertGroup> groups;
    for (size_t i = 0; i < experts.size(); ++i) groups.push_back({experts[i], {int32_t(i)}, {0}, {}});
    std::vector<std::vector<float>> out;
    remote.run(layer, h.data(), hidden(), groups, out);
  }

  static inline std::unique_ptr<TinyModel> model_;
};

}  // namespace

TEST_F(DispatchMetrics, RequestsAndRoundTripsArePerHost) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "*:0-3", "host-a"), b(sys, model(), "*:4-7", "host-b");
  auto reg = std::make_shared<prometheus::Registry>();
  RemoteExpertsOptions o;
  o.metrics = reg;
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry(), b.entry()}});
  call(remote, 0, {1, 2});     // host-a only
  call(remote, 1, {0, 5, 6});  // both
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_requests_total", {{"host", "host-a"}}), 2);
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_requests_total", {{"host", "host-b"}}), 1);
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_round_trip_seconds_count", {{"host", "host-a"}}), 2);
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_round_trip_seconds_count", {{"host", "host-b"}}), 1);
  // Failure series exist at 0 once a host is known, so rates are 0 rather than absent.
  EXPECT_EQ(
      series_value(*reg, "moemesh_attention_dispatch_failures_total", {{"host", "host-b"}, {"reason", "timeout"}}), 0);
  const std::string text = prometheus::TextSerializer().Serialize(reg->Collect());
  EXPECT_NE(text.find("moemesh_attention_dispatch_failures_total{host=\"host-a\",reason=\"timeout\"} 0"),
            std::string::npos)
      << text;
}

TEST_F(DispatchMetrics, ADeadHostCountsATimeoutAndAFailover) {
  caf::actor_system sys{two_thread_config()};
  Host a(sys, model(), "all", "host-a"), b(sys, model(), "all", "host-b");
  auto reg = std::make_shared<prometheus::Registry>();
  RemoteExpertsOptions o;
  o.metrics = reg;
  o.deadline = std::chrono::milliseconds(800);
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry(), b.entry()}});
  b.kill();
  // Eight experts: replicas are balanced by rows, so b gets some of them, times out, and they go to a.
  call(remote, 0, {0, 1, 2, 3, 4, 5, 6, 7});
  EXPECT_EQ(
      series_value(*reg, "moemesh_attention_dispatch_failures_total", {{"host", "host-b"}, {"reason", "timeout"}}), 1);
  EXPECT_EQ(
      series_value(*reg, "moemesh_attention_dispatch_failures_total", {{"host", "host-a"}, {"reason", "timeout"}}), 0);
  const double failovers = series_value(*reg, "moemesh_attention_dispatch_failovers_total", {{"reason", "timeout"}});
  EXPECT_GT(failovers, 0);
  EXPECT_EQ(failovers, double(remote.stats().retries.load()));
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_round_trip_seconds_count", {{"host", "host-b"}}), 0);
}

TEST_F(DispatchMetrics, ErrorRepliesAndGivingUpAreCountedByReason) {
  caf::actor_system sys{two_thread_config()};
  // host-a claims layer 0's experts 4-7 too but holds only 0-3: it answers unknown_expert.
  Host a(sys, model(), "0:0-3", "host-a");
  auto reg = std::make_shared<prometheus::Registry>();
  RemoteExpertsOptions o;
  o.metrics = reg;
  o.uncovered_wait = std::chrono::milliseconds(200);  // how long a layer nobody serves is waited for
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry("0:*")}});
  EXPECT_THROW(call(remote, 0, {6}), Error);
  EXPECT_EQ(
      series_value(*reg, "moemesh_attention_dispatch_failures_total", {{"host", "host-a"}, {"reason", "error_reply"}}),
      1);
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_exhausted_total", {{"reason", "replicas_exhausted"}}), 1);
  EXPECT_THROW(call(remote, 1, {2}), Error);  // nobody serves layer 1
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_exhausted_total", {{"reason", "no_host"}}), 1);
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_uncovered_waits_total", {}), 1);
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_uncovered_wait_seconds_count", {}), 1);
  EXPECT_EQ(series_value(*reg, "moemesh_attention_dispatch_waiting_calls", {}), 0);
}
