// `moemesh plan profile`'s measurements through the real code paths: the reference Engine
// (core/engine.h) on the compute backend, with its routed experts timed apart by a wrapping
// ExpertExecutor, so the attention side and the expert MLPs get costs of their own.
#pragma once
#include <filesystem>
#include <optional>
#include <utility>
#include <vector>

#include "core/planner_cost.h"
#include "core/planner_sim.h"

namespace moemesh::planner {

struct EngineSample {
  double rows = 0, ctx = 0;   // a step's rows and attended positions
  double seconds = 0;         // the step's wall time without its expert calls
  double expert_seconds = 0;  // its expert calls
  bool prefill = false;       // one prompt's rows, else one decode row per sequence
};
struct ExpertSample {
  double active = 0, rows = 0, seconds = 0;  // one layer's call
};

struct EngineMeasurements {
  std::vector<EngineSample> steps;
  std::vector<ExpertSample> experts;
};

// Runs decode steps at each batch size and context, and prefills, `repeats` times each. A
// decode shape is one sample, the fastest of its repeats (other jobs on a shared machine only add
// time); expert calls likewise per (active experts, rows).
EngineMeasurements measure_engine(const std::filesystem::path& model, const std::vector<int64_t>& batches,
                                  const std::vector<int64_t>& contexts, int repeats);

// Fits the attention-side and expert costs of `p` (its model's layer counts) to the measurements:
// decode steps give the fixed, per-row and per-context costs, prefills (what is left of them)
// the per-prefill-row cost, so a prompt is not priced as a pile of decode steps.
void fit_engine_costs(const EngineMeasurements& m, CostProfile& p);

// One `moemesh bench` run against a running cluster (closed loop, fixed lengths): the traffic
// and what it measured.
struct CalibrationPoint {
  int concurrency = 1;
  double rate = 0;  // > 0: Poisson arrivals per second instead of `concurrency` clients
  int64_t prompt = 16, output = 32, requests = 8;
  double ttft_p50_s = 0, itl_p50_s = 0, itl_p90_s = 0;
};

// A request's start as the streams already running see it (`plan profile`'s "beside" runs,
// bench/request_cost.py): one long stream while short requests arrive beside it. Each gap of the
// stream is classed by what the others did in the step that ended it, and priced by its excess
// over the median of its unclassed neighbours (six each side): a local comparison, so the
// machine's drift over seconds cancels.
struct GapExcess {
  std::vector<double> start;      // a request's first token: its admission, prefix lookup, prompt rows
  std::vector<double> decode;     // one of its other tokens
  std::vector<double> end;        // its last token
  std::vector<double> after_end;  // the gap after its last token
};
// Token times of one client's request (its start + TTFT, then each gap).
std::vector<double> token_times(const bench::Outcome& o);
// `others`' times are on the stream's clock; a token "ends" the stream's gap of the step that
// produced it when it comes within 0.3 ms of the stream's token of that step.
GapExcess gap_excess(const std::vector<double>& stream, const std::vector<std::vector<double>>& others);
// The offset to add to `others`' clock to put it on the stream's: each of their first tokens
// comes with one of the stream's (the same step's reply) within 0.3 ms. Searched from -0.2 to
// +0.5 s in 50 µs steps; returns the middle of the offsets that match the most first tokens, and
// how many they match.
std::pair<double, int> align_clocks(const std::vector<double>& stream, const std::vector<std::vector<double>>& others);

// One beside run from its clients' per-request records: the stream (`stream_client`'s longest
// request), the other requests' token times on the stream's clock, and the run as a trace for the
// simulator (arrivals from the first one, the stream's lengths first among equals). With `beside`
// empty the others are `stream_client`'s other requests (one clock, as the simulator writes them);
// else they are `beside`'s, put on the stream's clock by align_clocks.
struct BesideRun {
  std::vector<double> stream;
  std::vector<std::vector<double>> others;
  std::vector<SimRequest> trace;
  int matched = 0;      // of the others' first tokens, those that came with one of the stream's
  double offset_s = 0;  // added to `beside`'s clock
};
BesideRun beside_run(const std::vector<bench::Outcome>& stream_client, const std::vector<bench::Outcome>& beside = {});

// What a calibration recorded of its "beside" runs: each run's requests (the stream first) on the
// stream's clock, and the median start excess measured over all of them.
struct BesidePoint {
  std::vector<std::vector<SimRequest>> runs;
  double start_excess_s = 0;
  double fitted_start_excess_s = 0;  // what the fitted profile's simulator gives (set by calibrate_cluster)
};
// The median start excess of `runs` simulated with `p` on `d`; none when no start was alone in
// a gap of the stream (the requests overlapped throughout).
std::optional<double> simulated_start_excess(const CostProfile& p, const Deployment& d,
                                             const std::vector<std::vector<SimRequest>>& runs);

// The cluster's own costs on a machine whose processes share its cores, fitted so that the
// simulator of `d` reproduces three runs: one request at a time with short prompts (`one`: its
// inter-token latency prices the hand-offs of a step and of each MoE layer's dispatch, its TTFT
// the router's per-request work, the spread of its inter-token latency the machine's interference),
// the same with long prompts (`long_prompt`: the cost of a
// prompt row on the cluster), and several at once (`loaded`: its ITL the CPU each streamed token
// costs beside the steps, the router's HTTP streaming and the client's, or, when it is faster
// than the engine's decode rows allow with none, a scale below 1 on their per-row costs (an engine
// timed while the machine was slow); its TTFT the share of the
// per-request work that waits behind the cores' other work). All are CPU on the node's
// cores (p.shared_node_compute). `idle`, when given, is a run whose requests arrive apart (a low
// Poisson rate): its TTFT prices waking from idle (p.idle_wake_s), its inter-token latency how
// long that lasts (p.idle_wake_decay). `beside`, when given, prices a step that starts sequences
// (p.step_start_s) by its start excess; its fitted value is written back. Returns the simulator's
// values for the points, fitted.
std::vector<CalibrationPoint> calibrate_cluster(CostProfile& p, const Deployment& d, const CalibrationPoint& one,
                                                const CalibrationPoint& long_prompt, const CalibrationPoint& loaded,
                                                const CalibrationPoint* idle = nullptr, BesidePoint* beside = nullptr);

// The Poisson rate of the calibration run that prices waking from idle: requests four
// lifetimes apart on average (a lifetime of `output` tokens from one request at a time's TTFT and
// ITL), so most find the cluster idle.
double idle_calibration_rate(double ttft_s, double itl_s, int64_t output);

}  // namespace moemesh::planner
