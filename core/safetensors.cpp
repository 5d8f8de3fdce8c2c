#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moemesh::safetensors {

namespace fs = std::filesystem;
using nlohmann::json;

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

namespace {

// Element count with overflow detection (a hostile header must not wrap around).
bool checked_numel(const std::vector<int64_t>& shape, uint64_t& out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && n > UINT64_MAX / uint64_t(d)) return false;
    n *= uint64_t(d);
  }
  out = n;
  return true;
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

void pread_all(int fd, void* buf, size_t n, uint64_t off, const std::string& fname) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, off_t(off));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw Error(fname + ": read failed: " + (r < 0 ? std::strerror(errno) : "unexpected end of file"));
    p += r;
    n -= size_t(r);
    off += uint64_t(r);
  }
}

}  // namespace

const Entry* Header::find(const std::string& name) const {
  for (const Entry& e : tensors)
    if (e.name == name) return &e;
  return nullptr;
}

Header read_header(const fs::path& file) {
  const std::string fname = file.filename().string();
  Fd f;
  f.fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) throw Error(fname + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw Error(fname + ": cannot stat: " + std::strerror(errno));
  Header h;
  h.file = file;
  h.file_size = uint64_t(st.st_size);
  if (h.file_size < 8) throw Error(fname + ": not a safetensors file (only " + std::to_string(h.file_size) + " bytes)");

  unsigned char lenbuf[8];
  pread_all(f.fd, lenbuf, 8, 0, fname);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | lenbuf[i];  // little-endian
  if (n < 2 || n > kMaxHeaderBytes || n > h.file_size - 8)
    throw Error(fname + ": bad header length " + std::to_string(n) + " (file is " + std::to_string(h.file_size) +
                " bytes); not a safetensors file or corrupt");
  h.data_offset = 8 + n;

  std::string text(n, '\0');
  pread_all(f.fd, text.data(), n, 8, fname);
  if (text[0] != '{') throw Error(fname + ": header is not a JSON object; not a safetensors file or corrupt");
  json j;
  try {
    j = json::parse(text);  // trailing spaces (alignment padding) are fine
  } catch (const json::exception& e) {
    throw Error(fname + ": header is not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!j.is_object()) throw Error(fname + ": header is not a JSON object");

  const uint64_t data_size = h.file_size - h.data_offset;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw Error(fname + ": __metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw Error(fname + ": __metadata__." + m.key() + " must be a string");
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = fname + ": tensor " + name;
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      throw Error(where + ": entry needs dtype, shape and data_offsets");
    Entry e;
    e.name = name;
    const json& dt = v.at("dtype");
    if (!dt.is_string()) throw Error(where + ": dtype must be a string");
    try {
      e.dtype = parse_dtype(dt.get<std::string>());
    } catch (const Error&) {
      throw Error(where + ": unknown dtype \"" + dt.get<std::string>() + "\"");
    }
    const json& sh = v.at("shape");
    if (!sh.is_array()) throw Error(where + ": shape must be a list of integers");
    for (const json& d : sh) {
      if (!d.is_number_unsigned()) throw Error(where + ": shape must be a list of non-negative integers");
      e.shape.push_back(d.get<int64_t>());
    }
    const json& off = v.at("data_offsets");
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw Error(where + ": data_offsets must be [begin, end]");
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    if (e.end < e.begin) throw Error(where + ": data_offsets end before they begin");
    uint64_t numel = 0;
    if (!checked_numel(e.shape, numel) || numel > UINT64_MAX / dtype_size(e.dtype))
      throw Error(where + ": shape " + shape_str(e.shape) + " is too large");
    if (numel * dtype_size(e.dtype) != e.nbytes())
      throw Error(where + ": shape " + shape_str(e.shape) + " of " + std::string(dtype_name(e.dtype)) + " needs " +
                  std::to_string(numel * dtype_size(e.dtype)) + " bytes but data_offsets span " +
                  std::to_string(e.nbytes()));
    if (e.end > data_size)
      throw Error(where + ": data [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                  ") lies beyond the end of the file (data section is " + std::to_string(data_size) +
                  " bytes); the file is truncated or corrupt");
    h.tensors.push_back(std::move(e));
  }

  std::sort(h.tensors.begin(), h.tensors.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  for (size_t i = 1; i < h.tensors.size(); ++i) {
    const Entry& a = h.tensors[i - 1];
    const Entry& b = h.tensors[i];
    if (b.begin < a.end)
      throw Error(fname + ": tensor " + b.name + " overlaps tensor " + a.name + " (data_offsets [" +
                  std::to_string(b.begin) + ", " + std::to_string(b.end) + ") and [" + std::to_string(a.begin) + ", " +
                  std::to_string(a.end) + "))");
  }
  return h;
}

std::vector<float> read_f32(const Header& h, const Entry& e) {
  const std::string fname = h.file.filename().string();
  if (e.dtype != DType::F32 && e.dtype != DType::F16 && e.dtype != DType::BF16)
    throw Error(fname + ": tensor " + e.name + " is " + std::string(dtype_name(e.dtype)) +
                ", expected F32, F16 or BF16");
  Fd f;
  f.fd = ::open(h.file.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) throw Error(fname + ": cannot open: " + std::strerror(errno));
  std::vector<char> raw(e.nbytes());
  pread_all(f.fd, raw.data(), raw.size(), h.data_offset + e.begin, fname);
  std::vector<float> out(raw.size() / dtype_size(e.dtype));
  to_f32(e.dtype, raw.data(), out.data(), out.size());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing

uint64_t TensorSpec::nbytes() const {
  uint64_t n = 0;
  if (!checked_numel(shape, n)) throw Error("tensor " + name + ": bad shape " + shape_str(shape));
  return n * dtype_size(dtype);
}

Writer::Writer(const fs::path& file, std::vector<TensorSpec> specs, std::map<std::string, std::string> metadata)
    : file_(file), tmp_(file.string() + ".tmp"), specs_(std::move(specs)) {
  std::sort(specs_.begin(), specs_.end(), [](const TensorSpec& a, const TensorSpec& b) { return a.name < b.name; });
  for (size_t i = 1; i < specs_.size(); ++i)
    if (specs_[i].name == specs_[i - 1].name)
      throw Error(file_.filename().string() + ": duplicate tensor " + specs_[i].name);

  // Same layout as the reference writer: __metadata__ first, tensors in data order, compact
  // JSON padded with spaces to a multiple of 8 so the data section is aligned.
  nlohmann::ordered_json hj = nlohmann::ordered_json::object();
  if (!metadata.empty()) hj["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const TensorSpec& s : specs_) {
    uint64_t nb = s.nbytes();
    hj[s.name] = {{"dtype", std::string(dtype_name(s.dtype))}, {"shape", s.shape}, {"data_offsets", {off, off + nb}}};
    off += nb;
  }
  std::string text = hj.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  f_ = std::fopen(tmp_.c_str(), "wb");
  if (!f_) throw Error(tmp_.string() + ": cannot create: " + std::strerror(errno));
  std::setvbuf(f_, nullptr, _IOFBF, 1 << 20);
  unsigned char len[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  if (std::fwrite(len, 1, 8, f_) != 8 || std::fwrite(text.data(), 1, text.size(), f_) != text.size())
    throw Error(tmp_.string() + ": write failed: " + std::strerror(errno));
}

Writer::~Writer() {
  if (f_) {  // not finished: drop the partial file
    std::fclose(f_);
    std::error_code ec;
    fs::remove(tmp_, ec);
  }
}

void Writer::write(const void* data, size_t nbytes) {
  const char* p = static_cast<const char*>(data);
  while (nbytes > 0) {
    if (current_ >= specs_.size()) throw Error(file_.filename().string() + ": more data written than the tensors hold");
    uint64_t room = specs_[current_].nbytes() - written_in_current_;
    size_t take = size_t(std::min<uint64_t>(room, nbytes));
    if (take && std::fwrite(p, 1, take, f_) != take)
      throw Error(tmp_.string() + ": write failed: " + std::strerror(errno));
    p += take;
    nbytes -= take;
    written_in_current_ += take;
    // Advance past this tensor (and any zero-sized ones after it).
    while (current_ < specs_.size() && written_in_current_ == specs_[current_].nbytes()) {
      ++current_;
      written_in_current_ = 0;
    }
  }
}

void Writer::write_f32(const float* data, size_t n) {
  if (current_ >= specs_.size()) throw Error(file_.filename().string() + ": more data written than the tensors hold");
  DType t = specs_[current_].dtype;
  if (t != DType::F32 && t != DType::F16 && t != DType::BF16)
    throw Error(file_.filename().string() + ": tensor " + specs_[current_].name + " is not a float tensor");
  if (t == DType::F32) return write(data, n * 4);
  conv_.resize(n * dtype_size(t));
  from_f32(t, data, conv_.data(), n);
  write(conv_.data(), conv_.size());
}

void Writer::finish() {
  while (current_ < specs_.size() && specs_[current_].nbytes() == 0) ++current_;
  if (current_ < specs_.size())
    throw Error(file_.filename().string() + ": tensor " + specs_[current_].name + " was not fully written");
  if (std::fflush(f_) != 0 || std::fclose(f_) != 0) {
    f_ = nullptr;
    throw Error(tmp_.string() + ": write failed: " + std::strerror(errno));
  }
  f_ = nullptr;
  fs::rename(tmp_, file_);
}

void write_file(const fs::path& file, const std::vector<TensorSpec>& specs,
                const std::vector<std::vector<char>>& data) {
  if (specs.size() != data.size()) throw Error("write_file: specs and data differ in length");
  Writer w(file, specs);
  for (const TensorSpec& s : w.order()) {
    size_t i = size_t(std::find_if(specs.begin(), specs.end(), [&](const TensorSpec& x) { return x.name == s.name; }) -
                      specs.begin());
    if (data[i].size() != s.nbytes()) throw Error("write_file: tensor " + s.name + " has the wrong number of bytes");
    w.write(data[i].data(), data[i].size());
  }
  w.finish();
}

std::vector<std::vector<TensorSpec>> plan_shards(const std::vector<TensorSpec>& specs, uint64_t max_shard_bytes) {
  std::vector<std::vector<TensorSpec>> shards;
  std::vector<TensorSpec> cur;
  uint64_t cur_bytes = 0;
  for (const TensorSpec& s : specs) {
    uint64_t nb = s.nbytes();
    if (nb > max_shard_bytes) {
      shards.push_back({s});
      continue;
    }
    if (cur_bytes + nb > max_shard_bytes) {
      shards.push_back(std::move(cur));
      cur.clear();
      cur_bytes = 0;
    }
    cur.push_back(s);
    cur_bytes += nb;
  }
  if (!cur.empty() || shards.empty()) shards.push_back(std::move(cur));
  return shards;
}

std::string shard_file_name(size_t index, size_t count) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return buf;
}

void write_index(const fs::path& dir, const std::vector<std::vector<TensorSpec>>& shards) {
  json weight_map = json::object();
  uint64_t total = 0;
  for (size_t i = 0; i < shards.size(); ++i)
    for (const TensorSpec& s : shards[i]) {
      weight_map[s.name] = shard_file_name(i, shards.size());
      total += s.nbytes();
    }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  fs::path p = dir / kIndexFile;
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << index.dump(2) << "\n";
  if (!out) throw Error(p.string() + ": write failed");
}

}  // namespace moemesh::safetensors
