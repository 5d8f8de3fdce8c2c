// Two micro-batches: a step's sequences split into two halves that run on two threads give the
// logits of the one-batch path (Mixtral and DeepSeek layouts, prefill and decode, through the
// Engine and through the StepWorker), a failure in either half leaves every sequence as it was,
// and the overlap the step measured stays within the step.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "actors/step_worker.h"
#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "core/moe.h"
#include "tests/support/numeric.h"
#include "tests/support/temp_dir.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;
using namespace moemesh::actors;

namespace {

using moemesh::testing::random_tokens;
using moemesh::testing::rel_diff;
using moemesh::testing::TempDir;

int32_t argmax(std::span<const float> row) { return int32_t(std::max_element(row.begin(), row.end()) - row.begin()); }

// Local experts that fail on demand (as a remote host without replica would).
class FlakyExperts : public ExpertExecutor {
 public:
  explicit FlakyExperts(ModelWeights w) : weights_(std::move(w)), local_(weights_) {}
  void run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
           std::vector<std::vector<float>>& outputs) override {
    if (fail_after_ >= 0 && calls_++ >= fail_after_) throw Error("layer " + std::to_string(layer) + ": host gone");
    local_.run(layer, h, hidden, groups, outputs);
  }
  void fail_after(int calls) {
    calls_ = 0;
    fail_after_ = calls;
  }

 private:
  ModelWeights weights_;  // views into the checkpoint's mapping
  LocalExpertExecutor local_;
  std::atomic<int> calls_{0};
  std::atomic<int> fail_after_{-1};
};

class MicroBatches : public ::testing::TestWithParam<Arch> {
 protected:
  static void SetUpTestSuite() {
    dir_ = std::make_unique<TempDir>("moemesh-mb");
    for (Arch a : {Arch::Mixtral, Arch::DeepSeek})
      moemesh::testing::write_tiny_model(*dir_ / std::string(arch_name(a)), a, /*seed=*/3, /*vocab=*/128);
  }
  static void TearDownTestSuite() { dir_.reset(); }
  void SetUp() override { ckpt_ = Checkpoint::open(*dir_ / std::string(arch_name(GetParam()))); }
  std::shared_ptr<Engine> engine(std::shared_ptr<ExpertExecutor> experts = nullptr) {
    return std::make_shared<Engine>(ckpt_, EngineOptions{128}, std::move(experts));
  }
  int64_t vocab() const { return ckpt_->config().vocab_size; }

  static inline std::unique_ptr<TempDir> dir_;
  std::shared_ptr<Checkpoint> ckpt_;
};

}  // namespace

