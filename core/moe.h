// The MoE block, split so that routed experts can run elsewhere:
//   route()            gate logits -> top-k expert ids and weights per row (the checkpoint's rule)
//   group_by_expert()  rows grouped per expert, ordered by expert id
//   ExpertExecutor     "compute these experts on these rows for layer l" (local here; remote
//                      expert hosts in the cluster)
//   combine()          Σ w·expert(h) per row in a fixed order (expert id, then slot), so the
//                      result never depends on which expert answered first.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/compute_backend.h"
#include "core/model_config.h"

namespace moemesh {

struct Routing {
  int64_t rows = 0;
  int64_t k = 0;
  std::vector<int32_t> ids;    // [rows, k], by weight descending (ties: lower id first)
  std::vector<float> weights;  // [rows, k], final mixing weights (renormalised / scaled)
};

// Mixtral: softmax(logits / T) over all experts, top-k, renormalise the k weights.
// DeepSeek: softmax(logits / T), top-k, renormalise (w / (Σw + 1e-20)) only when norm_topk_prob
// and k > 1 (as HF's MoEGate), then multiply by routed_scaling_factor.
// gate_logits [rows, num_experts] (before temperature).
Routing route_from_logits(const ModelConfig& cfg, const float* gate_logits, int64_t rows);
// "E=B,E=B,...": bias B added to expert E's gate logit (ModelConfig::router_bias, for skewing the
// routing on purpose in tests and benchmarks); the experts not named get 0. Throws
// moemesh::Error naming the bad item.
std::vector<float> parse_router_bias(const std::string& spec, int64_t num_experts);
// h [rows, hidden] · router^T, then route_from_logits.
Routing route(const ModelConfig& cfg, const Weight& router, const float* h, int64_t rows);

// The rows one expert must compute: rows[i] is a row of h, slots[i] its top-k slot there.
struct ExpertGroup {
  int32_t expert = 0;
  std::vector<int32_t> rows;
  std::vector<int32_t> slots;
  // Per entry of rows: the LoRA adapter of that row (null: base); empty when no row has one.
  std::vector<const LoraAdapter*> adapters;
};
// Groups ordered by expert id; rows within a group ascending. Experts nobody chose are absent.
// row_adapters (per row of r; empty: none) fills each group's adapters, for the rows whose
// adapter adapts experts.
std::vector<ExpertGroup> group_by_expert(const Routing& r, std::span<const LoraAdapter* const> row_adapters = {});
// Per entry of g.rows: expert g.expert's LoRA deltas in `layer` of that row's adapter (null: none).
std::vector<const MlpLora*> expert_lora(const ExpertGroup& g, int64_t layer);

// Copies rows `rows` of h (any order, repeats allowed) into a contiguous [rows.size(), hidden]
// buffer.
void gather_rows(const float* h, int64_t hidden, std::span<const int32_t> rows, std::vector<float>& out);

// SwiGLU MLP: out[rows, hidden] = down(silu(gate(x)) * up(x)); x [rows, hidden].
void mlp_forward(const MlpWeights& w, const float* x, int64_t rows, int64_t hidden, float* out);

// Computes routed experts. outputs[i] receives [groups[i].rows.size(), hidden] floats: expert
// groups[i].expert of `layer` applied to those rows of h.
class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  virtual void run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
                   std::vector<std::vector<float>>& outputs) = 0;
};

// Runs the experts in-process from mapped weights (which must outlive it) on a backend (null:
// the CPU).
class LocalExpertExecutor : public ExpertExecutor {
 public:
  explicit LocalExpertExecutor(const ModelWeights& weights, std::shared_ptr<ComputeBackend> backend = nullptr);
  void run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
           std::vector<std::vector<float>>& outputs) override;

 private:
  const ModelWeights& weights_;
  std::shared_ptr<ComputeBackend> backend_;
};

// out[rows, hidden] += Σ_k weight[row, slot] * outputs[group][i], visiting groups by expert id
// and, inside an expert, its entries in row order: a fixed order per row.
void combine(const Routing& r, std::span<const ExpertGroup> groups, const std::vector<std::vector<float>>& outputs,
             int64_t hidden, float* out);

}  // namespace moemesh
