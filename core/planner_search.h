// The capacity planner's search: the cheapest deployment shape (attention workers, expert hosts,
// replicas, micro-batches, step token budget) whose simulated latencies meet a service-level
// objective under a given traffic, and the Helm values that deploy it.
#pragma once
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "core/planner_sim.h"

namespace moemesh::planner {

// Upper bounds on latency percentiles, seconds (infinity: no bound).
struct Slo {
  static constexpr double kNone = std::numeric_limits<double>::infinity();
  double ttft_p50 = kNone, ttft_p90 = kNone, ttft_p99 = kNone;
  double itl_p50 = kNone, itl_p90 = kNone, itl_p99 = kNone;
  double e2e_p99 = kNone;
  // "ttft_p99=2s,itl_p99=100ms" (units s or ms); throws moemesh::Error naming the bad part.
  static Slo parse(const std::string& spec);
  bool met_by(const SimResult& r) const;
  // How far the worst bound is from being met: max over bounds of measured / bound (<= 1 met).
  double worst_ratio(const SimResult& r) const;
  std::string describe() const;
};

struct SearchSpace {
  int max_attention = 16, max_experts = 16;
  std::vector<int> replicas = {1, 2};
  std::vector<int> micro_batches = {1, 2};
  std::vector<int64_t> step_budgets = {256, 512, 1024, 2048};
  Deployment base;  // everything else (transport, KV, max running, window)
  int max_evaluations = 2000;
};

struct Candidate {
  Deployment dep;
  int nodes = 1;
  double cost_per_hour = 0;
  SimResult result;
  bool meets = false;
};

struct SearchResult {
  std::optional<Candidate> best;
  int evaluated = 0;
  std::vector<Candidate> cheapest_failures;  // of the cost levels below the answer, their best try
};

// Walks shapes in order of cost (nodes x node cost, then fewer processes); at the first cost
// level where some shape meets the SLO, returns the one with the most headroom there.
SearchResult search(const CostProfile& profile, const TrafficSpec& traffic, const ExpertLoad& load, const Slo& slo,
                    const SearchSpace& space, const SimOptions& opts = {});

// The chart's values (helm/moemesh/values.yaml keys) for a shape; `model_path` goes to model.path.
std::string helm_values(const Candidate& c, const CostProfile& profile, const std::string& slo,
                        const std::string& traffic, const std::string& model_path);

}  // namespace moemesh::planner
