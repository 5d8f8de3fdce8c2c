// Expert placement: coverage, replicas, slot reuse by a replacement host, expiry.
#include <gtest/gtest.h>

#include "core/error.h"
#include "core/placement.h"

using namespace moemesh;
using namespace std::chrono_literals;

namespace {
PlacementPlan plan(int slots, int replicas) { return PlacementPlan({1, 2, 3}, 8, slots, replicas); }
}  // namespace

TEST(Placement, EveryExpertOnExactlyRHosts) {
  for (int slots : {1, 3, 4}) {
    for (int r = 1; r <= slots && r <= 2; ++r) {
      PlacementPlan p = plan(slots, r);
      std::map<ExpertKey, int> copies;
      for (int s = 0; s < p.slots(); ++s)
        for (const auto& k : p.slot(s)) ++copies[k];
      ASSERT_EQ(copies.size(), 24u);
      for (const auto& [k, n] : copies) EXPECT_EQ(n, r) << "slots " << slots << " layer " << k.first;
      // balanced: slot sizes differ by at most one
      size_t lo = 1000, hi = 0;
      for (int s = 0; s < p.slots(); ++s) lo = std::min(lo, p.slot(s).size()), hi = std::max(hi, p.slot(s).size());
      EXPECT_LE(hi - lo, 1u);
    }
  }
  EXPECT_THROW(plan(2, 3), Error);
}

TEST(Placement, ReplicaRotationIsFixedPerKeyAndSpreadsOverTheReplicas) {
  std::vector<int> first(3, 0);
  for (int32_t e = 0; e < 300; ++e) {
    const size_t r = replica_rotation(1, e, 42, 3);
    ASSERT_LT(r, 3u);
    EXPECT_EQ(r, replica_rotation(1, e, 42, 3));  // the same client asks the same replica first
    ++first[r];
  }
  for (int n : first) EXPECT_GT(n, 60);  // each of three replicas first for a fair share
  int moved = 0;                         // another client (salt) starts elsewhere for some keys
  for (int32_t e = 0; e < 300; ++e) moved += replica_rotation(1, e, 42, 3) != replica_rotation(1, e, 7, 3);
  EXPECT_GT(moved, 60);
  EXPECT_EQ(replica_rotation(5, 9, 1, 1), 0u);
}

TEST(Placement, HostsTakeSlotsAndReplacementsInheritThem) {
  Placement pl(plan(2, 1));
  auto t0 = Placement::Clock::now();
  auto a = pl.add_host("a", "tcp://a", {}, t0);
  EXPECT_EQ(pl.uncovered().size(), 24u - a.size());
  auto b = pl.add_host("b", "tcp://b", {}, t0);
  EXPECT_TRUE(pl.uncovered().empty());
  uint64_t v = pl.table().version;
  ASSERT_EQ(pl.table().hosts.size(), 2u);
  EXPECT_EQ(pl.table().hosts_for(2, 5).size(), 1u);

  // a goes silent; b keeps beating
  pl.touch("b", t0 + 3s);
  auto dead = pl.expire(t0 + 3s, 2s);
  ASSERT_EQ(dead, std::vector<std::string>{"a"});
  EXPECT_GT(pl.table().version, v);
  EXPECT_EQ(pl.uncovered().size(), a.size());
  // a replacement gets a's experts
  auto c = pl.add_host("c", "tcp://c", {}, t0 + 4s);
  EXPECT_EQ(c, a);
  EXPECT_TRUE(pl.uncovered().empty());
}

TEST(Placement, PinnedHostsAndIdempotentRegistration) {
  Placement pl(plan(2, 1));
  auto t0 = Placement::Clock::now();
  std::set<ExpertKey> pinned{{1, 0}, {1, 1}};
  EXPECT_EQ(pl.add_host("p", "tcp://p", pinned, t0), pinned);
  uint64_t v = pl.table().version;
  EXPECT_EQ(pl.add_host("p", "tcp://p", pinned, t0), pinned);  // a retried registration
  EXPECT_EQ(pl.table().version, v);
  EXPECT_FALSE(pl.touch("nobody", t0));
}

TEST(Placement, AHostThatComesBackGetsItsOldSlot) {
  // Both hosts go silent and come back in the other order: each must serve what it loaded.
  Placement pl(plan(2, 1));
  auto t0 = Placement::Clock::now();
  auto a = pl.add_host("a", "tcp://a", {}, t0);
  auto b = pl.add_host("b", "tcp://b", {}, t0);
  ASSERT_NE(a, b);
  EXPECT_EQ(pl.expire(t0 + 5s, 2s).size(), 2u);
  EXPECT_EQ(pl.add_host("b", "tcp://b", {}, t0 + 6s), b);
  EXPECT_EQ(pl.add_host("a", "tcp://a", {}, t0 + 6s), a);
  EXPECT_TRUE(pl.uncovered().empty());
}

TEST(Placement, AHostBeyondTheSlotsGetsTheHottestExpertsOnceLoadIsKnown) {
  Placement pl(plan(2, 1));  // 24 experts, 12 per slot
  auto t0 = Placement::Clock::now();
  const auto a = pl.add_host("a", "tcp://a", {}, t0);
  const auto b = pl.add_host("b", "tcp://b", {}, t0);
  // Before any load is measured: a copy of a slot, round robin.
  const auto c = pl.add_host("c", "tcp://c", {}, t0);
  EXPECT_TRUE(c == a || c == b);
  EXPECT_EQ(pl.load_placed(), 0u);

  std::map<ExpertKey, double> load;
  for (const auto& k : pl.plan().all_experts()) load[k] = 1;
  load[{2, 5}] = 500;
  load[{3, 1}] = 400;
  pl.set_load(load);
  const auto d = pl.add_host("d", "tcp://d", {}, t0);
  EXPECT_TRUE(d.count({2, 5}) && d.count({3, 1})) << "the two hot experts go to the new host first";
  EXPECT_LE(d.size(), a.size()) << "no more than a slot holds";
  EXPECT_EQ(pl.load_placed(), d.size());

  // It comes back after an expiry with what it loaded.
  EXPECT_EQ(pl.expire(t0 + 5s, 2s).size(), 4u);
  EXPECT_EQ(pl.add_host("d", "tcp://d", {}, t0 + 6s), d);
}
