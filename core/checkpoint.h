// A Hugging Face checkpoint folder: config.json plus model.safetensors or sharded
// model-0000X-of-0000N.safetensors with model.safetensors.index.json.
//
// Opening reads only the safetensors headers and checks every tensor the config implies
// (name, dtype, shape, bounds inside its file). Tensor bytes are memory-mapped on demand,
// one mapping per requested tensor, so a process that asks only for some experts maps only
// those (an expert host's memory is proportional to its share).
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/gptq.h"
#include "core/model_config.h"

namespace moemesh {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::filesystem::path file;
  uint64_t offset = 0;  // absolute byte offset of the data in file
  uint64_t nbytes = 0;
  int64_t numel() const;
};

// A read-only view of a mapped tensor. Row-major; for a Linear weight shape = {out, in}.
// A GPTQ-quantized Linear has `quant` (its INT4/INT8 values repacked for the kernels), dtype I32
// and data pointing at its qweight, so code that reads only F32/F16/BF16 refuses it by name.
struct Weight {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  std::shared_ptr<const cpu::QuantMatrix> quant;
  bool empty() const { return data == nullptr; }
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.size() < 2 ? 1 : shape[1]; }
  int64_t numel() const;
};

// SwiGLU MLP: out = down(silu(gate(x)) * up(x)).
// HF names: Mixtral experts w1 = gate, w3 = up, w2 = down; DeepSeek gate_proj/up_proj/down_proj.
struct MlpWeights {
  Weight gate;  // {inter, hidden}
  Weight up;    // {inter, hidden}
  Weight down;  // {hidden, inter}
};

struct LayerWeights {
  Weight input_norm, post_attention_norm;  // {hidden}
  Weight q, k, v, o;                       // q {heads*hd, hidden}, k/v {kv_heads*hd, hidden}, o {hidden, heads*hd}
  bool moe = false;
  Weight router;                                   // {num_experts, hidden}; MoE layers only
  std::vector<std::optional<MlpWeights>> experts;  // size num_experts; nullopt where not loaded
  std::optional<MlpWeights> shared;                // DeepSeek shared experts (fused, one MLP)
  std::optional<MlpWeights> dense;                 // dense MLP of a non-MoE layer
};

struct ModelWeights {
  Weight embed;       // {vocab, hidden}
  Weight final_norm;  // {hidden}
  Weight lm_head;     // {vocab, hidden} (the embedding when tied)
  std::vector<LayerWeights> layers;
};

// Which parts of the model a process maps.
struct WeightSelection {
  bool dense_parts = true;                        // embeddings, norms, attention, routers, shared/dense MLPs, lm_head
  bool all_experts = true;                        // every routed expert
  std::set<std::pair<int64_t, int64_t>> experts;  // (layer, expert) when !all_experts
  static WeightSelection all() { return {}; }
  static WeightSelection attention_side() { return {true, false, {}}; }
  static WeightSelection only_experts(std::set<std::pair<int64_t, int64_t>> e) { return {false, false, std::move(e)}; }
  bool wants_expert(int64_t layer, int64_t expert) const { return all_experts || experts.count({layer, expert}) > 0; }
};

class Checkpoint {
 public:
  // Throws moemesh::Error with one line naming the file (and tensor) at fault.
  static std::shared_ptr<Checkpoint> open(const std::filesystem::path& dir);
  ~Checkpoint();

  const ModelConfig& config() const { return config_; }
  ModelConfig& mutable_config() { return config_; }  // runtime settings (gating temperature)
  const std::filesystem::path& dir() const { return dir_; }
  // Folder name, the default served-model name.
  std::string name() const;

  bool has(const std::string& tensor) const;
  const TensorInfo& info(const std::string& tensor) const;  // throws if missing
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }

  // Maps the tensor's bytes (once; later calls return the same view).
  Weight map(const std::string& tensor) const;
  // A Linear weight by its ".weight" name: map(), or for a GPTQ-quantized module its tensors
  // mapped, checked and repacked (once), their pages then given back.
  Weight map_linear(const std::string& weight_tensor) const;
  // Unmaps a Linear weight (its ".weight", or a GPTQ module's tensors and repacked copy), e.g. an
  // expert a host no longer serves. Views of it must no longer be in use; a later map_linear maps
  // it again.
  void release_linear(const std::string& weight_tensor) const;
  // The bytes a Linear weight is stored in: its ".weight", or a GPTQ module's four tensors.
  uint64_t linear_bytes(const std::string& weight_tensor) const;
  // The checkpoint's GPTQ settings; nullopt for a float checkpoint.
  const std::optional<GptqConfig>& quantization() const { return gptq_; }
  // Total bytes of tensor data currently mapped (for "maps only its share" checks).
  uint64_t mapped_bytes() const;
  std::vector<std::string> mapped_tensors() const;

  // Maps and binds the selected parts of the model.
  ModelWeights load(const WeightSelection& sel = WeightSelection::all()) const;

  // The HF tensor names this config implies.
  static std::string expert_tensor(const ModelConfig& c, int64_t layer, int64_t expert,
                                   const char* which /*gate|up|down*/);
  struct ExpectedTensor {
    std::string name;
    std::vector<int64_t> shape;
  };
  // Every tensor the config implies, in the order of the HF module tree (the state-dict order).
  static std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c);

 private:
  Checkpoint() = default;
  struct Mapping;
  std::filesystem::path dir_;
  ModelConfig config_;
  std::map<std::string, TensorInfo> tensors_;
  std::optional<GptqConfig> gptq_;
  mutable std::map<std::string, std::unique_ptr<Mapping>> mappings_;
  mutable std::map<std::string, Weight> quantized_;  // by ".weight" name
  mutable std::mutex mu_;
};

}  // namespace moemesh