TEST_P(MicroBatches, TwoHalvesGiveTheLogitsOfOneBatch) {
  auto one = engine(), two = engine();
  const std::vector<size_t> lengths = {37, 5, 60, 18, 1};
  std::vector<SeqId> a, b;
  std::vector<StepInput> in1, in2;
  for (size_t i = 0; i < lengths.size(); ++i) {
    a.push_back(one->create_sequence());
    b.push_back(two->create_sequence());
    const auto prompt = random_tokens(lengths[i], 100 + i, vocab());
    in1.push_back({a[i], prompt, true});
    in2.push_back({b[i], prompt, true});
  }
  for (int step = 0; step < 6; ++step) {
    auto o1 = one->step(in1);
    auto o2 = two->step(in2, {2});
    EXPECT_EQ(one->last_timing().micro_batches, 1);
    const MicroBatchTiming& t = two->last_timing();
    EXPECT_EQ(t.micro_batches, 2);
    EXPECT_GE(t.overlap_seconds, 0.0);
    EXPECT_LE(t.overlap_seconds, t.step_seconds);
    ASSERT_EQ(o1.size(), o2.size());
    for (size_t i = 0; i < o1.size(); ++i) {
      EXPECT_EQ(o2[i].seq, b[i]);  // input order, whichever half a sequence ran in
      EXPECT_EQ(o2[i].n, o1[i].n);
      EXPECT_EQ(o2[i].first_position, o1[i].first_position);
      EXPECT_LE(rel_diff(o2[i].logits, o1[i].logits), 1e-5) << "step " << step << " sequence " << i;
    }
    // Greedy decode: every sequence feeds its own argmax back.
    for (size_t i = 0; i < o1.size(); ++i) {
      const auto last = std::span(o1[i].logits).subspan(size_t((o1[i].n - 1) * vocab()));
      const int32_t next = argmax(last);
      in1[i] = {a[i], {next}, false};
      in2[i] = {b[i], {next}, false};
    }
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(one->sequence_length(a[i]), two->sequence_length(b[i]));
}

TEST_P(MicroBatches, AFailureInEitherHalfChangesNoSequence) {
  auto flaky = std::make_shared<FlakyExperts>(ckpt_->load());
  auto eng = engine(flaky), ref = engine();
  std::vector<SeqId> s, r;
  std::vector<StepInput> in, in_ref;
  for (int i = 0; i < 3; ++i) {
    s.push_back(eng->create_sequence());
    r.push_back(ref->create_sequence());
    const auto prompt = random_tokens(20 + 10 * size_t(i), 7 + uint64_t(i), vocab());
    in.push_back({s.back(), prompt, false});
    in_ref.push_back({r.back(), prompt, false});
  }
  const int moe_layers = int(ckpt_->config().num_hidden_layers - ckpt_->config().first_k_dense_replace);
  for (int fail_after : {0, 1, moe_layers, 2 * moe_layers - 1}) {  // first half, second half, late
    flaky->fail_after(fail_after);
    EXPECT_THROW(eng->step(in, {2}), Error) << "failing after " << fail_after << " expert calls";
    for (SeqId id : s) EXPECT_EQ(eng->sequence_length(id), 0);
  }
  flaky->fail_after(-1);
  auto got = eng->step(in, {2});
  auto want = ref->step(in_ref);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_LE(rel_diff(got[i].logits, want[i].logits), 1e-5);
}

TEST_P(MicroBatches, StepWorkerOutputsAreTheSameWithOneOrTwo) {
  StepWorkerOptions one, two;
  one.micro_batches = 1;
  two.micro_batches = 2;
  StepWorker w1(engine(), {2}, one), w2(engine(), {2}, two);
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < 4; ++i) prompts.push_back(random_tokens(10 + 13 * i, 50 + i, vocab()));
  std::vector<int32_t> last(prompts.size(), -1);
  // Step 0: sequences 0-1 prefill whole, 2-3 a first chunk; step 1: 2-3 finish, 0-1 decode; then decode.
  for (int step = 0; step < 6; ++step) {
    pb::StepRequest req;
    req.set_step(uint64_t(step) + 1);
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto* wk = req.add_work();
      wk->set_seq(i + 1);
      const auto& p = prompts[i];
      const size_t half = p.size() / 2;
      if (step == 0) {
        wk->set_is_first(true);
        wk->mutable_sampling()->set_ignore_eos(true);
        for (int32_t t : p) wk->add_prompt(t);
        const size_t n = i < 2 ? p.size() : half;
        for (size_t k = 0; k < n; ++k) wk->add_tokens(p[k]);
        wk->set_sample(n == p.size());
      } else if (step == 1 && i >= 2) {
        for (size_t k = half; k < p.size(); ++k) wk->add_tokens(p[k]);
        wk->set_sample(true);
      } else {
        wk->add_tokens(last[i]);
        wk->set_sample(true);
      }
      wk->set_return_logits(wk->sample());
    }
    std::vector<std::vector<float>> l1, l2;
    auto r1 = w1.run(req, l1), r2 = w2.run(req, l2);
    ASSERT_EQ(r1.results_size(), r2.results_size());
    for (int k = 0; k < r1.results_size(); ++k) {
      const auto &a = r1.results(k), &b = r2.results(k);
      EXPECT_TRUE(a.error().empty() && b.error().empty()) << a.error() << b.error();
      EXPECT_EQ(a.seq(), b.seq());
      EXPECT_EQ(a.token(), b.token()) << "step " << step << " seq " << a.seq();
      if (a.logits_tensor() >= 0 && b.logits_tensor() >= 0) {
        EXPECT_LE(rel_diff(l2[size_t(b.logits_tensor())], l1[size_t(a.logits_tensor())]), 1e-5);
      }
      if (a.token() >= 0) last[a.seq() - 1] = a.token();
    }
  }
  EXPECT_EQ(w1.counts().microbatch_steps, 0u);
  EXPECT_EQ(w2.counts().microbatch_steps, 6u);
  EXPECT_GE(w2.counts().last_overlap_ratio, 0.0);
  EXPECT_LE(w2.counts().last_overlap_ratio, 1.0);
  EXPECT_EQ(w1.prompt_tokens_computed(), w2.prompt_tokens_computed());

  // A step of one sequence runs as one batch whatever the setting.
  pb::StepRequest req;
  req.set_step(100);
  auto* wk = req.add_work();
  wk->set_seq(1);
  wk->add_tokens(last[0]);
  wk->set_sample(true);
  std::vector<std::vector<float>> l;
  w2.run(req, l);
  EXPECT_EQ(w2.counts().microbatch_steps, 6u);
}

