// GPTQ checkpoints (AutoGPTQ / GPTQModel / Optimum; the format in docs/quantization.md): the
// quantization config, the checks of a quantized Linear's tensors, and their repacking into the
// CPU kernels' QuantMatrix (kernels/cpu/quant_matrix.h).
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "core/dtype.h"
#include "kernels/cpu/quant_matrix.h"

namespace moemesh {

struct TensorInfo;   // core/checkpoint.h
struct ModelConfig;  // core/model_config.h

struct GptqConfig {
  int bits = 4;
  int64_t group_size = 128;  // -1: one group over the whole input
  bool desc_act = false;
  bool sym = true;
  bool v2 = false;       // checkpoint_format "gptq_v2": zeros stored as they are (v1 stores zero - 1)
  bool lm_head = false;  // GPTQModel's "lm_head": true: lm_head is quantized too
  int64_t groups(int64_t in) const { return group_size < 0 ? 1 : (in + group_size - 1) / group_size; }
  int pack() const { return 32 / bits; }  // values per int32
  std::string describe() const;           // "GPTQ 4-bit, group size 128, desc_act, asym"
};

// The quantization_config of config.json (`config`), else quantize_config.json in `dir`; nullopt
// when neither has one. Throws moemesh::Error naming the file and key for another quant_method,
// bits other than 4 or 8, a bad group_size or an unknown checkpoint_format.
std::optional<GptqConfig> read_gptq_config(const nlohmann::json& config, const std::filesystem::path& dir);

// Quantizing lm_head (`quantize --lm-head`, `export-gguf --lm-head`) needs one of its own. Throws
// moemesh::Error naming `model` when the config ties lm_head to the embeddings.
void require_own_lm_head(const ModelConfig& config, const std::string& model);

// The module of a Linear weight's tensor name: "x.q_proj.weight" -> "x.q_proj".
std::string module_of(const std::string& weight_tensor);

// Checks the GPTQ tensors of `module` (a Linear [out, in]) against the config: present, dtype and
// shape. Throws moemesh::Error with one line naming the tensor at fault.
using TensorLookup = std::function<const TensorInfo*(const std::string& name)>;
void check_gptq_tensors(const GptqConfig& cfg, const std::string& module, int64_t out, int64_t in,
                        const TensorLookup& find);

// The mapped tensors of one quantized Linear [out, in] (g_idx may be null: i / group_size).
struct GptqTensors {
  const int32_t* qweight = nullptr;
  const int32_t* qzeros = nullptr;
  const void* scales = nullptr;
  DType scales_dtype = DType::F16;
  const int32_t* g_idx = nullptr;
};
// Repacks into the kernels' layout. Throws moemesh::Error naming `module`.g_idx for a group index
// outside [0, groups).
cpu::QuantMatrix repack_gptq(const GptqConfig& cfg, const std::string& module, int64_t out, int64_t in,
                             const GptqTensors& t);

}  // namespace moemesh
