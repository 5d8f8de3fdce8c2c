#include "core/lora.h"

#include <algorithm>
#include <charconv>
#include <optional>
#include <string_view>
#include <cmath>
#include <fstream>
#include <map>
#include <random>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/json_file.h"
#include "core/safetensors.h"
#include "kernels/cpu/gemm.h"

namespace moemesh {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";
constexpr std::string_view kPrefix = "base_model.model.";

// PEFT's key matching for alpha_pattern, for keys that are module names (the usual case, e.g.
// "q_proj" or "model.layers.0.self_attn.q_proj"): the key is the name, or its end after a dot.
// PEFT reads keys as Python regexes; one with regex syntax matches only literally here.
bool pattern_matches(const std::string& key, const std::string& module) {
  return module == key || module.ends_with("." + key);
}

// "123.rest" -> 123 and "rest"; nullopt when s does not start with digits and a dot.
std::optional<std::pair<int64_t, std::string_view>> leading_index(std::string_view s) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end == s.data() + s.size() || *end != '.') return std::nullopt;
  return std::pair{v, s.substr(size_t(end - s.data()) + 1)};
}

// Where a Linear of the base model sits, and its shape.
struct Site {
  int64_t layer = 0;
  enum class Kind { Q, K, V, O, Router, Expert, Shared, Dense } kind = Kind::Q;
  int64_t expert = -1;
  int proj = 0;  // MLPs: 0 gate, 1 up, 2 down
  int64_t out = 0, in = 0;
};

// Every Linear the adapter may target, by module name (the checkpoint's tensor name without
// ".weight"): the names come from Checkpoint::expected_tensors, so they are the loader's.
std::map<std::string, Site> linear_sites(const ModelConfig& c) {
  std::map<std::string, Site> out;
  auto proj_of = [](std::string_view p) {
    if (p == "w1" || p == "gate_proj") return 0;
    if (p == "w3" || p == "up_proj") return 1;
    return 2;  // w2, down_proj
  };
  constexpr std::string_view kLayers = "model.layers.", kWeight = ".weight";
  for (const auto& t : Checkpoint::expected_tensors(c)) {
    const std::string_view name = t.name;
    if (t.shape.size() != 2 || !name.starts_with(kLayers) || !name.ends_with(kWeight)) continue;
    const auto layer = leading_index(name.substr(kLayers.size(), name.size() - kLayers.size() - kWeight.size()));
    if (!layer) continue;
    Site s;
    s.layer = layer->first;
    s.out = t.shape[0];
    s.in = t.shape[1];
    const std::string_view rest = layer->second;
    const std::string_view last = rest.substr(rest.rfind('.') + 1);
    if (rest == "self_attn.q_proj")
      s.kind = Site::Kind::Q;
    else if (rest == "self_attn.k_proj")
      s.kind = Site::Kind::K;
    else if (rest == "self_attn.v_proj")
      s.kind = Site::Kind::V;
    else if (rest == "self_attn.o_proj")
      s.kind = Site::Kind::O;
    else if (rest == "block_sparse_moe.gate" || rest == "mlp.gate")
      s.kind = Site::Kind::Router;
    else if (rest.starts_with("block_sparse_moe.experts.") || rest.starts_with("mlp.experts.")) {
      const auto e = leading_index(rest.substr(rest.find("experts.") + 8));
      if (!e) continue;
      s.kind = Site::Kind::Expert;
      s.expert = e->first;
      s.proj = proj_of(e->second);
    } else if (rest.starts_with("mlp.shared_experts.")) {
      s.kind = Site::Kind::Shared;
      s.proj = proj_of(last);
    } else if (rest.starts_with("mlp.")) {
      s.kind = Site::Kind::Dense;
      s.proj = proj_of(last);
    } else {
      continue;
    }
    out.emplace(t.name.substr(0, t.name.size() - 7), s);
  }
  return out;
}

LoraModule& slot(LayerLora& l, const Site& s) {
  auto mlp = [&](MlpLora& m) -> LoraModule& { return s.proj == 0 ? m.gate : s.proj == 1 ? m.up : m.down; };
  switch (s.kind) {
    case Site::Kind::Q:
      return l.q;
    case Site::Kind::K:
      return l.k;
    case Site::Kind::V:
      return l.v;
    case Site::Kind::O:
      return l.o;
    case Site::Kind::Router:
      return l.router;
    case Site::Kind::Expert:
      return mlp(l.experts.at(size_t(s.expert)));
    case Site::Kind::Shared:
      return mlp(l.shared);
    case Site::Kind::Dense:
      return mlp(l.dense);
  }
  throw Error("lora: unknown site");
}

}  // namespace

