#include "core/planner_measure.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>
#include <memory>

#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/sampler.h"

namespace moemesh::planner {
namespace {

using Clock = std::chrono::steady_clock;

// The fastest of repeated timings: other jobs on a shared machine only ever add time, so the
// minimum is the operation's own cost (their share is fitted apart, on the running cluster).
double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

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
  std::vector<EngineSample> decode;
  std::map<std::pair<double, double>, std::vector<double>> expert_times;
  auto timed_step = [&](std::vector<StepInput>& in, double rows, double ctx, bool prefill) {
    timing->calls.clear();
    const auto t0 = Clock::now();
    engine.step(in);
    const double total = std::chrono::duration<double>(Clock::now() - t0).count();
    double experts = 0;
    for (const auto& c : timing->calls) {
      experts += c.seconds;
      expert_times[{c.active, c.rows}].push_back(c.seconds);
    }
    (prefill ? out.steps : decode).push_back({rows, ctx, total - experts, experts, prefill});
  };
  // Each sampled row asks for its logits summary, as an attention worker does for greedy or top-k/p
  // sampling (actors/step_worker.cpp): computing it is per-row work of the step, like lm_head.
  SamplingParams greedy_params;
  greedy_params.temperature = 0;
  const LogitsRequest summary = Sampler(greedy_params, {}).logits_request();
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
        in[0].summary = summary;
        for (int64_t k = 0; k < c; ++k) in[0].tokens.push_back(next_token());
        timed_step(in, double(c), double(c) * double(c + 1) / 2, true);
      }
      decode.clear();
      for (int r = 0; r < repeats; ++r) {
        std::vector<StepInput> in(static_cast<size_t>(b));
        double ctx = 0;
        for (int64_t i = 0; i < b; ++i) {
          in[size_t(i)].seq = seqs[size_t(i)];
          in[size_t(i)].tokens = {next_token()};
          in[size_t(i)].summary = summary;
          ctx += double(engine.sequence_length(seqs[size_t(i)]) + 1);
        }
        timed_step(in, double(b), ctx, false);
      }
      // The shape's fastest step (its context grows by one per repeat: the middle one's).
      EngineSample best =
          *std::min_element(decode.begin(), decode.end(), [](auto& x, auto& y) { return x.seconds < y.seconds; });
      best.ctx = double(b) * double(c + 1 + repeats / 2);
      out.steps.push_back(best);
      for (SeqId s : seqs) engine.free_sequence(s);
    }
  for (auto& [shape, times] : expert_times) out.experts.push_back({shape.first, shape.second, fastest(times)});
  return out;
}

