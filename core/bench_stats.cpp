#include "core/bench_stats.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <numeric>

#include "core/error.h"

namespace moemesh::bench {

namespace {

std::optional<double> to_number(std::string_view s) {
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  for (size_t start = 0;;) {
    size_t at = s.find(sep, start);
    parts.push_back(s.substr(start, at == std::string_view::npos ? std::string_view::npos : at - start));
    if (at == std::string_view::npos) return parts;
    start = at + 1;
  }
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

}  // namespace

LengthDist LengthDist::parse(std::string_view spec) {
  const std::string quoted = "'" + std::string(spec) + "'";
  const auto parts = split(spec, ':');
  const auto number = [&](std::string_view s, const char* what) {
    auto v = to_number(s);
    if (!v) throw Error("length distribution " + quoted + ": " + what + " '" + std::string(s) + "' is not a number");
    return *v;
  };
  LengthDist d;
  if (parts.size() == 1) {
    d.a_ = number(parts[0], "length");
    if (d.a_ < 1 || d.a_ != std::floor(d.a_))
      throw Error("length distribution " + quoted + ": a fixed length must be an integer >= 1");
    return d;
  }
  if (parts.size() != 3)
    throw Error("length distribution " + quoted + ": expected N, uniform:A:B or normal:MEAN:SD");
  if (parts[0] == "uniform") {
    d.kind_ = Kind::uniform;
    d.a_ = number(parts[1], "lower bound");
    d.b_ = number(parts[2], "upper bound");
    if (d.a_ < 1 || d.a_ != std::floor(d.a_) || d.b_ != std::floor(d.b_) || d.b_ < d.a_)
      throw Error("length distribution " + quoted + ": uniform bounds must be integers with 1 <= A <= B");
  } else if (parts[0] == "normal") {
    d.kind_ = Kind::normal;
    d.a_ = number(parts[1], "mean");
    d.b_ = number(parts[2], "standard deviation");
    if (d.a_ < 1) throw Error("length distribution " + quoted + ": the mean must be >= 1");
    if (d.b_ < 0) throw Error("length distribution " + quoted + ": the standard deviation must be >= 0");
  } else {
    throw Error("length distribution " + quoted + ": unknown kind '" + std::string(parts[0]) +
                "' (expected uniform or normal)");
  }
  return d;
}

int64_t LengthDist::sample(std::mt19937_64& rng) const {
  switch (kind_) {
    case Kind::fixed:
      return int64_t(a_);
    case Kind::uniform:
      return std::uniform_int_distribution<int64_t>(int64_t(a_), int64_t(b_))(rng);
    case Kind::normal:
      if (b_ == 0) return std::max<int64_t>(1, std::llround(a_));
      return std::max<int64_t>(1, std::llround(std::normal_distribution<double>(a_, b_)(rng)));
  }
  return 1;
}

std::string LengthDist::describe() const {
  const auto num = [](double v) { return fmt("%g", v); };
  switch (kind_) {
    case Kind::fixed: return num(a_);
    case Kind::uniform: return "uniform:" + num(a_) + ":" + num(b_);
    case Kind::normal: return "normal:" + num(a_) + ":" + num(b_);
  }
  return {};
}

TenantSpec parse_tenant(std::string_view spec) {
  if (spec.empty()) throw Error("--tenant: the API key is empty");
  TenantSpec t{std::string(spec), 1};
  const size_t colon = spec.rfind(':');
  if (colon == std::string_view::npos) return t;
  const auto weight = to_number(spec.substr(colon + 1));
  if (!weight) return t;  // a key that contains ':' itself
  if (colon == 0) throw Error("--tenant '" + std::string(spec) + "': the API key is empty");
  if (*weight <= 0) throw Error("--tenant '" + std::string(spec) + "': the weight must be > 0");
  t.key = std::string(spec.substr(0, colon));
  t.weight = *weight;
  return t;
}

size_t pick_weighted(const std::vector<TenantSpec>& tenants, double u) {
  if (tenants.empty()) throw Error("pick_weighted: no tenants");
  double total = 0;
  for (const auto& t : tenants) total += t.weight;
  double acc = 0;
  for (size_t i = 0; i < tenants.size(); ++i) {
    acc += tenants[i].weight / total;
    if (u < acc) return i;
  }
  return tenants.size() - 1;  // u within rounding of 1
}

std::string mask_key(std::string_view key) {
  if (key.empty()) return "(no key)";
  if (key.size() <= 8) return std::string(key);
  return std::string(key.substr(0, 8)) + "...";
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) throw Error("percentile of an empty sample");
  if (!(p >= 0 && p <= 100)) throw Error("percentile " + fmt("%g", p) + " is outside [0, 100]");
  std::sort(values.begin(), values.end());
  const double rank = p / 100.0 * double(values.size() - 1);
  const size_t lo = size_t(std::floor(rank)), hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (values[hi] - values[lo]) * (rank - double(lo));
}

std::optional<Summary> summarize(const std::vector<double>& values) {
  if (values.empty()) return std::nullopt;
  Summary s;
  s.count = values.size();
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / double(values.size());
  s.p50 = percentile(values, 50);
  s.p90 = percentile(values, 90);
  s.p99 = percentile(values, 99);
  return s;
}

namespace {

nlohmann::json summary_ms(const std::vector<double>& seconds) {
  std::vector<double> ms(seconds.size());
  std::transform(seconds.begin(), seconds.end(), ms.begin(), [](double s) { return s * 1e3; });
  auto s = summarize(ms);
  if (!s) return nullptr;
  return {{"count", s->count}, {"mean", s->mean}, {"p50", s->p50}, {"p90", s->p90}, {"p99", s->p99}};
}

// The statistics of a subset of the outcomes over a run of `duration_s`.
nlohmann::json section(const std::vector<const Outcome*>& outcomes, double duration_s) {
  size_t ok = 0;
  int64_t prompt = 0, output = 0;
  std::map<std::string, int64_t> failures;
  std::map<std::string, std::string> errors;
  std::vector<double> ttft, itl, e2e;
  for (const Outcome* o : outcomes) {
    if (!o->ok()) {
      ++failures[o->failure];
      errors.emplace(o->failure, o->error);  // the first message of each kind
      continue;
    }
    ++ok;
    prompt += o->prompt_tokens;
    output += o->output_tokens;
    if (o->ttft_s) ttft.push_back(*o->ttft_s);
    itl.insert(itl.end(), o->itl_s.begin(), o->itl_s.end());
    e2e.push_back(o->end_s - o->start_s);
  }
  const auto rate = [&](double n) { return duration_s > 0 ? n / duration_s : 0.0; };
  return {{"requests", {{"total", outcomes.size()}, {"ok", ok}, {"failed", outcomes.size() - ok}}},
          {"failures", failures},
          {"errors", errors},
          {"prompt_tokens", prompt},
          {"output_tokens", output},
          {"requests_per_s", rate(double(ok))},
          {"output_tokens_per_s", rate(double(output))},
          {"total_tokens_per_s", rate(double(prompt + output))},
          {"ttft_ms", summary_ms(ttft)},
          {"itl_ms", summary_ms(itl)},
          {"e2e_ms", summary_ms(e2e)}};
}

}  // namespace

nlohmann::json outcome_json(const Outcome& o) {
  nlohmann::json j = {{"start_s", o.start_s},
                      {"end_s", o.end_s},
                      {"ttft_s", o.ttft_s ? nlohmann::json(*o.ttft_s) : nlohmann::json(nullptr)},
                      {"itl_s", o.itl_s},
                      {"prompt_tokens", o.prompt_tokens},
                      {"output_tokens", o.output_tokens},
                      {"tenant", o.tenant}};
  if (!o.ok()) j["failure"] = o.failure + (o.error.empty() ? "" : ": " + o.error);
  return j;
}

Outcome outcome_from_json(const nlohmann::json& j) {
  try {
    Outcome o;
    o.start_s = j.at("start_s");
    o.end_s = j.at("end_s");
    if (!j.at("ttft_s").is_null()) o.ttft_s = j.at("ttft_s").get<double>();
    o.itl_s = j.at("itl_s").get<std::vector<double>>();
    o.prompt_tokens = j.at("prompt_tokens");
    o.output_tokens = j.at("output_tokens");
    o.tenant = j.value("tenant", size_t(0));
    if (j.contains("failure")) o.failure = j.at("failure").get<std::string>();
    return o;
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("a per-request record: ") + e.what());
  }
}

