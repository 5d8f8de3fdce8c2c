// LoRA adapters as PEFT writes them (adapter_config.json + adapter_model.safetensors), and the
// segmented products that apply them: y += (alpha/r)·B·(A·x) per row, each row with its own
// adapter (or none), the base weights untouched and read once for every row of the batch.
//
// An adapter is loaded for one process's share of the model (a WeightSelection): the attention
// side reads attention, router, shared-expert and dense-MLP modules; an expert host only the
// experts it holds. Every tensor is checked against the base model's shapes at load.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "core/checkpoint.h"
#include "core/lora_ref.h"
#include "core/model_config.h"
#include "kernels/cpu/gemm.h"

namespace moemesh {

// adapter_config.json, what serving reads of it.
struct LoraConfig {
  int64_t r = 0;
  double lora_alpha = 0;
  bool use_rslora = false;
  std::vector<std::string> target_modules;                    // as given (a single regex string becomes one entry)
  std::vector<std::pair<std::string, double>> alpha_pattern;  // module pattern -> alpha
  std::string base_model_name_or_path;
  // Parses and checks: peft_type LORA, r > 0, no modules_to_save, bias "none", no DoRA, no
  // fan_in_fan_out. Throws moemesh::Error naming the file and the field.
  static LoraConfig from_json_file(const std::filesystem::path& file);
  // The factor on B·A for a module of rank r (the rank its tensors have, so rank_pattern needs no
  // reading): alpha/r, or alpha/√r with rsLoRA; alpha from alpha_pattern where a key matches.
  double scale(int64_t rank, const std::string& module) const;
};

// One adapted Linear [out, in]: A [rank, in], B [out, rank] with the scale folded in, kept in
// `dtype`: F32 (a, b), or BF16 (a16, b16; the products then round their inputs to bf16, as the
// kernels do for every bf16 weight).
// A: [rank, in]; B (with the adapter's scale folded in) is kept transposed, bt: [rank, out], so
// that B·t is a sum of rank rows scaled by t's entries (cpu::LowRankJob).
struct LoraModule {
  int64_t rank = 0, in = 0, out = 0;
  DType dtype = DType::F32;
  std::vector<float> a, bt;
  std::vector<uint16_t> a16, bt16;
  bool empty() const { return rank == 0; }
  uint64_t bytes() const { return (a.size() + bt.size()) * sizeof(float) + (a16.size() + bt16.size()) * 2; }
  const void* a_data() const { return dtype == DType::BF16 ? static_cast<const void*>(a16.data()) : a.data(); }
  const void* bt_data() const { return dtype == DType::BF16 ? static_cast<const void*>(bt16.data()) : bt.data(); }
};

// What an adapter on this checkpoint is kept and multiplied in: BF16 on a bf16 model (as vLLM
// keeps adapters in the model's dtype: half the bytes a step reads), F32 otherwise.
DType lora_dtype_for(const Checkpoint& base);

struct MlpLora {
  LoraModule gate, up, down;
  bool empty() const { return gate.empty() && up.empty() && down.empty(); }
};

struct LayerLora {
  LoraModule q, k, v, o, router;
  MlpLora shared, dense;
  std::vector<MlpLora> experts;  // size num_experts (empty entries where not targeted or not loaded)
  bool attention_empty() const { return q.empty() && k.empty() && v.empty() && o.empty(); }
};

class LoraAdapter {
 public:
  // Reads `dir` (adapter_config.json, adapter_model.safetensors) for the modules `sel` wants.
  // Every tensor of the file is checked (known module of this model, A/B pair, shapes), also those
  // not loaded. Throws moemesh::Error with one line naming the file and tensor at fault.
  // dtype: F32 or BF16 (lora_dtype_for).
  static std::shared_ptr<const LoraAdapter> load(const std::filesystem::path& dir, const ModelConfig& base,
                                                 const WeightSelection& sel = WeightSelection::all(),
                                                 std::string name = {}, std::string key = {}, DType dtype = DType::F32);

