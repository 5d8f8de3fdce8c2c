// Each sampling parameter changes the distribution the way it should (checked on counts over
// many seeded draws, or on the processed logits), and a seed fixes the output.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/logits_summary.h"
#include "core/sampler.h"

using namespace moemesh;

namespace {

// Token i has probability p[i] (as logits log p).
std::vector<float> logits_of(const std::vector<double>& p) {
  std::vector<float> l;
  for (double v : p) l.push_back(float(std::log(v)));
  return l;
}

// Counts of first tokens over n samplers seeded 0..n-1.
std::map<int32_t, int> histogram(const SamplingParams& base, const std::vector<float>& logits, int n) {
  std::map<int32_t, int> h;
  for (int s = 0; s < n; ++s) {
    SamplingParams p = base;
    p.seed = uint64_t(s);
    Sampler smp(p, {});
    ++h[smp.sample(logits).id];
  }
  return h;
}

const std::vector<double> kProbs = {0.4, 0.3, 0.15, 0.1, 0.05};

}  // namespace

TEST(Sampler, GreedyTakesArgmaxLowestIdOnTies) {
  SamplingParams p;
  p.temperature = 0;
  Sampler s(p, {});
  EXPECT_EQ(s.sample(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}).id, 1);
  EXPECT_EQ(s.sample(std::vector<float>{5.0f, 3.0f, 5.0f}).id, 0);
  EXPECT_EQ(s.output(), (std::vector<int32_t>{1, 0}));
}

TEST(Sampler, TemperatureOneMatchesTheDistribution) {
  SamplingParams p;
  const int n = 20000;
  auto h = histogram(p, logits_of(kProbs), n);
  for (size_t i = 0; i < kProbs.size(); ++i) {
    const double sd = std::sqrt(kProbs[i] * (1 - kProbs[i]) / n);
    EXPECT_NEAR(double(h[int32_t(i)]) / n, kProbs[i], 5 * sd) << "token " << i;
  }
}

TEST(Sampler, TemperatureWithATailPastTheSummaryMatchesTheDistribution) {
  // 300 tokens: four hold ~70% of the mass, 296 share the rest, so draws past the summary's 64
  // tokens (the full row's tail, in id order) are common. Each token's frequency and the tail's
  // share match the softmax.
  std::vector<float> row(300, 0.0f);
  for (int32_t id : {7, 100, 205, 299}) row[size_t(id)] = 5.0f;
  std::vector<double> p(row.size());
  double z = 0;
  for (size_t i = 0; i < row.size(); ++i) z += p[i] = std::exp(double(row[i]));
  for (double& v : p) v /= z;
  SamplingParams params;
  params.seed = 3;
  Sampler s(params, {});
  const int n = 40000;
  std::map<int32_t, int> h;
  for (int i = 0; i < n; ++i) ++h[s.sample(row).id];
  double tail = 0, tail_seen = 0;
  for (size_t i = 0; i < row.size(); ++i) {
    const double sd = std::sqrt(p[i] * (1 - p[i]) / n);
    EXPECT_NEAR(double(h[int32_t(i)]) / n, p[i], 5 * sd + 1e-4) << "token " << i;
    if (row[i] == 0.0f) tail += p[i], tail_seen += double(h[int32_t(i)]) / n;
  }
  EXPECT_NEAR(tail_seen, tail, 5 * std::sqrt(tail * (1 - tail) / n));
}

TEST(Sampler, LowTemperatureSharpensHighFlattens) {
  SamplingParams cold, hot;
  cold.temperature = 0.2;
  hot.temperature = 5.0;
  const int n = 4000;
  auto hc = histogram(cold, logits_of(kProbs), n), hh = histogram(hot, logits_of(kProbs), n);
  // p^(1/0.2) renormalised: token 0 gets ~0.8; at T=5 the distribution is nearly flat.
  EXPECT_GT(hc[0], int(0.75 * n));
  EXPECT_LT(hh[0], int(0.30 * n));
  EXPECT_GT(hh[4], int(0.12 * n));
}

TEST(Sampler, SameSeedSameOutputDifferentSeedDiffers) {
  SamplingParams p;
  p.seed = 42;
  std::vector<float> logits(50);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::sin(double(i)));
  auto run = [&](uint64_t seed) {
    SamplingParams q = p;
    q.seed = seed;
    Sampler s(q, {});
    std::vector<int32_t> out;
    for (int i = 0; i < 30; ++i) out.push_back(s.sample(logits).id);
    return out;
  };
  EXPECT_EQ(run(42), run(42));
  EXPECT_NE(run(42), run(43));
}

