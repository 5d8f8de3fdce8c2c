#include "core/trace_ref.h"

#include <cstring>

#include "proto/dataplane.pb.h"

namespace moemesh {

void trace_to_proto(const TraceRef& r, pb::TraceRef* out) {
  out->set_trace_id(std::string(reinterpret_cast<const char*>(r.trace_id.data()), r.trace_id.size()));
  out->set_span_id(r.span_id);
}

std::optional<TraceRef> trace_from_proto(const pb::TraceRef& r) {
  TraceRef out;
  if (r.trace_id().size() != out.trace_id.size()) return std::nullopt;
  std::memcpy(out.trace_id.data(), r.trace_id().data(), out.trace_id.size());
  out.span_id = r.span_id();
  if (!out.valid()) return std::nullopt;
  return out;
}

}  // namespace moemesh
