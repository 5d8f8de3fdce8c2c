// W3C Trace Context (https://www.w3.org/TR/trace-context/) for requests, and span log lines.
//
// The router takes the `traceparent` header of an HTTP request (or starts a new trace when it is
// absent or malformed), answers with its own `traceparent` (same trace id, the router's span id),
// and logs each span as ONE JSON line on stderr, so a slow request can be found by trace id in
// every process's log:
//   {"span":"completion","service":"router","trace_id":"4bf9...","span_id":"00f0...",
//    "parent_span_id":"a2fb...","start_unix_s":1732803000.123456,"duration_s":0.042,"peer":"...", ...}
#pragma once
#include <array>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/trace_ref.h"

namespace moemesh::actors::trace {

struct Context {
  std::array<uint8_t, 16> trace_id{};  // never all zero once made
  uint64_t span_id = 0;                // this hop's span
  uint64_t parent_span_id = 0;         // the caller's span; 0 at the root
  uint8_t flags = 1;                   // bit 0: sampled

  // Spans of an unsampled trace are not logged, and the hops after the router carry no trace for
  // it: the caller (or the router's --trace-sample-ratio) chose not to record it.
  bool sampled() const { return flags & 1; }
};

// "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>"; nullopt when malformed or when an id
// is all zeros (the spec's invalid values). The result has a fresh span_id.
std::optional<Context> parse_traceparent(std::string_view header);
// A new root trace, sampled with probability `sample_ratio` (0-1).
Context new_trace(double sample_ratio = 1.0);
// From the header when valid (its sampled flag kept: the caller's decision), else a new root
// sampled with probability `sample_ratio`.
Context from_header(std::string_view header, double sample_ratio = 1.0);
// The header that names this span as the parent of the next hop.
std::string traceparent(const Context& c);
std::string hex(const uint8_t* bytes, size_t n);

// What this span tells the next hop: the trace and this span's id (the next span's parent).
TraceRef ref_of(const Context& c);
// A span of this process under `parent`: same trace, a fresh span id.
Context child_of(const TraceRef& parent);
// A ZeroMQ routing id as a span's peer: the sender's instance name, or hex when ZeroMQ made it up.
std::string peer_name(std::string_view routing_id);
// {"trace_id": ..., "span_id": ...}: a span's link to another trace it served (batched work).
nlohmann::json link(const TraceRef& r);

// Logs one span line: the context's ids, start, duration, service, plus `attrs` (an object).
// Nothing when the context is not sampled.
void log_span(const std::string& service, const std::string& name, const Context& c,
              std::chrono::system_clock::time_point start, std::chrono::steady_clock::duration duration,
              nlohmann::json attrs = nlohmann::json::object());

// A span being timed: it starts when made and is logged (one line) by finish().
struct OpenSpan {
  explicit OpenSpan(Context c)
      : ctx(c), start(std::chrono::system_clock::now()), t0(std::chrono::steady_clock::now()) {}
  void finish(const std::string& service, const std::string& name,
              nlohmann::json attrs = nlohmann::json::object()) const {
    log_span(service, name, ctx, start, std::chrono::steady_clock::now() - t0, std::move(attrs));
  }

  Context ctx;
  std::chrono::system_clock::time_point start;
  std::chrono::steady_clock::time_point t0;
};

}  // namespace moemesh::actors::trace
