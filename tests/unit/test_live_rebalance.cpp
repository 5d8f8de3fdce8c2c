// The live re-placement state machine (core/live_rebalance.h): when it plans, the order of a move
// (load the union, switch the table, then drop), and aborts that leave the placement as it was.
#include <gtest/gtest.h>

#include "core/error.h"
#include "core/live_rebalance.h"

using namespace moemesh;
using namespace std::chrono_literals;
using Clock = LiveRebalancer::Clock;

namespace {

// Two hosts, one layer of 8 experts dealt round robin: a holds the even ones, b the odd ones.
struct Fixture {
  Placement pl{PlacementPlan({0}, 8, 2, 1)};
  Clock::time_point t0 = Clock::now();
  Fixture() {
    pl.add_host("a", "tcp://a", {}, t0);
    pl.add_host("b", "tcp://b", {}, t0);
  }
  // Experts 0 and 2 (both on a) take almost every row.
  std::map<ExpertKey, double> skewed() const {
    std::map<ExpertKey, double> l;
    for (int e = 0; e < 8; ++e) l[{0, e}] = 10;
    l[{0, 0}] = 5000;
    l[{0, 2}] = 4000;
    return l;
  }
  std::set<ExpertKey> of(const std::string& host) const {
    for (const auto& h : pl.table().hosts)
      if (h.instance == host) return h.experts;
    return {};
  }
};

RebalanceOptions opts() {
  RebalanceOptions o;
  o.interval = 1s;
  o.min_rows = 100;
  o.max_moves = 4;
  return o;
}

const RebalanceActions::Assign* to(const RebalanceActions& a, const std::string& host) {
  for (const auto& x : a.assign)
    if (x.instance == host) return &x;
  return nullptr;
}

}  // namespace

TEST(LiveRebalance, LoadsTheUnionThenSwitchesThenDrops) {
  Fixture f;
  LiveRebalancer r(opts());
  const auto before_a = f.of("a"), before_b = f.of("b");
  const uint64_t v0 = f.pl.table().version;

  // Planning: b gets (a replica of) a hot expert; nobody routes to it before it has loaded.
  RebalanceActions a = r.tick(f.t0 + 2s, f.pl, f.skewed(), true, {v0});
  ASSERT_EQ(r.phase(), LiveRebalancer::Phase::Loading);
  const auto* load_b = to(a, "b");
  ASSERT_NE(load_b, nullptr);
  for (const auto& k : before_b) EXPECT_TRUE(load_b->experts.count(k)) << "the union keeps what b had";
  EXPECT_GT(load_b->experts.size(), before_b.size());
  EXPECT_FALSE(a.publish);
  EXPECT_EQ(f.pl.table().version, v0);
  EXPECT_EQ(f.of("b"), before_b);

  // Answers for another move or host change nothing.
  EXPECT_TRUE(r.on_loaded(f.t0 + 2s, f.pl, "b", load_b->version + 7, "").assign.empty());
  EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Loading);

  // Every loading host answered: one new table with the new sets.
  std::set<std::string> loading;
  for (const auto& x : a.assign) loading.insert(x.instance);
  RebalanceActions s;
  for (const auto& h : loading) s = r.on_loaded(f.t0 + 3s, f.pl, h, load_b->version, "");
  ASSERT_EQ(r.phase(), LiveRebalancer::Phase::Switching);
  EXPECT_TRUE(s.publish);
  const uint64_t v1 = f.pl.table().version;
  EXPECT_GT(v1, v0);
  EXPECT_TRUE(f.pl.uncovered().empty());
  EXPECT_NE(f.of("a"), before_a);  // something moved or was replicated
  // The hot experts' load is spread: b now serves expert 0 or 1.
  EXPECT_TRUE(f.of("b").count({0, 0}) || f.of("b").count({0, 2}));

  // A worker still on the old table: no drop yet.
  EXPECT_TRUE(r.tick(f.t0 + 3500ms, f.pl, f.skewed(), true, {v0}).assign.empty());
  EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Switching);
  // Every worker applied it: hosts with experts to shed are told their final sets.
  RebalanceActions d = r.tick(f.t0 + 4s, f.pl, f.skewed(), true, {v1, v1 + 3});
  for (const auto& x : d.assign) EXPECT_EQ(x.experts, f.of(x.instance));
  if (d.assign.empty()) {
    EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Idle);  // nothing to drop: done at once
  } else {
    ASSERT_EQ(r.phase(), LiveRebalancer::Phase::Dropping);
    for (const auto& x : d.assign) r.on_loaded(f.t0 + 5s, f.pl, x.instance, x.version, "");
  }
  EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Idle);
  EXPECT_EQ(r.rebalances(), 1u);
  EXPECT_GT(r.moves(), 0u);
  EXPECT_LE(r.moves(), 2u * 4u);  // adds within the budget, plus their drops
}

