// ModelConfig: parsing Hugging Face config.json for Mixtral and DeepSeek-MoE, every rejection
// naming config.json and the field, and to_json writing what transformers writes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/model_config.h"

using moemesh::Arch;
using moemesh::Error;
using moemesh::ModelConfig;
using nlohmann::json;

namespace {

// Mixtral-8x7B-v0.1's config.json, as published (extra keys included).
json mixtral_json() {
  return json::parse(R"({
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": false,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": true, "vocab_size": 32000})");
}

// deepseek-moe-16b-base's config.json, as published.
json deepseek_json() {
  return json::parse(R"({
    "architectures": ["DeepseekForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"},
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 4096,
    "model_type": "deepseek", "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 28,
    "num_key_value_heads": 16, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": null,
    "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": true, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": true,
    "vocab_size": 102400})");
}

// Expects from_json(j) to throw an Error that names config.json and `field`.
void expect_bad(const json& j, const std::string& field) {
  try {
    ModelConfig::from_json(j);
    ADD_FAILURE() << "accepted a config with a bad " << field << ": " << j.dump();
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
    EXPECT_NE(msg.find("\"" + field + "\""), std::string::npos) << "message does not name " << field << ": " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
  }
}

json with(json j, const std::string& k, json v) {
  j[k] = std::move(v);
  return j;
}
json without(json j, const std::string& k) {
  j.erase(k);
  return j;
}

}  // namespace

TEST(ModelConfig, ParsesMixtral) {
  ModelConfig c = ModelConfig::from_json(mixtral_json());
  EXPECT_EQ(c.arch, Arch::Mixtral);
  EXPECT_EQ(c.model_type, "mixtral");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.moe_intermediate_size, 14336);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) EXPECT_TRUE(c.is_moe_layer(l));
}

TEST(ModelConfig, MixtralOptionalFields) {
  json j = mixtral_json();
  j["sliding_window"] = 4096;
  j["head_dim"] = 64;  // explicit head_dim wins over hidden/heads
  j["eos_token_id"] = {2, 7};
  j["bos_token_id"] = nullptr;
  j["rope_theta"] = 10000;  // an integer is fine for a float field
  ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 7}));
  EXPECT_FALSE(c.bos_token_id.has_value());
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  // head_dim null means "derive it"
  c = ModelConfig::from_json(with(mixtral_json(), "head_dim", nullptr));
  EXPECT_EQ(c.head_dim, 128);
  // num_key_value_heads defaults to the head count (MHA)
  c = ModelConfig::from_json(without(mixtral_json(), "num_key_value_heads"));
  EXPECT_EQ(c.num_key_value_heads, 32);
}

TEST(ModelConfig, ParsesDeepSeek) {
  ModelConfig c = ModelConfig::from_json(deepseek_json());
  EXPECT_EQ(c.arch, Arch::DeepSeek);
  EXPECT_EQ(c.num_experts, 64);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.moe_intermediate_size, 1408);
  EXPECT_EQ(c.intermediate_size, 10944);
  EXPECT_EQ(c.shared_intermediate_size(), 2816);
  EXPECT_EQ(c.num_experts_per_tok, 6);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.bos_token_id, 100000);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(27));
}

TEST(ModelConfig, DeepSeekLayerPattern) {
  json j = deepseek_json();
  j["first_k_dense_replace"] = 2;
  j["moe_layer_freq"] = 3;
  j["routed_scaling_factor"] = 2.5;
  ModelConfig c = ModelConfig::from_json(j);
  std::vector<bool> moe;
  for (int64_t l = 0; l < 10; ++l) moe.push_back(c.is_moe_layer(l));
  EXPECT_EQ(moe, (std::vector<bool>{false, false, false, true, false, false, true, false, false, true}));
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  // No routed experts: every layer is dense.
  c = ModelConfig::from_json(with(deepseek_json(), "n_routed_experts", nullptr));
  EXPECT_EQ(c.num_experts, 0);
  EXPECT_FALSE(c.is_moe_layer(5));
}

