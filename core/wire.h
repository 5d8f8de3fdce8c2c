// The data-plane wire format between services (StepRequest/Response, DispatchRequest/
// Response, KV block put/get). A message is a ZeroMQ multipart:
//
//   frame 0      header: fixed little-endian prefix, one descriptor per tensor, then the
//                kind-specific metadata (a serialized protobuf, see proto/dataplane.proto)
//   frame 1..n   raw tensor bytes, one frame per tensor, sent zero-copy
//
// Every field is checked before use (magic, version, kind, counts, dtypes, shapes, sizes,
// frame lengths); a bad message raises WireError, whose code the receiver puts in its error
// reply and its drop counter. Nothing here touches sockets.
#pragma once
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace moemesh::wire {

inline constexpr uint32_t kMagic = 0x48534d4d;  // "MMSH" read as little-endian bytes
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kMaxTensors = 64;
inline constexpr size_t kMaxDims = 4;
inline constexpr uint64_t kMaxTensorBytes = uint64_t(1) << 32;  // 4 GiB per tensor frame
inline constexpr uint32_t kMaxMetaBytes = 1u << 20;

enum class Kind : uint16_t {
  StepRequest = 1,
  StepResponse = 2,
  DispatchRequest = 3,
  DispatchResponse = 4,
  KvPut = 5,
  KvGet = 6,
  KvGetReply = 7,
  Error = 8,
};
const char* kind_name(Kind k);

enum class ErrorCode : uint16_t {
  Truncated = 1,      // a frame shorter than its declared content
  BadMagic = 2,
  BadVersion = 3,
  BadKind = 4,
  BadFrameCount = 5,  // tensor frames missing or extra
  BadTensor = 6,      // dtype, rank, shape or size invalid
  Oversized = 7,      // a declared size over the limits above
  BadMeta = 8,        // metadata that does not parse
};
const char* error_code_name(ErrorCode c);

class WireError : public std::runtime_error {
 public:
  WireError(ErrorCode code, const std::string& what) : std::runtime_error(what), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

struct TensorDesc {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

struct Header {
  Kind kind = Kind::Error;
  uint64_t request_id = 0;
  uint8_t trace_id[16] = {};  // W3C trace id; all zero when untraced
  std::string meta;           // kind-specific protobuf bytes
  std::vector<TensorDesc> tensors;
};

using Frame = std::span<const uint8_t>;

std::vector<uint8_t> encode_header(const Header& h);

// Parses frame 0 and checks that frames[1..] match the declared tensors exactly.
Header decode(std::span<const Frame> frames);
// Parses frame 0 alone (when the tensor frames are checked separately).
Header decode_header(Frame frame0);

}  // namespace moemesh::wire
