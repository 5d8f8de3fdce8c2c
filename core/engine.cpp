#include "core/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <future>
#include <numeric>
#include <string>
#include <unordered_set>

#include "core/error.h"

namespace moemesh {

namespace {

// out = the MLP on every row of h; rows whose adapter adapts this MLP (`pick` finds its deltas)
// go through grouped_mlp with them.
void local_mlp(ComputeBackend& backend, const MlpWeights& w, const float* h, int64_t rows, int64_t hidden,
               std::span<const LoraAdapter* const> row_adapters, int64_t layer,
               const MlpLora& (*pick)(const LayerLora&), float* out) {
  std::vector<const MlpLora*> lora;
  for (const LoraAdapter* a : row_adapters) {
    const MlpLora* m = a ? &pick(a->layer(layer)) : nullptr;
    lora.push_back(m && !m->empty() ? m : nullptr);
  }
  if (std::none_of(lora.begin(), lora.end(), [](const MlpLora* m) { return m != nullptr; })) {
    backend.mlp(w, h, rows, hidden, out);
    return;
  }
  std::vector<int32_t> all(static_cast<size_t>(rows));
  std::iota(all.begin(), all.end(), 0);
  const ExpertRows e{&w, all, out, lora};
  backend.grouped_mlp(h, rows, hidden, std::span(&e, 1));
}

}  // namespace

void ffn_block(const ModelConfig& cfg, const LayerWeights& lw, int64_t layer, ComputeBackend& backend,
               ExpertExecutor& experts, float* x, int64_t rows, std::span<const LoraAdapter* const> row_adapters) {
  const int64_t hidden = cfg.hidden_size;
  std::vector<float> h(size_t(rows * hidden)), y(size_t(rows * hidden), 0.0f);
  backend.rmsnorm(x, lw.post_attention_norm, rows, cfg.rms_norm_eps, h.data());
  if (lw.moe) {
    if (lw.router.empty()) throw Error("moe: router weight is not loaded");
    std::vector<float> gate(size_t(rows * cfg.num_experts));
    backend.matmul(h.data(), rows, lw.router, gate.data());
    std::vector<LoraTask> router_deltas;
    const auto by_adapter = rows_by_adapter<LoraAdapter>(row_adapters);  // the tasks point into it
    for (const auto& [a, r] : by_adapter)
      router_deltas.push_back({&a->layer(layer).router, h.data(), r.data(), hidden, gate.data(), r.data(),
                               cfg.num_experts, int64_t(r.size())});
    lora_add(router_deltas);
    const Routing r = route_from_logits(cfg, gate.data(), rows);
    const std::vector<ExpertGroup> groups = group_by_expert(r, row_adapters);
    std::vector<std::vector<float>> outputs;
    experts.run(layer, h.data(), hidden, groups, outputs);
    combine(r, groups, outputs, hidden, y.data());
    if (lw.shared) {  // DeepSeek: shared experts see the same h, added after the routed sum
      std::vector<float> s(size_t(rows * hidden));
      local_mlp(
          backend, *lw.shared, h.data(), rows, hidden, row_adapters, layer,
          [](const LayerLora& l) -> const MlpLora& { return l.shared; }, s.data());
      for (int64_t i = 0; i < rows * hidden; ++i) y[size_t(i)] += s[size_t(i)];
    }
  } else {
    if (!lw.dense) throw Error("engine: layer " + std::to_string(layer) + " has no dense MLP loaded");
    local_mlp(
        backend, *lw.dense, h.data(), rows, hidden, row_adapters, layer,
        [](const LayerLora& l) -> const MlpLora& { return l.dense; }, y.data());
  }
  for (int64_t i = 0; i < rows * hidden; ++i) x[i] += y[size_t(i)];
}

Engine::Engine(std::shared_ptr<const Checkpoint> ckpt, EngineOptions opts, std::shared_ptr<ExpertExecutor> experts)
    : Engine(ckpt->config(), ckpt->load(experts ? WeightSelection::attention_side() : WeightSelection::all()), opts,
             experts, ckpt) {}

Engine::Engine(ModelConfig cfg, ModelWeights weights, EngineOptions opts, std::shared_ptr<ExpertExecutor> experts,
               std::shared_ptr<const void> owner)
    : owner_(std::move(owner)),
      cfg_(std::move(cfg)),
      weights_(std::move(weights)),
      backend_(opts.backend ? std::move(opts.backend) : cpu_backend()),
      experts_(std::move(experts)) {
  validate();
  if (!experts_) experts_ = std::make_shared<LocalExpertExecutor>(weights_, backend_);
  kv_ =
      backend_->make_kv_cache(cfg_.num_hidden_layers, cfg_.num_key_value_heads * cfg_.head_dim, opts.kv_blocks,
                              KvCacheFormat{opts.kv_dtype, cfg_.num_key_value_heads, cfg_.sliding_window.value_or(0)});
}

void Engine::validate() {
  const auto& c = cfg_;
  if (c.hidden_size <= 0 || c.head_dim <= 0 || c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 ||
      c.vocab_size <= 0 || c.num_hidden_layers <= 0)
    throw Error("engine: the model config has a non-positive size");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw Error("engine: num_attention_heads " + std::to_string(c.num_attention_heads) +
                " is not a multiple of num_key_value_heads " + std::to_string(c.num_key_value_heads));
  if (c.head_dim % 2 != 0) throw Error("engine: head_dim must be even for rotary embeddings");
  if (weights_.embed.empty() || weights_.final_norm.empty() || weights_.lm_head.empty())
    throw Error("engine: embeddings, final norm or lm_head not loaded");
  if (int64_t(weights_.layers.size()) != c.num_hidden_layers)
    throw Error("engine: " + std::to_string(weights_.layers.size()) + " layers loaded, config has " +
                std::to_string(c.num_hidden_layers));
}

namespace {

using Clock = std::chrono::steady_clock;
using Interval = std::pair<Clock::time_point, Clock::time_point>;

thread_local std::span<const StepInput> forward_inputs;

// Publishes a forward pass's inputs to its thread for as long as it runs.
struct ForwardInputsScope {
  explicit ForwardInputsScope(std::span<const StepInput> part) { forward_inputs = part; }
  ~ForwardInputsScope() { forward_inputs = {}; }
};

// Records when the experts of one micro-batch were in flight.
class TimedExecutor : public ExpertExecutor {
 public:
  TimedExecutor(ExpertExecutor& inner, std::vector<Interval>& log) : inner_(inner), log_(log) {}
  void run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
           std::vector<std::vector<float>>& outputs) override {
    const auto t0 = Clock::now();
    try {
      inner_.run(layer, h, hidden, groups, outputs);
    } catch (...) {
      log_.emplace_back(t0, Clock::now());
      throw;
    }
    log_.emplace_back(t0, Clock::now());
  }

