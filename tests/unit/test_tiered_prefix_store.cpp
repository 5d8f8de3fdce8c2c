// The worker's two-tier prefix cache: memory first, the store only for the rest of the chain,
// what the store returns kept in memory, least recently used blocks evicted under the budget.
#include <gtest/gtest.h>

#include <map>

#include "actors/tiered_prefix_store.h"

using namespace moemesh;
using namespace moemesh::actors;

namespace {

constexpr size_t kFloats = 8;  // a tiny "block"

// A store that records what it was asked for.
struct MapStore : PrefixStore {
  std::map<std::string, std::vector<float>> blocks;
  std::vector<size_t> asked;  // chain lengths of each fetch
  int batches = 0;            // fetch_many calls
  size_t published = 0;
  std::vector<std::vector<std::vector<float>>> fetch_many(std::span<const PrefixQuery> queries, size_t floats,
                                                          WaitUntil give_up = kWaitForTheStore) override {
    ++batches;
    last_give_up = give_up;
    return PrefixStore::fetch_many(queries, floats);
  }
  WaitUntil last_give_up{};
  std::vector<std::vector<float>> fetch(std::span<const BlockKey> keys, size_t, const TraceRef&) override {
    asked.push_back(keys.size());
    std::vector<std::vector<float>> out;
    for (const auto& k : keys) {
      auto it = blocks.find(k.to_bytes());
      if (it == blocks.end()) break;
      out.push_back(it->second);
    }
    return out;
  }
  void publish(std::span<const BlockKey> keys, std::vector<std::vector<float>> b, const TraceRef&) override {
    for (size_t i = 0; i < keys.size(); ++i) blocks[keys[i].to_bytes()] = b[i];
    published += keys.size();
  }
};

std::vector<BlockKey> chain(int32_t first, int n) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < n * int(kBlockTokens); ++i) tokens.push_back(first + i);
  return prefix_block_keys("m", tokens);
}

std::vector<std::vector<float>> blocks_of(int n, float base) {
  std::vector<std::vector<float>> b;
  for (int i = 0; i < n; ++i) b.emplace_back(kFloats, base + float(i));
  return b;
}

}  // namespace

TEST(TieredPrefixStore, MemoryServesWhatWasPublishedAndForwardsToTheStore) {
  auto remote = std::make_shared<MapStore>();
  TieredPrefixStore t(remote, 1 << 20);
  const auto keys = chain(1, 3);
  t.publish(keys, blocks_of(3, 10));
  EXPECT_EQ(remote->published, 3u);
  const auto got = t.fetch(keys, kFloats);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[2][0], 12.0f);
  EXPECT_TRUE(remote->asked.empty()) << "a full memory hit must not ask the store";
  EXPECT_EQ(t.stats().local_hit_blocks, 3u);
}

TEST(TieredPrefixStore, TheStoreIsAskedOnlyForTheRestAndItsBlocksAreKept) {
  auto remote = std::make_shared<MapStore>();
  const auto keys = chain(5, 4);
  remote->publish(keys, blocks_of(4, 0), {});  // the store has all 4 (another worker published them)
  TieredPrefixStore t(remote, 1 << 20);
  t.publish(std::span(keys).first(1), blocks_of(1, 0));  // memory has the first
  auto got = t.fetch(keys, kFloats);
  ASSERT_EQ(got.size(), 4u);
  ASSERT_EQ(remote->asked.size(), 1u);
  EXPECT_EQ(remote->asked[0], 3u) << "only the 3 blocks memory lacks";
  EXPECT_EQ(t.stats().remote_hit_blocks, 3u);
  got = t.fetch(keys, kFloats);  // now all in memory
  EXPECT_EQ(got.size(), 4u);
  EXPECT_EQ(remote->asked.size(), 1u);
}

TEST(TieredPrefixStore, ManyChainsAskTheStoreOnceForWhatMemoryLacks) {
  auto remote = std::make_shared<MapStore>();
  const auto a = chain(100, 3), b = chain(200, 2), c = chain(300, 2);
  remote->publish(a, blocks_of(3, 0), {});
  remote->publish(std::span(b).first(1), blocks_of(1, 20), {});  // the store has b's first block only
  TieredPrefixStore t(remote, 1 << 20);
  t.publish(std::span(a).first(2), blocks_of(2, 0));  // memory has a's first two
  t.publish(c, blocks_of(2, 30));                     // and all of c
  const std::vector<PrefixQuery> queries{{a, {}}, {b, {}}, {c, {}}, {{}, {}}};
  const auto got = t.fetch_many(queries, kFloats);
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[0].size(), 3u);
  EXPECT_EQ(got[0][2][0], 2.0f);
  ASSERT_EQ(got[1].size(), 1u);
  EXPECT_EQ(got[1][0][0], 20.0f);
  ASSERT_EQ(got[2].size(), 2u);
  EXPECT_EQ(got[2][1][0], 31.0f);
  EXPECT_TRUE(got[3].empty());
  EXPECT_EQ(remote->batches, 1) << "the chains' rests go to the store in one batch";
  EXPECT_EQ(remote->last_give_up, kWaitForTheStore) << "no budget asked, none passed on";
  EXPECT_EQ(remote->asked, (std::vector<size_t>{1, 2})) << "a's last block and all of b; c is all in memory";
  EXPECT_EQ(t.stats().remote_hit_blocks, 2u);
  EXPECT_EQ(t.stats().local_hit_blocks, 4u);
}

TEST(TieredPrefixStore, LeastRecentlyUsedBlocksGoFirstUnderTheBudget) {
  TieredPrefixStore t(nullptr, 3 * kFloats * sizeof(float));  // room for 3 blocks, no store
  const auto a = chain(100, 2), b = chain(200, 2);
  t.publish(a, blocks_of(2, 0));
  EXPECT_EQ(t.fetch(std::span(a).first(1), kFloats).size(), 1u);  // a[0] is now the most recent
  t.publish(b, blocks_of(2, 5));                                  // 4 blocks for 3 places: a[1], the least recent, goes
  EXPECT_EQ(t.stats().evicted_blocks, 1u);
  EXPECT_EQ(t.fetch(a, kFloats).size(), 1u) << "a[0] kept, a[1] evicted";
  EXPECT_EQ(t.fetch(b, kFloats).size(), 2u);
  EXPECT_EQ(t.stats().bytes, 3 * kFloats * sizeof(float));
  TieredPrefixStore none(nullptr, 0);  // budget 0 keeps nothing
  none.publish(a, blocks_of(2, 0));
  EXPECT_TRUE(none.fetch(a, kFloats).empty());
}

TEST(TieredPrefixStore, TheCallersWaitBudgetGoesOnToTheStore) {
  auto remote = std::make_shared<MapStore>();
  TieredPrefixStore t(remote, 1 << 20);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(3);
  const std::vector<PrefixQuery> queries{{chain(100, 2), {}}};
  t.fetch_many(queries, kFloats, give_up);
  EXPECT_EQ(remote->last_give_up, give_up);
}