TEST(Sampler, TopKKeepsOnlyTheKBest) {
  SamplingParams p;
  p.top_k = 2;
  auto h = histogram(p, logits_of(kProbs), 3000);
  EXPECT_EQ(h.size(), 2u);
  EXPECT_GT(h[0], 0);
  EXPECT_GT(h[1], 0);
  // Renormalised over the two: 0.4 / 0.7.
  EXPECT_NEAR(h[0] / 3000.0, 0.4 / 0.7, 0.04);
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
  SamplingParams p;
  p.top_p = 0.8;  // 0.4 + 0.3 = 0.7 < 0.8, + 0.15 = 0.85 >= 0.8: tokens 0..2
  Sampler s(p, {});
  const auto x = s.process(logits_of(kProbs));
  EXPECT_TRUE(std::isfinite(x[0]) && std::isfinite(x[1]) && std::isfinite(x[2]));
  EXPECT_TRUE(std::isinf(x[3]) && std::isinf(x[4]));
  auto h = histogram(p, logits_of(kProbs), 3000);
  EXPECT_EQ(h.count(3) + h.count(4), 0u);
  EXPECT_GT(h[2], 0);
  // A tiny top_p keeps only the most likely token.
  p.top_p = 0.01;
  EXPECT_EQ(histogram(p, logits_of(kProbs), 200).size(), 1u);
}

TEST(Sampler, MinPDropsTokensBelowTheFractionOfTheBest) {
  SamplingParams p;
  p.min_p = 0.3;  // keep p >= 0.12: tokens 0, 1, 2
  Sampler s(p, {});
  const auto x = s.process(logits_of(kProbs));
  EXPECT_TRUE(std::isfinite(x[2]));
  EXPECT_TRUE(std::isinf(x[3]) && std::isinf(x[4]));
  auto h = histogram(p, logits_of(kProbs), 3000);
  EXPECT_EQ(h.count(3) + h.count(4), 0u);
  EXPECT_EQ(h.size(), 3u);
}

TEST(Sampler, RepetitionPenaltyHfSemantics) {
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 2.0;
  const std::vector<int32_t> prompt = {0, 1};
  Sampler s(p, prompt);
  const auto x = s.process(std::vector<float>{4.0f, -1.0f, 3.0f, 1.0f});
  EXPECT_FLOAT_EQ(x[0], 2.0f);   // positive: divided
  EXPECT_FLOAT_EQ(x[1], -2.0f);  // negative: multiplied
  EXPECT_FLOAT_EQ(x[2], 3.0f);   // unseen: unchanged
  // Greedy now prefers token 2; once generated it is penalised too.
  EXPECT_EQ(s.sample(std::vector<float>{4.0f, -1.0f, 3.0f, 1.0f}).id, 2);
  EXPECT_FLOAT_EQ(s.process(std::vector<float>{4.0f, -1.0f, 3.0f, 1.0f})[2], 1.5f);
}

TEST(Sampler, PresenceAndFrequencyPenaltiesCountOutputOnly) {
  SamplingParams p;
  p.temperature = 0;
  p.presence_penalty = 0.5;
  p.frequency_penalty = 0.25;
  const std::vector<int32_t> prompt = {3};
  Sampler s(p, prompt);
  s.accept(1);
  s.accept(1);
  s.accept(2);
  const auto x = s.process(std::vector<float>{0.0f, 0.0f, 0.0f, 0.0f});
  EXPECT_FLOAT_EQ(x[0], 0.0f);
  EXPECT_FLOAT_EQ(x[1], -(0.5f + 2 * 0.25f));
  EXPECT_FLOAT_EQ(x[2], -(0.5f + 0.25f));
  EXPECT_FLOAT_EQ(x[3], 0.0f);  // in the prompt only: no OpenAI penalty
  // A negative presence penalty encourages repeats.
  SamplingParams q;
  q.temperature = 0;
  q.presence_penalty = -1.0;
  Sampler r(q, {});
  r.accept(2);
  EXPECT_EQ(r.sample(std::vector<float>{0.5f, 0.0f, 0.0f}).id, 2);
}

TEST(Sampler, StopTokensAndEos) {
  SamplingParams p;
  p.stop_token_ids = {7};
  Sampler s(p, {}, {2});
  EXPECT_TRUE(s.is_stop(7));
  EXPECT_TRUE(s.is_stop(2));
  EXPECT_FALSE(s.is_stop(3));
  p.ignore_eos = true;
  Sampler t(p, {}, {2});
  EXPECT_TRUE(t.is_stop(7));
  EXPECT_FALSE(t.is_stop(2));
}

TEST(Sampler, LogprobsOfRawDistribution) {
  SamplingParams p;
  p.temperature = 0;
  p.top_logprobs = 3;
  p.repetition_penalty = 10.0;  // changes the choice, not the reported logprobs
  const std::vector<int32_t> prompt = {0};
  Sampler s(p, prompt);
  const auto t = s.sample(logits_of(kProbs));
  EXPECT_EQ(t.id, 1);
  EXPECT_NEAR(t.logprob, std::log(0.3), 1e-6);
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].first, 0);
  EXPECT_NEAR(t.top[0].second, std::log(0.4), 1e-6);
  EXPECT_EQ(t.top[2].first, 2);
}

