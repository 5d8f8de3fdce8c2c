// The model's hyper-parameters, read from a Hugging Face config.json.
// Two families: Mixtral (model_type "mixtral") and DeepSeek-MoE (model_type "deepseek").
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moemesh {

enum class Arch { Mixtral, DeepSeek };

// config.json's "rope_scaling" (core/rope.h computes the frequencies from it).
struct RopeScaling {
  enum class Type { None, Linear, Dynamic, Yarn, Llama3 };
  Type type = Type::None;
  double factor = 1.0;
  // yarn, llama3: the pretrained context (yarn without it: max_position_embeddings)
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0, beta_slow = 1.0;              // yarn
  double mscale = 1.0, mscale_all_dim = 0.0;             // yarn (DeepSeek)
  std::optional<double> attention_factor;                // yarn: overrides the mscale ratio
  bool truncate = true;                                  // yarn: round the ramp's ends to whole dimensions
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
};
// "linear", "dynamic", "yarn", "llama3" (or "none").
const char* rope_scaling_name(RopeScaling::Type t);

struct ModelConfig {
  Arch arch = Arch::Mixtral;
  std::string model_type;  // as written in config.json
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP width (DeepSeek dense layers); Mixtral: expert width
  int64_t moe_intermediate_size = 0;  // routed expert width (Mixtral: = intermediate_size)
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // hidden_size / num_attention_heads unless given
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 4096;
  std::optional<int64_t>
      sliding_window;       // a position attends to the previous sliding_window positions (itself included)
  int64_t num_experts = 0;  // num_local_experts | n_routed_experts
  int64_t num_experts_per_tok = 2;
  int64_t n_shared_experts = 0;        // DeepSeek only
  int64_t first_k_dense_replace = 0;   // DeepSeek only: the first k layers are dense
  int64_t moe_layer_freq = 1;          // DeepSeek only
  bool norm_topk_prob = true;          // Mixtral always renormalises the top-k weights
  double routed_scaling_factor = 1.0;  // multiplies routed expert output (DeepSeek V2 style; 1.0 otherwise)
  bool tie_word_embeddings = false;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;
  std::string torch_dtype;  // informational

  // Runtime setting, not from config.json: gate logits are divided by it before softmax.
  double gating_temperature = 1.0;
  // Runtime, for tests and benchmarks only: added to expert e's gate logit in every MoE layer
  // (skews the routing on purpose; empty: none). Changes the model's output.
  std::vector<float> router_bias;

  bool is_moe_layer(int64_t layer) const;
  // The longest context the model serves, as vLLM derives it: max_position_embeddings, times the
  // rope_scaling factor for linear and dynamic; original_max_position_embeddings x factor for yarn.
  int64_t max_context() const;
  // Width of the shared-expert MLP (DeepSeek: n_shared_experts * moe_intermediate_size).
  int64_t shared_intermediate_size() const { return n_shared_experts * moe_intermediate_size; }

  // Throws moemesh::Error naming the file and the field on a missing or bad field.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& origin = "config.json");
  static ModelConfig load(const std::filesystem::path& config_json);
  nlohmann::json to_json() const;  // HF-shaped config.json for this config
};

}  // namespace moemesh
