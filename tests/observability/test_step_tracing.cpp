// The attention step's phases and its sequences' trace spans (actors/step_phases.h,
// actors/step_worker.h): blocked time from lanes and expert waits, the phases adding up, the
// span a traced sequence logs when freed, and the trace each forward pass hands its expert
// executor (only the sequences of its own micro-batch).
#include <gtest/gtest.h>

#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/step_phases.h"
#include "actors/step_worker.h"
#include "actors/trace_span.h"
#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/moe.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;
using namespace moemesh::actors;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr const char* kTraceId = "4bf92f3577b34da6a3ce929d0e0e4736";
constexpr const char* kRouterSpan = "00f067aa0ba902b7";

std::thread::id other_thread_id() {
  std::thread::id id;
  std::thread([&] { id = std::this_thread::get_id(); }).join();
  return id;
}

// Lanes over [0, 100] ms of a made-up clock.
StepLanes lanes(std::vector<std::pair<std::thread::id, int>> ends, int end = 100) {
  StepLanes l;
  l.start = Clock::time_point{};
  l.end = l.start + milliseconds(end);
  for (auto [t, e] : ends) l.lanes.emplace_back(t, l.start + milliseconds(e));
  return l;
}
ExpertWait wait(std::thread::id t, int from, int to) {
  return {t, Clock::time_point{} + milliseconds(from), Clock::time_point{} + milliseconds(to)};
}

}  // namespace

TEST(StepPhases, OneLaneIsBlockedExactlyWhileItWaits) {
  const auto me = std::this_thread::get_id();
  EXPECT_NEAR(blocked_seconds(lanes({{me, 100}}), std::vector{wait(me, 10, 30), wait(me, 50, 60)}), 0.030, 1e-9);
  EXPECT_NEAR(blocked_seconds(lanes({{me, 100}}), {}), 0.0, 1e-9);
  // Waits of threads that are not lanes (another executor) do not count.
  EXPECT_NEAR(blocked_seconds(lanes({{me, 100}}), std::vector{wait(other_thread_id(), 0, 90)}), 0.0, 1e-9);
}

TEST(StepPhases, TwoLanesAreBlockedOnlyWhenNeitherComputes) {
  const auto a = std::this_thread::get_id(), b = other_thread_id();
  // a waits 10-40, b waits 30-60: both wait only in 30-40.
  EXPECT_NEAR(blocked_seconds(lanes({{a, 100}, {b, 100}}), std::vector{wait(a, 10, 40), wait(b, 30, 60)}), 0.010, 1e-9);
  // Disjoint waits: one half always computes (full overlap), nothing is blocked.
  EXPECT_NEAR(blocked_seconds(lanes({{a, 100}, {b, 100}}), std::vector{wait(a, 10, 20), wait(b, 50, 60)}), 0.0, 1e-9);
  // b finished at 50: from then on a's waits block the step (70-90), and before that both waited 20-30.
  EXPECT_NEAR(
      blocked_seconds(lanes({{a, 100}, {b, 50}}), std::vector{wait(a, 20, 30), wait(b, 20, 30), wait(a, 70, 90)}),
      0.030, 1e-9);
  // The engine's own work after both lanes ended waits on nobody.
  EXPECT_NEAR(blocked_seconds(lanes({{a, 90}, {b, 80}}), std::vector{wait(a, 85, 95)}), 0.005, 1e-9);
}

TEST(StepPhases, TheTimerGivesAttentionWhatTheOtherPhasesLeave) {
  StepPhases p{1, 2, 3, 4};
  const auto t0 = Clock::now();
  {
    StepPhaseTimer t(p);
    EXPECT_EQ(p.attention, 0);  // reset at the start of a step
    EXPECT_EQ(p.prefix_lookup, 0);
    p.expert_wait = 1e-3;
    p.sampling = 2e-3;
    p.prefix_lookup = 1.5e-3;
    std::this_thread::sleep_for(milliseconds(10));
  }
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_GT(p.attention, 0);
  EXPECT_LE(p.attention + 4.5e-3, wall) << "the other phases come out of the wall time";
  EXPECT_GE(p.attention + 4.5e-3, 10e-3);
  EXPECT_EQ(p.expert_wait, 1e-3);
  EXPECT_EQ(p.sampling, 2e-3);
  EXPECT_EQ(p.prefix_lookup, 1.5e-3);
}

