#include "core/moe.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

#include "core/error.h"
#include "core/weight_jobs.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/ops.h"

namespace moemesh {

Routing route_from_logits(const ModelConfig& cfg, const float* gate_logits, int64_t rows) {
  const int64_t n = cfg.num_experts, k = cfg.num_experts_per_tok;
  if (k <= 0 || k > n)
    throw Error("moe: num_experts_per_tok " + std::to_string(k) + " is not in 1.." + std::to_string(n));
  if (!(cfg.gating_temperature > 0.0))
    throw Error("moe: gating temperature must be > 0 (got " + std::to_string(cfg.gating_temperature) + ")");
  Routing r;
  r.rows = rows;
  r.k = k;
  r.ids.resize(size_t(rows * k));
  r.weights.resize(size_t(rows * k));
  const bool mixtral = cfg.arch == Arch::Mixtral;
  std::vector<float> biased;
  if (!cfg.router_bias.empty()) {
    if (int64_t(cfg.router_bias.size()) != n)
      throw Error("moe: the router bias has " + std::to_string(cfg.router_bias.size()) + " entries, the model " +
                  std::to_string(n) + " experts");
    biased.assign(gate_logits, gate_logits + rows * n);
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t e = 0; e < n; ++e) biased[size_t(row * n + e)] += cfg.router_bias[size_t(e)];
    gate_logits = biased.data();
  }
  cpu::topk_gating(gate_logits, rows, n, k, float(cfg.gating_temperature), /*renormalize=*/false, r.ids.data(),
                   r.weights.data());
  for (int64_t row = 0; row < rows; ++row) {
    float* w = r.weights.data() + row * k;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += w[j];
    if (mixtral) {
      for (int64_t j = 0; j < k; ++j) w[j] /= sum;
    } else {
      if (cfg.norm_topk_prob && k > 1)
        for (int64_t j = 0; j < k; ++j) w[j] /= (sum + 1e-20f);
      for (int64_t j = 0; j < k; ++j) w[j] *= float(cfg.routed_scaling_factor);
    }
  }
  return r;
}

std::vector<float> parse_router_bias(const std::string& spec, int64_t num_experts) {
  std::vector<float> bias(size_t(num_experts), 0.0f);
  size_t at = 0;
  while (at <= spec.size()) {
    const size_t end = std::min(spec.find(',', at), spec.size());
    const std::string item = spec.substr(at, end - at);
    const size_t eq = item.find('=');
    size_t used_e = 0, used_b = 0;
    try {
      if (eq == std::string::npos) throw std::invalid_argument("no '='");
      const long e = std::stol(item.substr(0, eq), &used_e);
      const float b = std::stof(item.substr(eq + 1), &used_b);
      if (used_e != eq || used_b != item.size() - eq - 1) throw std::invalid_argument("trailing characters");
      if (e < 0 || e >= num_experts)
        throw Error("--router-bias: expert " + std::to_string(e) + " is not in 0.." + std::to_string(num_experts - 1));
      bias[size_t(e)] = b;
    } catch (const Error&) {
      throw;
    } catch (const std::exception&) {
      throw Error("--router-bias: '" + item + "' is not EXPERT=BIAS (e.g. \"0=4,1=2.5\")");
    }
    at = end + 1;
  }
  return bias;
}

Routing route(const ModelConfig& cfg, const Weight& router, const float* h, int64_t rows) {
  if (router.empty()) throw Error("moe: router weight is not loaded");
  std::vector<float> logits(size_t(rows * cfg.num_experts));
  const cpu::MatmulJob j = projection_job(h, rows, router, logits.data());
  cpu::matmul(std::span(&j, 1));
  return route_from_logits(cfg, logits.data(), rows);
}

std::vector<ExpertGroup> group_by_expert(const Routing& r, std::span<const LoraAdapter* const> row_adapters) {
  std::vector<ExpertGroup> groups;
  if (r.ids.empty()) return groups;
  const int32_t max_id = *std::max_element(r.ids.begin(), r.ids.end());
  std::vector<int32_t> index(size_t(max_id) + 1, -1);  // expert -> position in groups
  std::vector<int32_t> experts(r.ids.begin(), r.ids.end());
  std::sort(experts.begin(), experts.end());
  experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
  for (int32_t e : experts) {
    index[size_t(e)] = int32_t(groups.size());
    groups.push_back(ExpertGroup{e, {}, {}, {}});
  }
  for (int64_t row = 0; row < r.rows; ++row)
    for (int64_t j = 0; j < r.k; ++j) {
      ExpertGroup& g = groups[size_t(index[size_t(r.ids[size_t(row * r.k + j)])])];
      g.rows.push_back(int32_t(row));
      g.slots.push_back(int32_t(j));
    }
  const bool any = std::any_of(row_adapters.begin(), row_adapters.end(),
                               [](const LoraAdapter* a) { return a && a->adapts_experts(); });
  if (any)
    for (ExpertGroup& g : groups)
      for (int32_t row : g.rows) {
        const LoraAdapter* a = row_adapters[size_t(row)];
        g.adapters.push_back(a && a->adapts_experts() ? a : nullptr);
      }
  return groups;
}

