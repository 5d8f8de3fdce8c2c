// The capacity planner's traffic: which requests arrive when. Open loop (Poisson, bursts, a trace
// file) gives arrival times up front; closed loop (N clients, each sending its next request when
// the previous one ends, as `moemesh bench --concurrency N` does) is driven by the simulator.
#pragma once
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "core/bench_stats.h"

namespace moemesh::planner {

struct SimRequest {
  double arrival_s = 0;
  int64_t prompt = 1, output = 1;
  int tenant = 0;
};

struct TrafficSpec {
  enum class Kind { poisson, closed, bursts, trace };
  Kind kind = Kind::poisson;
  double rate = 1;             // poisson, bursts: mean requests per second
  int concurrency = 1;         // closed: requests in flight
  double burst_period_s = 10;  // bursts: a burst of rate * period requests every period
  bench::LengthDist prompt_len = bench::LengthDist::parse("128");
  bench::LengthDist output_len = bench::LengthDist::parse("64");
  int64_t requests = 0;                            // stop after this many (0: by duration)
  double duration_s = 60;                          // open loop: arrivals stop after this (when requests is 0)
  std::vector<std::string> tenants = {"default"};  // requests are dealt round-robin
  double prefix_hit_rate = 0;                      // share of prompt tokens restored from the prefix cache
  uint64_t seed = 1;
  std::vector<SimRequest> trace;  // kind trace: the file's rows

  // "poisson:RATE", "closed:CONCURRENCY", "bursts:RATE:PERIOD_S" or "trace:FILE.csv"; throws
  // moemesh::Error naming the bad part.
  static TrafficSpec parse(const std::string& spec);
  std::string describe() const;
};

// A trace file: CSV rows "arrival_s,prompt_len,output_len,tenant" (a header row is skipped;
// tenant optional), sorted by arrival on reading. Throws moemesh::Error with the line number.
std::vector<SimRequest> read_trace(const std::filesystem::path& file, std::vector<std::string>& tenants);

// Open-loop arrivals of a spec (empty for closed loop), sorted by time.
std::vector<SimRequest> open_loop_arrivals(const TrafficSpec& spec);

// Request `index`'s lengths and tenant (index = the order requests are issued in): drawn as `moemesh bench --seed`
// draws them (a generator seeded from the seed and the index alone), so a plan and a bench with the same seed see the
// same requests.
// Beyond ~10^6 requests (a per-request generator costs ~15 us, most of a long run's time) `stream`
// is given instead: one generator for all (the same lengths' distribution, other draws).
SimRequest sample_request(const TrafficSpec& spec, int64_t index, std::mt19937_64* stream = nullptr);
bool per_request_streams(const TrafficSpec& spec);

}  // namespace moemesh::planner