TEST(Sampler, UniformIsInUnitIntervalAndUsesTopBits) {
  std::mt19937_64 a(5), b(5);
  for (int i = 0; i < 1000; ++i) {
    const double u = Sampler::uniform(a);
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
    EXPECT_EQ(u, double(b() >> 11) / 9007199254740992.0);
  }
}

TEST(Sampler, BadParametersAreRejected) {
  SamplingParams p;
  p.top_p = 0;
  EXPECT_THROW(Sampler(p, {}), Error);
  p = {};
  p.temperature = -1;
  EXPECT_THROW(Sampler(p, {}), Error);
  p = {};
  p.repetition_penalty = 0;
  EXPECT_THROW(Sampler(p, {}), Error);
  p = {};
  p.presence_penalty = 3;
  EXPECT_THROW(Sampler(p, {}), Error);
}

// A preempted sequence resumes on a fresh sampler: after replaying what it generated, the next
// draws equal those of a sampler that never stopped (penalties and RNG position both).
TEST(Sampler, ReplayResumesExactlyWhereTheOriginalWas) {
  std::vector<float> logits(64);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(std::cos(double(i) * 0.7));
  for (double temperature : {0.0, 0.8}) {
    SamplingParams p;
    p.seed = 7;
    p.temperature = temperature;
    p.repetition_penalty = 1.3;
    p.frequency_penalty = 0.5;
    const std::vector<int32_t> prompt = {3, 5, 8};
    Sampler whole(p, prompt);
    std::vector<int32_t> first, rest;
    for (int i = 0; i < 10; ++i) first.push_back(whole.sample(logits).id);
    for (int i = 0; i < 10; ++i) rest.push_back(whole.sample(logits).id);
    Sampler resumed(p, prompt);
    resumed.replay(first);
    std::vector<int32_t> again;
    for (int i = 0; i < 10; ++i) again.push_back(resumed.sample(logits).id);
    EXPECT_EQ(again, rest) << "temperature " << temperature;
    Sampler not_replayed(p, prompt);  // without the replay the draws differ: the test can fail
    std::vector<int32_t> fresh;
    for (int i = 0; i < 10; ++i) fresh.push_back(not_replayed.sample(logits).id);
    EXPECT_NE(fresh, rest) << "temperature " << temperature;
  }
}

// sample_from on a summary of the row (what a GPU returns instead of the row) chooses exactly
// what sample_full_row() chooses, or declines and leaves the sampler untouched; and it decides
// the cases it should (greedy, top_k, top_p / min_p, and temperature alone, on a peaked row) by
// itself; on a flat row a draw without a cut mostly ends past its tokens and is declined. (sample() takes
// the same path on the host, so this is also what makes it exact.) A declined row goes to
// sample_full_row with the summary already made, as the step worker passes it.
TEST(Sampler, SummaryDecidesLikeTheFullRow) {
  struct Case {
    const char* name;
    SamplingParams p;
    double min_decided;  // share of steps sample_from must decide alone (peaked rows)
  };
  auto params = [](double t, int64_t top_k, double top_p, double min_p, double rep, double pres, double freq,
                   int64_t logprobs) {
    SamplingParams p;
    p.temperature = t;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.repetition_penalty = rep;
    p.presence_penalty = pres;
    p.frequency_penalty = freq;
    p.top_logprobs = logprobs;
    return p;
  };
  const std::vector<Case> cases = {
      {"greedy", params(0, 0, 1, 0, 1, 0, 0, 0), 1.0},
      {"greedy+repetition", params(0, 0, 1, 0, 1.3, 0, 0, 3), 1.0},
      {"greedy+repetition<1", params(0, 0, 1, 0, 0.8, 0, 0, 0), 1.0},
      {"top_k", params(0.8, 20, 1, 0, 1, 0, 0, 0), 1.0},
      {"top_p", params(1.0, 0, 0.9, 0, 1, 0, 0, 2), 0.8},
      {"min_p", params(0.7, 0, 1, 0.1, 1, 0, 0, 0), 0.8},
      {"everything", params(0.9, 40, 0.95, 0.05, 1.2, 0.5, 0.3, 5), 1.0},
      {"top_p+penalties", params(1.0, 0, 0.8, 0, 1.1, -0.5, 0.2, 0), 0.8},
      {"plain temperature", params(1.2, 0, 1, 0, 1, 0, 0, 0), 0.8},
      {"temperature+penalties", params(1.0, 0, 1, 0, 1.2, 0.3, 0.1, 2), 0.8},
  };
  const int64_t vocab = 300;
  const std::vector<int32_t> prompt{5, 17, 17, 42, 299, 0};
  for (const Case& c : cases)
    for (uint64_t seed = 0; seed < 4; ++seed) {
      SamplingParams p = c.p;
      p.seed = seed;
      Sampler full(p, prompt), summarised(p, prompt);
      std::mt19937 rng(uint32_t(seed * 31 + 7));
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::uniform_int_distribution<int32_t> token(0, int32_t(vocab - 1));
      int peaked_steps = 0, peaked_decided = 0, declined = 0;
      for (int step = 0; step < 30; ++step) {
        const bool peaked = step % 5 != 4;  // every fifth row is flat
        std::vector<float> row(static_cast<size_t>(vocab));
        for (float& x : row) x = nd(rng) * (peaked ? 1.5f : 0.05f);
        if (peaked) {
          for (int j = 0; j < 3; ++j) row[size_t(token(rng))] += 7.0f;
          row[size_t(prompt[size_t(step) % prompt.size()])] += 6.0f;  // a penalised token near the top
        }
        const SampledToken want = full.sample_full_row(row);
        const LogitsRequest req = summarised.logits_request();
        const LogitsSummary summary = summarise_logits(row, req);
        std::optional<SampledToken> got = summarised.sample_from(req, summary);
        if (peaked) ++peaked_steps;
        if (got) {
          peaked_decided += peaked ? 1 : 0;
        } else {
          ++declined;
          got = summarised.sample_full_row(row, &summary);  // as the step worker does: no second summary
        }
        ASSERT_EQ(got->id, want.id) << c.name << " seed " << seed << " step " << step;
        ASSERT_EQ(got->logprob, want.logprob) << c.name;
        ASSERT_EQ(got->top, want.top) << c.name;
      }
      EXPECT_EQ(summarised.output(), full.output());
      EXPECT_GE(peaked_decided, int(c.min_decided * peaked_steps)) << c.name << " seed " << seed;
      std::printf("%s seed %d: %d of %d peaked rows decided, %d declined\n", c.name, int(seed), peaked_decided,
                  peaked_steps, declined);
    }
}

