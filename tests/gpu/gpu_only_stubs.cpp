// Linked into moemesh_core in the GPU-only build (MOEMESH_GPU_ONLY) alone, which leaves out the
// tokenizer (PCRE2, spdlog). model_writer.cpp reads a tokenizer's BOS/EOS through this function
// only when it copies tokenizer files (`moemesh mkmodel --tokenizer`), which no GPU test does: say
// so if anything ever gets here.
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/tokenizer.h"

namespace moemesh {

std::optional<std::string> config_token_content(const nlohmann::json&, const char* key) {
  throw Error(std::string("reading the tokenizer's ") + key + ": the GPU-only build has no tokenizer");
}

}  // namespace moemesh