TEST(ModelConfig, RejectsBadFields) {
  json m = mixtral_json(), d = deepseek_json();
  expect_bad(with(m, "model_type", "llama"), "model_type");
  expect_bad(without(m, "model_type"), "model_type");
  expect_bad(without(m, "hidden_size"), "hidden_size");
  expect_bad(without(m, "vocab_size"), "vocab_size");
  expect_bad(without(m, "num_hidden_layers"), "num_hidden_layers");
  expect_bad(without(m, "num_local_experts"), "num_local_experts");
  expect_bad(with(m, "hidden_size", "4096"), "hidden_size");
  expect_bad(with(m, "hidden_size", 4096.5), "hidden_size");
  expect_bad(with(m, "hidden_size", 4100), "num_attention_heads");  // 32 does not divide 4100
  expect_bad(with(m, "num_key_value_heads", 5), "num_key_value_heads");
  expect_bad(with(m, "num_experts_per_tok", 9), "num_experts_per_tok");
  expect_bad(with(m, "num_experts_per_tok", 0), "num_experts_per_tok");
  expect_bad(with(m, "num_local_experts", 0), "num_local_experts");
  expect_bad(with(m, "intermediate_size", -1), "intermediate_size");
  expect_bad(with(m, "head_dim", 15), "head_dim");  // odd: no rotary pairs
  expect_bad(with(m, "sliding_window", 0), "sliding_window");
  expect_bad(with(m, "rms_norm_eps", 0), "rms_norm_eps");
  expect_bad(with(m, "rope_theta", "big"), "rope_theta");
  expect_bad(with(m, "tie_word_embeddings", 1), "tie_word_embeddings");
  expect_bad(with(m, "eos_token_id", 32000), "eos_token_id");
  expect_bad(with(m, "eos_token_id", json::array({2, "x"})), "eos_token_id");
  expect_bad(with(m, "bos_token_id", -1), "bos_token_id");
  expect_bad(with(m, "hidden_act", "gelu"), "hidden_act");
  expect_bad(with(m, "rope_scaling", json{{"type", "longrope"}, {"factor", 2.0}}), "rope_scaling.rope_type");
  expect_bad(with(m, "rope_scaling", json{{"factor", 2.0}}), "rope_scaling.rope_type");
  expect_bad(with(m, "rope_scaling", json{{"type", "linear"}}), "rope_scaling.factor");
  expect_bad(with(m, "rope_scaling", json{{"type", "linear"}, {"factor", 0.5}}), "rope_scaling.factor");
  expect_bad(with(m, "rope_scaling", json{{"rope_type", "llama3"}, {"factor", 8.0}}),
             "rope_scaling.original_max_position_embeddings");
  expect_bad(with(m, "rope_scaling",
                  json{{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"original_max_position_embeddings", 8192},
                       {"low_freq_factor", 4.0},
                       {"high_freq_factor", 1.0}}),
             "rope_scaling.high_freq_factor");
  expect_bad(with(m, "rope_scaling", json{{"rope_type", "yarn"}, {"factor", 4.0}, {"beta_fast", 0.5}}),
             "rope_scaling.beta_fast");
  expect_bad(with(m, "rope_scaling", "linear"), "rope_scaling");
  expect_bad(with(d, "scoring_func", "sigmoid"), "scoring_func");
  expect_bad(without(d, "moe_intermediate_size"), "moe_intermediate_size");
  expect_bad(with(d, "num_experts_per_tok", 65), "num_experts_per_tok");
  expect_bad(with(d, "moe_layer_freq", 0), "moe_layer_freq");
  expect_bad(with(d, "n_shared_experts", -1), "n_shared_experts");
  expect_bad(with(d, "attention_bias", true), "attention_bias");
  expect_bad(with(d, "norm_topk_prob", "no"), "norm_topk_prob");
}