// The summary's k largest are partial_sort's, ties lowest id first: rows of few distinct values
// (many ties), the largest late in the row, k from 1 to the whole vocabulary.
TEST(Sampler, SummaryTopIdsArePartialSortsWithTies) {
  std::mt19937 rng(11);
  for (int64_t vocab : {1, 5, 300, 5000})
    for (int64_t k : {int64_t(1), int64_t(3), int64_t(64), vocab}) {
      std::vector<float> row(static_cast<size_t>(vocab));
      std::uniform_int_distribution<int> level(0, 9);
      for (size_t i = 0; i < row.size(); ++i) row[i] = float(level(rng)) + (i + 1 == row.size() ? 20.0f : 0.0f);
      std::vector<int32_t> ids(row.size());
      std::iota(ids.begin(), ids.end(), 0);
      const auto kk = ptrdiff_t(std::min(k, vocab));
      std::partial_sort(ids.begin(), ids.begin() + kk, ids.end(), [&](int32_t a, int32_t b) {
        return row[size_t(a)] > row[size_t(b)] || (row[size_t(a)] == row[size_t(b)] && a < b);
      });
      LogitsRequest req;
      req.k = k;
      const LogitsSummary s = summarise_logits(row, req);
      EXPECT_EQ(s.top_ids, std::vector<int32_t>(ids.begin(), ids.begin() + kk)) << "vocab " << vocab << " k " << k;
    }
}

TEST(Sampler, SummaryRequestWatchesWhatThePenaltiesTouch) {
  SamplingParams p;
  p.top_k = 2000;
  p.top_logprobs = 80;
  EXPECT_EQ(Sampler(p, std::vector<int32_t>{3, 1}).logits_request().k, 80) << "top_k beyond 1024 is not fetched";
  EXPECT_TRUE(Sampler(p, std::vector<int32_t>{3, 1}).logits_request().watch.empty());
  p.repetition_penalty = 1.1;
  EXPECT_EQ(Sampler(p, std::vector<int32_t>{3, 1, 3}).logits_request().watch, (std::vector<int32_t>{1, 3}));
  p.repetition_penalty = 1.0;
  p.presence_penalty = 0.5;
  Sampler s(p, std::vector<int32_t>{3, 1});
  s.accept(9);
  EXPECT_EQ(s.logits_request().watch, (std::vector<int32_t>{9})) << "presence: output tokens only";
  // A request from before the last token no longer covers the penalised tokens: declined.
  const LogitsRequest old = s.logits_request();
  s.accept(4);
  std::vector<float> row(20, 0.0f);
  row[4] = 9.0f;
  EXPECT_FALSE(s.sample_from(old, summarise_logits(row, old)).has_value());
}
