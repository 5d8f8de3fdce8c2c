// The safetensors file format: an 8-byte little-endian header length N, N bytes of JSON
// ({"__metadata__": {...}, "name": {"dtype", "shape", "data_offsets": [begin, end]}, ...}),
// then the data section; offsets are relative to the data section.
//
// The reader parses the header only (two preads) and validates it strictly against the file
// size. The writer streams tensor data to disk, so a model never has to fit in memory.
#pragma once
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace moemesh::safetensors {

// "[2,3]": a shape as error messages print it.
std::string shape_str(const std::vector<int64_t>& shape);

// Largest header accepted (the reference implementation's limit).
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct Entry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // relative to the data section
  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  std::filesystem::path file;
  uint64_t file_size = 0;
  uint64_t data_offset = 0;  // absolute offset of the data section (8 + N)
  std::map<std::string, std::string> metadata;
  std::vector<Entry> tensors;  // in data order
  const Entry* find(const std::string& name) const;
};

// Reads and validates the header of `file`. Throws moemesh::Error naming the file (and tensor).
Header read_header(const std::filesystem::path& file);
// Reads one F32/F16/BF16 tensor of a file whose header is `h`, converted to f32 (small tensors:
// adapters; a model's weights are mapped by core/checkpoint instead).
std::vector<float> read_f32(const Header& h, const Entry& e);

struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

// Streams one safetensors file. The header is written first from the specs; then the tensors'
// bytes are appended in order() (sorted by name, as the reference implementation lays them out).
// Data goes to "<file>.tmp", renamed on finish(), so an interrupted write leaves no valid file.
class Writer {
 public:
  Writer(const std::filesystem::path& file, std::vector<TensorSpec> specs,
         std::map<std::string, std::string> metadata = {{"format", "pt"}});
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  const std::vector<TensorSpec>& order() const { return specs_; }
  // Appends bytes of the current tensor (any chunking); moves to the next when one is complete.
  void write(const void* data, size_t nbytes);
  // Appends n floats converted to the current tensor's dtype.
  void write_f32(const float* data, size_t n);
  void finish();

 private:
  std::filesystem::path file_, tmp_;
  std::vector<TensorSpec> specs_;
  std::FILE* f_ = nullptr;
  size_t current_ = 0;
  uint64_t written_in_current_ = 0;
  std::vector<char> conv_;
};

// Writes whole tensors at once (tests, small files). data[i] holds specs[i]'s bytes.
void write_file(const std::filesystem::path& file, const std::vector<TensorSpec>& specs,
                const std::vector<std::vector<char>>& data);

// Hugging Face sharding (huggingface_hub.split_torch_state_dict_into_shards): walk tensors in
// order, start a new shard when the next tensor would overflow max_shard_bytes; a tensor larger
// than the limit gets a shard of its own.
std::vector<std::vector<TensorSpec>> plan_shards(const std::vector<TensorSpec>& specs, uint64_t max_shard_bytes);
// "model-00001-of-00003.safetensors" (index from 0).
std::string shard_file_name(size_t index, size_t count);
inline constexpr const char* kSingleFile = "model.safetensors";
inline constexpr const char* kIndexFile = "model.safetensors.index.json";
// Writes model.safetensors.index.json as transformers does (sorted keys, indent 2).
void write_index(const std::filesystem::path& dir, const std::vector<std::vector<TensorSpec>>& shards);

}  // namespace moemesh::safetensors