  const std::string& name() const { return name_; }
  // How other processes name it (key: the content key it was loaded under; may be empty).
  LoraRef ref() const { return {name_, dir_.string(), key_}; }
  const std::filesystem::path& dir() const { return dir_; }
  const LoraConfig& config() const { return config_; }
  const LayerLora& layer(int64_t l) const { return layers_.at(size_t(l)); }
  int64_t num_layers() const { return int64_t(layers_.size()); }
  // Bytes of the loaded A and B matrices.
  uint64_t bytes() const { return bytes_; }
  // Whether the file adapts any routed expert (the attention side then sends its rows' adapter
  // with every dispatch) / anything the attention side computes.
  bool adapts_experts() const { return adapts_experts_; }

 private:
  std::string name_, key_;
  std::filesystem::path dir_;
  LoraConfig config_;
  std::vector<LayerLora> layers_;
  uint64_t bytes_ = 0;
  bool adapts_experts_ = false;
};

// One module's adapter as PEFT stores it: A [rank, in], B [out, rank] without the scale.
struct LoraModuleFile {
  std::string module;  // the base model's name, e.g. "model.layers.0.self_attn.q_proj"
  int64_t rank = 0, in = 0, out = 0;
  std::vector<float> a, b;
};
// The Linear modules of the base model that PEFT's target_modules select (a short name matches
// the module's last component; "block_sparse_moe.gate" / "mlp.gate" name the routers), with
// their shapes as rank-0 LoraModuleFiles. Throws moemesh::Error for a name that selects nothing.
std::vector<LoraModuleFile> lora_target_sites(const ModelConfig& base, const std::vector<std::string>& targets);
// Writes a PEFT adapter folder: adapter_config.json (from config; lora_dropout 0, bias none) and
// adapter_model.safetensors with f32 tensors.
void write_lora_adapter(const std::filesystem::path& dir, const LoraConfig& config,
                        const std::vector<LoraModuleFile>& modules);
// A random adapter for tests and benchmarks: A ~ N(0, 1/in), B ~ N(0, (b_scale/(s·√rank))²) so
// each delta is about b_scale of a unit-scale weight's magnitude.
std::vector<LoraModuleFile> random_lora_modules(const ModelConfig& base, const LoraConfig& config, uint64_t seed,
                                                double b_scale = 0.2);

// One segment of a LoRA product: for i < n,
//   y[y_rows[i]] += B·(A·x[x_rows[i]])   (x_rows / y_rows null: row i; ldx / ldy 0: in / out)
// or, with add false, y[y_rows[i]] = B·(A·x[x_rows[i]]).
struct LoraTask {
  const LoraModule* m = nullptr;
  const float* x = nullptr;
  const int32_t* x_rows = nullptr;
  int64_t ldx = 0;
  float* y = nullptr;
  const int32_t* y_rows = nullptr;
  int64_t ldy = 0;
  int64_t n = 0;
  bool add = true;
};
// The tasks as the CPU kernels' low-rank jobs (empty modules and rows left out), to run in the
// same parallel section as other products (cpu::matmul(jobs, lora_jobs(tasks))).
std::vector<cpu::LowRankJob> lora_jobs(std::span<const LoraTask> tasks);
// Runs every task in one parallel section. Each row's result depends only on its own x row and
// module.
void lora_add(std::span<const LoraTask> tasks);

// Rows grouped by the adapter they use, in first-appearance order; rows without one (null) are
// left out. row_adapters[r] is row r's adapter.
template <class T>
std::vector<std::pair<const T*, std::vector<int32_t>>> rows_by_adapter(std::span<const T* const> row_adapters) {
  std::vector<std::pair<const T*, std::vector<int32_t>>> out;
  for (size_t r = 0; r < row_adapters.size(); ++r) {
    const T* a = row_adapters[r];
    if (!a) continue;
    auto it = out.begin();
    while (it != out.end() && it->first != a) ++it;
    if (it == out.end()) it = out.insert(out.end(), {a, {}});
    it->second.push_back(int32_t(r));
  }
  return out;
}

}  // namespace moemesh
