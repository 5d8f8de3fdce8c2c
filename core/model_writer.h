// Writes random-weight models in the Hugging Face layout (what `moemesh mkmodel` produces):
// config.json, generation_config.json, model.safetensors or model-0000X-of-0000N.safetensors +
// model.safetensors.index.json, tokenizer.json and tokenizer_config.json.
//
// Weights are deterministic from (seed, tensor name) alone: our own PRNG (splitmix64 seeding
// xoshiro256**, Box-Muller normals), so the same seed gives the same bytes on every platform
// and whatever the sharding.
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/model_config.h"

namespace moemesh {

// transformers' max_shard_size is decimal; 2 GB keeps a medium model in one or two files.
inline constexpr uint64_t kDefaultShardBytes = 2'000'000'000;

// What mkmodel needs from a tokenizer, read from its JSON directly.
struct TokenizerFiles {
  std::filesystem::path tokenizer_json;
  std::filesystem::path tokenizer_config;  // empty when there is none
  int64_t vocab_size = 0;                  // highest id + 1 over the model vocab and added tokens
  std::optional<int64_t> bos_id, eos_id;
  bool has_chat_template = false;
};

// FILE_OR_DIR: a folder with tokenizer.json (and tokenizer_config.json), or a tokenizer.json.
TokenizerFiles read_tokenizer_files(const std::filesystem::path& file_or_dir);
// bootstrap's tokenizer for arch: llama2 for Mixtral, deepseek_v3 for DeepSeek, under
// $MOEMESH_CACHE or the compiled-in cache folder. Throws with a hint to run scripts/bootstrap.
std::filesystem::path default_tokenizer_dir(Arch arch);

// Deterministic normal numbers for one block of one tensor.
class TensorRng {
 public:
  TensorRng(uint64_t seed, std::string_view tensor_name, uint64_t block = 0);
  uint64_t next_u64();
  double next_normal();

 private:
  uint64_t s_[4];
  double spare_ = 0;
  bool has_spare_ = false;
};

// The initial values of tensor `name` (its name and shape choose the scale). Element i comes
// from the stream of block i / kBlock, so blocks can be generated in parallel and the values
// depend on (seed, name) alone.
class TensorInit {
 public:
  static constexpr uint64_t kBlock = 1 << 16;
  TensorInit(uint64_t seed, std::string name, const std::vector<int64_t>& shape);
  // Elements [start, start + n).
  void fill(uint64_t start, float* out, size_t n) const;
  // The next n elements (call repeatedly to fill a tensor in chunks).
  void fill(float* out, size_t n) {
    fill(pos_, out, n);
    pos_ += n;
  }
  double mean() const { return mean_; }
  double stddev() const { return std_; }

 private:
  uint64_t seed_;
  std::string name_;
  uint64_t pos_ = 0;
  double mean_ = 0, std_ = 1;
};

struct WriteOptions {
  DType dtype = DType::BF16;
  uint64_t seed = 0;
  uint64_t shard_bytes = kDefaultShardBytes;
  unsigned threads = 0;  // 0: one per core (at most 16); the output does not depend on it
};

struct WriteSummary {
  int64_t params = 0;
  uint64_t tensor_bytes = 0;
  std::vector<std::string> files;  // every file written, relative to the folder
};

// Writes the whole model folder. `tok` supplies the tokenizer files (vocab_size and bos/eos of
// `config` should already match it); without one only config, generation config and weights
// are written. Stale weight files of an earlier run in `dir` are removed first.
WriteSummary write_model(const ModelConfig& config, const std::filesystem::path& dir, const WriteOptions& opts,
                         const TokenizerFiles* tok = nullptr);

}  // namespace moemesh
