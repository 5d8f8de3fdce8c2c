// Tenants: file validation, key hashing, admission limits (429 with Retry-After), refunds,
// reload; and the token-fair queue: shares follow weights, idle tenants earn no credit,
// priorities order admission.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <vector>

#include "core/error.h"
#include "core/fair_queue.h"
#include "core/tenants.h"
#include "tests/support/temp_dir.h"

using namespace moemesh;
using namespace std::chrono_literals;

namespace {

std::filesystem::path write_file(const std::string& text) {
  static const moemesh::testing::TempDir dir("moemesh-tenants");  // removed when the test program ends
  static int n = 0;
  auto p = dir / (std::to_string(n++) + ".json");
  std::ofstream(p) << text;
  return p;
}

TenantSpec tenant(std::string name, std::string key) {
  TenantSpec t;
  t.name = std::move(name);
  t.key_hashes = {sha256_hex(key)};
  return t;
}

}  // namespace

TEST(Tenants, Sha256KnownAnswer) {
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Tenants, FileIsValidatedWithTheFieldNamed) {
  const std::string h = sha256_hex("k1");
  auto ok = load_tenants(write_file(R"({"tenants": [{"name": "acme", "api_key_sha256": [")" + h +
                                    R"("], "weight": 2, "priority": "high", "requests_per_minute": 60, "models": ["m"]}]})"));
  ASSERT_EQ(ok.size(), 1u);
  EXPECT_EQ(ok[0].weight, 2);
  EXPECT_EQ(ok[0].priority, Priority::High);
  EXPECT_FALSE(ok[0].allows_model("other"));
  auto error_of = [](const std::string& text) {
    try {
      load_tenants(write_file(text));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(error_of("{bad").find("not valid JSON"), std::string::npos);
  EXPECT_NE(error_of(R"({"tenants": [{"name": "a", "api_key_sha256": ["xyz"]}]})").find("64 lower-case hex"), std::string::npos);
  EXPECT_NE(error_of(R"({"tenants": [{"name": "a", "api_key_sha256": [")" + h + R"("], "weight": -1}]})").find("\"weight\""),
            std::string::npos);
  EXPECT_NE(error_of(R"({"tenants": [{"name": "a", "api_key_sha256": [")" + h + R"("]}, {"name": "b", "api_key_sha256": [")" +
                     h + R"("]}]})")
                .find("shared with tenant \"a\""),
            std::string::npos);
  EXPECT_NE(error_of(R"({"tenants": [{"name": "a", "api_key_sha256": [")" + h + R"("], "priority": "urgent"}]})").find("tenant \"a\""),
            std::string::npos);
}

TEST(Tenants, OpenModeAdmitsEverything) {
  TenantRegistry reg;
  EXPECT_TRUE(reg.open());
  Admission a = reg.admit("", "m", 10, 10);
  EXPECT_TRUE(a.ok);
  EXPECT_EQ(a.tenant, "default");
}

TEST(Tenants, KeysModelsAndSizes) {
  TenantSpec t = tenant("acme", "secret");
  t.models = {"m"};
  t.max_tokens = 100;
  TenantRegistry reg({t});
  EXPECT_EQ(reg.admit("", "m", 1, 1).status, 401);
  EXPECT_EQ(reg.admit("wrong", "m", 1, 1).status, 401);
  EXPECT_EQ(reg.admit("secret", "x", 1, 1).status, 404);
  EXPECT_EQ(reg.admit("secret", "m", 1, 101).status, 400);
  Admission a = reg.admit("secret", "m", 1, 100);
  EXPECT_TRUE(a.ok);
  EXPECT_EQ(a.tenant, "acme");
}

TEST(Tenants, RequestsPerMinuteBucketRefills) {
  TenantSpec t = tenant("acme", "k");
  t.requests_per_minute = 2;
  TenantRegistry reg({t});
  auto t0 = TenantRegistry::Clock::now();
  EXPECT_TRUE(reg.admit("k", "m", 1, 1, t0).ok);
  EXPECT_TRUE(reg.admit("k", "m", 1, 1, t0).ok);
  Admission over = reg.admit("k", "m", 1, 1, t0);
  EXPECT_EQ(over.status, 429);
  EXPECT_EQ(over.reason, "rpm");
  EXPECT_EQ(over.retry_after_s, 30);  // one request refills in 60 s / 2
  EXPECT_TRUE(reg.admit("k", "m", 1, 1, t0 + 31s).ok);
}

TEST(Tenants, TokensAreChargedAtAdmissionAndRefunded) {
  TenantSpec t = tenant("acme", "k");
  t.tokens_per_minute = 1000;
  t.max_concurrent = 5;
  TenantRegistry reg({t});
  auto t0 = TenantRegistry::Clock::now();
  ASSERT_TRUE(reg.admit("k", "m", 100, 800, t0).ok);      // 900 charged
  EXPECT_EQ(reg.admit("k", "m", 100, 100, t0).reason, "tpm");
  reg.finish("acme", 800, 50, t0);                         // 750 back
  EXPECT_TRUE(reg.admit("k", "m", 100, 100, t0).ok);
  EXPECT_EQ(reg.in_flight("acme"), 1);
  EXPECT_EQ(reg.admit("k", "m", 10, 2000, t0).retry_after_s, 60);  // can never fit
}

