// `moemesh bench`'s distributions, tenant specs, percentiles and report (core/bench_stats).
#include "core/bench_stats.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include <unistd.h>

#include "core/error.h"

using namespace moemesh;
using namespace moemesh::bench;

namespace {

std::vector<int64_t> draw(const LengthDist& d, int n, uint64_t seed = 7) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> v;
  for (int i = 0; i < n; ++i) v.push_back(d.sample(rng));
  return v;
}

void expect_error(std::string_view spec, std::string_view fragment) {
  try {
    LengthDist::parse(spec);
    ADD_FAILURE() << "no error for '" << spec << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(LengthDist, FixedIsExact) {
  const auto d = LengthDist::parse("128");
  for (int64_t v : draw(d, 50)) EXPECT_EQ(v, 128);
  EXPECT_EQ(d.describe(), "128");
}

TEST(LengthDist, UniformCoversItsInclusiveRangeOnly) {
  const auto d = LengthDist::parse("uniform:3:6");
  std::map<int64_t, int> seen;
  for (int64_t v : draw(d, 2000)) ++seen[v];
  ASSERT_EQ(seen.size(), 4u);
  EXPECT_EQ(seen.begin()->first, 3);
  EXPECT_EQ(seen.rbegin()->first, 6);
  for (const auto& [v, n] : seen) EXPECT_GT(n, 350) << v;  // 500 expected each
  EXPECT_EQ(d.describe(), "uniform:3:6");
}

TEST(LengthDist, NormalHasItsMeanAndIsClampedToOne) {
  const auto wide = draw(LengthDist::parse("normal:100:10"), 4000);
  double sum = 0;
  for (int64_t v : wide) sum += double(v);
  EXPECT_NEAR(sum / double(wide.size()), 100.0, 1.0);
  // Half of normal(1, 5) is below 1: every such sample becomes 1, none is below.
  const auto clamped = draw(LengthDist::parse("normal:1:5"), 2000);
  int ones = 0;
  for (int64_t v : clamped) {
    EXPECT_GE(v, 1);
    ones += v == 1;
  }
  EXPECT_GT(ones, 800);
  for (int64_t v : draw(LengthDist::parse("normal:7:0"), 10)) EXPECT_EQ(v, 7);
}

TEST(LengthDist, SameSeedSameSamples) {
  const auto d = LengthDist::parse("uniform:1:1000");
  EXPECT_EQ(draw(d, 20, 1), draw(d, 20, 1));
  EXPECT_NE(draw(d, 20, 1), draw(d, 20, 2));
}

TEST(LengthDist, BadSpecsSayWhatIsWrong) {
  expect_error("", "not a number");
  expect_error("0", ">= 1");
  expect_error("2.5", "integer");
  expect_error("abc", "not a number");
  expect_error("uniform:5", "expected N, uniform:A:B or normal:MEAN:SD");
  expect_error("uniform:9:3", "1 <= A <= B");
  expect_error("uniform:0:3", "1 <= A <= B");
  expect_error("uniform:x:3", "lower bound 'x'");
  expect_error("normal:10:-1", "standard deviation must be >= 0");
  expect_error("normal:0:1", "mean must be >= 1");
  expect_error("poisson:3:4", "unknown kind 'poisson'");
}

TEST(Tenant, KeyAndOptionalWeight) {
  auto t = parse_tenant("sk-alpha:3");
  EXPECT_EQ(t.key, "sk-alpha");
  EXPECT_EQ(t.weight, 3);
  t = parse_tenant("sk-beta");
  EXPECT_EQ(t.key, "sk-beta");
  EXPECT_EQ(t.weight, 1);
  t = parse_tenant("org:team:0.5");  // only the last ':' can start a weight
  EXPECT_EQ(t.key, "org:team");
  EXPECT_EQ(t.weight, 0.5);
  t = parse_tenant("org:team");  // not a number: all of it is the key
  EXPECT_EQ(t.key, "org:team");
  EXPECT_EQ(t.weight, 1);
  EXPECT_THROW(parse_tenant("key:0"), Error);
  EXPECT_THROW(parse_tenant("key:-2"), Error);
  EXPECT_THROW(parse_tenant(":2"), Error);
  EXPECT_THROW(parse_tenant(""), Error);
}

TEST(Tenant, PickFollowsTheWeights) {
  const std::vector<TenantSpec> ts{{"a", 1}, {"b", 3}};
  EXPECT_EQ(pick_weighted(ts, 0.0), 0u);
  EXPECT_EQ(pick_weighted(ts, 0.24), 0u);
  EXPECT_EQ(pick_weighted(ts, 0.26), 1u);
  EXPECT_EQ(pick_weighted(ts, 0.999999), 1u);
  EXPECT_THROW(pick_weighted({}, 0.5), Error);
}

TEST(Tenant, ReportsShowOnlyAKeyPrefix) {
  EXPECT_EQ(mask_key("short"), "short");
  EXPECT_EQ(mask_key("sk-proj-0123456789"), "sk-proj-...");
  EXPECT_EQ(mask_key(""), "(no key)");
}

TEST(Percentile, LinearInterpolationBetweenClosestRanks) {
  // NumPy: np.percentile([1, 2, 3, 4], [0, 50, 90, 100]) == [1, 2.5, 3.7, 4]
  const std::vector<double> v{4, 1, 3, 2};
  EXPECT_DOUBLE_EQ(percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(percentile(v, 50), 2.5);
  EXPECT_DOUBLE_EQ(percentile(v, 90), 3.7);
  EXPECT_DOUBLE_EQ(percentile(v, 100), 4);
  EXPECT_DOUBLE_EQ(percentile({42}, 99), 42);
  std::vector<double> hundred;
  for (int i = 1; i <= 101; ++i) hundred.push_back(i);
  EXPECT_DOUBLE_EQ(percentile(hundred, 99), 100);
  EXPECT_THROW(percentile({}, 50), Error);
  EXPECT_THROW(percentile({1}, 101), Error);
  EXPECT_THROW(percentile({1}, -1), Error);
}

TEST(Percentile, Summary) {
  EXPECT_FALSE(summarize({}).has_value());
  const auto s = summarize({10, 20, 30});
  ASSERT_TRUE(s);
  EXPECT_EQ(s->count, 3u);
  EXPECT_DOUBLE_EQ(s->mean, 20);
  EXPECT_DOUBLE_EQ(s->p50, 20);
  EXPECT_DOUBLE_EQ(s->p90, 28);
}

namespace {
Outcome ok(size_t tenant, double start, double end, double ttft, std::vector<double> itl, int64_t out) {
  Outcome o;
  o.tenant = tenant;
  o.start_s = start;
  o.end_s = end;
  o.ttft_s = ttft;
  o.itl_s = std::move(itl);
  o.prompt_tokens = 10;
  o.output_tokens = out;
  return o;
}
Outcome failed(size_t tenant, std::string kind, std::string msg, double start, double end) {
  Outcome o;
  o.tenant = tenant;
  o.failure = std::move(kind);
  o.error = std::move(msg);
  o.start_s = start;
  o.end_s = end;
  return o;
}
}  // namespace

TEST(Report, TotalsThroughputLatenciesAndTenants) {
  const std::vector<TenantSpec> tenants{{"good-key", 1}, {"limited-key-123456", 2}};
  std::vector<Outcome> os{ok(0, 1.0, 2.0, 0.1, {0.2, 0.4}, 3), ok(0, 1.5, 3.0, 0.3, {0.1}, 2),
                          failed(1, "429", "slow down", 2.0, 2.1), failed(1, "429", "again", 2.5, 2.6),
                          failed(1, "connection_refused", "refused", 4.0, 5.0)};
  const auto r = make_report(os, tenants);
  EXPECT_EQ(r["requests"]["total"], 5);
  EXPECT_EQ(r["requests"]["ok"], 2);
  EXPECT_EQ(r["requests"]["failed"], 3);
  EXPECT_EQ(r["failures"]["429"], 2);
  EXPECT_EQ(r["failures"]["connection_refused"], 1);
  EXPECT_EQ(r["errors"]["429"], "slow down");  // the first message of each kind
  EXPECT_DOUBLE_EQ(r["duration_s"].get<double>(), 4.0);  // first start 1.0, last end 5.0
  EXPECT_EQ(r["output_tokens"], 5);
  EXPECT_EQ(r["prompt_tokens"], 20);  // failures carry no tokens
  EXPECT_DOUBLE_EQ(r["requests_per_s"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(r["output_tokens_per_s"].get<double>(), 1.25);
  EXPECT_DOUBLE_EQ(r["total_tokens_per_s"].get<double>(), 6.25);
  EXPECT_EQ(r["ttft_ms"]["count"], 2);
  EXPECT_NEAR(r["ttft_ms"]["p50"].get<double>(), 200, 1e-9);
  EXPECT_EQ(r["itl_ms"]["count"], 3);  // every gap of every request
  EXPECT_NEAR(r["itl_ms"]["p50"].get<double>(), 200, 1e-9);
  EXPECT_NEAR(r["e2e_ms"]["p90"].get<double>(), 1450, 1e-9);  // 1000 and 1500 ms

  ASSERT_EQ(r["tenants"].size(), 2u);
  const auto& a = r["tenants"][0];
  const auto& b = r["tenants"][1];
  EXPECT_EQ(a["tenant"], "good-key");
  EXPECT_EQ(a["requests"]["ok"], 2);
  EXPECT_TRUE(a["failures"].empty());
  EXPECT_EQ(b["tenant"], "limited-...");
  EXPECT_EQ(b["weight"], 2.0);
  EXPECT_EQ(b["requests"]["ok"], 0);
  EXPECT_EQ(b["failures"]["429"], 2);
  EXPECT_TRUE(b["ttft_ms"].is_null());
  EXPECT_DOUBLE_EQ(b["requests_per_s"].get<double>(), 0.0);

  const std::string table = format_report(r);
  for (const char* s : {"ok 2, failed 3 (429: 2, connection_refused: 1)", "0.50 req/s", "1.2 output tok/s", "TTFT",
                        "ITL", "E2E", "tenant limited-... (weight 2)", "first 429: slow down"})
    EXPECT_NE(table.find(s), std::string::npos) << s << "\n" << table;
}

TEST(Report, WithoutStreamingTtftIsAbsentNotZero) {
  Outcome o;
  o.start_s = 0;
  o.end_s = 0.5;
  o.output_tokens = 4;
  const auto r = make_report({o}, {{"", 1}});
  EXPECT_TRUE(r["ttft_ms"].is_null());
  EXPECT_TRUE(r["itl_ms"].is_null());
  EXPECT_EQ(r["e2e_ms"]["count"], 1);
  EXPECT_EQ(r["tenants"][0]["tenant"], "(no key)");
  EXPECT_NE(format_report(r).find("n/a"), std::string::npos);
}

TEST(Report, OutcomeForAnUnknownTenantIsAnError) {
  Outcome o;
  o.tenant = 3;
  EXPECT_THROW(make_report({o}, {{"", 1}}), Error);
}

// A streamed request of tenant 1 with three tokens.
Outcome answered() {
  Outcome ok;
  ok.tenant = 1;
  ok.start_s = 0.5;
  ok.end_s = 0.75;
  ok.ttft_s = 0.1;
  ok.itl_s = {0.02, 0.03};
  ok.prompt_tokens = 7;
  ok.output_tokens = 3;
  return ok;
}

TEST(Report, APerRequestLineHoldsTheOutcome) {
  const Outcome ok = answered();
  const nlohmann::json j = outcome_json(ok);
  EXPECT_EQ(j.at("tenant"), 1);
  EXPECT_DOUBLE_EQ(j.at("ttft_s").get<double>(), 0.1);
  EXPECT_EQ(j.at("itl_s"), nlohmann::json({0.02, 0.03}));
  EXPECT_EQ(j.at("output_tokens"), 3);
  EXPECT_FALSE(j.contains("failure"));
  Outcome failed;
  failed.failure = "429";
  failed.error = "over quota";
  const nlohmann::json f = outcome_json(failed);
  EXPECT_TRUE(f.at("ttft_s").is_null());
  EXPECT_EQ(f.at("failure"), "429: over quota");
}

TEST(Report, PerRequestLinesReadBackAsWritten) {
  const Outcome ok = answered();
  Outcome failed;
  failed.failure = "429";
  const auto file = std::filesystem::temp_directory_path() / ("moemesh-outcomes-" + std::to_string(::getpid()));
  {
    std::ofstream out(file);
    out << outcome_json(ok) << "\n" << outcome_json(failed) << "\n";
  }
  const auto back = read_outcomes(file);
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[0].tenant, 1u);
  EXPECT_DOUBLE_EQ(back[0].end_s, 0.75);
  EXPECT_DOUBLE_EQ(back[0].ttft_s.value(), 0.1);
  EXPECT_EQ(back[0].itl_s, ok.itl_s);
  EXPECT_EQ(back[0].output_tokens, 3);
  EXPECT_FALSE(back[1].ttft_s.has_value());
  EXPECT_EQ(back[1].failure, "429");
  {
    std::ofstream out(file, std::ios::app);
    out << R"({"start_s": 1.0, "end_s": 2.0})"
        << "\n";
  }
  try {
    read_outcomes(file);
    ADD_FAILURE() << "a record without ttft_s was read";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(file.string() + ":3:"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ttft_s"), std::string::npos) << e.what();
  }
  std::filesystem::remove(file);
}