 private:
  ExpertExecutor& inner_;
  std::vector<Interval>& log_;
};

// Seconds during which `busy` (sorted, disjoint) overlaps the part of `window` outside `own`
// (the other micro-batch computing rather than waiting for its experts).
double overlap_seconds(const std::vector<Interval>& busy, Interval window, const std::vector<Interval>& own) {
  std::vector<Interval> computing;
  Clock::time_point t = window.first;
  for (const auto& [a, b] : own) {
    if (a > t) computing.emplace_back(t, std::min(a, window.second));
    t = std::max(t, b);
  }
  if (t < window.second) computing.emplace_back(t, window.second);
  double sum = 0;
  for (const auto& [a, b] : busy)
    for (const auto& [c, d] : computing) {
      const auto lo = std::max(a, c), hi = std::min(b, d);
      if (lo < hi) sum += std::chrono::duration<double>(hi - lo).count();
    }
  return sum;
}

}  // namespace

std::span<const StepInput> current_forward_inputs() { return forward_inputs; }

std::vector<StepOutput> Engine::step(std::span<const StepInput> batch, StepOptions opts) {
  // Validate everything before touching the cache, so a failed step changes nothing.
  std::unordered_set<SeqId> seen;
  int64_t blocks = 0;
  std::vector<int64_t> rows_of;
  for (const StepInput& in : batch) {
    if (!kv_->has_sequence(in.seq)) throw Error("engine: unknown sequence " + std::to_string(in.seq));
    if (!seen.insert(in.seq).second)
      throw Error("engine: sequence " + std::to_string(in.seq) + " appears twice in one step");
    if (in.tokens.empty()) throw Error("engine: sequence " + std::to_string(in.seq) + " has no new tokens");
    for (int32_t t : in.tokens)
      if (t < 0 || t >= cfg_.vocab_size)
        throw Error("engine: token id " + std::to_string(t) + " out of range [0, " + std::to_string(cfg_.vocab_size) +
                    ")");
    if (in.adapter && in.adapter->num_layers() != cfg_.num_hidden_layers)
      throw Error("engine: LoRA adapter " + in.adapter->name() + " has " + std::to_string(in.adapter->num_layers()) +
                  " layers, the model " + std::to_string(cfg_.num_hidden_layers));
    blocks += kv_->blocks_needed(in.seq, kv_->length(in.seq) + int64_t(in.tokens.size()));
    rows_of.push_back(int64_t(in.tokens.size()));
  }
  if (blocks > kv_->free_blocks())
    throw Error("kv cache: out of blocks (this step needs " + std::to_string(blocks) + ", " +
                std::to_string(kv_->free_blocks()) + " of " + std::to_string(kv_->num_blocks()) + " free)");
  // All reservations happen here, on this thread: the micro-batches below only read the
  // sequence table and write K/V rows of their own sequences.
  for (const StepInput& in : batch) kv_->reserve(in.seq, kv_->length(in.seq) + int64_t(in.tokens.size()));

  std::vector<StepOutput> outs;
  timing_ = {};
  lanes_ = {};
  lanes_.start = Clock::now();
  if (opts.micro_batches < 2 || batch.size() < 2) {
    outs = forward(batch, *experts_);
    lanes_.lanes.emplace_back(std::this_thread::get_id(), Clock::now());
  } else {
    // Two contiguous halves with rows as even as possible (input order is kept).
    int64_t total = 0, before = 0;
    for (int64_t r : rows_of) total += r;
    size_t split = 1;
    int64_t best = -1;
    for (size_t k = 1; k < batch.size(); ++k) {
      before += rows_of[k - 1];
      const int64_t imbalance = std::abs(total - 2 * before);
      if (best < 0 || imbalance < best) best = imbalance, split = k;
    }
    std::vector<Interval> log0, log1;
    TimedExecutor ex0(*experts_, log0), ex1(*experts_, log1);
    const auto t0 = Clock::now();
    Clock::time_point end1;
    std::thread::id thread1;
    auto second = std::async(std::launch::async, [&] {
      thread1 = std::this_thread::get_id();
      auto r = forward(batch.subspan(split), ex1);
      end1 = Clock::now();
      return r;
    });
    std::exception_ptr error;
    try {
      outs = forward(batch.first(split), ex0);
    } catch (...) {
      error = std::current_exception();
    }
    const auto end0 = Clock::now();
    std::vector<StepOutput> rest;
    try {
      rest = second.get();  // always joined, even when the first half failed
    } catch (...) {
      if (!error) error = std::current_exception();
    }
    if (error) std::rethrow_exception(error);
    const auto t1 = Clock::now();
    for (auto& o : rest) outs.push_back(std::move(o));
    timing_.micro_batches = 2;
    timing_.step_seconds = std::chrono::duration<double>(t1 - t0).count();
    timing_.overlap_seconds = overlap_seconds(log0, {t0, end1}, log1) + overlap_seconds(log1, {t0, end0}, log0);
    lanes_.lanes = {{std::this_thread::get_id(), end0}, {thread1, end1}};
  }
  lanes_.end = Clock::now();
  for (const StepInput& in : batch) kv_->set_length(in.seq, kv_->length(in.seq) + int64_t(in.tokens.size()));
  return outs;
}

