#include "actors/step_phases.h"

#include <algorithm>

namespace moemesh::actors {

using Clock = std::chrono::steady_clock;

void ExpertWaitLog::record(Clock::time_point begin, Clock::time_point end) {
  std::lock_guard<std::mutex> lk(mu_);
  waits_.push_back({std::this_thread::get_id(), begin, end});
}

std::vector<ExpertWait> ExpertWaitLog::take() {
  std::lock_guard<std::mutex> lk(mu_);
  return std::exchange(waits_, {});
}

double blocked_seconds(const StepLanes& lanes, std::span<const ExpertWait> waits) {
  if (lanes.lanes.empty() || lanes.end <= lanes.start) return 0;
  // Until the last lane ends (the engine's own work after that is not waiting on anyone).
  Clock::time_point last = lanes.start;
  for (const auto& lane : lanes.lanes) last = std::max(last, std::min(lane.second, lanes.end));
  // The union of the lanes' computing intervals; blocked is the rest of [start, last].
  std::vector<std::pair<Clock::time_point, Clock::time_point>> computing;
  for (const auto& [thread, lane_end] : lanes.lanes) {
    std::vector<std::pair<Clock::time_point, Clock::time_point>> own;
    for (const ExpertWait& w : waits)
      if (w.thread == thread) own.emplace_back(w.begin, w.end);
    std::sort(own.begin(), own.end());
    const Clock::time_point stop = std::min(lane_end, lanes.end);
    Clock::time_point t = lanes.start;
    for (const auto& [a, b] : own) {
      if (a > t && t < stop) computing.emplace_back(t, std::min(a, stop));
      t = std::max(t, b);
    }
    if (t < stop) computing.emplace_back(t, stop);
  }
  std::sort(computing.begin(), computing.end());
  Clock::duration busy{0};
  Clock::time_point covered = lanes.start;
  for (const auto& [a, b] : computing) {
    const auto from = std::max(a, covered);
    if (b > from) busy += b - from, covered = b;
  }
  return std::max(0.0, std::chrono::duration<double>(last - lanes.start - busy).count());
}

StepPhaseTimer::~StepPhaseTimer() {
  const double wall = std::chrono::duration<double>(Clock::now() - t0_).count();
  phases_.attention = std::max(0.0, wall - phases_.expert_wait - phases_.sampling - phases_.prefix_lookup);
}

}  // namespace moemesh::actors
