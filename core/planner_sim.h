// The capacity planner's discrete-event simulator of the moemesh data path, at the level the
// system schedules it (docs/planner.md):
//   - requests arrive (core/planner_traffic.h) and wait in the router's token-fair queue
//     (core/fair_queue.h itself);
//   - the scheduler's rules (actors/scheduler.cpp): placement on the worker with the most free KV
//     blocks that can hold the context, at most max_running per worker, one step in flight per
//     worker, decode tokens first then prefill chunks under the step token budget, preemption of
//     the newest sequences when the next step's KV blocks do not fit;
//   - a step runs as one or two micro-batches (lanes); per layer each lane computes attention on
//     its worker, then dispatches its rows' top-k assignments to the expert hosts of the placement
//     (core/placement.h, replicas, skewed expert load) over the links of the profile, the expert
//     hosts batch what arrives for a layer (window, merge), compute, and answer;
//   - a step that starts sequences first waits for their prefix-cache lookup in the KV store (one
//     round trip); prefix-cache hits skip restored prompt positions.
// Compute resources (an attention worker, an expert host, or a whole node when its processes
// share its cores) serve operations first-come first-served in the gaps of their timeline.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/planner_cost.h"
#include "core/planner_traffic.h"

namespace moemesh::planner {

// The deployment's shape: what `moemesh up` flags and the Helm values set.
struct Deployment {
  int attention_workers = 1;
  int expert_hosts = 1;
  int replicas = 1;       // copies of every expert (<= expert_hosts)
  int micro_batches = 2;  // 1 or 2
  int64_t step_token_budget = 512;
  int64_t max_running_per_worker = 64;
  int64_t kv_tokens_per_worker = 0;       // 0: the profile's
  bool nccl = false;                      // expert dispatch payloads over NCCL (GPU pairs) or ZeroMQ
  int processes_per_node = 0;             // 0: the profile's gpus_per_node
  double expert_batch_window_s = 200e-6;  // moemesh-expert --batch-window-us
  int nodes(const CostProfile& p) const;
  std::string describe() const;
  void validate() const;  // throws moemesh::Error
};

// The share of routed (row, expert) assignments each expert receives (sums to 1).
struct ExpertLoad {
  std::vector<double> share;
  static ExpertLoad uniform(int64_t experts);
  // Zipf-like skew: expert i (in a fixed shuffled order) gets weight 1/(i+1)^s.
  static ExpertLoad zipf(int64_t experts, double s, uint64_t seed = 7);
  // A file of per-expert loads: a JSON array of numbers, or one number per line.
  static ExpertLoad load(const std::string& file, int64_t experts);
};

struct SimOptions {
  double sample_every_s = 1.0;  // queue-length timeline resolution
  // Layers simulated per event: 1 is exact per layer; the model's layer count runs a step's lanes
  // as one event each (for very large runs). 0: chosen from the run's size.
  int64_t layers_per_event = 0;
  double max_sim_s = 0;  // stop even with requests unfinished (0: 4x the arrivals' span + 600 s)
  // Keep every request as a client saw it (SimResult::traces), in the form `moemesh bench`
  // records measured ones, so a run and its prediction line up request by request.
  bool trace_requests = false;
};

struct LatencySummary {
  int64_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;  // seconds
};

struct TimelineSample {
  double t = 0;
  int64_t waiting = 0, running = 0;
  double kv_used = 0;       // of all workers' KV capacity
  double output_tok_s = 0;  // over the last interval
};

struct SimResult {
  int64_t requests = 0, completed = 0, unfinished = 0, preemptions = 0, steps = 0;
  double duration_s = 0;  // first arrival to last completion
  double requests_per_s = 0, output_tok_s = 0;
  LatencySummary ttft, itl, e2e, queue;
  double attention_util = 0, expert_util = 0, expert_util_max = 0, network_util = 0, node_util = 0;
  double kv_used_peak = 0;
  double expert_wait_share = 0;     // of the lanes' time, waiting on expert dispatch
  double dispatches_per_batch = 0;  // expert hosts' merging: requests per batch computed
  double hosts_per_dispatch = 0;    // expert hosts one lane's MoE layer sends to (messages per layer)
  std::string bottleneck;
  std::vector<TimelineSample> timeline;
  int64_t events = 0;
  int64_t layers_per_event = 1;
  double wall_s = 0;                   // the simulator's own run time
  std::vector<bench::Outcome> traces;  // with SimOptions::trace_requests, in completion order
  nlohmann::json to_json() const;
};

SimResult simulate(const CostProfile& profile, const Deployment& dep, const TrafficSpec& traffic,
                   const ExpertLoad& load, const SimOptions& opts = {});

// Timeline as CSV: t_s,waiting,running,kv_used,output_tok_s.
std::string timeline_csv(const SimResult& r);

}  // namespace moemesh::planner
