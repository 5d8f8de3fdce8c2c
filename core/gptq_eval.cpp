#include "core/gptq_eval.h"

#include <algorithm>
#include <cmath>

#include "core/engine.h"
#include "core/error.h"
#include "core/kv_cache.h"

namespace moemesh {
namespace {

// log-softmax of one logits row, in f64.
void log_softmax(const float* logits, int64_t n, std::vector<double>& out) {
  out.resize(size_t(n));
  const double m = *std::max_element(logits, logits + n);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - m);
  const double lse = m + std::log(sum);
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = double(logits[i]) - lse;
}

// The logits [window.size(), vocab] of every position of one window, in a fresh sequence.
std::vector<float> window_logits(Engine& e, const std::vector<int32_t>& window) {
  const SeqId seq = e.create_sequence();
  StepInput in;
  in.seq = seq;
  in.tokens = window;
  in.all_logits = true;
  auto out = e.step(std::span(&in, 1));
  e.free_sequence(seq);
  return std::move(out.front().logits);
}

}  // namespace

std::vector<DistributionDiff> compare_next_token(const std::shared_ptr<const Checkpoint>& reference,
                                                 std::span<const std::shared_ptr<const Checkpoint>> quantized,
                                                 std::span<const std::vector<int32_t>> windows) {
  size_t longest = 0;
  for (const auto& w : windows) longest = std::max(longest, w.size());
  if (longest == 0) throw Error("quantize-eval: no tokens to evaluate");
  EngineOptions opts;
  opts.kv_blocks = int64_t(longest) / KvCache::kBlockSize + 2;
  Engine ref(reference, opts);
  std::vector<std::unique_ptr<Engine>> engines;
  for (const auto& q : quantized) engines.push_back(std::make_unique<Engine>(q, opts));
  const int64_t vocab = ref.config().vocab_size;

  std::vector<DistributionDiff> diffs(quantized.size());
  std::vector<int64_t> nll_positions(quantized.size(), 0);
  std::vector<double> lp, lq;
  for (const auto& w : windows) {
    if (w.empty()) continue;
    const std::vector<float> ref_logits = window_logits(ref, w);
    for (size_t m = 0; m < engines.size(); ++m) {
      const std::vector<float> q_logits = window_logits(*engines[m], w);
      DistributionDiff& d = diffs[m];
      for (size_t t = 0; t < w.size(); ++t) {
        log_softmax(ref_logits.data() + t * size_t(vocab), vocab, lp);
        log_softmax(q_logits.data() + t * size_t(vocab), vocab, lq);
        double kl = 0;
        for (int64_t i = 0; i < vocab; ++i) kl += std::exp(lp[size_t(i)]) * (lp[size_t(i)] - lq[size_t(i)]);
        kl = std::max(kl, 0.0);  // rounding can leave -1e-17 for equal rows
        d.mean_kl += kl;
        d.max_kl = std::max(d.max_kl, kl);
        const auto top_p = std::max_element(lp.begin(), lp.end()) - lp.begin();
        const auto top_q = std::max_element(lq.begin(), lq.end()) - lq.begin();
        d.top1_agreement += top_p == top_q ? 1 : 0;
        ++d.positions;
        if (t + 1 < w.size()) {
          d.nll -= lq[size_t(w[t + 1])];
          d.reference_nll -= lp[size_t(w[t + 1])];
          ++nll_positions[m];
        }
      }
    }
  }
  for (size_t m = 0; m < diffs.size(); ++m) {
    DistributionDiff& d = diffs[m];
    if (d.positions) d.mean_kl /= double(d.positions), d.top1_agreement /= double(d.positions);
    if (nll_positions[m]) d.nll /= double(nll_positions[m]), d.reference_nll /= double(nll_positions[m]);
  }
  return diffs;
}

}  // namespace moemesh
