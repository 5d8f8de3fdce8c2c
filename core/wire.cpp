#include "core/wire.h"

#include <cstring>

namespace moemesh::wire {
namespace {

// Fixed prefix: magic u32, version u16, kind u16, request_id u64, trace_id[16],
// n_tensors u16, reserved u16, meta_len u32. Then per tensor: dtype u8, ndim u8,
// reserved u16, dims i64[ndim]. Then meta_len bytes.
constexpr size_t kPrefixBytes = 4 + 2 + 2 + 8 + 16 + 2 + 2 + 4;

class Writer {
 public:
  template <class T>
  void put(T v) {  // the host is little-endian (x86-64, aarch64): memcpy is the LE encoding
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    out.insert(out.end(), b, b + sizeof(T));
  }
  void bytes(const void* p, size_t n) {
    auto* c = static_cast<const uint8_t*>(p);
    out.insert(out.end(), c, c + n);
  }
  std::vector<uint8_t> out;
};

class Reader {
 public:
  explicit Reader(Frame f) : f_(f) {}
  template <class T>
  T get(const char* field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, f_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  const uint8_t* take(size_t n, const char* field) {
    need(n, field);
    const uint8_t* p = f_.data() + pos_;
    pos_ += n;
    return p;
  }
  size_t left() const { return f_.size() - pos_; }

 private:
  void need(size_t n, const char* field) {
    if (left() < n)
      throw WireError(ErrorCode::Truncated, std::string("header frame truncated at ") + field + " (" +
                                                std::to_string(f_.size()) + " bytes)");
  }
  Frame f_;
  size_t pos_ = 0;
};

bool known_kind(uint16_t k) { return k >= 1 && k <= 8; }

}  // namespace

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::StepRequest: return "StepRequest";
    case Kind::StepResponse: return "StepResponse";
    case Kind::DispatchRequest: return "DispatchRequest";
    case Kind::DispatchResponse: return "DispatchResponse";
    case Kind::KvPut: return "KvPut";
    case Kind::KvGet: return "KvGet";
    case Kind::KvGetReply: return "KvGetReply";
    case Kind::Error: return "Error";
  }
  return "unknown";
}

const char* error_code_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::Truncated: return "truncated";
    case ErrorCode::BadMagic: return "bad_magic";
    case ErrorCode::BadVersion: return "bad_version";
    case ErrorCode::BadKind: return "bad_kind";
    case ErrorCode::BadFrameCount: return "bad_frame_count";
    case ErrorCode::BadTensor: return "bad_tensor";
    case ErrorCode::Oversized: return "oversized";
    case ErrorCode::BadMeta: return "bad_meta";
  }
  return "unknown";
}

uint64_t TensorDesc::nbytes() const {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) n *= uint64_t(d);
  return n;
}

std::vector<uint8_t> encode_header(const Header& h) {
  if (h.tensors.size() > kMaxTensors) throw WireError(ErrorCode::Oversized, "too many tensors");
  if (h.meta.size() > kMaxMetaBytes) throw WireError(ErrorCode::Oversized, "metadata too large");
  Writer w;
  w.put(kMagic);
  w.put(kVersion);
  w.put(uint16_t(h.kind));
  w.put(h.request_id);
  w.bytes(h.trace_id, sizeof h.trace_id);
  w.put(uint16_t(h.tensors.size()));
  w.put(uint16_t(0));
  w.put(uint32_t(h.meta.size()));
  for (const TensorDesc& t : h.tensors) {
    if (t.shape.size() > kMaxDims) throw WireError(ErrorCode::BadTensor, "tensor rank over 4");
    w.put(uint8_t(t.dtype));
    w.put(uint8_t(t.shape.size()));
    w.put(uint16_t(0));
    for (int64_t d : t.shape) w.put(d);
  }
  w.bytes(h.meta.data(), h.meta.size());
  return std::move(w.out);
}