std::vector<LoraModuleFile> lora_target_sites(const ModelConfig& base, const std::vector<std::string>& targets) {
  const auto sites = linear_sites(base);
  std::vector<LoraModuleFile> out;
  for (const std::string& t : targets) {
    size_t found = 0;
    for (const auto& [module, s] : sites)
      if (module == t || module.ends_with("." + t)) {
        out.push_back({module, 0, s.in, s.out, {}, {}});
        ++found;
      }
    if (!found)
      throw Error("target module \"" + t + "\" matches no Linear layer of this " + base.model_type +
                  " model (e.g. q_proj, k_proj, v_proj, o_proj, " +
                  (base.arch == Arch::Mixtral ? "w1, w2, w3, block_sparse_moe.gate"
                                              : "gate_proj, up_proj, down_proj, mlp.gate") +
                  ")");
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.module < b.module; });
  out.erase(std::unique(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.module == b.module; }),
            out.end());
  return out;
}

void write_lora_adapter(const fs::path& dir, const LoraConfig& config, const std::vector<LoraModuleFile>& modules) {
  fs::create_directories(dir);
  json c = {{"peft_type", "LORA"},
            {"task_type", "CAUSAL_LM"},
            {"r", config.r},
            // An integer when it is one, as PEFT writes it.
            {"lora_alpha", config.lora_alpha == std::floor(config.lora_alpha) ? json(int64_t(config.lora_alpha))
                                                                              : json(config.lora_alpha)},
            {"target_modules", config.target_modules},
            {"lora_dropout", 0.0},
            {"bias", "none"},
            {"use_rslora", config.use_rslora},
            {"use_dora", false},
            {"fan_in_fan_out", false},
            {"modules_to_save", nullptr},
            {"inference_mode", true},
            {"base_model_name_or_path", config.base_model_name_or_path}};
  std::ofstream(dir / kConfigFile) << c.dump(2) << "\n";
  std::vector<safetensors::TensorSpec> specs;
  std::vector<std::vector<char>> data;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    if (int64_t(v.size()) != shape[0] * shape[1]) throw Error("lora writer: " + name + " has the wrong size");
    specs.push_back({name, DType::F32, std::move(shape)});
    const char* p = reinterpret_cast<const char*>(v.data());
    data.emplace_back(p, p + v.size() * sizeof(float));
  };
  for (const LoraModuleFile& m : modules) {
    add(std::string(kPrefix) + m.module + ".lora_A.weight", {m.rank, m.in}, m.a);
    add(std::string(kPrefix) + m.module + ".lora_B.weight", {m.out, m.rank}, m.b);
  }
  safetensors::write_file(dir / kWeightsFile, specs, data);
}

std::vector<LoraModuleFile> random_lora_modules(const ModelConfig& base, const LoraConfig& config, uint64_t seed,
                                                double b_scale) {
  std::vector<LoraModuleFile> mods = lora_target_sites(base, config.target_modules);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  const int64_t r = config.r;
  for (LoraModuleFile& m : mods) {
    m.rank = r;
    const double sa = 1.0 / std::sqrt(double(m.in)), sb = b_scale / (config.scale(r, m.module) * std::sqrt(double(r)));
    for (int64_t i = 0; i < r * m.in; ++i) m.a.push_back(float(sa * normal(rng)));
    for (int64_t i = 0; i < m.out * r; ++i) m.b.push_back(float(sb * normal(rng)));
  }
  return mods;
}

