// DispatchRequest / DispatchResponse / Error messages between attention workers and expert
// hosts, on top of core/wire (header frame + raw tensor frames). Used by both sides.
//
//   request   kind DispatchRequest, meta pb::DispatchRequest{layer, groups[{expert, rows}]},
//             one tensor: rows [total, hidden] f32, grouped in the order of `groups`
//   response  kind DispatchResponse, same request_id, meta pb::DispatchResponse{layer},
//             one tensor: outputs [total, hidden] f32 in the same order
//   error     kind Error, same request_id (0 when the header was unreadable),
//             meta pb::ErrorReply{code, message}, no tensor
//
// Decoding validates the whole message (wire checks, kind, metadata, tensor shape against the
// groups) and throws DecodeError carrying a bounded `code` for error replies and counters.
// Whether the receiver can serve the layer, the experts or the hidden size is its own check.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "core/lora_ref.h"
#include "core/trace_ref.h"
#include "core/wire.h"

namespace moemesh::dispatch {

struct Group {
  int32_t expert = 0;
  int32_t rows = 0;
  // Per row: 1 + its adapter's index in the request's adapters, 0 for none; empty: all none.
  std::vector<int32_t> adapter{};
};

// An outbound message: the header frame and one payload per tensor frame (moved, not copied,
// into zero-copy frames by the sender).
struct Message {
  std::vector<uint8_t> header;
  std::vector<std::vector<float>> tensors;
};

// Error codes of our own, beside wire::error_code_name()'s (all bounded, used as labels).
inline constexpr std::string_view kBadRequest = "bad_request";        // well-formed, not a dispatch
inline constexpr std::string_view kBadLayer = "bad_layer";            // layer this host does not serve
inline constexpr std::string_view kUnknownExpert = "unknown_expert";  // expert this host does not hold
inline constexpr std::string_view kBadHidden = "bad_hidden";          // hidden size of another model
inline constexpr std::string_view kInternal = "internal";             // the host failed computing
inline constexpr std::string_view kNotReady = "not_ready";            // the host is still loading its experts

class DecodeError : public Error {
 public:
  DecodeError(uint64_t request_id, std::string code, const std::string& what)
      : Error(what), request_id_(request_id), code_(std::move(code)) {}
  uint64_t request_id() const { return request_id_; }  // 0 when the header was unreadable
  const std::string& code() const { return code_; }

 private:
  uint64_t request_id_;
  std::string code_;
};

// A request names at most this many traces (of the sequences whose rows it carries).
inline constexpr size_t kMaxTraces = 8;

// rows: [sum(groups.rows), hidden] f32, grouped in the order of `groups`. traces: at most
// kMaxTraces (more is an error).
// adapters: the LoRA adapters the groups' rows name.
Message encode_request(uint64_t request_id, int32_t layer, std::span<const Group> groups, int64_t hidden,
                       std::vector<float> rows, uint64_t placement_version = 0, std::span<const TraceRef> traces = {},
                       std::span<const LoraRef> adapters = {});
// outputs: [total, hidden] f32.
Message encode_response(uint64_t request_id, int32_t layer, int64_t hidden, std::vector<float> outputs);
Message encode_error(uint64_t request_id, std::string_view code, std::string_view message);

// Views into the caller's frames, which must outlive them. Tensor bytes may be unaligned in a
// received frame: read them with copy_floats, never through a float*.
struct Request {
  uint64_t request_id = 0;
  int32_t layer = 0;
  uint64_t placement_version = 0;
  std::vector<Group> groups;
  int64_t total_rows = 0;
  int64_t hidden = 0;
  wire::Frame rows;              // [total_rows, hidden] f32 (Payload::InFrames)
  std::vector<TraceRef> traces;  // the valid ones of the first kMaxTraces sent (tracing never fails a request)
  std::vector<LoraRef> adapters;  // what the groups' adapter indexes name
};

struct Reply {
  uint64_t request_id = 0;
  bool ok = false;  // a DispatchResponse; otherwise an Error reply
  int32_t layer = 0;
  int64_t rows = 0;
  int64_t hidden = 0;
  wire::Frame outputs;                    // [rows, hidden] f32 when ok (Payload::InFrames)
  std::string error_code, error_message;  // when !ok
};

// Where a message's tensor payloads travel (actors/transport.h): as ZeroMQ frames after the
// header, checked here against its descriptors, or outside ZeroMQ (NCCL), when the header must
// come alone and the caller receives the tensor through its transport (rows/outputs stay empty).
enum class Payload { InFrames, Elsewhere };

// frames: header, then tensor frames (a ROUTER's identity frame already stripped).
Request decode_request(std::span<const wire::Frame> frames, Payload payload = Payload::InFrames);
Reply decode_reply(std::span<const wire::Frame> frames, Payload payload = Payload::InFrames);

// Copies `count` floats starting at float index `first` of a tensor frame into dst.
void copy_floats(wire::Frame frame, size_t first, size_t count, float* dst);

}  // namespace moemesh::dispatch
