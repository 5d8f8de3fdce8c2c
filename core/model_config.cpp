#include "core/model_config.h"

#include <cmath>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_file.h"

namespace moemesh {

using nlohmann::json;

namespace {

// Field readers: every error names the file and the field, so a user can fix config.json by hand.
class Fields {
 public:
  // prefix names a nested object's fields ("rope_scaling." + key).
  Fields(const json& j, const std::string& origin, std::string prefix = {})
      : j_(j), origin_(origin), prefix_(std::move(prefix)) {}

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error(origin_ + ": field \"" + prefix_ + field + "\" " + what);
  }

  bool present(const std::string& k) const { return j_.contains(k) && !j_.at(k).is_null(); }

  int64_t int_(const std::string& k) const {
    if (!j_.contains(k)) fail(k, "is missing");
    return as_int(k, j_.at(k));
  }
  int64_t int_or(const std::string& k, int64_t dflt) const { return present(k) ? as_int(k, j_.at(k)) : dflt; }
  std::optional<int64_t> opt_int(const std::string& k) const {
    if (!present(k)) return std::nullopt;
    return as_int(k, j_.at(k));
  }
  double num_or(const std::string& k, double dflt) const {
    if (!present(k)) return dflt;
    const json& v = j_.at(k);
    if (!v.is_number()) fail(k, "must be a number, got " + v.dump());
    return v.get<double>();
  }
  bool bool_or(const std::string& k, bool dflt) const {
    if (!present(k)) return dflt;
    const json& v = j_.at(k);
    if (!v.is_boolean()) fail(k, "must be true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::string str_or(const std::string& k, const std::string& dflt) const {
    if (!present(k)) return dflt;
    const json& v = j_.at(k);
    if (!v.is_string()) fail(k, "must be a string, got " + v.dump());
    return v.get<std::string>();
  }
  // An int, or a list of ints (HF allows both for eos_token_id).
  std::vector<int64_t> int_list(const std::string& k) const {
    std::vector<int64_t> out;
    if (!present(k)) return out;
    const json& v = j_.at(k);
    if (v.is_array()) {
      for (const json& e : v) out.push_back(as_int(k, e));
    } else {
      out.push_back(as_int(k, v));
    }
    return out;
  }

 private:
  int64_t as_int(const std::string& k, const json& v) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    // Some exporters write 4096.0; accept integral floats only.
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (d == static_cast<double>(static_cast<int64_t>(d))) return static_cast<int64_t>(d);
    }
    fail(k, "must be an integer, got " + v.dump());
  }

  const json& j_;
  const std::string& origin_;
  std::string prefix_;
};

// rope_scaling as transformers reads it ("rope_type", or the older "type"); anything the engine
// would not compute as transformers does is refused, naming the field.
RopeScaling parse_rope_scaling(const json& j, const std::string& origin, const ModelConfig& c) {
  if (!j.is_object()) Fields(json::object(), origin).fail("rope_scaling", "must be an object or null, got " + j.dump());
  Fields f(j, origin, "rope_scaling.");
  RopeScaling r;
  std::string type = f.str_or("rope_type", "");
  if (type.empty()) type = f.str_or("type", "");
  if (type.empty()) f.fail("rope_type", "is missing (expected linear, dynamic, yarn or llama3)");
  if (type == "default") return r;
  if (type == "linear") {
    r.type = RopeScaling::Type::Linear;
  } else if (type == "dynamic") {
    r.type = RopeScaling::Type::Dynamic;
  } else if (type == "yarn") {
    r.type = RopeScaling::Type::Yarn;
  } else if (type == "llama3") {
    r.type = RopeScaling::Type::Llama3;
  } else {
    f.fail("rope_type", "is \"" + type + "\"; supported: linear, dynamic, yarn, llama3 (and default)");
  }
  if (!f.present("factor")) f.fail("factor", "is missing (rope type " + type + ")");
  r.factor = f.num_or("factor", 1.0);
  if (!(r.factor >= 1.0) || !std::isfinite(r.factor))
    f.fail("factor", "must be a finite number >= 1, got " + j.at("factor").dump());
  r.original_max_position_embeddings = f.int_or("original_max_position_embeddings", 0);
  if (r.type == RopeScaling::Type::Yarn) {
    r.beta_fast = f.num_or("beta_fast", r.beta_fast);
    r.beta_slow = f.num_or("beta_slow", r.beta_slow);
    r.mscale = f.num_or("mscale", r.mscale);
    r.mscale_all_dim = f.num_or("mscale_all_dim", r.mscale_all_dim);
    r.truncate = f.bool_or("truncate", r.truncate);
    if (f.present("attention_factor")) {
      r.attention_factor = f.num_or("attention_factor", 1.0);
      if (!(*r.attention_factor > 0)) f.fail("attention_factor", "must be positive");
    }
    if (!(r.beta_fast > 0) || !(r.beta_slow > 0) || r.beta_fast < r.beta_slow)
      f.fail("beta_fast", "and beta_slow must be positive with beta_fast >= beta_slow");
    if (r.original_max_position_embeddings == 0) r.original_max_position_embeddings = c.max_position_embeddings;
  }
  if (r.type == RopeScaling::Type::Llama3) {
    if (!f.present("original_max_position_embeddings"))
      f.fail("original_max_position_embeddings", "is missing (rope type llama3)");
    if (!f.present("low_freq_factor")) f.fail("low_freq_factor", "is missing (rope type llama3)");
    if (!f.present("high_freq_factor")) f.fail("high_freq_factor", "is missing (rope type llama3)");
    r.low_freq_factor = f.num_or("low_freq_factor", 1.0);
    r.high_freq_factor = f.num_or("high_freq_factor", 4.0);
    if (!(r.low_freq_factor > 0) || !(r.high_freq_factor > r.low_freq_factor))
      f.fail("high_freq_factor", "must exceed low_freq_factor, both positive");
  }
  if (f.present("original_max_position_embeddings") && r.original_max_position_embeddings <= 0)
    f.fail("original_max_position_embeddings", "must be positive");
  return r;
}

}  // namespace

