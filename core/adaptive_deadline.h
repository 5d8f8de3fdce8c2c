// A deadline that follows the measured latency: a multiple of the p99 of the most recent round
// trips, bounded by [min, max]. With fewer than `min_samples` measurements it is `max` (nothing
// is known yet). Thread-safe.
//
// The expert dispatch uses it (actors/remote_experts): a host that stops answering without its
// connection breaking (a stall, a lost message) is given up after a few times the usual round
// trip instead of a fixed 10 s; a broken connection is detected sooner still, from the transport.
#pragma once
#include <chrono>
#include <cstddef>
#include <mutex>
#include <vector>

namespace moemesh {

struct AdaptiveDeadlineOptions {
  std::chrono::milliseconds min{250};
  std::chrono::milliseconds max{10000};
  double multiple = 8.0;    // deadline = multiple x p99
  size_t window = 256;      // round trips remembered
  size_t min_samples = 16;  // before this many, the deadline is `max`
};

class AdaptiveDeadline {
 public:
  // Throws moemesh::Error on bounds that make no sense (min > max, multiple < 1, empty window).
  explicit AdaptiveDeadline(AdaptiveDeadlineOptions opts = {});

  void observe(std::chrono::nanoseconds round_trip);
  std::chrono::milliseconds current() const;
  // The p99 of the window (0 when empty).
  std::chrono::nanoseconds p99() const;
  const AdaptiveDeadlineOptions& options() const { return opts_; }

 private:
  AdaptiveDeadlineOptions opts_;
  mutable std::mutex mu_;
  std::vector<std::chrono::nanoseconds> ring_;
  size_t next_ = 0;
};

}  // namespace moemesh
