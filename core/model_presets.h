// Built-in model shapes for `moemesh mkmodel`: random-weight models in the exact layout of
// real Mixtral / DeepSeek-MoE checkpoints, sized for tests and benchmarks.
//
//   tiny    unit tests: generated and run in seconds (hidden 64, 2 layers, 8 experts top-2)
//   small   integration tests (hidden 256, 4 layers, 8 experts top-2)
//   medium  benchmarks: 1-2 GB in bf16 (hidden 1024, 8 layers, 8 experts top-2)
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "core/model_config.h"

namespace moemesh {

// "mixtral" | "deepseek"; throws moemesh::Error otherwise.
Arch parse_arch(std::string_view name);
std::string_view arch_name(Arch arch);

const std::vector<std::string>& preset_names();

// The preset's config. vocab_size, bos_token_id and eos_token_ids come from the tokenizer and
// are left for the caller to fill in. Throws moemesh::Error for an unknown preset.
ModelConfig model_preset(Arch arch, std::string_view preset);

}  // namespace moemesh
