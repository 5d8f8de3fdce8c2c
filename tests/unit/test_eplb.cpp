// Load-driven placement (core/eplb.h): the busiest host's load goes down under skewed load, hot
// experts get replicas, the move budget, the memory budgets and the gain threshold hold, every
// expert stays covered, a new host gets the hottest experts first, and bad input is refused.
#include <gtest/gtest.h>

#include <algorithm>

#include "core/eplb.h"
#include "core/error.h"

using namespace moemesh;

namespace {

// `n` hosts, experts 0..e-1 of one layer dealt round robin.
std::vector<EplbHost> round_robin(int n, int e, int64_t budget = 0) {
  std::vector<EplbHost> hosts;
  hosts.resize(size_t(n));
  for (int i = 0; i < n; ++i) hosts[size_t(i)] = {"host-" + std::to_string(i), {}, budget};
  for (int x = 0; x < e; ++x) hosts[size_t(x % n)].experts.insert({0, x});
  return hosts;
}

double busiest(const std::vector<EplbHost>& hosts, const std::map<ExpertKey, double>& load) {
  double m = 0;
  for (const auto& [name, l] : host_loads(hosts, load)) m = std::max(m, l);
  return m;
}

int copies(const std::vector<EplbHost>& hosts, ExpertKey k) {
  int n = 0;
  for (const auto& h : hosts) n += int(h.experts.count(k));
  return n;
}

// The plan's moves turn the input into its hosts.
void expect_moves_reach_plan(std::vector<EplbHost> hosts, const EplbPlan& plan) {
  for (const auto& m : plan.moves)
    for (auto& h : hosts)
      if (h.instance == m.host) {
        if (m.add)
          EXPECT_TRUE(h.experts.insert(m.expert).second) << "added twice";
        else
          EXPECT_EQ(h.experts.erase(m.expert), 1u) << "dropped what it did not hold";
      }
  ASSERT_EQ(hosts.size(), plan.hosts.size());
  for (size_t i = 0; i < hosts.size(); ++i) EXPECT_EQ(hosts[i].experts, plan.hosts[i].experts) << hosts[i].instance;
}

}  // namespace

TEST(Eplb, BalancedLoadChangesNothing) {
  const auto hosts = round_robin(4, 8);
  std::map<ExpertKey, double> load;
  for (int x = 0; x < 8; ++x) load[{0, x}] = 100;
  const EplbPlan p = plan_placement(hosts, load, {});
  EXPECT_FALSE(p.changed());
  EXPECT_DOUBLE_EQ(p.busiest_before, 200);
  EXPECT_DOUBLE_EQ(p.busiest_after, 200);
}

TEST(Eplb, AHotExpertGetsReplicasAndTheBusiestHostGetsLighter) {
  const auto hosts = round_robin(4, 8);
  std::map<ExpertKey, double> load;
  for (int x = 0; x < 8; ++x) load[{0, x}] = 10;
  load[{0, 0}] = 400;  // host-0 holds experts 0 and 4
  const EplbPlan p = plan_placement(hosts, load, {});
  ASSERT_TRUE(p.changed());
  EXPECT_DOUBLE_EQ(p.busiest_before, 410);
  EXPECT_LT(p.busiest_after, 0.5 * p.busiest_before);
  EXPECT_DOUBLE_EQ(busiest(p.hosts, load), p.busiest_after);
  EXPECT_GE(copies(p.hosts, {0, 0}), 3) << "the hot expert is spread";
  for (int x = 1; x < 8; ++x) EXPECT_EQ(copies(p.hosts, {0, x}), 1) << "cold expert " << x;
  expect_moves_reach_plan(hosts, p);
}

TEST(Eplb, TheMoveBudgetBoundsTheBytesLoaded) {
  const auto hosts = round_robin(4, 8);
  std::map<ExpertKey, double> load;
  for (int x = 0; x < 8; ++x) load[{0, x}] = 10;
  load[{0, 0}] = 400;
  EplbOptions o;
  o.expert_bytes = 1000;
  o.move_budget = 1500;  // one expert
  const EplbPlan p = plan_placement(hosts, load, o);
  EXPECT_EQ(p.bytes_loaded, 1000);
  EXPECT_EQ(std::count_if(p.moves.begin(), p.moves.end(), [](const EplbMove& m) { return m.add; }), 1);
  EXPECT_EQ(copies(p.hosts, {0, 0}), 2);
  EXPECT_NEAR(p.busiest_after, 220, 1e-9) << "host-0 200 + 10, the host that took the copy 200 + 20";
  expect_moves_reach_plan(hosts, p);
}

TEST(Eplb, BelowTheGainThresholdNothingMoves) {
  // a: ten experts of 11 rows (110), b: ten of 10 (100). The best plan (a copy of one of a's
  // experts on b) brings the busiest host to 105.5: a 4% gain.
  std::vector<EplbHost> hosts = {{"a", {}, 0}, {"b", {}, 0}};
  std::map<ExpertKey, double> load;
  for (int x = 0; x < 20; ++x) {
    hosts[x < 10 ? 0 : 1].experts.insert({0, x});
    load[{0, x}] = x < 10 ? 11 : 10;
  }
  EplbOptions o;
  o.min_gain = 0.10;
  const EplbPlan kept = plan_placement(hosts, load, o);
  EXPECT_FALSE(kept.changed());
  EXPECT_DOUBLE_EQ(kept.busiest_after, 110);
  o.min_gain = 0.0;
  const EplbPlan moved = plan_placement(hosts, load, o);
  ASSERT_TRUE(moved.changed());
  EXPECT_NEAR(moved.busiest_after, 105.5, 1e-9);
}

