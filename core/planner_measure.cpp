#include "core/planner_measure.h"

#include <chrono>
#include <memory>

#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/error.h"

namespace moemesh::planner {
namespace {

using Clock = std::chrono::steady_clock;

// Times every call of the experts it wraps.
class TimingExperts : public ExpertExecutor {
 public:
  explicit TimingExperts(std::shared_ptr<ExpertExecutor> inner) : inner_(std::move(inner)) {}
  void run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
           std::vector<std::vector<float>>& outputs) override {
    const auto t0 = Clock::now();
    inner_->run(layer, h, hidden, groups, outputs);
    ExpertSample s;
    s.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    for (const auto& g : groups) {
      s.active += g.rows.empty() ? 0 : 1;
      s.rows += double(g.rows.size());
    }
    calls.push_back(s);
  }
  std::vector<ExpertSample> calls;

 private:
  std::shared_ptr<ExpertExecutor> inner_;
};

}  // namespace

EngineMeasurements measure_engine(const std::filesystem::path& model, const std::vector<int64_t>& batches,
                                  const std::vector<int64_t>& contexts, int repeats) {
  auto ckpt = Checkpoint::open(model);
  EngineOptions opts;
  int64_t most = 0;
  for (int64_t b : batches)
    for (int64_t c : contexts) most = std::max(most, b * (c + int64_t(repeats) + 2));
  opts.kv_blocks = most / 16 + 64;
  Engine full(ckpt, opts);  // maps every weight; its experts are the ones timed
  auto timing = std::make_shared<TimingExperts>(std::make_shared<LocalExpertExecutor>(full.weights()));
  Engine engine(full.config(), full.weights(), opts, timing, ckpt);
  const int64_t vocab = engine.config().vocab_size;
  EngineMeasurements out;
  auto timed_step = [&](std::vector<StepInput>& in, double rows, double ctx) {
    timing->calls.clear();
    const auto t0 = Clock::now();
    engine.step(in);
    const double total = std::chrono::duration<double>(Clock::now() - t0).count();
    double experts = 0;
    for (const auto& c : timing->calls) experts += c.seconds;
    out.steps.push_back({rows, ctx, total - experts, experts});
    out.experts.insert(out.experts.end(), timing->calls.begin(), timing->calls.end());
  };
  int32_t token = 1;
  auto next_token = [&] { return int32_t(1 + (token++ * 7919) % std::max<int64_t>(2, vocab - 1)); };
  for (int64_t c : contexts)
    for (int64_t b : batches) {
      std::vector<SeqId> seqs;
      for (int64_t i = 0; i < b; ++i) {
        const SeqId s = engine.create_sequence();
        seqs.push_back(s);
        std::vector<StepInput> in(1);
        in[0].seq = s;
        for (int64_t k = 0; k < c; ++k) in[0].tokens.push_back(next_token());
        timed_step(in, double(c), double(c) * double(c + 1) / 2);  // a prefill
      }
      for (int r = 0; r < repeats; ++r) {
        std::vector<StepInput> in(static_cast<size_t>(b));
        double ctx = 0;
        for (int64_t i = 0; i < b; ++i) {
          in[size_t(i)].seq = seqs[size_t(i)];
          in[size_t(i)].tokens = {next_token()};
          ctx += double(engine.sequence_length(seqs[size_t(i)]) + 1);
        }
        timed_step(in, double(b), ctx);
      }
      for (SeqId s : seqs) engine.free_sequence(s);
    }
  return out;
}

void fit_engine_costs(const EngineMeasurements& m, CostProfile& p) {
  if (m.steps.empty() || m.experts.empty()) throw Error("plan profile: no measurements to fit");
  const double layers = double(p.model.num_hidden_layers);
  std::vector<std::vector<double>> x;
  std::vector<double> y;
  for (const auto& s : m.steps) {
    x.push_back({1.0, s.rows, s.ctx});
    y.push_back(s.seconds);
  }
  // The step's non-expert time is layers x attention + the step's own (embedding, lm_head):
  // the fixed part and the per-row part of the step are kept per layer here; the cluster's
  // step overheads come from the calibration against a running cluster.
  const auto a = fit_linear(x, y);
  p.attn_fixed_s = a[0] / layers;
  p.attn_per_row_s = a[1] / layers;
  p.attn_per_ctx_s = a[2] / layers;
  x.clear();
  y.clear();
  for (const auto& e : m.experts) {
    x.push_back({1.0, e.active, e.rows});
    y.push_back(e.seconds);
  }
  const auto e = fit_linear(x, y);
  p.expert_fixed_s = e[0];
  p.expert_per_expert_s = e[1];
  p.expert_per_row_s = e[2];
}

}  // namespace moemesh::planner
