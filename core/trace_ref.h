// A W3C trace context as handed from one hop to the next: the trace and the sender's span,
// which is the parent of the span the receiver logs (actors/trace_span.h). All zero: untraced.
#pragma once
#include <array>
#include <cstdint>
#include <optional>

namespace moemesh {
namespace pb {
class TraceRef;
}

struct TraceRef {
  std::array<uint8_t, 16> trace_id{};
  uint64_t span_id = 0;

  bool valid() const {
    bool any = false;
    for (uint8_t b : trace_id) any |= b != 0;
    return any && span_id != 0;  // the spec's invalid values are all-zero ids
  }
  bool operator==(const TraceRef&) const = default;
};

// On the wire (proto/dataplane.proto TraceRef). trace_from_proto: nullopt when unset or
// malformed (a trace id of another length, zero ids): such a message is served, not traced.
void trace_to_proto(const TraceRef& r, pb::TraceRef* out);
std::optional<TraceRef> trace_from_proto(const pb::TraceRef& r);

}  // namespace moemesh