TEST(StepPhases, TheWaitLogIsTakenOnce) {
  ExpertWaitLog log;
  log.record(Clock::now(), Clock::now());
  std::thread([&] { log.record(Clock::now(), Clock::now()); }).join();
  auto w = log.take();
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0].thread, std::this_thread::get_id());
  EXPECT_NE(w[1].thread, std::this_thread::get_id());
  EXPECT_TRUE(log.take().empty());
}

namespace {

// Local experts that note, per call, the traces of the forward pass's inputs and record each
// call as an expert wait (as the remote executor records its blocked time).
class WatchingExperts : public ExpertExecutor {
 public:
  WatchingExperts(ModelWeights w, std::shared_ptr<ExpertWaitLog> log)
      : weights_(std::move(w)), local_(weights_), log_(log) {}
  void run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
           std::vector<std::vector<float>>& outputs) override {
    const auto t0 = Clock::now();
    std::set<std::string> seen;
    for (const StepInput& in : current_forward_inputs())
      seen.insert(in.trace.valid() ? trace::hex(in.trace.trace_id.data(), 16) + "/" + std::to_string(in.trace.span_id)
                                   : "untraced");
    {
      std::lock_guard<std::mutex> lk(mu);
      calls.push_back(seen);
    }
    local_.run(layer, h, hidden, groups, outputs);
    const auto t1 = Clock::now();
    log_->record(t0, t1);
    std::lock_guard<std::mutex> lk(mu);
    waited += std::chrono::duration<double>(t1 - t0).count();
  }

  std::mutex mu;
  std::vector<std::set<std::string>> calls;
  double waited = 0;

 private:
  ModelWeights weights_;
  LocalExpertExecutor local_;
  std::shared_ptr<ExpertWaitLog> log_;
};

class StepTracing : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = std::make_unique<moemesh::testing::TinyModel>(Arch::Mixtral, /*seed=*/5, /*vocab=*/128);
  }
  static void TearDownTestSuite() { model_.reset(); }
  void SetUp() override {
    auto ckpt = Checkpoint::open(model_->path());
    log_ = std::make_shared<ExpertWaitLog>();
    experts_ = std::make_shared<WatchingExperts>(ckpt->load(), log_);
    StepWorkerOptions o;
    o.micro_batches = 2;
    o.expert_waits = log_;
    worker_ = std::make_unique<StepWorker>(std::make_shared<Engine>(ckpt, EngineOptions{64}, experts_),
                                           std::vector<int32_t>{2}, o);
  }

  static void first_chunk(pb::StepRequest& req, uint64_t seq, std::vector<int32_t> prompt, const std::string& tp) {
    auto* w = req.add_work();
    w->set_seq(seq);
    w->set_is_first(true);
    w->set_sample(true);
    for (int32_t t : prompt) w->add_tokens(t), w->add_prompt(t);
    w->mutable_sampling()->set_ignore_eos(true);
    w->set_traceparent(tp);
  }
  static void decode(pb::StepRequest& req, uint64_t seq, int32_t token) {
    auto* w = req.add_work();
    w->set_seq(seq);
    w->set_sample(true);
    w->add_tokens(token);
  }
  pb::StepResponse run(const pb::StepRequest& req) {
    std::vector<std::vector<float>> logits;
    return worker_->run(req, logits);
  }

  static inline std::unique_ptr<moemesh::testing::TinyModel> model_;
  std::shared_ptr<ExpertWaitLog> log_;
  std::shared_ptr<WatchingExperts> experts_;
  std::unique_ptr<StepWorker> worker_;
};