Header decode_header(Frame frame0) {
  if (frame0.size() < kPrefixBytes)
    throw WireError(ErrorCode::Truncated, "header frame of " + std::to_string(frame0.size()) +
                                              " bytes, shorter than the " + std::to_string(kPrefixBytes) +
                                              "-byte prefix");
  Reader r(frame0);
  if (r.get<uint32_t>("magic") != kMagic) throw WireError(ErrorCode::BadMagic, "bad magic: not a moemesh frame");
  uint16_t version = r.get<uint16_t>("version");
  if (version != kVersion)
    throw WireError(ErrorCode::BadVersion, "unsupported wire version " + std::to_string(version) +
                                               " (this build speaks " + std::to_string(kVersion) + ")");
  uint16_t kind = r.get<uint16_t>("kind");
  if (!known_kind(kind)) throw WireError(ErrorCode::BadKind, "unknown message kind " + std::to_string(kind));
  Header h;
  h.kind = Kind(kind);
  h.request_id = r.get<uint64_t>("request_id");
  std::memcpy(h.trace_id, r.take(16, "trace_id"), 16);
  uint16_t n = r.get<uint16_t>("n_tensors");
  r.get<uint16_t>("reserved");
  uint32_t meta_len = r.get<uint32_t>("meta_len");
  if (n > kMaxTensors) throw WireError(ErrorCode::Oversized, std::to_string(n) + " tensors, limit 64");
  if (meta_len > kMaxMetaBytes)
    throw WireError(ErrorCode::Oversized, "metadata of " + std::to_string(meta_len) + " bytes, limit 1 MiB");
  h.tensors.resize(n);
  for (uint16_t i = 0; i < n; ++i) {
    TensorDesc& t = h.tensors[i];
    uint8_t dt = r.get<uint8_t>("tensor dtype");
    if (dt > uint8_t(DType::I64))
      throw WireError(ErrorCode::BadTensor, "tensor " + std::to_string(i) + ": unknown dtype " + std::to_string(dt));
    t.dtype = DType(dt);
    uint8_t ndim = r.get<uint8_t>("tensor rank");
    r.get<uint16_t>("reserved");
    if (ndim > kMaxDims)
      throw WireError(ErrorCode::BadTensor, "tensor " + std::to_string(i) + ": rank " + std::to_string(ndim) + " over 4");
    uint64_t bytes = dtype_size(t.dtype);
    for (uint8_t d = 0; d < ndim; ++d) {
      int64_t dim = r.get<int64_t>("tensor dims");
      if (dim < 0) throw WireError(ErrorCode::BadTensor, "tensor " + std::to_string(i) + ": negative dimension");
      if (dim != 0 && bytes > kMaxTensorBytes / uint64_t(dim))
        throw WireError(ErrorCode::Oversized, "tensor " + std::to_string(i) + ": over the 4 GiB frame limit");
      bytes *= uint64_t(dim);
      t.shape.push_back(dim);
    }
  }
  if (r.left() != meta_len)
    throw WireError(r.left() < meta_len ? ErrorCode::Truncated : ErrorCode::BadMeta,
                    "metadata is " + std::to_string(r.left()) + " bytes, header says " + std::to_string(meta_len));
  const uint8_t* m = r.take(meta_len, "metadata");
  h.meta.assign(reinterpret_cast<const char*>(m), meta_len);
  return h;
}

Header decode(std::span<const Frame> frames) {
  if (frames.empty()) throw WireError(ErrorCode::BadFrameCount, "empty message");
  Header h = decode_header(frames[0]);
  if (frames.size() != h.tensors.size() + 1)
    throw WireError(ErrorCode::BadFrameCount, std::string(kind_name(h.kind)) + " declares " +
                                                  std::to_string(h.tensors.size()) + " tensors but carries " +
                                                  std::to_string(frames.size() - 1) + " tensor frames");
  for (size_t i = 0; i < h.tensors.size(); ++i)
    if (frames[i + 1].size() != h.tensors[i].nbytes())
      throw WireError(frames[i + 1].size() < h.tensors[i].nbytes() ? ErrorCode::Truncated : ErrorCode::BadTensor,
                      "tensor " + std::to_string(i) + " frame has " + std::to_string(frames[i + 1].size()) +
                          " bytes, its shape needs " + std::to_string(h.tensors[i].nbytes()));
  return h;
}

}  // namespace moemesh::wire