std::vector<StepOutput> Engine::forward(std::span<const StepInput> part, ExpertExecutor& experts) {
  ForwardInputsScope scope(part);
  BatchLayout layout;
  std::vector<const LoraAdapter*> row_adapters;
  for (const StepInput& in : part) {
    const int64_t pos0 = kv_->length(in.seq), n = int64_t(in.tokens.size());
    layout.spans.push_back({in.seq, layout.rows, n, pos0, in.adapter.get()});
    for (int64_t i = 0; i < n; ++i) layout.positions.push_back(int32_t(pos0 + i));
    layout.rows += n;
    row_adapters.insert(row_adapters.end(), size_t(n), in.adapter.get());
  }
  if (std::none_of(row_adapters.begin(), row_adapters.end(), [](const LoraAdapter* a) { return a != nullptr; }))
    row_adapters.clear();
  const int64_t rows = layout.rows, hidden = cfg_.hidden_size;
  std::vector<int32_t> ids;
  ids.reserve(size_t(rows));
  for (const StepInput& in : part) ids.insert(ids.end(), in.tokens.begin(), in.tokens.end());
  std::vector<float> x(size_t(rows * hidden));
  backend_->embedding(weights_.embed, ids.data(), rows, x.data());
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    const LayerWeights& lw = weights_.layers[size_t(l)];
    backend_->attention_block(cfg_, lw, l, *kv_, layout, x.data());
    ffn_block(cfg_, lw, l, *backend_, experts, x.data(), rows, row_adapters);
  }

  // Final norm and lm_head only on the rows whose logits were asked for, all of them in one
  // product (lm_head is the largest matrix: read once per step, not once per sequence); the rows
  // that want a summary go through the backend together.
  std::vector<StepOutput> outs(part.size());
  std::vector<float> normed;  // the rows of full logits, sequence after sequence
  std::vector<size_t> summarised, full;
  int64_t full_rows = 0;
  for (size_t i = 0; i < part.size(); ++i) {
    const auto& sp = layout.spans[i];
    StepOutput& out = outs[i];
    out.seq = sp.seq;
    out.n = part[i].all_logits ? sp.n : 1;
    const int64_t first_row = sp.row0 + sp.n - out.n;
    out.first_position = sp.pos0 + (sp.n - out.n);
    // A summarised row keeps its final hidden state (Engine::full_logits may need it).
    const bool summary = part[i].summary && !part[i].all_logits;
    if (summary) {
      out.final_hidden.resize(size_t(out.n * hidden));
      backend_->rmsnorm(x.data() + first_row * hidden, weights_.final_norm, out.n, cfg_.rms_norm_eps,
                        out.final_hidden.data());
      summarised.push_back(i);
      continue;
    }
    normed.resize(size_t((full_rows + out.n) * hidden));
    backend_->rmsnorm(x.data() + first_row * hidden, weights_.final_norm, out.n, cfg_.rms_norm_eps,
                      normed.data() + full_rows * hidden);
    full.push_back(i);
    full_rows += out.n;
  }
  if (!full.empty()) {
    std::vector<float> logits(size_t(full_rows * cfg_.vocab_size));
    backend_->matmul(normed.data(), full_rows, weights_.lm_head, logits.data());
    auto at = logits.begin();
    for (size_t i : full) {
      const auto n = ptrdiff_t(outs[i].n * cfg_.vocab_size);
      outs[i].logits.assign(at, at + n);
      at += n;
    }
  }
  if (!summarised.empty()) {
    std::vector<float> rows;
    std::vector<LogitsRequest> requests;
    for (size_t i : summarised) {
      rows.insert(rows.end(), outs[i].final_hidden.begin(), outs[i].final_hidden.end());
      requests.push_back(*part[i].summary);
    }
    auto summaries = backend_->logits_summaries(rows.data(), int64_t(summarised.size()), weights_.lm_head, requests);
    for (size_t j = 0; j < summarised.size(); ++j) outs[summarised[j]].summary = std::move(summaries[j]);
  }
  return outs;
}

std::vector<float> Engine::full_logits(const StepOutput& out) {
  if (out.final_hidden.size() != size_t(cfg_.hidden_size))
    throw Error("engine: full logits need the final hidden row of a summarised output");
  std::vector<float> logits(size_t(cfg_.vocab_size));
  backend_->matmul(out.final_hidden.data(), 1, weights_.lm_head, logits.data());
  return logits;
}

}  // namespace moemesh
