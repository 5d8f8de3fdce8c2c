// Tiny models for tests: the "tiny" preset with a test vocabulary, BOS 1 and EOS 2, written into
// temporary folders that are removed with their owner.
#pragma once
#include <stdlib.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>

#include "core/error.h"
#include "core/model_presets.h"
#include "core/model_writer.h"

namespace moemesh::testing {

// A fresh folder <temp>/<prefix>-XXXXXX, removed with everything in it on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix) {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (::mkdtemp(tmpl.data()) == nullptr)
      throw Error("cannot create the temporary folder " + tmpl + ": " + std::strerror(errno));
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;  // a destructor must not throw; a leftover temp folder is harmless
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

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