TEST(Eplb, MemoryBudgetsHoldAndColdReplicasMakeRoom) {
  // 3 hosts of room for 3 experts each; 6 experts, cold ones 1 and 5 have a second copy.
  std::vector<EplbHost> hosts = {
      {"a", {{0, 0}, {0, 1}, {0, 2}}, 3}, {"b", {{0, 3}, {0, 4}, {0, 5}}, 3}, {"c", {{0, 1}, {0, 5}}, 3}};
  std::map<ExpertKey, double> load = {{{0, 0}, 600}, {{0, 1}, 1},   {{0, 2}, 100},
                                      {{0, 3}, 100}, {{0, 4}, 100}, {{0, 5}, 1}};
  const EplbPlan p = plan_placement(hosts, load, {});
  ASSERT_TRUE(p.changed());
  for (const auto& h : p.hosts) EXPECT_LE(h.experts.size(), 3u) << h.instance;
  for (int x = 0; x < 6; ++x) EXPECT_GE(copies(p.hosts, {0, x}), 1) << "expert " << x << " lost its last copy";
  EXPECT_GE(copies(p.hosts, {0, 0}), 2);
  EXPECT_LT(p.busiest_after, p.busiest_before);
  expect_moves_reach_plan(hosts, p);
}

TEST(Eplb, ANewHostGetsTheHottestExpertsFirst) {
  auto hosts = round_robin(3, 12);
  hosts.push_back({"new", {}, 0});
  std::map<ExpertKey, double> load;
  for (int x = 0; x < 12; ++x) load[{0, x}] = 10 + x;
  load[{0, 7}] = 300;  // on host-1
  load[{0, 5}] = 200;  // on host-2
  EplbOptions o;
  o.move_budget = 1;  // one expert
  const EplbPlan first = plan_placement(hosts, load, o);
  ASSERT_EQ(first.moves.size(), 1u);
  EXPECT_EQ(first.moves[0], (EplbMove{"new", {0, 7}, true})) << "the hottest expert, on the new host";
  o.move_budget = 0;
  const EplbPlan all = plan_placement(hosts, load, o);
  EXPECT_TRUE(all.hosts.back().experts.count({0, 7}));
  EXPECT_LT(all.busiest_after, 0.6 * all.busiest_before);
  expect_moves_reach_plan(hosts, all);
}

TEST(Eplb, GrowingOneHostOnlyAddsToIt) {
  auto hosts = round_robin(3, 12);
  hosts.push_back({"new", {}, 3});  // room for three experts
  std::map<ExpertKey, double> load;
  for (int x = 0; x < 12; ++x) load[{0, x}] = 10 + x;
  load[{0, 7}] = 300;
  load[{0, 5}] = 200;
  load[{0, 2}] = 150;
  EplbOptions o;
  o.grow_host = "new";
  o.min_gain = 0;
  const EplbPlan p = plan_placement(hosts, load, o);
  for (const auto& m : p.moves) {
    EXPECT_TRUE(m.add) << "dropped " << m.expert.second << " from " << m.host;
    EXPECT_EQ(m.host, "new");
  }
  // host-2 (2, 5, 8, 11: 389) then host-1 (1, 4, 7, 10: 345) were the busiest: their hottest first.
  ASSERT_GE(p.moves.size(), 2u);
  EXPECT_EQ(p.moves[0].expert, (ExpertKey{0, 5}));
  EXPECT_EQ(p.moves[1].expert, (ExpertKey{0, 7}));
  EXPECT_LE(p.hosts.back().experts.size(), 3u) << "its memory budget";
  EXPECT_LT(p.busiest_after, p.busiest_before);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(p.hosts[i].experts, hosts[i].experts);
  o.grow_host = "nobody";
  EXPECT_THROW(plan_placement(hosts, load, o), Error);
}

TEST(Eplb, UncoveredExpertsAreCoveredWhateverTheGain) {
  std::vector<EplbHost> hosts = {{"a", {{0, 0}}, 0}, {"b", {{0, 1}}, 0}};
  std::map<ExpertKey, double> load = {{{0, 0}, 5}, {{0, 1}, 5}, {{0, 2}, 5}};
  EplbOptions o;
  o.min_gain = 0.9;
  const EplbPlan p = plan_placement(hosts, load, o);
  EXPECT_EQ(copies(p.hosts, {0, 2}), 1);
  o.min_replicas = 2;
  const EplbPlan q = plan_placement(hosts, load, o);
  for (int x = 0; x < 3; ++x) EXPECT_EQ(copies(q.hosts, {0, x}), 2) << "expert " << x;
}

TEST(Eplb, IsDeterministic) {
  const auto hosts = round_robin(4, 16);
  std::map<ExpertKey, double> load;
  for (int x = 0; x < 16; ++x) load[{0, x}] = (x * 37) % 11 + (x == 3 ? 90 : 0);
  const EplbPlan a = plan_placement(hosts, load, {}), b = plan_placement(hosts, load, {});
  EXPECT_EQ(a.moves, b.moves);
}

TEST(Eplb, RefusesBadInput) {
  const auto hosts = round_robin(2, 4);
  auto message = [&](std::vector<EplbHost> h, std::map<ExpertKey, double> l, EplbOptions o) {
    try {
      plan_placement(h, l, o);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message({}, {}, {}), "placement plan: no expert hosts");
  EXPECT_NE(message({hosts[0], hosts[0]}, {}, {}).find("listed twice"), std::string::npos);
  EXPECT_NE(message(hosts, {{{0, 1}, -1}}, {}).find("layer 0 expert 1 is negative"), std::string::npos);
  EplbOptions o;
  o.min_gain = 1.5;
  EXPECT_NE(message(hosts, {}, o).find("min_gain"), std::string::npos);
  o = {};
  o.min_replicas = 0;
  EXPECT_NE(message(hosts, {}, o).find("min_replicas"), std::string::npos);
}
