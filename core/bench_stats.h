// `moemesh bench`'s pure parts: length distributions, tenant specs, percentiles and the report
// built from per-request outcomes, and those outcomes as `--per-request` files hold them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace moemesh::bench {

// A length in tokens: "N" (fixed), "uniform:A:B" (integers A..B inclusive) or "normal:MEAN:SD"
// (rounded). Every sample is at least 1.
class LengthDist {
 public:
  static LengthDist parse(std::string_view spec);  // throws moemesh::Error naming the bad part
  int64_t sample(std::mt19937_64& rng) const;
  std::string describe() const;  // the spec in canonical form

 private:
  enum class Kind { fixed, uniform, normal };
  Kind kind_ = Kind::fixed;
  double a_ = 1, b_ = 0;
};

// `--tenant KEY[:WEIGHT]`: an API key and its share of the requests. The weight is the text
// after the last ':' when that text is a number; otherwise the whole spec is the key, weight 1.
struct TenantSpec {
  std::string key;  // empty: no Authorization header
  double weight = 1;
};
TenantSpec parse_tenant(std::string_view spec);

// The index whose cumulative weight share first exceeds u (u in [0, 1)).
size_t pick_weighted(const std::vector<TenantSpec>& tenants, double u);

// A key as shown in reports: its first 8 characters, then "..." when it is longer.
std::string mask_key(std::string_view key);

// The p-th percentile (0..100) by linear interpolation between the closest ranks, NumPy's
// default: rank = p/100 * (n-1). Throws on an empty sample or p outside [0, 100].
double percentile(std::vector<double> values, double p);

struct Summary {
  size_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;
};
std::optional<Summary> summarize(const std::vector<double>& values);  // nullopt when empty

// What happened to one request. Times are seconds since the run started.
struct Outcome {
  size_t tenant = 0;
  std::string failure;  // empty when ok; else the HTTP status ("429") or a transport error kind
  std::string error;    // the server's or the transport's message, for the report
  double start_s = 0, end_s = 0;
  std::optional<double> ttft_s;  // streaming only
  std::vector<double> itl_s;     // gaps between token-bearing chunks (streaming only)
  int64_t prompt_tokens = 0, output_tokens = 0;
  bool ok() const { return failure.empty(); }
};

// The report: totals, throughput over the run (first start to last end), TTFT / ITL / E2E in ms
// at p50/p90/p99 over successful requests, failures by kind, and the same per tenant.
nlohmann::json make_report(const std::vector<Outcome>& outcomes, const std::vector<TenantSpec>& tenants);

// One request as a `--per-request` line holds it (`moemesh bench` measured, `moemesh plan`
// simulated): times in seconds from the run's start, `ttft_s` null without a first token,
// `tenant` the index of its tenant (keys stay out of result files), `failure` only on failed ones.
nlohmann::json outcome_json(const Outcome& o);
// The request of one such line; throws moemesh::Error naming the missing or mistyped field.
Outcome outcome_from_json(const nlohmann::json& j);
// Every line of a `--per-request` file; throws moemesh::Error naming the file and line.
std::vector<Outcome> read_outcomes(const std::filesystem::path& file);

// The report as a table for the terminal.
std::string format_report(const nlohmann::json& report);

}  // namespace moemesh::bench