void fit_engine_costs(const EngineMeasurements& m, CostProfile& p) {
  if (m.steps.empty() || m.experts.empty()) throw Error("plan profile: no measurements to fit");
  const double layers = double(p.model.num_hidden_layers);
  // Decode steps: layers x attention + the step's own (embedding, lm_head), kept per layer here;
  // the cluster's step overheads come from the calibration against a running cluster.
  std::vector<std::vector<double>> x;
  std::vector<double> y;
  for (const auto& s : m.steps)
    if (!s.prefill) {
      x.push_back({1.0, s.rows, s.ctx});
      y.push_back(s.seconds);
    }
  if (x.empty()) throw Error("plan profile: no decode steps to fit");
  const auto a = fit_linear(x, y);
  p.attn_fixed_s = a[0] / layers;
  p.attn_per_row_s = a[1] / layers;
  p.attn_per_ctx_s = a[2] / layers;
  // Prefills, the fastest per prompt length, beyond the step's fixed cost: per prompt row and
  // per position attended, fitted apart from decode (other kernels).
  std::map<double, std::pair<double, std::vector<double>>> by_len;
  for (const auto& s : m.steps)
    if (s.prefill) {
      by_len[s.rows].first = s.ctx;
      by_len[s.rows].second.push_back(s.seconds - a[0]);
    }
  x.clear();
  y.clear();
  for (auto& [len, v] : by_len) {
    x.push_back({len, v.first});
    y.push_back(fastest(v.second));
  }
  p.attn_per_prefill_row_s = p.attn_per_row_s;
  p.attn_per_prefill_ctx_s = p.attn_per_ctx_s;
  if (!x.empty()) {
    const auto f = fit_linear(x, y);
    p.attn_per_prefill_row_s = f[0] / layers;
    p.attn_per_prefill_ctx_s = f[1] / layers;
  }
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

namespace {

SimResult simulate_point(const CostProfile& p, const Deployment& d, const CalibrationPoint& c) {
  TrafficSpec t =
      TrafficSpec::parse(c.rate > 0 ? "poisson:" + std::to_string(c.rate) : "closed:" + std::to_string(c.concurrency));
  t.prompt_len = bench::LengthDist::parse(std::to_string(c.prompt));
  t.output_len = bench::LengthDist::parse(std::to_string(c.output));
  t.requests = c.requests;
  SimOptions o;
  o.layers_per_event = 1;
  return simulate(p, d, t, ExpertLoad::uniform(std::max<int64_t>(1, p.model.num_experts)), o);
}

}  // namespace

std::vector<double> token_times(const bench::Outcome& o) {
  std::vector<double> t;
  if (!o.ttft_s) return t;
  t.push_back(o.start_s + *o.ttft_s);
  for (double g : o.itl_s) t.push_back(t.back() + g);
  return t;
}

namespace {
constexpr double kSameStep = 3e-4;  // a step's tokens reach two clients this close together
constexpr int kNeighbours = 6;

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}
}  // namespace

GapExcess gap_excess(const std::vector<double>& stream, const std::vector<std::vector<double>>& others) {
  GapExcess out;
  if (stream.size() < 2) return out;
  const size_t gaps = stream.size() - 1;
  enum Mark : unsigned { kStart = 1, kDecode = 2, kEnd = 4, kAfterEnd = 8 };
  std::vector<unsigned> marks(gaps, 0);
  // The gap closed by the stream's token of the step that produced t, if any.
  auto gap_of = [&](double t) -> std::optional<size_t> {
    const size_t i = size_t(std::lower_bound(stream.begin(), stream.end(), t - kSameStep) - stream.begin());
    if (i == 0 || i > gaps) return std::nullopt;
    return i - 1;
  };
  for (const auto& t : others) {
    if (t.empty()) continue;
    if (auto g = gap_of(t.front())) marks[*g] |= kStart;
    for (size_t k = 1; k + 1 < t.size(); ++k)
      if (auto g = gap_of(t[k])) marks[*g] |= kDecode;
    if (auto g = gap_of(t.back())) {
      if (t.size() > 1) marks[*g] |= kEnd;
      if (*g + 1 < gaps) marks[*g + 1] |= kAfterEnd;
    }
  }
  for (size_t i = 0; i < gaps; ++i) {
    const unsigned m = marks[i];
    if (m == 0 || (m & (m - 1)) != 0) continue;  // one thing at a time: a gap with two is no class's
    std::vector<double> ref;
    for (size_t j = i >= kNeighbours ? i - kNeighbours : 0; j < std::min(gaps, i + kNeighbours + 1); ++j)
      if (marks[j] == 0) ref.push_back(stream[j + 1] - stream[j]);
    if (ref.size() < 4) continue;
    const double excess = (stream[i + 1] - stream[i]) - median_of(ref);
    (m == kStart ? out.start : m == kDecode ? out.decode : m == kEnd ? out.end : out.after_end).push_back(excess);
  }
  return out;
}

