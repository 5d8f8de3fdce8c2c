#include "core/gguf_writer.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <system_error>

#include "core/dtype.h"
#include "core/error.h"

namespace moemesh::gguf {

static_assert(std::endian::native == std::endian::little, "GGUF is little-endian; this writer stores host order");

size_t tensor_row_bytes(TensorType t, int64_t cols) {
  switch (t) {
    case TensorType::F32:
      return size_t(cols) * 4;
    case TensorType::F16:
    case TensorType::BF16:
      return size_t(cols) * 2;
    case TensorType::Q4_0:
      if (cols % kQ4_0Block != 0)
        throw Error("gguf: a Q4_0 row of " + std::to_string(cols) + " values is not whole blocks of 32");
      return size_t(cols / kQ4_0Block * kQ4_0BlockBytes);
  }
  throw Error("gguf: unknown tensor type " + std::to_string(uint32_t(t)));
}

std::string_view tensor_type_name(TensorType t) {
  switch (t) {
    case TensorType::F32:
      return "F32";
    case TensorType::F16:
      return "F16";
    case TensorType::Q4_0:
      return "Q4_0";
    case TensorType::BF16:
      return "BF16";
  }
  return "?";
}

void quantize_row_q4_0(const float* x, int64_t cols, uint8_t* out) {
  for (int64_t b = 0; b < cols / kQ4_0Block; ++b, x += kQ4_0Block, out += kQ4_0BlockBytes) {
    float top = 0, signed_top = 0;
    for (int64_t j = 0; j < kQ4_0Block; ++j)
      if (std::abs(x[j]) > top) top = std::abs(x[j]), signed_top = x[j];
    const float d = signed_top / -8.0f, inv = d != 0 ? 1.0f / d : 0.0f;
    const uint16_t dh = f32_to_f16(d);
    std::memcpy(out, &dh, 2);
    auto nibble = [&](float v) { return uint8_t(std::min(15, int(v * inv + 8.5f))); };
    for (int64_t j = 0; j < kQ4_0Block / 2; ++j) out[2 + j] = uint8_t(nibble(x[j]) | (nibble(x[j + 16]) << 4));
  }
}

Writer::Writer(std::filesystem::path file, uint32_t alignment)
    : file_(std::move(file)), tmp_(file_.string() + ".tmp"), alignment_(alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0)
    throw Error("gguf: alignment " + std::to_string(alignment) + " is not a power of two");
  // Readers assume 32 unless told otherwise.
  if (alignment != kDefaultAlignment) set_u32("general.alignment", alignment);
}

Writer::~Writer() {
  if (f_ != nullptr) {
    std::fclose(f_);
    std::error_code ec;  // an unfinished export leaves nothing behind; never throw here
    std::filesystem::remove(tmp_, ec);
  }
}

void Writer::require_header_open(const char* what) const {
  if (header_written_) throw Error(std::string("gguf: ") + what + " after begin_data()");
}

void Writer::put_string(std::string_view s) {
  put<uint64_t>(s.size());
  put_raw(s.data(), s.size());
}

void Writer::begin_kv(const std::string& key, ValueType type) {
  require_header_open("metadata");
  if (key.empty()) throw Error("gguf: empty metadata key");
  if (!keys_.insert(key).second) throw Error("gguf: metadata key \"" + key + "\" set twice");
  put_string(key);
  put<uint32_t>(uint32_t(type));
  ++kv_count_;
}

void Writer::set_u8(const std::string& key, uint8_t v) {
  begin_kv(key, ValueType::U8);
  put(v);
}
void Writer::set_i32(const std::string& key, int32_t v) {
  begin_kv(key, ValueType::I32);
  put(v);
}
void Writer::set_u32(const std::string& key, uint32_t v) {
  begin_kv(key, ValueType::U32);
  put(v);
}
void Writer::set_u64(const std::string& key, uint64_t v) {
  begin_kv(key, ValueType::U64);
  put(v);
}
void Writer::set_i64(const std::string& key, int64_t v) {
  begin_kv(key, ValueType::I64);
  put(v);
}
void Writer::set_f32(const std::string& key, float v) {
  begin_kv(key, ValueType::F32);
  put(v);
}
void Writer::set_f64(const std::string& key, double v) {
  begin_kv(key, ValueType::F64);
  put(v);
}
void Writer::set_bool(const std::string& key, bool v) {
  begin_kv(key, ValueType::Bool);
  put<uint8_t>(v ? 1 : 0);
}
void Writer::set_string(const std::string& key, std::string_view v) {
  begin_kv(key, ValueType::String);
  put_string(v);
}
void Writer::set_strings(const std::string& key, const std::vector<std::string>& v) {
  begin_kv(key, ValueType::Array);
  put<uint32_t>(uint32_t(ValueType::String));
  put<uint64_t>(v.size());
  for (const auto& s : v) put_string(s);
}
void Writer::set_f32s(const std::string& key, const std::vector<float>& v) {
  begin_kv(key, ValueType::Array);
  put<uint32_t>(uint32_t(ValueType::F32));
  put<uint64_t>(v.size());
  put_raw(v.data(), v.size() * sizeof(float));
}
void Writer::set_i32s(const std::string& key, const std::vector<int32_t>& v) {
  begin_kv(key, ValueType::Array);
  put<uint32_t>(uint32_t(ValueType::I32));
  put<uint64_t>(v.size());
  put_raw(v.data(), v.size() * sizeof(int32_t));
}

