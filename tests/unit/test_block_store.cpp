// BlockStore: byte budget, LRU eviction with gets refreshing recency, longest-prefix chain
// lookups, counters, and blocks that outlive their eviction while someone still holds them.
#include <gtest/gtest.h>

#include <numeric>

#include "actors/block_store.h"

using namespace moemesh;
using namespace moemesh::actors;

namespace {

std::vector<BlockKey> chain(size_t n, const std::string& model = "m") {
  std::vector<int32_t> t(n * kBlockTokens);
  std::iota(t.begin(), t.end(), 0);
  return prefix_block_keys(model, t);
}

StoredBlock block(size_t bytes, uint8_t fill) {
  std::vector<uint8_t> b(bytes, fill);
  return StoredBlock::copy_of(DType::F32, {int64_t(bytes / 4)}, b);
}

}  // namespace

TEST(BlockStore, StoresAndReturnsBlocks) {
  BlockStore s(1000);
  auto k = chain(2);
  EXPECT_EQ(s.put(k[0], block(100, 7)), BlockStore::Put::Stored);
  auto got = s.get(k[0]);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->size, 100u);
  EXPECT_EQ(got->data[99], 7);
  EXPECT_EQ(got->shape, std::vector<int64_t>{25});
  EXPECT_FALSE(s.get(k[1]));
  EXPECT_EQ(s.stats().hits, 1u);
  EXPECT_EQ(s.stats().misses, 1u);
  EXPECT_EQ(s.stats().bytes, 100u);
  EXPECT_EQ(s.stats().blocks, 1u);
  // Same key again: the block held is kept.
  EXPECT_EQ(s.put(k[0], block(100, 9)), BlockStore::Put::Present);
  EXPECT_EQ(s.get(k[0])->data[0], 7);
  EXPECT_EQ(s.stats().bytes, 100u);
}

TEST(BlockStore, EvictsLeastRecentlyUsedWithinBudget) {
  BlockStore s(300);
  auto k = chain(5);
  for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(i)));
  EXPECT_EQ(s.stats().bytes, 300u);
  ASSERT_TRUE(s.get(k[0]));  // k0 is now the most recent: k1 is the oldest
  s.put(k[3], block(100, 3));
  EXPECT_TRUE(s.contains(k[0]));
  EXPECT_FALSE(s.contains(k[1]));
  EXPECT_TRUE(s.contains(k[2]));
  EXPECT_TRUE(s.contains(k[3]));
  EXPECT_EQ(s.stats().evictions, 1u);
  // A big block evicts as many as it needs.
  s.put(k[4], block(250, 4));
  EXPECT_EQ(s.stats().blocks, 1u);
  EXPECT_TRUE(s.contains(k[4]));
  EXPECT_EQ(s.stats().bytes, 250u);
  EXPECT_EQ(s.stats().evictions, 4u);
  EXPECT_LE(s.stats().bytes, s.budget());
}

TEST(BlockStore, RefusesABlockOverTheWholeBudget) {
  BlockStore s(100);
  auto k = chain(2);
  s.put(k[0], block(80, 1));
  EXPECT_EQ(s.put(k[1], block(101, 2)), BlockStore::Put::TooLarge);
  EXPECT_TRUE(s.contains(k[0]));  // nothing evicted for nothing
  EXPECT_EQ(s.stats().too_large, 1u);
  EXPECT_EQ(s.stats().evictions, 0u);
}

TEST(BlockStore, ChainReturnsTheLongestPresentPrefix) {
  BlockStore s(10000);
  auto k = chain(5);
  for (int i : {0, 1, 2, 4}) s.put(k[i], block(40, uint8_t(i)));
  auto got = s.get_chain(k);
  ASSERT_EQ(got.size(), 3u);  // k3 is missing, so k4 is unreachable
  for (int i = 0; i < 3; ++i) EXPECT_EQ(got[i].data[0], i);
  EXPECT_EQ(s.stats().hits, 3u);
  EXPECT_EQ(s.stats().misses, 2u);
  EXPECT_EQ(s.get_chain(k, 2).size(), 2u);
  EXPECT_TRUE(s.get_chain(chain(3, "other")).empty());
}

TEST(BlockStore, ChainLookupsRefreshRecency) {
  BlockStore s(300);
  auto k = chain(4);
  for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(i)));
  s.get_chain(std::span(k).subspan(0, 1));  // uses k0
  s.put(k[3], block(100, 3));
  EXPECT_TRUE(s.contains(k[0]));
  EXPECT_FALSE(s.contains(k[1]));
}

TEST(BlockStore, AHeldBlockOutlivesItsEviction) {
  BlockStore s(100);
  auto k = chain(2);
  s.put(k[0], block(100, 5));
  auto held = s.get(k[0]);
  s.put(k[1], block(100, 6));  // evicts k0
  EXPECT_FALSE(s.contains(k[0]));
  EXPECT_EQ(held->data[50], 5);  // still readable: the holder shares ownership
}
