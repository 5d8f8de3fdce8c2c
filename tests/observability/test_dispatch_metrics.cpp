// The attention side's dispatch metrics (moemesh_attention_dispatch_*, docs/metrics.md) against
// in-process expert hosts: requests and round trips per host, failures and failovers by reason
// when a host dies or answers with an error, and given-up dispatches when no host is left.
#include <gtest/gtest.h>

#include <stdlib.h>

#include <filesystem>
#include <random>

#include <prometheus/text_serializer.h>

#include "actors/expert_batcher.h"
#include "actors/remote_experts.h"
#include "core/error.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "core/moe.h"
#include "tests/support/in_process_expert_host.h"

using namespace moemesh;
using namespace moemesh::actors;
namespace fs = std::filesystem;

namespace {

caf::actor_system_config& config() {
  static caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  return cfg;
}

// One expert host, as moemesh-expert wires it, inside this process (1 compute thread).
class Host : public moemesh::testing::InProcessExpertHost {
 public:
  Host(caf::actor_system& sys, const fs::path& model, const std::string& spec, std::string name)
      : InProcessExpertHost(sys, model, spec, std::move(name), 1) {}
};

// The value of one series in the registry's exposition (0 when absent).
double value(prometheus::Registry& reg, const std::string& name, const prometheus::Labels& labels) {
  for (const auto& fam : reg.Collect()) {
    for (const auto& m : fam.metric) {
      prometheus::Labels got;
      for (const auto& l : m.label) got[l.name] = l.value;
      if (got != labels) continue;
      if (fam.name == name) return fam.type == prometheus::MetricType::Counter ? m.counter.value : m.gauge.value;
      if (fam.name + "_count" == name) return double(m.histogram.sample_count);
    }
  }
  return 0;
}

class DispatchMetrics : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string tmpl = (fs::temp_directory_path() / "moemesh-dm-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = new fs::path(tmpl);
    ModelConfig c = model_preset(Arch::Mixtral, "tiny");
    c.vocab_size = 64;
    c.bos_token_id = 1;
    c.eos_token_ids = {2};
    WriteOptions o;
    o.dtype = DType::F32;
    o.seed = 1;
    write_model(c, *dir_ / "mixtral", o);
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  fs::path model() const { return *dir_ / "mixtral"; }
  int64_t hidden() const { return Checkpoint::open(model())->config().hidden_size; }

  // One row for each of the given experts of `layer`.
  void call(RemoteExpertExecutor& remote, int64_t layer, std::vector<int32_t> experts) {
    std::vector<float> h(experts.size() * size_t(hidden()), 0.5f);
    std::vector<ExpertGroup> groups;
    for (size_t i = 0; i < experts.size(); ++i) groups.push_back({experts[i], {int32_t(i)}, {0}});
    std::vector<std::vector<float>> out;
    remote.run(layer, h.data(), hidden(), groups, out);
  }

  static fs::path* dir_;
};
fs::path* DispatchMetrics::dir_ = nullptr;

}  // namespace

TEST_F(DispatchMetrics, RequestsAndRoundTripsArePerHost) {
  caf::actor_system sys{config()};
  Host a(sys, model(), "*:0-3", "host-a"), b(sys, model(), "*:4-7", "host-b");
  auto reg = std::make_shared<prometheus::Registry>();
  RemoteExpertsOptions o;
  o.metrics = reg;
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry(), b.entry()}});
  call(remote, 0, {1, 2});     // host-a only
  call(remote, 1, {0, 5, 6});  // both
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_requests_total", {{"host", "host-a"}}), 2);
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_requests_total", {{"host", "host-b"}}), 1);
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_round_trip_seconds_count", {{"host", "host-a"}}), 2);
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_round_trip_seconds_count", {{"host", "host-b"}}), 1);
  // Failure series exist at 0 once a host is known, so rates are 0 rather than absent.
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_failures_total", {{"host", "host-b"}, {"reason", "timeout"}}), 0);
  const std::string text = prometheus::TextSerializer().Serialize(reg->Collect());
  EXPECT_NE(text.find("moemesh_attention_dispatch_failures_total{host=\"host-a\",reason=\"timeout\"} 0"),
            std::string::npos)
      << text;
}

TEST_F(DispatchMetrics, ADeadHostCountsATimeoutAndAFailover) {
  caf::actor_system sys{config()};
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
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_failures_total", {{"host", "host-b"}, {"reason", "timeout"}}), 1);
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_failures_total", {{"host", "host-a"}, {"reason", "timeout"}}), 0);
  const double failovers = value(*reg, "moemesh_attention_dispatch_failovers_total", {{"reason", "timeout"}});
  EXPECT_GT(failovers, 0);
  EXPECT_EQ(failovers, double(remote.stats().retries.load()));
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_round_trip_seconds_count", {{"host", "host-b"}}), 0);
}

TEST_F(DispatchMetrics, ErrorRepliesAndGivingUpAreCountedByReason) {
  caf::actor_system sys{config()};
  // host-a claims layer 0's experts 4-7 too but holds only 0-3: it answers unknown_expert.
  Host a(sys, model(), "0:0-3", "host-a");
  auto reg = std::make_shared<prometheus::Registry>();
  RemoteExpertsOptions o;
  o.metrics = reg;
  RemoteExpertExecutor remote(sys, o);
  remote.set_placement({1, {a.entry("0:*")}});
  EXPECT_THROW(call(remote, 0, {6}), Error);
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_failures_total", {{"host", "host-a"}, {"reason", "error_reply"}}), 1);
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_exhausted_total", {{"reason", "replicas_exhausted"}}), 1);
  EXPECT_THROW(call(remote, 1, {2}), Error);  // nobody serves layer 1
  EXPECT_EQ(value(*reg, "moemesh_attention_dispatch_exhausted_total", {{"reason", "no_host"}}), 1);
}
