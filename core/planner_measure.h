// `moemesh plan profile`'s measurements through the real code paths: the reference Engine
// (core/engine.h) on the compute backend, with its routed experts timed apart by a wrapping
// ExpertExecutor, so the attention side and the expert MLPs get costs of their own.
#pragma once
#include <filesystem>
#include <vector>

#include "core/planner_cost.h"

namespace moemesh::planner {

struct EngineSample {
  double rows = 0, ctx = 0;   // a step's rows and attended positions
  double seconds = 0;         // the step's wall time without its expert calls
  double expert_seconds = 0;  // its expert calls
};
struct ExpertSample {
  double active = 0, rows = 0, seconds = 0;  // one layer's call
};

struct EngineMeasurements {
  std::vector<EngineSample> steps;
  std::vector<ExpertSample> experts;
};

// Runs decode steps at each batch size and context, and prefills, `repeats` times each.
EngineMeasurements measure_engine(const std::filesystem::path& model, const std::vector<int64_t>& batches,
                                  const std::vector<int64_t>& contexts, int repeats);

// Fits the attention-side and expert costs of `p` (its model's layer counts) to the measurements.
void fit_engine_costs(const EngineMeasurements& m, CostProfile& p);

}  // namespace moemesh::planner
