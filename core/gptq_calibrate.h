// GPTQ over a whole model (`moemesh quantize --method gptq`): calibration samples run through the
// model layer by layer, as AutoGPTQ does (true_sequential), on the CPU backend:
//   - layer l's input is the calibration rows after layers 0 .. l-1, already quantized;
//   - inside the layer, each step's inputs come from the steps before it, quantized:
//     q/k/v (input_layernorm(x)), then o_proj (the attention output), then every expert's w1/w3
//     (post_attention_layernorm rows the router sends to it; shared and dense MLPs: all rows),
//     then w2 (that expert's silu(w1·h) ⊙ w3·h);
//   - a routed expert that receives fewer than min_expert_rows rows is rounded to nearest instead
//     (its Hessian would rest on too few rows), and the layer's report names it;
//   - lm_head, when selected (GPTQModel's lm_head=True), last: from norm(x) after every layer.
// Samples are independent sequences (causal attention within each).
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/gptq_quantizer.h"

namespace moemesh {

class Tokenizer;

struct CalibrationOptions {
  QuantOptions quant;
  // Which Linear weights (by tensor name, "....q_proj.weight") are quantized.
  std::function<bool(const std::string& weight_tensor)> quantized;
  int64_t min_expert_rows = 0;  // 0: 2 × group size (256 with one group)
  int64_t effective_min_expert_rows() const {
    return min_expert_rows > 0 ? min_expert_rows : 2 * (quant.group_size < 0 ? 128 : quant.group_size);
  }
};

struct LayerReport {
  int64_t layer = 0, layers = 0;
  bool lm_head = false;  // the report of lm_head, after the last layer
  double seconds = 0;
  int64_t gptq = 0, rtn = 0;  // Linear weights quantized each way
  struct Fallback {
    int64_t expert = 0, rows = 0;
  };
  std::vector<Fallback> fallbacks;  // routed experts rounded to nearest for want of rows
};

// module ("model.layers.0.self_attn.q_proj") -> its GPTQ v1 tensors, for every Linear selected.
using QuantizedModules = std::map<std::string, PackedLinear>;

// Runs the calibration `samples` (token ids) through the float checkpoint and quantizes every
// selected Linear. Calls `progress` after each layer. Throws moemesh::Error on a token outside
// the vocabulary or a module GPTQ cannot handle (named).
QuantizedModules gptq_calibrate(const Checkpoint& ck, std::span<const std::vector<int32_t>> samples,
                                const CalibrationOptions& opts,
                                const std::function<void(const LayerReport&)>& progress);

// Calibration data. A .jsonl file holds one sample per line: {"text": ...}, {"prompt": ...},
// {"messages": [...]} (rendered with the tokenizer's chat template) or {"input_ids": [...]};
// any other file is one text. Texts need the tokenizer (null: only input_ids lines work).
// At most max_samples samples (0: all). Throws moemesh::Error naming the file and line.
std::vector<std::vector<int32_t>> read_calibration(const std::filesystem::path& file, const Tokenizer* tok,
                                                   int64_t max_samples);

// Cuts samples into windows of at most seq_len tokens, in order, until max_tokens tokens (0: all).
std::vector<std::vector<int32_t>> token_windows(std::span<const std::vector<int32_t>> samples, int64_t seq_len,
                                                int64_t max_tokens);

}  // namespace moemesh