std::vector<Outcome> read_outcomes(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(file.string() + ": cannot read");
  std::vector<Outcome> out;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty()) continue;
    try {
      out.push_back(outcome_from_json(nlohmann::json::parse(line)));
    } catch (const std::exception& e) {
      throw Error(file.string() + ":" + std::to_string(line_no) + ": " + e.what());
    }
  }
  return out;
}

nlohmann::json make_report(const std::vector<Outcome>& outcomes, const std::vector<TenantSpec>& tenants) {
  double first = 0, last = 0;
  if (!outcomes.empty()) {
    first = outcomes.front().start_s;
    last = outcomes.front().end_s;
    for (const auto& o : outcomes) {
      first = std::min(first, o.start_s);
      last = std::max(last, o.end_s);
    }
  }
  const double duration = last - first;
  std::vector<const Outcome*> all;
  std::vector<std::vector<const Outcome*>> by_tenant(tenants.size());
  for (const auto& o : outcomes) {
    all.push_back(&o);
    if (o.tenant >= tenants.size()) throw Error("make_report: an outcome names tenant " + std::to_string(o.tenant));
    by_tenant[o.tenant].push_back(&o);
  }
  nlohmann::json report = section(all, duration);
  report["duration_s"] = duration;
  report["tenants"] = nlohmann::json::array();
  for (size_t i = 0; i < tenants.size(); ++i) {
    nlohmann::json t = section(by_tenant[i], duration);
    t["tenant"] = mask_key(tenants[i].key);
    t["weight"] = tenants[i].weight;
    report["tenants"].push_back(std::move(t));
  }
  return report;
}