// A restarted router (a new router_epoch) counts its sequence ids from 1 again and knows nothing
// of the old run's sequences: the worker releases them (their KV blocks come back) on the first
// step of the new run, and the new run's sequence 2 starts fresh, whatever the old 2 held. Steps
// of one run never release anything of their own.
TEST_P(MicroBatches, ANewRouterEpochReleasesTheOldRunsSequences) {
  const auto eng = engine();
  StepWorker w(eng, {2});
  KvCache& kv = eng->kv_cache();
  const int64_t free_at_start = kv.free_blocks();
  const auto first_step = [&](uint64_t epoch, uint64_t step, std::vector<uint64_t> seqs, size_t prompt_len) {
    pb::StepRequest req;
    req.set_step(step);
    req.set_router_epoch(epoch);
    for (uint64_t id : seqs) {
      auto* wk = req.add_work();
      wk->set_seq(id);
      wk->set_is_first(true);
      const auto p = random_tokens(prompt_len, 70 + id, vocab());
      for (int32_t t : p) wk->add_prompt(t), wk->add_tokens(t);
      wk->set_sample(true);
    }
    std::vector<std::vector<float>> logits;
    const pb::StepResponse resp = w.run(req, logits);
    for (const auto& r : resp.results()) EXPECT_EQ(r.error(), "") << "sequence " << r.seq();
  };
  first_step(7, 1, {1, 2, 3}, 40);
  first_step(7, 2, {4}, 40);  // the same run: 1-3 stay
  EXPECT_EQ(w.sequences(), 4u);
  const int64_t held = free_at_start - kv.free_blocks();
  EXPECT_GT(held, 0);
  first_step(9, 1, {2}, 20);  // the router restarted
  EXPECT_EQ(w.sequences(), 1u);
  EXPECT_LT(free_at_start - kv.free_blocks(), held);
  EXPECT_EQ(free_at_start - kv.free_blocks(), (20 + KvCache::kBlockSize - 1) / KvCache::kBlockSize)
      << "only the new run's sequence 2 holds blocks";
}

// Sampling from the backend's logits summaries (what --logits-summaries does on a GPU) chooses the
// tokens the full rows choose, for greedy, top_k, top_p with penalties and plain temperature
// sampling (whose draws end among the summary's tokens or fetch the full row).
TEST_P(MicroBatches, SamplingFromSummariesChoosesTheSameTokens) {
  StepWorkerOptions with;
  with.sample_from_summaries = true;
  StepWorker rows(engine(), {2}), summaries(engine(), {2}, with);
  const size_t n = 4;
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < n; ++i) prompts.push_back(random_tokens(9 + 5 * i, 70 + i, vocab()));
  std::vector<int32_t> last(n, -1);
  for (int step = 0; step < 10; ++step) {
    pb::StepRequest req;
    req.set_step(uint64_t(step) + 1);
    for (size_t i = 0; i < n; ++i) {
      auto* wk = req.add_work();
      wk->set_seq(i + 1);
      wk->set_sample(true);
      if (step > 0) {
        wk->add_tokens(last[i]);
        continue;
      }
      wk->set_is_first(true);
      for (int32_t t : prompts[i]) wk->add_prompt(t), wk->add_tokens(t);
      auto* sp = wk->mutable_sampling();
      sp->set_ignore_eos(true);
      sp->set_seed(11 + i);
      sp->set_top_logprobs(2);
      if (i == 0) sp->set_temperature(0);
      if (i == 1) sp->set_temperature(0.8f), sp->set_top_k(10);
      if (i == 2) sp->set_top_p(0.5f), sp->set_repetition_penalty(1.3f), sp->set_presence_penalty(0.4f);
      if (i == 3) sp->set_temperature(1.1f);
    }
    std::vector<std::vector<float>> l1, l2;
    const auto a = rows.run(req, l1), b = summaries.run(req, l2);
    ASSERT_EQ(a.results_size(), int(n));
    ASSERT_EQ(b.results_size(), int(n));
    for (size_t i = 0; i < n; ++i) {
      const auto &x = a.results(int(i)), &y = b.results(int(i));
      ASSERT_TRUE(x.error().empty() && y.error().empty()) << x.error() << y.error();
      EXPECT_EQ(y.token(), x.token()) << "step " << step << " seq " << i + 1;
      EXPECT_EQ(y.logprob(), x.logprob());
      ASSERT_EQ(y.top_size(), x.top_size());
      for (int t = 0; t < x.top_size(); ++t) EXPECT_EQ(y.top(t).token(), x.top(t).token());
      last[i] = x.token();
    }
  }
  EXPECT_EQ(rows.counts().sampled_from_summary, 0u);
  EXPECT_EQ(rows.counts().sampled_from_full_row, 40u);
  EXPECT_EQ(summaries.counts().sampled_from_summary + summaries.counts().sampled_from_full_row, 40u);
  EXPECT_GE(summaries.counts().sampled_from_summary, 30u)
      << "greedy, the cuts and most draws at temperature alone decide from the summary";
}

INSTANTIATE_TEST_SUITE_P(Archs, MicroBatches, ::testing::Values(Arch::Mixtral, Arch::DeepSeek),
                         [](const auto& info) { return std::string(arch_name(info.param)); });

TEST(StepWorkerOptionsTest, MicroBatchesIsOneOrTwo) {
  ModelConfig c = model_preset(Arch::Mixtral, "tiny");
  c.vocab_size = 64;
  const TempDir dir("moemesh-mbopt");
  WriteOptions o;
  o.dtype = DType::F32;
  write_model(c, dir / "m", o);
  auto eng = std::make_shared<Engine>(Checkpoint::open(dir / "m"), EngineOptions{8});
  auto with = [](int micro_batches) {
    StepWorkerOptions o;
    o.micro_batches = micro_batches;
    return o;
  };
  EXPECT_THROW(StepWorker(eng, {}, with(3)), Error);
  EXPECT_THROW(StepWorker(eng, {}, with(0)), Error);
  EXPECT_NO_THROW(StepWorker(eng, {}, with(1)));
}