uint64_t Writer::add_tensor(const std::string& name, TensorType type, const std::vector<int64_t>& shape) {
  require_header_open("add_tensor");
  if (name.empty() || name.size() > kMaxTensorName)
    throw Error("gguf: tensor name \"" + name + "\" must have 1 to " + std::to_string(kMaxTensorName) + " characters");
  if (shape.empty() || shape.size() > kMaxDims)
    throw Error("gguf: tensor " + name + " has " + std::to_string(shape.size()) + " dimensions (1 to 4 allowed)");
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 1) throw Error("gguf: tensor " + name + " has a dimension of " + std::to_string(d));
    if (n > std::numeric_limits<uint64_t>::max() / uint64_t(d)) throw Error("gguf: tensor " + name + " is too large");
    n *= uint64_t(d);
  }
  // Only a tensor that passed every check reserves its name.
  if (!names_.insert(name).second) throw Error("gguf: tensor \"" + name + "\" added twice");
  Tensor t{name, type, shape, data_size_, n / uint64_t(shape.back()) * tensor_row_bytes(type, shape.back())};
  const uint64_t a = alignment_;
  data_size_ += (t.nbytes + a - 1) / a * a;
  tensors_.push_back(std::move(t));
  return tensors_.back().offset;
}

void Writer::write_file(const void* p, size_t n) {
  if (n == 0) return;
  if (std::fwrite(p, 1, n, f_) != n) throw Error(tmp_.string() + ": write failed: " + std::strerror(errno));
  position_ += n;
}

void Writer::pad_to_alignment() {
  static const char zeros[256] = {};
  uint64_t pad = (alignment_ - position_ % alignment_) % alignment_;
  while (pad > 0) {
    size_t n = size_t(std::min<uint64_t>(pad, sizeof zeros));
    write_file(zeros, n);
    pad -= n;
  }
}

void Writer::begin_data() {
  require_header_open("begin_data");
  f_ = std::fopen(tmp_.c_str(), "wb");
  if (f_ == nullptr) throw Error(tmp_.string() + ": cannot create: " + std::strerror(errno));
  header_written_ = true;
  const uint32_t head[2] = {kMagic, kVersion};
  write_file(head, sizeof head);
  const uint64_t counts[2] = {tensors_.size(), kv_count_};
  write_file(counts, sizeof counts);
  write_file(kv_.data(), kv_.size());
  std::vector<char>().swap(kv_);
  for (const auto& t : tensors_) {
    const uint64_t len = t.name.size();
    write_file(&len, sizeof len);
    write_file(t.name.data(), t.name.size());
    const uint32_t n_dims = uint32_t(t.shape.size());
    write_file(&n_dims, sizeof n_dims);
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) {  // ggml order: innermost first
      const uint64_t ne = uint64_t(*it);
      write_file(&ne, sizeof ne);
    }
    const uint32_t type = uint32_t(t.type);
    write_file(&type, sizeof type);
    write_file(&t.offset, sizeof t.offset);
  }
  pad_to_alignment();
  data_start_ = position_;
}

void Writer::write(const void* data, size_t nbytes) {
  if (!header_written_ || finished_) throw Error("gguf: write() outside begin_data() .. finish()");
  const char* p = static_cast<const char*>(data);
  while (nbytes > 0) {
    if (current_ >= tensors_.size())
      throw Error("gguf: " + std::to_string(nbytes) + " bytes written past the last tensor");
    const Tensor& t = tensors_[current_];
    const size_t n = size_t(std::min<uint64_t>(nbytes, t.nbytes - written_in_current_));
    write_file(p, n);
    p += n;
    nbytes -= n;
    written_in_current_ += n;
    if (written_in_current_ == t.nbytes) {
      pad_to_alignment();
      if (position_ - data_start_ != (current_ + 1 < tensors_.size() ? tensors_[current_ + 1].offset : data_size_))
        throw Error("gguf: internal error: tensor " + t.name + " ends at the wrong offset");
      ++current_;
      written_in_current_ = 0;
    }
  }
}

void Writer::finish() {
  if (!header_written_) begin_data();  // a file with metadata only
  if (finished_) return;
  if (current_ < tensors_.size())
    throw Error("gguf: tensor " + tensors_[current_].name + " has " + std::to_string(written_in_current_) + " of its " +
                std::to_string(tensors_[current_].nbytes) + " bytes written");
  finished_ = true;
  const bool ok = std::fflush(f_) == 0;
  const bool closed = std::fclose(f_) == 0;
  f_ = nullptr;
  if (!ok || !closed) {
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
    throw Error(tmp_.string() + ": write failed: " + std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp_, file_, ec);
  if (ec) throw Error(file_.string() + ": cannot rename the finished file into place: " + ec.message());
}

}  // namespace moemesh::gguf
