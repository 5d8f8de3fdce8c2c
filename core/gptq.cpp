#include "core/gptq.h"

#include <vector>

#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/error.h"
#include "core/json_file.h"
#include "core/model_config.h"
#include "core/safetensors.h"

namespace moemesh {
namespace {

using nlohmann::json;

GptqConfig parse(const json& q, const std::string& where) {
  const auto fail = [&](const std::string& key, const std::string& what) {
    throw Error(where + ": " + key + " " + what);
  };
  const std::string method = q.value("quant_method", std::string("gptq"));
  if (method != "gptq") fail("quant_method", "is \"" + method + "\"; only \"gptq\" is supported");
  GptqConfig c;
  if (!q.contains("bits") || !q["bits"].is_number_integer()) fail("bits", "is missing");
  c.bits = q["bits"].get<int>();
  if (c.bits != 4 && c.bits != 8) fail("bits", "is " + std::to_string(c.bits) + "; only 4 and 8 bits are supported");
  if (!q.contains("group_size") || !q["group_size"].is_number_integer()) fail("group_size", "is missing");
  c.group_size = q["group_size"].get<int64_t>();
  if (c.group_size == 0 || c.group_size < -1)
    fail("group_size", "is " + std::to_string(c.group_size) + "; expected -1 or a positive size");
  c.desc_act = q.value("desc_act", false);
  c.sym = q.value("sym", true);
  const std::string format = q.value("checkpoint_format", std::string("gptq"));
  if (format != "gptq" && format != "gptq_v2")
    fail("checkpoint_format", "is \"" + format + "\"; supported: \"gptq\", \"gptq_v2\"");
  c.v2 = format == "gptq_v2";
  if (q.contains("lm_head") && !q["lm_head"].is_boolean()) fail("lm_head", "is not true or false");
  c.lm_head = q.value("lm_head", false);
  return c;
}

const TensorInfo& require(const TensorLookup& find, const std::string& name, const std::string& module) {
  const TensorInfo* t = find(name);
  if (!t) throw Error("tensor " + name + " is missing (" + module + " has a qweight, so it is GPTQ-quantized)");
  return *t;
}

}  // namespace

void require_own_lm_head(const ModelConfig& config, const std::string& model) {
  if (config.tie_word_embeddings)
    throw Error("--lm-head: " + model +
                " ties lm_head to the embeddings (tie_word_embeddings); it has no lm_head to quantize");
}

std::string GptqConfig::describe() const {
  return "GPTQ " + std::to_string(bits) + "-bit, group size " +
         (group_size < 0 ? std::string("all") : std::to_string(group_size)) + (desc_act ? ", desc_act" : "") +
         (sym ? ", sym" : ", asym") + (v2 ? ", gptq_v2" : "") + (lm_head ? ", lm_head" : "");
}

std::optional<GptqConfig> read_gptq_config(const json& config, const std::filesystem::path& dir) {
  if (config.is_object() && config.contains("quantization_config")) {
    const json& q = config["quantization_config"];
    if (!q.is_object()) throw Error("config.json: quantization_config is not an object");
    return parse(q, "config.json: quantization_config");
  }
  const auto file = dir / "quantize_config.json";
  if (!std::filesystem::exists(file)) return std::nullopt;
  const json q = read_json_file(file);
  if (!q.is_object()) throw Error("quantize_config.json: not an object");
  return parse(q, "quantize_config.json");
}

std::string module_of(const std::string& weight_tensor) {
  const std::string suffix = ".weight";
  if (weight_tensor.size() > suffix.size() &&
      weight_tensor.compare(weight_tensor.size() - suffix.size(), suffix.size(), suffix) == 0)
    return weight_tensor.substr(0, weight_tensor.size() - suffix.size());
  return weight_tensor;
}

void check_gptq_tensors(const GptqConfig& cfg, const std::string& module, int64_t out, int64_t in,
                        const TensorLookup& find) {
  const int64_t p = cfg.pack(), groups = cfg.groups(in);
  const std::string why = " (from quantization_config: " + cfg.describe() + ", and the module's [" +
                          std::to_string(out) + ", " + std::to_string(in) + "] shape)";
  const auto check = [&](const std::string& suffix, std::vector<DType> dtypes, std::vector<int64_t> shape) {
    const std::string name = module + "." + suffix;
    const TensorInfo& t = require(find, name, module);
    const std::string where = t.file.filename().string() + ": tensor " + name;
    bool dtype_ok = false;
    for (DType d : dtypes) dtype_ok |= t.dtype == d;
    if (!dtype_ok)
      throw Error(where + " has dtype " + std::string(dtype_name(t.dtype)) + ", expected " +
                  std::string(dtype_name(dtypes.front())));
    if (t.shape != shape)
      throw Error(where + " has shape " + safetensors::shape_str(t.shape) + ", expected " +
                  safetensors::shape_str(shape) + why);
  };
  if (in % p != 0 || out % p != 0)
    throw Error("tensor " + module + ".qweight: [" + std::to_string(out) + ", " + std::to_string(in) +
                "] is not a multiple of " + std::to_string(p) + " (" + std::to_string(cfg.bits) +
                "-bit values per int32) in both dimensions");
  check("qweight", {DType::I32}, {in / p, out});
  check("qzeros", {DType::I32}, {groups, out / p});
  check("scales", {DType::F16, DType::BF16, DType::F32}, {groups, out});
  if (find(module + ".g_idx"))
    check("g_idx", {DType::I32}, {in});
  else if (cfg.desc_act)
    throw Error("tensor " + module + ".g_idx is missing: desc_act is true, so the groups come from g_idx");
  if (find(module + ".bias")) throw Error("tensor " + module + ".bias: biased projections are not supported");
}

cpu::QuantMatrix repack_gptq(const GptqConfig& cfg, const std::string& module, int64_t out, int64_t in,
                             const GptqTensors& t) {
  const int64_t p = cfg.pack(), groups = cfg.groups(in);
  const uint32_t mask = (1u << cfg.bits) - 1;
  // The input channels of each group, in increasing order.
  std::vector<std::vector<int32_t>> members(static_cast<size_t>(groups));
  for (int64_t i = 0; i < in; ++i) {
    const int64_t g = t.g_idx ? t.g_idx[i] : (cfg.group_size < 0 ? 0 : i / cfg.group_size);
    if (g < 0 || g >= groups)
      throw Error("tensor " + module + ".g_idx: channel " + std::to_string(i) + " is in group " + std::to_string(g) +
                  ", outside the " + std::to_string(groups) + " groups of " + cfg.describe());
    members[size_t(g)].push_back(int32_t(i));
  }
  std::vector<int64_t> sizes;
  for (const auto& m : members) sizes.push_back(int64_t(m.size()));
  cpu::QuantMatrix m;
  m.shape(cfg.bits, out, in, sizes);
  std::vector<int64_t> position(static_cast<size_t>(in));  // input channel -> position in a packed row
  for (int64_t g = 0; g < groups; ++g)
    for (size_t k = 0; k < members[size_t(g)].size(); ++k) {
      const int64_t pos = m.group_start[size_t(g)] + int64_t(k);
      m.source[size_t(pos)] = members[size_t(g)][k];
      position[size_t(members[size_t(g)][k])] = pos;
    }
  for (int64_t i = 0; i < in; ++i) {
    const int32_t* word = t.qweight + (i / p) * out;
    const int shift = int(i % p) * cfg.bits;
    for (int64_t j = 0; j < out; ++j) m.set_quant(j, position[size_t(i)], int((uint32_t(word[j]) >> shift) & mask));
  }
  std::vector<float> scales(size_t(groups * out));
  to_f32(t.scales_dtype, t.scales, scales.data(), scales.size());
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < out; ++j) {
      const uint32_t stored = (uint32_t(t.qzeros[g * (out / p) + j / p]) >> (int(j % p) * cfg.bits)) & mask;
      // v1 stores zero - 1; AutoGPTQ's reference dequantization adds 1 and masks again.
      const uint32_t zero = cfg.v2 ? stored : (stored + 1) & mask;
      const float s = scales[size_t(g * out + j)];
      m.scale[size_t(j * groups + g)] = s;
      m.scaled_zero[size_t(j * groups + g)] = s * float(zero);
    }
  return m;
}

}  // namespace moemesh