TEST(LiveRebalance, ARefusalAbortsAndUnloadsWhatWasLoaded) {
  Fixture f;
  RebalanceOptions o = opts();
  LiveRebalancer r(o);
  const auto before_a = f.of("a"), before_b = f.of("b");
  const uint64_t v0 = f.pl.table().version;
  RebalanceActions a = r.tick(f.t0 + 2s, f.pl, f.skewed(), true, {v0});
  ASSERT_EQ(r.phase(), LiveRebalancer::Phase::Loading);
  ASSERT_FALSE(a.assign.empty());
  const uint64_t version = a.assign[0].version;
  if (a.assign.size() == 2) r.on_loaded(f.t0 + 2s, f.pl, a.assign[1].instance, version, "");
  RebalanceActions x = r.on_loaded(f.t0 + 2s, f.pl, a.assign[0].instance, version, "out of memory");
  EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Idle);
  EXPECT_EQ(r.aborted(), 1u);
  EXPECT_EQ(f.pl.table().version, v0);  // the table never changed
  EXPECT_EQ(f.of("a"), before_a);
  EXPECT_EQ(f.of("b"), before_b);
  // Only the host that loaded is told to unload, back to its old set.
  for (const auto& y : x.assign) {
    EXPECT_EQ(y.instance, a.assign.size() == 2 ? a.assign[1].instance : std::string("none"));
    EXPECT_EQ(y.experts, f.of(y.instance));
  }
}

TEST(LiveRebalance, AHostLeavingWhileLoadingAborts) {
  Fixture f;
  LiveRebalancer r(opts());
  RebalanceActions a = r.tick(f.t0 + 2s, f.pl, f.skewed(), true, {});
  ASSERT_EQ(r.phase(), LiveRebalancer::Phase::Loading);
  f.pl.remove_host(a.assign[0].instance);
  r.tick(f.t0 + 2500ms, f.pl, f.skewed(), true, {});
  EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Idle);
  EXPECT_EQ(r.aborted(), 1u);
}

TEST(LiveRebalance, ALoadThatNeverAnswersTimesOut) {
  Fixture f;
  RebalanceOptions o = opts();
  o.load_timeout = 3s;
  LiveRebalancer r(o);
  r.tick(f.t0 + 2s, f.pl, f.skewed(), true, {});
  ASSERT_EQ(r.phase(), LiveRebalancer::Phase::Loading);
  r.tick(f.t0 + 4s, f.pl, f.skewed(), true, {});
  EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Loading);
  r.tick(f.t0 + 6s, f.pl, f.skewed(), true, {});
  EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Idle);
  EXPECT_EQ(r.aborted(), 1u);
}

TEST(LiveRebalance, NothingWithoutEnoughLoadReadyHostsOrWhenBalanced) {
  RebalanceOptions o = opts();
  {
    Fixture f;
    LiveRebalancer r(o);
    auto few = f.skewed();
    for (auto& [k, n] : few) n /= 1000;  // under min_rows
    EXPECT_TRUE(r.tick(f.t0 + 2s, f.pl, few, true, {}).assign.empty());
    EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Idle);
  }
  {
    Fixture f;
    LiveRebalancer r(o);
    EXPECT_TRUE(r.tick(f.t0 + 2s, f.pl, f.skewed(), /*hosts_ready=*/false, {}).assign.empty());
    EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Idle);
    // The next look is an interval later, not on the next tick.
    EXPECT_TRUE(r.tick(f.t0 + 2500ms, f.pl, f.skewed(), true, {}).assign.empty());
    EXPECT_FALSE(r.tick(f.t0 + 3100ms, f.pl, f.skewed(), true, {}).assign.empty());
  }
  {
    Fixture f;
    LiveRebalancer r(o);
    std::map<ExpertKey, double> even;
    for (int e = 0; e < 8; ++e) even[{0, e}] = 1000;
    EXPECT_TRUE(r.tick(f.t0 + 2s, f.pl, even, true, {}).assign.empty());
    EXPECT_EQ(r.phase(), LiveRebalancer::Phase::Idle);
  }
  {
    RebalanceOptions off = o;
    off.interval = 0ms;
    Fixture f;
    LiveRebalancer r(off);
    EXPECT_TRUE(r.tick(f.t0 + 2s, f.pl, f.skewed(), true, {}).assign.empty());
  }
}

