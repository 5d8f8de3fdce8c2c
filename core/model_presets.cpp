#include "core/model_presets.h"

#include "core/error.h"

namespace moemesh {

Arch parse_arch(std::string_view name) {
  if (name == "mixtral") return Arch::Mixtral;
  if (name == "deepseek") return Arch::DeepSeek;
  throw Error("unknown architecture \"" + std::string(name) + "\" (expected mixtral or deepseek)");
}

std::string_view arch_name(Arch arch) { return arch == Arch::Mixtral ? "mixtral" : "deepseek"; }

const std::vector<std::string>& preset_names() {
  static const std::vector<std::string> names = {"tiny", "small", "medium"};
  return names;
}

namespace {

struct Shape {
  int64_t hidden, layers, heads, kv_heads;
  int64_t expert_width;  // routed expert width
  int64_t dense_width;   // DeepSeek dense-layer MLP width
  int64_t experts, top_k, shared;
};

Shape preset_shape(std::string_view preset) {
  // hidden layers heads kv  expert dense  E  k  shared
  if (preset == "tiny") return {64, 2, 4, 2, 128, 256, 8, 2, 2};
  if (preset == "small") return {256, 4, 8, 4, 512, 1024, 8, 2, 2};
  // ~0.65B (mixtral) / ~0.75B (deepseek, larger vocab) parameters: 1.3-1.5 GB in bf16.
  if (preset == "medium") return {1024, 8, 16, 4, 2816, 5632, 8, 2, 2};
  throw Error("unknown preset \"" + std::string(preset) + "\" (expected tiny, small or medium)");
}

}  // namespace

ModelConfig model_preset(Arch arch, std::string_view preset) {
  Shape s = preset_shape(preset);
  ModelConfig c;
  c.arch = arch;
  c.hidden_size = s.hidden;
  c.num_hidden_layers = s.layers;
  c.num_attention_heads = s.heads;
  c.num_key_value_heads = s.kv_heads;
  c.head_dim = s.hidden / s.heads;
  c.num_experts = s.experts;
  c.num_experts_per_tok = s.top_k;
  c.tie_word_embeddings = false;
  c.torch_dtype = "bfloat16";
  if (arch == Arch::Mixtral) {
    c.model_type = "mixtral";
    c.intermediate_size = s.expert_width;
    c.moe_intermediate_size = s.expert_width;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 1e6;
    c.max_position_embeddings = 32768;
    c.norm_topk_prob = true;
  } else {
    // DeepSeek-MoE: layer 0 dense, the rest MoE with shared experts; expert width is
    // finer-grained (half the Mixtral width here), as in the real model.
    c.model_type = "deepseek";
    c.intermediate_size = s.dense_width;
    c.moe_intermediate_size = s.expert_width / 2;
    c.n_shared_experts = s.shared;
    c.first_k_dense_replace = 1;
    c.moe_layer_freq = 1;
    c.norm_topk_prob = false;
    c.rms_norm_eps = 1e-6;
    c.rope_theta = 10000.0;
    c.max_position_embeddings = 4096;
  }
  return c;
}

}  // namespace moemesh
