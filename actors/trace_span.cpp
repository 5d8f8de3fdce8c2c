#include "actors/trace_span.h"

#include <cstdio>
#include <mutex>
#include <random>


namespace moemesh::actors::trace {
namespace {

uint64_t random_u64() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  uint64_t v = 0;
  while (v == 0) v = rng();  // zero ids are invalid
  return v;
}

int nibble(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;  // the spec allows lowercase hex only
}

bool unhex(std::string_view s, uint8_t* out) {
  for (size_t i = 0; i < s.size() / 2; ++i) {
    const int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = uint8_t(hi << 4 | lo);
  }
  return true;
}

std::string hex64(uint64_t v) {
  uint8_t b[8];
  for (int i = 0; i < 8; ++i) b[i] = uint8_t(v >> (56 - 8 * i));
  return hex(b, 8);
}

}  // namespace

std::string hex(const uint8_t* bytes, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s(2 * n, '0');
  for (size_t i = 0; i < n; ++i) s[2 * i] = digits[bytes[i] >> 4], s[2 * i + 1] = digits[bytes[i] & 15];
  return s;
}

std::optional<Context> parse_traceparent(std::string_view h) {
  // version(2) - trace id(32) - parent id(16) - flags(2); future versions may append fields.
  if (h.size() < 55 || h[2] != '-' || h[35] != '-' || h[52] != '-' || (h.size() > 55 && h[55] != '-')) return std::nullopt;
  uint8_t version = 0, parent[8], flags = 0;
  Context c;
  if (!unhex(h.substr(0, 2), &version) || version == 0xff || (version == 0 && h.size() != 55)) return std::nullopt;
  if (!unhex(h.substr(3, 32), c.trace_id.data()) || !unhex(h.substr(36, 16), parent) || !unhex(h.substr(53, 2), &flags))
    return std::nullopt;
  bool zero_trace = true;
  for (uint8_t b : c.trace_id) zero_trace &= b == 0;
  for (uint8_t b : parent) c.parent_span_id = c.parent_span_id << 8 | b;
  if (zero_trace || c.parent_span_id == 0) return std::nullopt;
  c.flags = flags;
  c.span_id = random_u64();
  return c;
}

Context new_trace(double sample_ratio) {
  Context c;
  // The top 53 bits as a uniform double in [0, 1): below the ratio, sampled (1 always, 0 never).
  c.flags = double(random_u64() >> 11) * 0x1.0p-53 < sample_ratio ? 1 : 0;
  const uint64_t hi = random_u64(), lo = random_u64();
  for (int i = 0; i < 8; ++i) c.trace_id[size_t(i)] = uint8_t(hi >> (56 - 8 * i)), c.trace_id[size_t(8 + i)] = uint8_t(lo >> (56 - 8 * i));
  c.span_id = random_u64();
  return c;
}

Context from_header(std::string_view header, double sample_ratio) {
  if (auto c = parse_traceparent(header)) return *c;
  return new_trace(sample_ratio);
}

std::string traceparent(const Context& c) {
  return "00-" + hex(c.trace_id.data(), c.trace_id.size()) + "-" + hex64(c.span_id) + "-" + hex(&c.flags, 1);
}

TraceRef ref_of(const Context& c) { return {c.trace_id, c.span_id}; }

Context child_of(const TraceRef& parent) {
  Context c;
  c.trace_id = parent.trace_id;
  c.parent_span_id = parent.span_id;
  c.span_id = random_u64();
  return c;
}

std::string peer_name(std::string_view id) {
  for (unsigned char c : id)
    if (c < 0x20 || c > 0x7e) return "0x" + hex(reinterpret_cast<const uint8_t*>(id.data()), id.size());
  return std::string(id);
}

nlohmann::json link(const TraceRef& r) {
  return {{"trace_id", hex(r.trace_id.data(), r.trace_id.size())}, {"span_id", hex64(r.span_id)}};
}

void log_span(const std::string& service, const std::string& name, const Context& c,
              std::chrono::system_clock::time_point start, std::chrono::steady_clock::duration duration,
              nlohmann::json attrs) {
  if (!c.sampled()) return;
  nlohmann::json j = {
      {"span", name},
      {"service", service},
      {"trace_id", hex(c.trace_id.data(), c.trace_id.size())},
      {"span_id", hex64(c.span_id)},
      {"start_unix_s", std::chrono::duration<double>(start.time_since_epoch()).count()},
      {"duration_s", std::chrono::duration<double>(duration).count()},
  };
  if (c.parent_span_id) j["parent_span_id"] = hex64(c.parent_span_id);
  for (auto& [k, v] : attrs.items()) j[k] = v;
  const std::string line = j.dump() + "\n";
  static std::mutex mu;  // one line, never interleaved with another span's
  std::lock_guard<std::mutex> lk(mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace moemesh::actors::trace