TEST(LiveRebalance, PinnedHostsAreLeftAlone) {
  Placement pl{PlacementPlan({0}, 8, 2, 1)};
  const auto t0 = Clock::now();
  pl.add_host("a", "tcp://a", {{0, 1}, {0, 3}, {0, 5}, {0, 7}}, t0);  // b takes slot 0: the even ones
  pl.add_host("b", "tcp://b", {}, t0);
  ASSERT_TRUE(pl.uncovered().empty());
  EXPECT_FALSE(pl.reassign("a", {{0, 0}}));
  LiveRebalancer r(opts());
  std::map<ExpertKey, double> l{{{0, 0}, 5000}, {{0, 2}, 4000}};
  RebalanceActions a = r.tick(t0 + 2s, pl, l, true, {});
  EXPECT_TRUE(a.assign.empty());
  ASSERT_EQ(a.log.size(), 1u);
  EXPECT_NE(a.log[0].find("pinned"), std::string::npos);
}

TEST(LiveRebalance, AReplacementHostInheritsTheRePlacedSet) {
  Fixture f;
  std::set<ExpertKey> mine{{0, 0}, {0, 1}, {0, 4}};
  ASSERT_TRUE(f.pl.reassign("b", mine));
  f.pl.remove_host("b");
  EXPECT_EQ(f.pl.add_host("c", "tcp://c", {}, f.t0 + 1s), mine);
}

// Each layer's step waits for that layer's busiest host: two layers hot on different hosts are
// balanced in sum, yet every step is slow. The plan splits each layer's hot pair.
TEST(LiveRebalance, BalancesEachLayerNotTheSumOverLayers) {
  Placement pl{PlacementPlan({0, 1}, 8, 2, 1)};
  const auto t0 = Clock::now();
  pl.add_host("a", "tcp://a", {}, t0);  // even experts of both layers
  pl.add_host("b", "tcp://b", {}, t0);  // odd ones
  std::map<ExpertKey, double> l;
  for (int layer = 0; layer < 2; ++layer)
    for (int e = 0; e < 8; ++e) l[{layer, e}] = 10;
  l[{0, 0}] = 5000, l[{0, 2}] = 4000;  // layer 0: both on a
  l[{1, 1}] = 5000, l[{1, 3}] = 4000;  // layer 1: both on b
  LiveRebalancer r(opts());
  RebalanceActions a = r.tick(t0 + 2s, pl, l, true, {});
  ASSERT_EQ(r.phase(), LiveRebalancer::Phase::Loading) << "a summed objective sees nothing to gain";
  for (const auto& x : a.assign) r.on_loaded(t0 + 2s, pl, x.instance, x.version, "");
  ASSERT_EQ(r.phase(), LiveRebalancer::Phase::Switching);
  auto holds = [&](const std::string& host, ExpertKey k) {
    for (const auto& h : pl.table().hosts)
      if (h.instance == host) return h.experts.count(k) > 0;
    return false;
  };
  EXPECT_TRUE(holds("b", {0, 0}) || holds("b", {0, 2})) << "layer 0's hot pair should be split";
  EXPECT_TRUE(holds("a", {1, 1}) || holds("a", {1, 3})) << "layer 1's hot pair should be split";
  EXPECT_TRUE(pl.uncovered().empty());
}

TEST(LiveRebalance, BadOptionsAreRefused) {
  RebalanceOptions o;
  o.max_moves = 0;
  EXPECT_THROW(LiveRebalancer{o}, Error);
  o = {};
  o.min_gain = 1.5;
  EXPECT_THROW(LiveRebalancer{o}, Error);
}
