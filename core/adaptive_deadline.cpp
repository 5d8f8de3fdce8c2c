#include "core/adaptive_deadline.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"

namespace moemesh {

AdaptiveDeadline::AdaptiveDeadline(AdaptiveDeadlineOptions opts) : opts_(opts) {
  if (opts_.min.count() < 1) throw Error("adaptive deadline: the minimum must be at least 1 ms");
  if (opts_.min > opts_.max)
    throw Error("adaptive deadline: the minimum (" + std::to_string(opts_.min.count()) + " ms) is above the maximum (" +
                std::to_string(opts_.max.count()) + " ms)");
  if (!(opts_.multiple >= 1.0)) throw Error("adaptive deadline: the p99 multiple must be at least 1");
  if (opts_.window == 0) throw Error("adaptive deadline: the window must hold at least one round trip");
  opts_.min_samples = std::min(opts_.min_samples, opts_.window);
  ring_.reserve(opts_.window);
}

void AdaptiveDeadline::observe(std::chrono::nanoseconds round_trip) {
  std::lock_guard<std::mutex> lk(mu_);
  if (ring_.size() < opts_.window) {
    ring_.push_back(round_trip);
  } else {
    ring_[next_] = round_trip;
    next_ = (next_ + 1) % opts_.window;
  }
}

std::chrono::nanoseconds AdaptiveDeadline::p99() const {
  std::vector<std::chrono::nanoseconds> v;
  {
    std::lock_guard<std::mutex> lk(mu_);
    v = ring_;
  }
  if (v.empty()) return {};
  // The nearest-rank p99: the smallest value with at least 99% of the samples at or below it.
  const size_t rank = std::max<size_t>(1, (v.size() * 99 + 99) / 100);
  std::nth_element(v.begin(), v.begin() + ptrdiff_t(rank - 1), v.end());
  return v[rank - 1];
}

std::chrono::milliseconds AdaptiveDeadline::current() const {
  size_t n;
  {
    std::lock_guard<std::mutex> lk(mu_);
    n = ring_.size();
  }
  if (n < opts_.min_samples) return opts_.max;
  const double ms = std::chrono::duration<double, std::milli>(p99()).count() * opts_.multiple;
  const auto d = std::chrono::milliseconds(int64_t(std::ceil(ms)));
  return std::clamp(d, opts_.min, opts_.max);
}

}  // namespace moemesh
