#include "core/planner_traffic.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moemesh::planner {
namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  if (!s.empty() && s.back() == sep) out.emplace_back();
  return out;
}

double number(const std::string& text, const std::string& what) {
  try {
    size_t used = 0;
    const double v = std::stod(text, &used);
    if (used != text.size()) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    throw Error(what + ": \"" + text + "\" is not a number");
  }
}

}  // namespace

TrafficSpec TrafficSpec::parse(const std::string& spec) {
  TrafficSpec t;
  const auto parts = split(spec, ':');
  const std::string& kind = parts.empty() ? spec : parts[0];
  auto need = [&](size_t n, const char* form) {
    if (parts.size() != n) throw Error("--traffic \"" + spec + "\": expected " + form);
  };
  if (kind == "poisson") {
    need(2, "poisson:RATE");
    t.kind = Kind::poisson;
    t.rate = number(parts[1], "poisson rate");
    if (t.rate <= 0) throw Error("--traffic: the poisson rate must be positive");
  } else if (kind == "closed") {
    need(2, "closed:CONCURRENCY");
    t.kind = Kind::closed;
    t.concurrency = int(number(parts[1], "closed-loop concurrency"));
    if (t.concurrency < 1) throw Error("--traffic: the concurrency must be at least 1");
  } else if (kind == "bursts") {
    need(3, "bursts:RATE:PERIOD_S");
    t.kind = Kind::bursts;
    t.rate = number(parts[1], "burst rate");
    t.burst_period_s = number(parts[2], "burst period");
    if (t.rate <= 0 || t.burst_period_s <= 0) throw Error("--traffic: burst rate and period must be positive");
  } else if (kind == "trace") {
    if (parts.size() < 2) throw Error("--traffic \"" + spec + "\": expected trace:FILE.csv");
    t.kind = Kind::trace;
    t.tenants.clear();
    t.trace = read_trace(spec.substr(6), t.tenants);
  } else {
    throw Error("--traffic \"" + spec + "\": unknown kind \"" + kind + "\" (poisson, closed, bursts or trace)");
  }
  return t;
}

std::string TrafficSpec::describe() const {
  std::ostringstream o;
  switch (kind) {
    case Kind::poisson:
      o << "poisson " << rate << " req/s";
      break;
    case Kind::closed:
      o << "closed loop, " << concurrency << " in flight";
      break;
    case Kind::bursts:
      o << "bursts averaging " << rate << " req/s every " << burst_period_s << " s";
      break;
    case Kind::trace:
      o << "trace of " << trace.size() << " requests";
      break;
  }
  if (kind != Kind::trace) o << ", prompt " << prompt_len.describe() << ", output " << output_len.describe();
  if (prefix_hit_rate > 0) o << ", prefix hit rate " << prefix_hit_rate;
  return o.str();
}

std::vector<SimRequest> read_trace(const std::filesystem::path& file, std::vector<std::string>& tenants) {
  std::ifstream in(file);
  if (!in) throw Error(file.string() + ": cannot read the trace");
  std::vector<SimRequest> out;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    const auto f = split(line, ',');
    if (n == 1 && !f.empty() && !f[0].empty() && !std::isdigit(static_cast<unsigned char>(f[0][0])) && f[0][0] != '.')
      continue;  // a header row
    const std::string where = file.string() + ":" + std::to_string(n);
    if (f.size() < 3) throw Error(where + ": expected arrival_s,prompt_len,output_len[,tenant]");
    SimRequest r;
    r.arrival_s = number(f[0], where + " arrival_s");
    r.prompt = int64_t(number(f[1], where + " prompt_len"));
    r.output = int64_t(number(f[2], where + " output_len"));
    if (r.arrival_s < 0 || r.prompt < 1 || r.output < 1) throw Error(where + ": arrival must be >= 0 and lengths >= 1");
    const std::string tenant = f.size() > 3 && !f[3].empty() ? f[3] : "default";
    auto it = std::find(tenants.begin(), tenants.end(), tenant);
    r.tenant = int(it - tenants.begin());
    if (it == tenants.end()) tenants.push_back(tenant);
    out.push_back(r);
  }
  if (out.empty()) throw Error(file.string() + ": the trace has no requests");
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.arrival_s < b.arrival_s; });
  return out;
}

bool per_request_streams(const TrafficSpec& spec) {
  const double n = spec.requests > 0                        ? double(spec.requests)
                   : spec.kind == TrafficSpec::Kind::closed ? 1e9
                                                            : spec.rate * spec.duration_s;
  return n <= 1e6;
}

SimRequest sample_request(const TrafficSpec& spec, int64_t index, std::mt19937_64* stream) {
  SimRequest r;
  r.tenant = spec.tenants.empty() ? 0 : int(index % int64_t(spec.tenants.size()));
  if (stream) {
    r.prompt = spec.prompt_len.sample(*stream);
    r.output = spec.output_len.sample(*stream);
    return r;
  }
  // services/cli/cmd_bench.cpp Bench::plan: the tenant draw, then prompt and output lengths.
  const auto i = uint64_t(index);
  std::seed_seq seq{uint32_t(spec.seed), uint32_t(spec.seed >> 32), uint32_t(i), uint32_t(i >> 32)};
  std::mt19937_64 rng(seq);
  (void)std::uniform_real_distribution<double>(0, 1)(rng);  // the bench's tenant pick
  r.prompt = spec.prompt_len.sample(rng);
  r.output = spec.output_len.sample(rng);
  return r;
}

std::vector<SimRequest> open_loop_arrivals(const TrafficSpec& spec) {
  if (spec.kind == TrafficSpec::Kind::trace) {
    if (spec.requests > 0 && size_t(spec.requests) < spec.trace.size())
      return {spec.trace.begin(), spec.trace.begin() + spec.requests};
    return spec.trace;
  }
  if (spec.kind == TrafficSpec::Kind::closed) return {};
  // The bench's arrival stream (its own generator; the first request at t = 0).
  std::mt19937_64 rng(spec.seed ^ 0x9e3779b97f4a7c15ull);
  std::mt19937_64 lengths(spec.seed);
  std::mt19937_64* stream = per_request_streams(spec) ? nullptr : &lengths;
  std::vector<SimRequest> out;
  auto more = [&](double t) { return spec.requests > 0 ? int64_t(out.size()) < spec.requests : t < spec.duration_s; };
  if (spec.kind == TrafficSpec::Kind::poisson) {
    std::exponential_distribution<double> gap(spec.rate);
    for (double t = 0; more(t); t += gap(rng)) {
      SimRequest r = sample_request(spec, int64_t(out.size()), stream);
      r.arrival_s = t;
      out.push_back(r);
    }
  } else {  // bursts: every period, rate * period requests at once
    const auto per_burst = std::max<int64_t>(1, int64_t(spec.rate * spec.burst_period_s + 0.5));
    for (double t = 0; more(t); t += spec.burst_period_s)
      for (int64_t i = 0; i < per_burst && more(t); ++i) {
        SimRequest r = sample_request(spec, int64_t(out.size()), stream);
        r.arrival_s = t;
        out.push_back(r);
      }
  }
  return out;
}

}  // namespace moemesh::planner