const char* rope_scaling_name(RopeScaling::Type t) {
  switch (t) {
    case RopeScaling::Type::Linear:
      return "linear";
    case RopeScaling::Type::Dynamic:
      return "dynamic";
    case RopeScaling::Type::Yarn:
      return "yarn";
    case RopeScaling::Type::Llama3:
      return "llama3";
    default:
      return "none";
  }
}

int64_t ModelConfig::max_context() const {
  const RopeScaling& r = rope_scaling;
  switch (r.type) {
    case RopeScaling::Type::Linear:
    case RopeScaling::Type::Dynamic:
      return int64_t(double(max_position_embeddings) * r.factor);
    case RopeScaling::Type::Yarn:
      return int64_t(double(r.original_max_position_embeddings) * r.factor);
    default:
      return max_position_embeddings;
  }
}

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (arch == Arch::Mixtral) return num_experts > 0;
  return num_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& origin) {
  if (!j.is_object()) throw Error(origin + ": expected a JSON object");
  Fields f(j, origin);
  ModelConfig c;
  c.model_type = f.str_or("model_type", "");
  if (c.model_type == "mixtral") {
    c.arch = Arch::Mixtral;
  } else if (c.model_type == "deepseek") {
    c.arch = Arch::DeepSeek;
  } else if (c.model_type.empty()) {
    f.fail("model_type", "is missing");
  } else {
    f.fail("model_type", "is \"" + c.model_type + "\"; supported: \"mixtral\", \"deepseek\"");
  }

  c.vocab_size = f.int_("vocab_size");
  c.hidden_size = f.int_("hidden_size");
  c.intermediate_size = f.int_("intermediate_size");
  c.num_hidden_layers = f.int_("num_hidden_layers");
  c.num_attention_heads = f.int_("num_attention_heads");
  c.num_key_value_heads = f.int_or("num_key_value_heads", c.num_attention_heads);
  c.rms_norm_eps = f.num_or("rms_norm_eps", c.rms_norm_eps);
  c.rope_theta = f.num_or("rope_theta", c.rope_theta);
  c.max_position_embeddings = f.int_or("max_position_embeddings", c.max_position_embeddings);
  c.tie_word_embeddings = f.bool_or("tie_word_embeddings", false);
  c.bos_token_id = f.opt_int("bos_token_id");
  c.eos_token_ids = f.int_list("eos_token_id");
  c.torch_dtype = f.str_or("torch_dtype", "");
  c.num_experts_per_tok = f.int_or("num_experts_per_tok", c.num_experts_per_tok);

  // Things the engine does not implement: refuse rather than compute something else.
  if (std::string act = f.str_or("hidden_act", "silu"); act != "silu")
    f.fail("hidden_act", "is \"" + act + "\"; only \"silu\" is supported");
  if (f.present("rope_scaling")) c.rope_scaling = parse_rope_scaling(j.at("rope_scaling"), origin, c);
  if (f.bool_or("attention_bias", false)) f.fail("attention_bias", "is true; biased attention is not supported");

  if (c.arch == Arch::Mixtral) {
    c.num_experts = f.int_("num_local_experts");
    c.moe_intermediate_size = c.intermediate_size;
    c.norm_topk_prob = true;
    c.sliding_window = f.opt_int("sliding_window");
  } else {
    // n_routed_experts null means a dense model (DeepSeek's own config allows it).
    c.num_experts = f.int_or("n_routed_experts", 0);
    c.n_shared_experts = f.int_or("n_shared_experts", 0);
    c.first_k_dense_replace = f.int_or("first_k_dense_replace", 0);
    c.moe_layer_freq = f.int_or("moe_layer_freq", 1);
    c.norm_topk_prob = f.bool_or("norm_topk_prob", false);
    c.routed_scaling_factor = f.num_or("routed_scaling_factor", 1.0);
    if (c.num_experts > 0 || c.n_shared_experts > 0) c.moe_intermediate_size = f.int_("moe_intermediate_size");
    if (std::string s = f.str_or("scoring_func", "softmax"); s != "softmax")
      f.fail("scoring_func", "is \"" + s + "\"; only \"softmax\" is supported");
  }

  if (f.present("head_dim")) {
    c.head_dim = f.int_("head_dim");
  } else {
    if (c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads != 0)
      f.fail("num_attention_heads", "(" + std::to_string(c.num_attention_heads) + ") must divide hidden_size (" +
                                        std::to_string(c.hidden_size) + ") when head_dim is not given");
    c.head_dim = c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0;
  }

  // Consistency: each check names the field to fix.
  auto positive = [&](const char* k, int64_t v) {
    if (v <= 0) f.fail(k, "must be positive, got " + std::to_string(v));
  };
  positive("vocab_size", c.vocab_size);
  positive("hidden_size", c.hidden_size);
  positive("intermediate_size", c.intermediate_size);
  positive("num_hidden_layers", c.num_hidden_layers);
  positive("num_attention_heads", c.num_attention_heads);
  positive("num_key_value_heads", c.num_key_value_heads);
  positive("head_dim", c.head_dim);
  positive("max_position_embeddings", c.max_position_embeddings);
  if (c.head_dim % 2 != 0) f.fail("head_dim", "must be even for rotary embeddings, got " + std::to_string(c.head_dim));
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    f.fail("num_key_value_heads", "(" + std::to_string(c.num_key_value_heads) + ") must divide num_attention_heads (" +
                                      std::to_string(c.num_attention_heads) + ")");
  if (!(c.rms_norm_eps > 0)) f.fail("rms_norm_eps", "must be positive");
  if (!(c.rope_theta > 0)) f.fail("rope_theta", "must be positive");
  if (c.sliding_window && *c.sliding_window <= 0)
    f.fail("sliding_window", "must be positive or null, got " + std::to_string(*c.sliding_window));

  const char* experts_key = c.arch == Arch::Mixtral ? "num_local_experts" : "n_routed_experts";
  if (c.arch == Arch::Mixtral) positive(experts_key, c.num_experts);
  if (c.num_experts < 0) f.fail(experts_key, "must not be negative");
  if (c.num_experts > 0) {
    positive("num_experts_per_tok", c.num_experts_per_tok);
    if (c.num_experts_per_tok > c.num_experts)
      f.fail("num_experts_per_tok", "(" + std::to_string(c.num_experts_per_tok) + ") exceeds " + experts_key + " (" +
                                        std::to_string(c.num_experts) + ")");
    positive("moe_intermediate_size", c.moe_intermediate_size);
  }
  if (c.arch == Arch::DeepSeek) {
    if (c.n_shared_experts < 0) f.fail("n_shared_experts", "must not be negative");
    if (c.n_shared_experts > 0) positive("moe_intermediate_size", c.moe_intermediate_size);
    positive("moe_layer_freq", c.moe_layer_freq);
    if (c.first_k_dense_replace < 0) f.fail("first_k_dense_replace", "must not be negative");
    if (!(c.routed_scaling_factor > 0)) f.fail("routed_scaling_factor", "must be positive");
  }
  if (c.bos_token_id && (*c.bos_token_id < 0 || *c.bos_token_id >= c.vocab_size))
    f.fail("bos_token_id", "(" + std::to_string(*c.bos_token_id) + ") is outside the vocabulary");
  for (int64_t e : c.eos_token_ids)
    if (e < 0 || e >= c.vocab_size) f.fail("eos_token_id", "(" + std::to_string(e) + ") is outside the vocabulary");
  return c;
}