namespace {

std::string failures_text(const nlohmann::json& s) {
  std::string out;
  for (const auto& [kind, n] : s["failures"].items())
    out += (out.empty() ? " (" : ", ") + kind + ": " + std::to_string(n.get<int64_t>());
  return out.empty() ? out : out + ")";
}

std::string latency_rows(const nlohmann::json& s, const std::string& indent) {
  std::string out = indent + "latency (ms)         p50       p90       p99      mean\n";
  const std::pair<const char*, const char*> rows[] = {{"TTFT", "ttft_ms"}, {"ITL", "itl_ms"}, {"E2E", "e2e_ms"}};
  for (const auto& [name, key] : rows) {
    std::string row = indent + "  " + name;
    row.resize(indent.size() + 14, ' ');
    const auto& v = s[key];
    if (v.is_null()) {
      row += "       n/a";  // TTFT and ITL need --stream; nothing at all when every request failed
    } else {
      for (const char* p : {"p50", "p90", "p99", "mean"}) row += fmt("%10.2f", v[p].get<double>());
    }
    out += row + "\n";
  }
  return out;
}

}  // namespace

std::string format_report(const nlohmann::json& r) {
  std::string out;
  const auto& q = r["requests"];
  out += "requests      ok " + std::to_string(q["ok"].get<int64_t>()) + ", failed " +
         std::to_string(q["failed"].get<int64_t>()) + failures_text(r) + "\n";
  out += "duration      " + fmt("%.2f s", r["duration_s"].get<double>()) + "\n";
  out += "throughput    " + fmt("%.2f req/s, ", r["requests_per_s"].get<double>()) +
         fmt("%.1f output tok/s, ", r["output_tokens_per_s"].get<double>()) +
         fmt("%.1f total tok/s", r["total_tokens_per_s"].get<double>()) + "\n";
  out += "tokens        " + std::to_string(r["prompt_tokens"].get<int64_t>()) + " prompt, " +
         std::to_string(r["output_tokens"].get<int64_t>()) + " output\n";
  out += latency_rows(r, "");
  for (const auto& [kind, msg] : r["errors"].items())
    out += "first " + kind + ": " + msg.get<std::string>().substr(0, 200) + "\n";
  if (r["tenants"].size() > 1) {
    for (const auto& t : r["tenants"]) {
      const auto& tq = t["requests"];
      out += "\ntenant " + t["tenant"].get<std::string>() + fmt(" (weight %g)", t["weight"].get<double>()) + ": ok " +
             std::to_string(tq["ok"].get<int64_t>()) + ", failed " + std::to_string(tq["failed"].get<int64_t>()) +
             failures_text(t) + fmt(", %.2f req/s, ", t["requests_per_s"].get<double>()) +
             fmt("%.1f output tok/s", t["output_tokens_per_s"].get<double>()) + "\n";
      out += latency_rows(t, "  ");
    }
  }
  return out;
}

}  // namespace moemesh::bench