std::vector<nlohmann::json> span_lines(const std::string& text) {
  std::vector<nlohmann::json> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (!line.empty() && line[0] == '{') out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

TEST_F(StepTracing, ATracedSequenceLogsOneSpanWhenFreedAndEachHalfNamesOnlyItsOwnTraces) {
  const std::string tp = std::string("00-") + kTraceId + "-" + kRouterSpan + "-01";
  pb::StepRequest r1;
  r1.set_step(1);
  first_chunk(r1, 7, {1, 5, 9, 11, 13}, tp);
  first_chunk(r1, 8, {1, 6, 10}, "");  // untraced
  ::testing::internal::CaptureStderr();
  auto a = run(r1);
  ASSERT_EQ(a.results_size(), 2);
  // Two sequences, two micro-batches: each pass saw only its own sequence.
  {
    std::lock_guard<std::mutex> lk(experts_->mu);
    ASSERT_FALSE(experts_->calls.empty());
    std::set<std::set<std::string>> kinds(experts_->calls.begin(), experts_->calls.end());
    EXPECT_EQ(kinds.size(), 2u);
    for (const auto& k : kinds) EXPECT_EQ(k.size(), 1u);
    EXPECT_TRUE(kinds.count({"untraced"}));
  }
  // The phases add up: with one lane per half, blocked time is at most what was recorded.
  const StepPhases p1 = worker_->last_phases();
  EXPECT_GT(p1.expert_wait, 0);
  EXPECT_GT(p1.sampling, 0);
  EXPECT_GT(p1.attention, 0);
  EXPECT_LE(p1.expert_wait, experts_->waited + 1e-9);

  pb::StepRequest r2;
  r2.set_step(2);
  decode(r2, 7, a.results(0).token());
  auto b = run(r2);
  ASSERT_EQ(b.results_size(), 1);
  // One sequence: one lane, blocked exactly while the executor waited in this step.
  {
    std::lock_guard<std::mutex> lk(experts_->mu);
    experts_->waited = 0;
  }
  pb::StepRequest r3;
  r3.set_step(3);
  decode(r3, 7, b.results(0).token());
  run(r3);
  EXPECT_NEAR(worker_->last_phases().expert_wait, experts_->waited, 1e-9);

  pb::StepRequest r4;
  r4.set_step(4);
  r4.add_free(7);
  r4.add_free(8);
  run(r4);
  const auto spans = span_lines(::testing::internal::GetCapturedStderr());
  ASSERT_EQ(spans.size(), 1u) << "only the traced sequence logs a span";
  const auto& s = spans[0];
  EXPECT_EQ(s["span"], "sequence");
  EXPECT_EQ(s["service"], "attention");
  EXPECT_EQ(s["trace_id"], kTraceId);
  EXPECT_EQ(s["parent_span_id"], kRouterSpan);
  EXPECT_EQ(s["peer"], "router");
  EXPECT_EQ(s["end"], "freed");
  EXPECT_EQ(s["prompt_tokens"], 5);
  EXPECT_EQ(s["generated_tokens"], 3);
  EXPECT_EQ(s["cached_tokens"], 0);
  EXPECT_EQ(s["steps"], 3);
  EXPECT_GT(s["duration_s"].get<double>(), 0);
  // The span id the experts were handed is the one logged.
  const uint64_t span_id = std::stoull(s["span_id"].get<std::string>(), nullptr, 16);
  std::lock_guard<std::mutex> lk(experts_->mu);
  bool named = false;
  for (const auto& c : experts_->calls) named |= c.count(std::string(kTraceId) + "/" + std::to_string(span_id)) > 0;
  EXPECT_TRUE(named);
}

TEST_F(StepTracing, ASpanSaysWhyItsSequenceEnded) {
  pb::StepRequest r;
  r.set_step(1);
  first_chunk(r, 3, {1, 500}, std::string("00-") + kTraceId + "-" + kRouterSpan + "-01");  // token out of range
  ::testing::internal::CaptureStderr();
  run(r);
  pb::StepRequest r2;
  r2.set_step(2);
  first_chunk(r2, 4, {1, 4}, std::string("00-") + kTraceId + "-" + kRouterSpan + "-01");
  run(r2);
  pb::StepRequest r3;
  r3.set_step(3);
  first_chunk(r3, 4, {1, 4}, std::string("00-") + kTraceId + "-" + kRouterSpan + "-01");  // resubmitted
  run(r3);
  pb::StepRequest r4;
  r4.set_step(4);
  decode(r4, 4, 500);  // out of range: the sequence fails and is freed
  run(r4);
  const auto spans = span_lines(::testing::internal::GetCapturedStderr());
  // The bad first chunk is refused before its sequence exists: no span. The resubmission ends
  // the first try of sequence 4, the bad decode token the second.
  ASSERT_EQ(spans.size(), 2u);
  EXPECT_EQ(spans[0]["end"], "restarted");
  EXPECT_EQ(spans[0]["steps"], 1);
  EXPECT_EQ(spans[1]["end"], "failed");
  EXPECT_EQ(spans[1]["generated_tokens"], 1);
}