std::pair<double, int> align_clocks(const std::vector<double>& stream, const std::vector<std::vector<double>>& others) {
  // Every offset within the slack of the true one matches as many: the middle of the first run of
  // best offsets puts the others' first tokens on the stream's.
  int best = -1, first = 0, last = 0;
  for (int k = -4000; k < 10000; ++k) {  // 50 us steps
    const double d = k * 5e-5;
    int hits = 0;
    for (const auto& t : others) {
      if (t.empty()) continue;
      const auto it = std::lower_bound(stream.begin(), stream.end(), t.front() + d - kSameStep);
      hits += it != stream.end() && *it <= t.front() + d + kSameStep;
    }
    if (hits > best) {
      best = hits, first = last = k;
    } else if (hits == best && last == k - 1) {
      last = k;
    }
  }
  return {(first + last) * 5e-5 / 2, best};
}

BesideRun beside_run(const std::vector<bench::Outcome>& stream_client, const std::vector<bench::Outcome>& beside) {
  BesideRun r;
  const auto stream = std::max_element(stream_client.begin(), stream_client.end(),
                                       [](const auto& a, const auto& b) { return a.output_tokens < b.output_tokens; });
  if (stream == stream_client.end()) return r;
  r.stream = token_times(*stream);
  r.trace.push_back({stream->start_s, stream->prompt_tokens, stream->output_tokens, 0});
  const bool one_clock = beside.empty();
  for (const auto& o : one_clock ? stream_client : beside)
    if (&o != &*stream) r.others.push_back(token_times(o));
  if (!one_clock) std::tie(r.offset_s, r.matched) = align_clocks(r.stream, r.others);
  for (auto& t : r.others)
    for (double& x : t) x += r.offset_s;
  for (const auto& o : one_clock ? stream_client : beside)
    if (&o != &*stream) r.trace.push_back({o.start_s + r.offset_s, o.prompt_tokens, o.output_tokens, 0});
  if (one_clock)  // on one clock every first token is the step's own
    r.matched = int(std::count_if(r.others.begin(), r.others.end(), [](const auto& t) { return !t.empty(); }));
  std::stable_sort(r.trace.begin(), r.trace.end(),
                   [](const auto& x, const auto& y) { return x.arrival_s < y.arrival_s; });
  const double t0 = r.trace.front().arrival_s;  // the clients may have started either way round
  for (auto& q : r.trace) q.arrival_s -= t0;
  return r;
}

std::optional<double> simulated_start_excess(const CostProfile& p, const Deployment& d,
                                             const std::vector<std::vector<SimRequest>>& runs) {
  std::vector<double> all;
  for (const auto& run : runs) {
    if (run.empty()) continue;
    TrafficSpec t;
    t.kind = TrafficSpec::Kind::trace;
    t.trace = run;
    SimOptions o;
    o.layers_per_event = 1;
    o.trace_requests = true;
    const SimResult r = simulate(p, d, t, ExpertLoad::uniform(std::max<int64_t>(1, p.model.num_experts)), o);
    const BesideRun b = beside_run(r.traces);  // the stream is the run's longest request
    if (b.stream.empty()) continue;
    const GapExcess g = gap_excess(b.stream, b.others);
    all.insert(all.end(), g.start.begin(), g.start.end());
  }
  if (all.empty()) return std::nullopt;
  return median_of(all);
}

namespace {

// The gain of one calibrated parameter's steps: halved each time its gap changes sign (it stepped
// past its target), grown back towards 1 while the sign holds. A measurement that moves several
// times faster per unit of its parameter than the step assumes (TTFT under load against the
// per-request CPU share) then converges instead of swinging between both ends of its range.
class StepGain {
 public:
  double operator()(double gap) {
    const int sign = (gap > 0) - (gap < 0);
    if (sign != 0 && last_ != 0) gain_ = sign != last_ ? gain_ * 0.5 : std::min(1.0, gain_ * 1.2);
    if (sign != 0) last_ = sign;
    return gain_ * gap;
  }

 private:
  double gain_ = 1;
  int last_ = 0;
};

}  // namespace