ModelConfig ModelConfig::load(const std::filesystem::path& config_json) {
  return from_json(read_json_file(config_json), config_json.filename().string());
}

json ModelConfig::to_json() const {
  // Key for key what transformers' save_pretrained writes for these classes.
  json j;
  j["attention_dropout"] = 0.0;
  j["bos_token_id"] = bos_token_id ? json(*bos_token_id) : json(nullptr);
  if (eos_token_ids.size() == 1)
    j["eos_token_id"] = eos_token_ids[0];
  else if (eos_token_ids.empty())
    j["eos_token_id"] = nullptr;
  else
    j["eos_token_id"] = eos_token_ids;
  j["hidden_act"] = "silu";
  j["hidden_size"] = hidden_size;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = intermediate_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["num_attention_heads"] = num_attention_heads;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_key_value_heads"] = num_key_value_heads;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  if (rope_scaling.type != RopeScaling::Type::None) {
    const RopeScaling& r = rope_scaling;
    json rs{{"rope_type", rope_scaling_name(r.type)}, {"factor", r.factor}};
    if (r.original_max_position_embeddings > 0)
      rs["original_max_position_embeddings"] = r.original_max_position_embeddings;
    if (r.type == RopeScaling::Type::Yarn) {
      rs["beta_fast"] = r.beta_fast;
      rs["beta_slow"] = r.beta_slow;
      rs["mscale"] = r.mscale;
      rs["mscale_all_dim"] = r.mscale_all_dim;
      if (r.attention_factor) rs["attention_factor"] = *r.attention_factor;
      if (!r.truncate) rs["truncate"] = false;
    }
    if (r.type == RopeScaling::Type::Llama3) {
      rs["low_freq_factor"] = r.low_freq_factor;
      rs["high_freq_factor"] = r.high_freq_factor;
    }
    j["rope_scaling"] = rs;
  }
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = torch_dtype.empty() ? "bfloat16" : torch_dtype;
  j["transformers_version"] = "4.46.3";
  j["use_cache"] = true;
  j["vocab_size"] = vocab_size;
  if (arch == Arch::Mixtral) {
    j["architectures"] = {"MixtralForCausalLM"};
    j["model_type"] = "mixtral";
    j["head_dim"] = head_dim;
    j["num_local_experts"] = num_experts;
    j["output_router_logits"] = false;
    j["router_aux_loss_coef"] = 0.02;
    j["router_jitter_noise"] = 0.0;
    j["sliding_window"] = sliding_window ? json(*sliding_window) : json(nullptr);
  } else {
    j["architectures"] = {"DeepseekForCausalLM"};
    j["model_type"] = "deepseek";
    // DeepSeek-MoE ships its modelling code with the checkpoint (trust_remote_code).
    j["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekConfig"},
                     {"AutoModel", "modeling_deepseek.DeepseekModel"},
                     {"AutoModelForCausalLM", "modeling_deepseek.DeepseekForCausalLM"}};
    j["attention_bias"] = false;
    j["aux_loss_alpha"] = 0.001;
    if (head_dim * num_attention_heads != hidden_size) j["head_dim"] = head_dim;
    j["first_k_dense_replace"] = first_k_dense_replace;
    j["moe_intermediate_size"] = moe_intermediate_size;
    j["moe_layer_freq"] = moe_layer_freq;
    j["n_routed_experts"] = num_experts > 0 ? json(num_experts) : json(nullptr);
    j["n_shared_experts"] = n_shared_experts > 0 ? json(n_shared_experts) : json(nullptr);
    j["norm_topk_prob"] = norm_topk_prob;
    j["pretraining_tp"] = 1;
    if (rope_scaling.type == RopeScaling::Type::None) j["rope_scaling"] = nullptr;
    if (routed_scaling_factor != 1.0) j["routed_scaling_factor"] = routed_scaling_factor;
    j["scoring_func"] = "softmax";
    j["seq_aux"] = true;
  }
  return j;
}

}  // namespace moemesh
