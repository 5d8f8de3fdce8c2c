// Writes GGUF v3 files, the format llama.cpp (ggml) loads:
//
//   u32 magic "GGUF", u32 version 3, u64 tensor count, u64 metadata count,
//   metadata: {string key, u32 value type, value}...,
//   tensor infos: {string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset}...,
//   zero padding to the alignment, then the data section; each tensor's offset (relative to the
//   data section) is a multiple of the alignment.
//
// Strings are u64 length + bytes (no terminator); arrays are u32 element type + u64 count +
// elements; everything little-endian. ggml lists dimensions innermost first (ne[0] is the
// contiguous one), the reverse of a row-major shape: the writer takes row-major shapes (as
// safetensors and numpy have them) and reverses them itself.
//
// Generic: it knows nothing of models. Metadata and tensor infos are declared first; data is
// then streamed tensor by tensor in declaration order, so a model never has to fit in memory.
// Data goes to "<file>.tmp", renamed on finish(), so an interrupted export leaves no valid file.
#pragma once
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace moemesh::gguf {

inline constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
inline constexpr uint32_t kVersion = 3;
inline constexpr uint32_t kDefaultAlignment = 32;  // ggml's GGUF_DEFAULT_ALIGNMENT
inline constexpr size_t kMaxTensorName = 63;       // GGML_MAX_NAME (64) less the terminator
inline constexpr size_t kMaxDims = 4;              // GGML_MAX_DIMS

// gguf_type: the metadata value types.
enum class ValueType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

// ggml_type: the tensor element types this writer produces: the float ones, and Q4_0 (blocks of
// 32 values along a row: an f16 scale d and 16 bytes, byte j holding value j in its low nibble
// and value j + 16 in its high one; value = (nibble - 8)·d).
enum class TensorType : uint32_t { F32 = 0, F16 = 1, Q4_0 = 2, BF16 = 30 };
constexpr int64_t kQ4_0Block = 32, kQ4_0BlockBytes = 18;
// Bytes of a row of `cols` values (a multiple of kQ4_0Block for Q4_0: else a moemesh::Error).
size_t tensor_row_bytes(TensorType t, int64_t cols);
std::string_view tensor_type_name(TensorType t);
// llama.cpp's Q4_0 of one row (cols a multiple of 32): per block d = the value of largest magnitude
// / -8, nibble = min(15, trunc(value / d + 8.5)).
void quantize_row_q4_0(const float* x, int64_t cols, uint8_t* out);

class Writer {
 public:
  explicit Writer(std::filesystem::path file, uint32_t alignment = kDefaultAlignment);
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Metadata, written in the order set. A key set twice is an error (llama.cpp refuses such files).
  void set_u8(const std::string& key, uint8_t v);
  void set_i32(const std::string& key, int32_t v);
  void set_u32(const std::string& key, uint32_t v);
  void set_u64(const std::string& key, uint64_t v);
  void set_i64(const std::string& key, int64_t v);
  void set_f32(const std::string& key, float v);
  void set_f64(const std::string& key, double v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, std::string_view v);
  void set_strings(const std::string& key, const std::vector<std::string>& v);
  void set_f32s(const std::string& key, const std::vector<float>& v);
  void set_i32s(const std::string& key, const std::vector<int32_t>& v);

  // Declares a tensor; `shape` is row-major (outermost first), 1 to 4 dimensions, each >= 1.
  // Returns its offset in the data section.
  uint64_t add_tensor(const std::string& name, TensorType type, const std::vector<int64_t>& shape);

  // Writes the header (metadata + tensor infos); no more metadata or tensors after it.
  void begin_data();
  // Appends bytes of the current tensor (any chunking); moves to the next when one is complete.
  void write(const void* data, size_t nbytes);
  // Checks that every tensor was written in full, pads, closes and renames into place.
  void finish();

  struct Tensor {
    std::string name;
    TensorType type;
    std::vector<int64_t> shape;  // row-major
    uint64_t offset = 0;         // relative to the data section
    uint64_t nbytes = 0;
  };
  const std::vector<Tensor>& tensors() const { return tensors_; }
  uint32_t alignment() const { return alignment_; }
  // Index of the tensor write() is filling (== tensors().size() once all are complete).
  size_t current_tensor() const { return current_; }

 private:
  void begin_kv(const std::string& key, ValueType type);
  void put_raw(const void* p, size_t n) {
    kv_.insert(kv_.end(), static_cast<const char*>(p), static_cast<const char*>(p) + n);
  }
  template <typename T>
  void put(T v) {
    put_raw(&v, sizeof v);
  }
  void put_string(std::string_view s);
  void pad_to_alignment();
  void write_file(const void* p, size_t n);
  void require_header_open(const char* what) const;

  std::filesystem::path file_, tmp_;
  uint32_t alignment_;
  std::vector<char> kv_;  // encoded metadata pairs
  uint64_t kv_count_ = 0;
  std::set<std::string> keys_, names_;
  std::vector<Tensor> tensors_;
  uint64_t data_size_ = 0;  // data section size so far, padded
  std::FILE* f_ = nullptr;
  bool header_written_ = false, finished_ = false;
  uint64_t position_ = 0;  // bytes written to the file
  uint64_t data_start_ = 0;
  size_t current_ = 0;
  uint64_t written_in_current_ = 0;
};

}  // namespace moemesh::gguf