double idle_calibration_rate(double ttft_s, double itl_s, int64_t output) {
  return 0.25 / std::max(1e-6, ttft_s + double(std::max<int64_t>(0, output - 1)) * itl_s);
}

std::vector<CalibrationPoint> calibrate_cluster(CostProfile& p, const Deployment& d, const CalibrationPoint& one,
                                                const CalibrationPoint& long_prompt, const CalibrationPoint& loaded,
                                                const CalibrationPoint* idle, BesidePoint* beside) {
  if (long_prompt.prompt <= one.prompt) throw Error("calibration: the long prompts must be longer than the short");
  int64_t moe = 0;
  for (int64_t l = 0; l < p.model.num_hidden_layers; ++l) moe += p.model.is_moe_layer(l);
  const double layers = double(p.model.num_hidden_layers), hops = double(moe + 1);
  const double step0 = p.step_fixed_s, dispatch0 = p.dispatch_overhead_s;
  const double row0 = p.attn_per_prefill_row_s, ctx0 = p.attn_per_prefill_ctx_s;
  const double decode_row0 = p.attn_per_row_s, decode_ctx0 = p.attn_per_ctx_s, expert_row0 = p.expert_per_row_s;
  auto prompt_cost = [&](double n) { return layers * (row0 * n + ctx0 * n * (n + 1) / 2); };
  const double engine_prompt = prompt_cost(double(long_prompt.prompt)) - prompt_cost(double(one.prompt));
  double prefill_scale = 1, decode_scale = 1;
  // Each parameter is moved by the gap of the measurement it dominates, divided by how much that
  // measurement grows per unit of it (an upper bound: the iteration approaches from one side).
  double cpu_share = 0, jitter = 0, hop = 0, per_request = p.router_per_request_s, per_prompt_row = 0,
         per_token = p.router_per_token_s;
  const double cores = double(std::max(1, p.node_cores));
  std::vector<CalibrationPoint> fitted(idle ? 4 : 3);
  double wake = 0, wake_decay = p.idle_wake_decay;
  StepGain jitter_gain, hop_gain, request_gain, prompt_gain, share_gain, wake_gain, decay_gain, token_gain, start_gain;
  double step_start = p.step_start_s;
  // The parameters move together and each gap depends a little on all: half steps converge.
  const double damp = 0.5;
  for (int round = 0; round < 80; ++round) {
    p.step_fixed_s = step0 + hop;
    p.dispatch_overhead_s = dispatch0 + hop;
    p.attn_per_prefill_row_s = row0 * prefill_scale + per_prompt_row;
    p.attn_per_prefill_ctx_s = ctx0 * prefill_scale;
    p.attn_per_row_s = decode_row0 * decode_scale;
    p.attn_per_ctx_s = decode_ctx0 * decode_scale;
    p.expert_per_row_s = expert_row0 * decode_scale;
    p.router_per_request_s = per_request;
    p.router_request_cpu_share = cpu_share;
    p.router_per_token_s = per_token;
    p.step_jitter = jitter;
    p.idle_wake_s = wake;
    p.idle_wake_decay = wake_decay;
    p.step_start_s = step_start;
    const SimResult a = simulate_point(p, d, one), b = simulate_point(p, d, long_prompt),
                    c = simulate_point(p, d, loaded);
    const SimResult e = idle ? simulate_point(p, d, *idle) : SimResult{};
    fitted = {one, long_prompt, loaded};
    if (idle) fitted.push_back(*idle);
    for (auto [f, r] :
         {std::pair{&fitted[0], &a}, {&fitted[1], &b}, {&fitted[2], &c}, {idle ? &fitted[3] : nullptr, &e}}) {
      if (!f) continue;
      f->ttft_p50_s = r->ttft.p50;
      f->itl_p50_s = r->itl.p50;
      f->itl_p90_s = r->itl.p90;
    }
    // An exponential share of mean j puts p90 and p50 of a constant step ln(10/2) j = 1.61 j of it apart.
    jitter = std::max(0.0, jitter + damp * jitter_gain((one.itl_p90_s - one.itl_p50_s) - (a.itl.p90 - a.itl.p50)) /
                                        (1.61 * one.itl_p50_s));
    hop = std::max(0.0, hop + damp * hop_gain(one.itl_p50_s - a.itl.p50) / hops);
    const double ttft_gap = one.ttft_p50_s - a.ttft.p50;
    per_request = std::max(0.0, per_request + damp * request_gain(ttft_gap));
    const double prompt_gap = prompt_gain((long_prompt.ttft_p50_s - b.ttft.p50) - ttft_gap);
    // The prompt rows' cost on the cluster: the engine's prefill costs scaled (its kernels, other
    // threads beside them), or, where the engine saw none, a cost per row.
    if (engine_prompt > 0)
      prefill_scale = std::max(0.0, prefill_scale + damp * prompt_gap / engine_prompt);
    else
      per_prompt_row =
          std::max(0.0, per_prompt_row + damp * prompt_gap / (layers * double(long_prompt.prompt - one.prompt)));
    // Under load a request's first token comes later than its share of the router's front
    // explains: that much of its work waits behind the cores' other work (about a step's worth).
    // Up to one request's latency on every core: several threads work on a request at once (the
    // router's HTTP thread and actors, the benchmark client), so its CPU can exceed its latency.
    cpu_share = std::clamp(
        cpu_share + damp * share_gain(loaded.ttft_p50_s - c.ttft.p50) / std::max(1e-6, loaded.itl_p50_s), 0.0, cores);
    // Requests that find the cluster idle: what their first token takes beyond a busy cluster's.
    if (idle) wake = std::max(0.0, wake + damp * wake_gain(idle->ttft_p50_s - e.ttft.p50));
    // Their inter-token gaps: how long the wake-up lasts (a gap in units of the wake-up cost).
    if (idle && wake > 0)
      wake_decay = std::clamp(wake_decay + damp * decay_gain(idle->itl_p50_s - e.itl.p50) / wake, 0.0, 0.9);
    // A step that starts a sequence, as the stream beside it saw it: the rest of that excess (the
    // prefix lookup, the prompt rows) is priced already, so what the simulator lacks is the start's own.
    // The runs are long (a stream of thousands of steps): every fourth round is enough.
    if (beside && !beside->runs.empty() && round % 4 == 0) {
      // No gap where a start was alone (requests overlapping throughout): nothing to fit on.
      if (const auto sim = simulated_start_excess(p, d, beside->runs)) {
        beside->fitted_start_excess_s = *sim;
        // At most the whole measured excess: the start's own share of it cannot be more.
        step_start = std::clamp(step_start + damp * start_gain(beside->start_excess_s - *sim), 0.0,
                                std::max(0.0, beside->start_excess_s));
      }
    }
    const double per_token_slope = double(loaded.concurrency) / cores;
    const double token_step = damp * token_gain(loaded.itl_p50_s - c.itl.p50) / per_token_slope;
    if (decode_scale < 1 || per_token + token_step < 0) {
      // Faster than the engine's decode rows allow with no CPU per token: the engine was timed
      // while the machine was slow (its speed moves by tens of percent), so its per-row costs
      // are scaled down instead, as far as the loaded run asks (up to 1 again when it asks more).
      per_token = 0;
      decode_scale = std::clamp(decode_scale * (1 + damp * (loaded.itl_p50_s - c.itl.p50) / c.itl.p50), 0.3, 1.0);
    } else {
      per_token += token_step;
    }
  }
  if (beside && !beside->runs.empty())
    beside->fitted_start_excess_s = simulated_start_excess(p, d, beside->runs).value_or(0.0);
  return fitted;
}

}  // namespace moemesh::planner
