// Tiny models for tests: the "tiny" preset with a test vocabulary, BOS 1 and EOS 2, written into
// temporary folders that are removed with their owner.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>

#include "core/model_presets.h"
#include "core/model_writer.h"
#include "tests/support/temp_dir.h"

namespace moemesh::testing {

// The tiny preset of `arch` with `vocab` tokens, BOS 1 and EOS 2.
inline ModelConfig tiny_config(Arch arch, int64_t vocab) {
  ModelConfig c = model_preset(arch, "tiny");  // hidden 64, 2 layers, 8 experts, top-2
  c.vocab_size = vocab;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

// Writes tiny_config(arch, vocab) to `dir` with weights drawn from `seed`.
inline void write_tiny_model(const std::filesystem::path& dir, Arch arch, uint64_t seed, int64_t vocab,
                             DType dtype = DType::F32) {
  WriteOptions o;
  o.dtype = dtype;
  o.seed = seed;
  write_model(tiny_config(arch, vocab), dir, o);
}

// A tiny model alone in its own temporary folder, removed on destruction.
class TinyModel {
 public:
  TinyModel(Arch arch, uint64_t seed, int64_t vocab, DType dtype = DType::F32)
      : dir_("moemesh-" + std::string(arch_name(arch))) {
    write_tiny_model(dir_.path(), arch, seed, vocab, dtype);
  }
  const std::filesystem::path& path() const { return dir_.path(); }

 private:
  TempDir dir_;
};

}  // namespace moemesh::testing