// rope_scaling: each type parsed, written back by to_json, and its context limit as vLLM derives it.
TEST(ModelConfig, RopeScaling) {
  using moemesh::RopeScaling;
  ModelConfig c =
      ModelConfig::from_json(with(mixtral_json(), "rope_scaling", json{{"type", "linear"}, {"factor", 4.0}}));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::Linear);
  EXPECT_EQ(c.max_context(), 4 * 32768);
  c = ModelConfig::from_json(with(mixtral_json(), "rope_scaling", json{{"rope_type", "default"}}));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::None);
  EXPECT_EQ(c.max_context(), 32768);
  // DeepSeek-V2's block.
  const json yarn{{"type", "yarn"},         {"factor", 40},   {"original_max_position_embeddings", 4096},
                  {"beta_fast", 32},        {"beta_slow", 1}, {"mscale", 0.707},
                  {"mscale_all_dim", 0.707}};
  c = ModelConfig::from_json(with(with(deepseek_json(), "rope_scaling", yarn), "max_position_embeddings", 163840));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::Yarn);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale_all_dim, 0.707);
  EXPECT_EQ(c.max_context(), 163840);
  const ModelConfig back = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(back.rope_scaling.type, RopeScaling::Type::Yarn);
  EXPECT_DOUBLE_EQ(back.rope_scaling.factor, 40);
  EXPECT_EQ(back.rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(back.rope_scaling.mscale, 0.707);
  // Llama 3.1's block keeps max_position_embeddings as the limit.
  c = ModelConfig::from_json(with(with(mixtral_json(), "max_position_embeddings", 131072), "rope_scaling",
                                  json{{"rope_type", "llama3"},
                                       {"factor", 8.0},
                                       {"low_freq_factor", 1.0},
                                       {"high_freq_factor", 4.0},
                                       {"original_max_position_embeddings", 8192}}));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::Llama3);
  EXPECT_EQ(c.max_context(), 131072);
  EXPECT_EQ(ModelConfig::from_json(c.to_json()).rope_scaling.original_max_position_embeddings, 8192);
}

TEST(ModelConfig, ErrorsNameTheOrigin) {
  try {
    ModelConfig::from_json(without(mixtral_json(), "hidden_size"), "models/x/config.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "models/x/config.json: field \"hidden_size\" is missing");
  }
}

TEST(ModelConfig, ToJsonRoundTripsAndLooksLikeTransformers) {
  for (const json& src : {mixtral_json(), deepseek_json()}) {
    ModelConfig c = ModelConfig::from_json(src);
    json out = c.to_json();
    ModelConfig back = ModelConfig::from_json(out);
    EXPECT_EQ(back.to_json(), out);
    // Every key transformers' published config has, we write too, with the same value for
    // the fields that define the model.
    for (auto it = src.begin(); it != src.end(); ++it) {
      if (it.key() == "transformers_version" || it.key() == "auto_map") continue;
      ASSERT_TRUE(out.contains(it.key())) << it.key();
      if (it.value().is_number())
        EXPECT_DOUBLE_EQ(out[it.key()].get<double>(), it.value().get<double>()) << it.key();
      else
        EXPECT_EQ(out[it.key()], it.value()) << it.key();
    }
  }
  EXPECT_EQ(ModelConfig::from_json(mixtral_json()).to_json()["architectures"], json::array({"MixtralForCausalLM"}));
  EXPECT_EQ(ModelConfig::from_json(deepseek_json()).to_json()["architectures"], json::array({"DeepseekForCausalLM"}));
  // Extra eos ids stay a list; routed_scaling_factor appears only when it matters.
  json d = deepseek_json();
  d["eos_token_id"] = {1, 2};
  d["routed_scaling_factor"] = 16.0;
  json out = ModelConfig::from_json(d).to_json();
  EXPECT_EQ(out["eos_token_id"], json::array({1, 2}));
  EXPECT_EQ(out["routed_scaling_factor"], 16.0);
  EXPECT_FALSE(ModelConfig::from_json(deepseek_json()).to_json().contains("routed_scaling_factor"));
}

TEST(ModelConfig, LoadReportsBadFiles) {
  auto dir = std::filesystem::temp_directory_path() / ("moemesh-cfg-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto p = dir / "config.json";
  {
    std::ofstream(p) << "{\"model_type\": \"mixtral\",";
  }
  try {
    ModelConfig::load(p);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("config.json: not valid JSON"), std::string::npos) << e.what();
  }
  {
    std::ofstream(p) << mixtral_json().dump();
  }
  EXPECT_EQ(ModelConfig::load(p).hidden_size, 4096);
  EXPECT_THROW(ModelConfig::load(dir / "nope.json"), Error);
  std::filesystem::remove_all(dir);
}