std::vector<const MlpLora*> expert_lora(const ExpertGroup& g, int64_t layer) {
  std::vector<const MlpLora*> out;
  if (g.adapters.empty()) return out;
  out.reserve(g.adapters.size());
  for (const LoraAdapter* a : g.adapters) {
    const MlpLora* m = a ? &a->layer(layer).experts.at(size_t(g.expert)) : nullptr;
    out.push_back(m && !m->empty() ? m : nullptr);
  }
  return out;
}

void gather_rows(const float* h, int64_t hidden, std::span<const int32_t> rows, std::vector<float>& out) {
  out.resize(rows.size() * size_t(hidden));
  for (size_t i = 0; i < rows.size(); ++i)
    std::copy(h + rows[i] * hidden, h + (rows[i] + 1) * hidden, out.begin() + ptrdiff_t(i * size_t(hidden)));
}

void mlp_forward(const MlpWeights& w, const float* x, int64_t rows, int64_t hidden, float* out) {
  std::vector<float> act(size_t(rows * w.gate.rows()));
  const cpu::MatmulJob gate_up = swiglu_job(x, hidden, rows, w, act.data());
  cpu::matmul(std::span(&gate_up, 1));
  const cpu::MatmulJob down = projection_job(act.data(), rows, w.down, out);
  cpu::matmul(std::span(&down, 1));
}

LocalExpertExecutor::LocalExpertExecutor(const ModelWeights& weights, std::shared_ptr<ComputeBackend> backend)
    : weights_(weights), backend_(backend ? std::move(backend) : cpu_backend()) {}

void LocalExpertExecutor::run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
                              std::vector<std::vector<float>>& outputs) {
  const LayerWeights& lw = weights_.layers.at(size_t(layer));
  outputs.resize(groups.size());
  std::vector<ExpertRows> experts;
  experts.reserve(groups.size());
  std::vector<std::vector<const MlpLora*>> lora(groups.size());
  int64_t h_rows = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    const ExpertGroup& g = groups[i];
    if (g.expert < 0 || size_t(g.expert) >= lw.experts.size() || !lw.experts[size_t(g.expert)])
      throw Error("moe: expert " + std::to_string(g.expert) + " of layer " + std::to_string(layer) +
                  " is not loaded here");
    outputs[i].resize(g.rows.size() * size_t(hidden));
    lora[i] = expert_lora(g, layer);
    experts.push_back({&*lw.experts[size_t(g.expert)], g.rows, outputs[i].data(), lora[i]});
    for (int32_t r : g.rows) h_rows = std::max<int64_t>(h_rows, int64_t(r) + 1);
  }
  backend_->grouped_mlp(h, h_rows, hidden, experts);
}

void combine(const Routing& r, std::span<const ExpertGroup> groups, const std::vector<std::vector<float>>& outputs,
             int64_t hidden, float* out) {
  if (outputs.size() != groups.size())
    throw Error("moe: " + std::to_string(outputs.size()) + " expert outputs for " + std::to_string(groups.size()) +
                " groups");
  // Groups come sorted by expert id (group_by_expert); keep that order whatever the caller did.
  std::vector<size_t> order(groups.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return groups[a].expert < groups[b].expert; });
  for (size_t gi : order) {
    const ExpertGroup& g = groups[gi];
    const std::vector<float>& o = outputs[gi];
    if (o.size() != g.rows.size() * size_t(hidden))
      throw Error("moe: expert " + std::to_string(g.expert) + " returned " + std::to_string(o.size()) +
                  " values, expected " + std::to_string(g.rows.size() * size_t(hidden)));
    for (size_t i = 0; i < g.rows.size(); ++i) {
      const float w = r.weights[size_t(g.rows[i] * r.k + g.slots[i])];
      float* dst = out + g.rows[i] * hidden;
      const float* src = o.data() + i * size_t(hidden);
      for (int64_t d = 0; d < hidden; ++d) dst[d] += w * src[d];
    }
  }
}

}  // namespace moemesh