LoraConfig LoraConfig::from_json_file(const fs::path& file) {
  const std::string where = file.string();
  const json j = read_json_file(file, where, "(a PEFT adapter folder holds adapter_config.json)");
  if (!j.is_object()) throw Error(where + ": not a JSON object");
  auto bad = [&](const std::string& field, const std::string& why) { return Error(where + ": " + field + " " + why); };
  if (j.contains("peft_type") && j["peft_type"] != "LORA")
    throw bad("peft_type", j["peft_type"].dump() + " is not supported (only LORA)");
  LoraConfig c;
  if (!j.contains("r") || !j["r"].is_number_integer() || j["r"].get<int64_t>() <= 0)
    throw bad("r", "must be a positive integer");
  c.r = j["r"].get<int64_t>();
  c.lora_alpha = j.contains("lora_alpha") && j["lora_alpha"].is_number() ? j["lora_alpha"].get<double>() : 8.0;
  c.use_rslora = j.value("use_rslora", false);
  if (j.value("use_dora", false)) throw bad("use_dora", "is true: DoRA adapters are not supported");
  if (j.value("fan_in_fan_out", false)) throw bad("fan_in_fan_out", "is true: only nn.Linear (not Conv1D) targets");
  if (j.contains("modules_to_save") && !j["modules_to_save"].is_null() && !j["modules_to_save"].empty())
    throw bad("modules_to_save",
              j["modules_to_save"].dump() +
                  " is not supported: an adapter may only add low-rank deltas (fully trained modules "
                  "would replace base weights)");
  if (j.contains("bias") && j["bias"] != "none")
    throw bad("bias", j["bias"].dump() + " is not supported (only \"none\")");
  for (const char* pattern : {"rank_pattern", "alpha_pattern"})
    if (j.contains(pattern) && !j[pattern].is_null() && !j[pattern].is_object())
      throw bad(pattern, "must be an object of module pattern -> number");
  if (j.contains("target_modules")) {
    const json& t = j["target_modules"];
    if (t.is_string())
      c.target_modules.push_back(t.get<std::string>());
    else if (t.is_array())
      for (const json& s : t)
        if (s.is_string()) c.target_modules.push_back(s.get<std::string>());
  }
  if (j.contains("alpha_pattern") && j["alpha_pattern"].is_object())
    for (const auto& [k, v] : j["alpha_pattern"].items())
      if (v.is_number()) c.alpha_pattern.emplace_back(k, v.get<double>());
  c.base_model_name_or_path = j.value("base_model_name_or_path", std::string());
  return c;
}

double LoraConfig::scale(int64_t rank, const std::string& module) const {
  double alpha = lora_alpha;
  for (const auto& [key, a] : alpha_pattern)
    if (pattern_matches(key, module)) alpha = a;
  return use_rslora ? alpha / std::sqrt(double(rank)) : alpha / double(rank);
}

