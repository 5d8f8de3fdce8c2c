// The price of one prompt position, learnt from steps of mostly prompt positions: an attention
// worker's KV store wait budget allows that much per position it asked for
// (actors/step_worker.cpp), and the planner's simulated worker learns it the same way
// (core/planner_sim.cpp).
#pragma once

#include <cstdint>

#include "core/kv_cache.h"

namespace moemesh {

class PrefillSpeed {
 public:
  // A step of `rows` positions, `prompt` of them prompt positions, computed in `seconds`.
  void add(int64_t rows, int64_t prompt, double seconds) {
    // Mostly prompt positions, at least a block's worth: decode rows cost more each (the step's
    // fixed costs over few rows) and would overprice the budget.
    if (rows <= 0 || prompt < KvCache::kBlockSize || 2 * prompt < rows) return;
    const double sample = seconds / double(rows);
    per_position_s_ = per_position_s_ > 0 ? 0.8 * per_position_s_ + 0.2 * sample : sample;
  }
  // 0 until such a step was seen.
  double per_position_s() const { return per_position_s_; }

 private:
  double per_position_s_ = 0;
};

}  // namespace moemesh