TEST(Tenants, ConcurrencyLimitAndReloadKeepsState) {
  TenantSpec t = tenant("acme", "k");
  t.max_concurrent = 1;
  TenantRegistry reg({t});
  ASSERT_TRUE(reg.admit("k", "m", 1, 1).ok);
  EXPECT_EQ(reg.admit("k", "m", 1, 1).reason, "concurrency");
  TenantSpec t2 = t;
  t2.key_hashes.push_back(sha256_hex("k2"));  // a new key for the same tenant
  reg.reload({t2});
  EXPECT_EQ(reg.in_flight("acme"), 1);  // the request in flight is still counted
  EXPECT_EQ(reg.admit("k2", "m", 1, 1).reason, "concurrency");
  reg.finish("acme", 1, 1);
  EXPECT_TRUE(reg.admit("k2", "m", 1, 1).ok);
  reg.reload({tenant("other", "z")});
  EXPECT_EQ(reg.admit("k", "m", 1, 1).status, 401);  // acme's keys are gone
}

TEST(FairQueue, BackloggedTenantsShareByWeight) {
  FairQueue q({1.0, 1.0});
  uint64_t id = 0;
  std::map<std::string, std::string> of;
  for (int i = 0; i < 400; ++i) {
    q.push(++id, "heavy", 1.0, Priority::Normal);
    q.push(++id, "light", 3.0, Priority::Normal);
  }
  std::map<std::string, int64_t> served;
  for (int i = 0; i < 200; ++i) {
    uint64_t next = *q.pop();
    const std::string t = next % 2 ? "heavy" : "light";
    served[t] += 10;
    q.charge(t, 10, 0);
  }
  const double share = double(served["light"]) / double(served["light"] + served["heavy"]);
  EXPECT_NEAR(share, 0.75, 0.02) << "light (weight 3) should get 3/4 of the tokens";
}

TEST(FairQueue, IdleTenantEarnsNoCreditAndNewcomerIsServedSoon) {
  FairQueue q({1.0, 1.0});
  for (uint64_t i = 1; i <= 100; ++i) q.push(i, "flood", 1.0, Priority::Normal);
  for (int i = 0; i < 50; ++i) {
    q.pop();
    q.charge("flood", 100, 0);
  }
  // A tenant arriving now competes from flood's counter, not from zero: it alternates with
  // flood instead of taking the next 50 slots, and it is served within two admissions.
  for (uint64_t i = 1001; i <= 1010; ++i) q.push(i, "newcomer", 1.0, Priority::Normal);
  uint64_t first = *q.pop();
  q.charge(first > 1000 ? "newcomer" : "flood", 100, 0);
  uint64_t second = *q.pop();
  q.charge(second > 1000 ? "newcomer" : "flood", 100, 0);
  EXPECT_TRUE(first > 1000 || second > 1000);
  int newcomer = 0;
  for (int i = 0; i < 10; ++i) {
    uint64_t id = *q.pop();
    const bool n = id > 1000;
    newcomer += n;
    q.charge(n ? "newcomer" : "flood", 100, 0);
  }
  EXPECT_GE(newcomer, 4);
  EXPECT_LE(newcomer, 6);
}

TEST(FairQueue, PriorityFirstThenRemove) {
  FairQueue q;
  q.push(1, "a", 1, Priority::Low);
  q.push(2, "b", 1, Priority::Normal);
  q.push(3, "c", 1, Priority::High);
  EXPECT_TRUE(q.remove(2));
  EXPECT_FALSE(q.remove(2));
  EXPECT_EQ(*q.pop(), 3u);
  EXPECT_EQ(*q.pop(), 1u);
  EXPECT_TRUE(q.empty());
  EXPECT_FALSE(q.pop().has_value());
}

TEST(FairQueue, RequestLoweredBelowItsTenantWaitsBehindNormalWork) {
  FairQueue q;
  q.push(1, "a", 1, Priority::Low);     // tenant a lowered this one request
  q.push(2, "a", 1, Priority::Normal);  // a's normal request still goes ahead of it
  q.push(3, "b", 1, Priority::Normal);
  q.push_front(4, "a", 1, Priority::Low);  // a preempted low request: first among a's low ones
  EXPECT_EQ(*q.peek(), 2u);
  std::vector<uint64_t> order;
  while (auto id = q.pop()) order.push_back(*id);
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(std::vector<uint64_t>(order.begin() + 2, order.end()), (std::vector<uint64_t>{4, 1}));
}