std::shared_ptr<const LoraAdapter> LoraAdapter::load(const fs::path& dir, const ModelConfig& base,
                                                     const WeightSelection& sel, std::string name, std::string key,
                                                     DType dtype) {
  if (dtype != DType::F32 && dtype != DType::BF16) throw Error("lora: adapters are kept in F32 or BF16");
  if (!fs::is_directory(dir)) throw Error(dir.string() + ": no such adapter folder");
  auto a = std::make_shared<LoraAdapter>();
  a->name_ = name.empty() ? dir.filename().string() : std::move(name);
  a->dir_ = dir;
  a->key_ = std::move(key);
  a->config_ = LoraConfig::from_json_file(dir / kConfigFile);
  const fs::path file = dir / kWeightsFile;
  if (!fs::exists(file))
    throw Error(file.string() + ": missing" +
                (fs::exists(dir / "adapter_model.bin") ? " (adapter_model.bin is a pickle: convert it to safetensors)"
                                                       : std::string()));
  const safetensors::Header h = safetensors::read_header(file);
  const std::string fname = file.string();
  const std::map<std::string, Site> sites = linear_sites(base);

  // Pair each module's A and B, checking names first so that a bad file fails before any read.
  struct Pair {
    const safetensors::Entry* a = nullptr;
    const safetensors::Entry* b = nullptr;
    Site site;
  };
  std::map<std::string, Pair> modules;
  for (const safetensors::Entry& e : h.tensors) {
    const bool is_a = e.name.ends_with(".lora_A.weight"), is_b = e.name.ends_with(".lora_B.weight");
    if (!e.name.starts_with(kPrefix) || !(is_a || is_b))
      throw Error(fname + ": tensor " + e.name + " is not a LoRA tensor (expected base_model.model.<module>.lora_A" +
                  "/lora_B.weight)");
    const std::string module = e.name.substr(kPrefix.size(), e.name.size() - kPrefix.size() - 14);
    const auto site = sites.find(module);
    if (site == sites.end())
      throw Error(fname + ": tensor " + e.name + " adapts " + module + ", which is not a Linear layer of this " +
                  base.model_type + " model (" + std::to_string(base.num_hidden_layers) +
                  " layers; targets: attention q/k/v/o_proj, routers, expert and MLP projections)");
    Pair& p = modules[module];
    p.site = site->second;
    (is_a ? p.a : p.b) = &e;
  }
  if (modules.empty()) throw Error(fname + ": no LoRA tensors");

  a->layers_.resize(size_t(base.num_hidden_layers));
  for (LayerLora& l : a->layers_) l.experts.resize(size_t(std::max<int64_t>(base.num_experts, 0)));
  for (const auto& [module, p] : modules) {
    const std::string prefix = std::string(kPrefix) + module;
    if (!p.a || !p.b)
      throw Error(fname + ": tensor " + prefix + (p.a ? ".lora_B.weight" : ".lora_A.weight") + " is missing");
    const Site& s = p.site;
    const int64_t r = p.a->shape.empty() ? 0 : p.a->shape[0];
    if (p.a->shape.size() != 2 || r <= 0 || p.a->shape[1] != s.in)
      throw Error(fname + ": tensor " + p.a->name + " has shape " + safetensors::shape_str(p.a->shape) +
                  ", expected [r, " + std::to_string(s.in) + "] for " + module);
    if (p.b->shape != std::vector<int64_t>{s.out, r})
      throw Error(fname + ": tensor " + p.b->name + " has shape " + safetensors::shape_str(p.b->shape) +
                  ", expected [" + std::to_string(s.out) + ", " + std::to_string(r) + "] for " + module);
    if (s.kind == Site::Kind::Expert) a->adapts_experts_ = true;
    const bool wanted = s.kind == Site::Kind::Expert ? sel.wants_expert(s.layer, s.expert) : sel.dense_parts;
    if (!wanted) continue;
    LoraModule& m = slot(a->layers_[size_t(s.layer)], s);
    m.rank = r;
    m.in = s.in;
    m.out = s.out;
    m.a = safetensors::read_f32(h, *p.a);
    const std::vector<float> b = safetensors::read_f32(h, *p.b);
    const float scale = float(a->config_.scale(r, module));
    m.bt.resize(b.size());
    for (int64_t o = 0; o < s.out; ++o)
      for (int64_t k = 0; k < r; ++k) m.bt[size_t(k * s.out + o)] = scale * b[size_t(o * r + k)];
    if (dtype == DType::BF16) {
      m.dtype = DType::BF16;
      for (float v : m.a) m.a16.push_back(f32_to_bf16(v));
      for (float v : m.bt) m.bt16.push_back(f32_to_bf16(v));
      m.a = {};
      m.bt = {};
    }
    a->bytes_ += m.bytes();
  }
  return a;
}

DType lora_dtype_for(const Checkpoint& base) {
  const std::string q = "model.layers.0.self_attn.q_proj.weight";
  return base.has(q) && base.info(q).dtype == DType::BF16 ? DType::BF16 : DType::F32;
}

std::vector<cpu::LowRankJob> lora_jobs(std::span<const LoraTask> tasks) {
  std::vector<cpu::LowRankJob> jobs;
  jobs.reserve(tasks.size());
  for (const LoraTask& k : tasks) {
    if (!k.m || k.m->empty() || k.n == 0) continue;
    jobs.push_back({.x = k.x,
                    .rows = k.n,
                    .in = k.m->in,
                    .x_rows = k.x_rows,
                    .ldx = k.ldx,
                    .a = k.m->a_data(),
                    .bt = k.m->bt_data(),
                    .wdtype = k.m->dtype,
                    .rank = k.m->rank,
                    .out = k.m->out,
                    .y = k.y,
                    .y_rows = k.y_rows,
                    .ldy = k.ldy,
                    .add = k.add});
  }
  return jobs;
}

void lora_add(std::span<const LoraTask> tasks) {
  const std::vector<cpu::LowRankJob> jobs = lora_jobs(tasks);
  if (!jobs.empty()) cpu::matmul({}, jobs);
}

}  // namespace moemesh
