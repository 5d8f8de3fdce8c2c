// Prefix hashing of KV blocks: the chain property (a key names its whole prefix), the exact
// byte layout hashed, and the wire form of keys.
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <unordered_set>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/error.h"
#include "core/prefix_hash.h"

using namespace moemesh;

namespace {
std::vector<int32_t> tokens(size_t n, int32_t start = 1) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), start);
  return t;
}
}  // namespace

TEST(PrefixHash, OnlyFullBlocksGetKeys) {
  EXPECT_EQ(kBlockTokens, 16);
  EXPECT_TRUE(prefix_block_keys("m", tokens(15)).empty());
  EXPECT_EQ(prefix_block_keys("m", tokens(16)).size(), 1u);
  EXPECT_EQ(prefix_block_keys("m", tokens(47)).size(), 2u);
  EXPECT_EQ(prefix_block_keys("m", tokens(48)).size(), 3u);
}

TEST(PrefixHash, AKeyNamesItsWholePrefix) {
  auto t = tokens(48);
  auto keys = prefix_block_keys("m", t);
  // A longer prompt with the same start shares the keys of the common blocks.
  auto longer = tokens(70);
  auto lkeys = prefix_block_keys("m", longer);
  ASSERT_EQ(lkeys.size(), 4u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(lkeys[i], keys[i]);

  // A change in block 2 changes only key 2; a change in block 0 changes every key.
  auto late = t;
  late[40] = 9999;
  auto lk = prefix_block_keys("m", late);
  EXPECT_EQ(lk[0], keys[0]);
  EXPECT_EQ(lk[1], keys[1]);
  EXPECT_NE(lk[2], keys[2]);
  auto early = t;
  early[0] = 9999;
  auto ek = prefix_block_keys("m", early);
  for (size_t i = 0; i < 3; ++i) EXPECT_NE(ek[i], keys[i]);

  // Same tokens in block 1 after a different block 0: a different key (the chain).
  EXPECT_NE(block_key("m", &ek[0], std::span(t).subspan(16, 16)), keys[1]);
  // Another model: other keys.
  EXPECT_NE(prefix_block_keys("m2", t)[0], keys[0]);
  // Identical blocks at different positions differ.
  std::vector<int32_t> same(32, 7);
  auto sk = prefix_block_keys("m", same);
  EXPECT_NE(sk[0], sk[1]);
}

TEST(PrefixHash, HashesTheDocumentedBytes) {
  // key_i = XXH3_128(u32 len(model) | model | key_{i-1} (zeros for i = 0) | 16 x i32 LE tokens)
  auto t = tokens(32, 100);
  auto keys = prefix_block_keys("mixtral", t);
  std::vector<uint8_t> buf;
  auto append = [&](const void* p, size_t n) {
    auto c = static_cast<const uint8_t*>(p);
    buf.insert(buf.end(), c, c + n);
  };
  BlockKey prev;
  for (size_t i = 0; i < 2; ++i) {
    buf.clear();
    uint32_t len = 7;
    append(&len, 4);
    append("mixtral", 7);
    append(prev.bytes.data(), 16);
    append(t.data() + 16 * i, 64);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(buf.data(), buf.size()));
    EXPECT_EQ(std::memcmp(c.digest, keys[i].bytes.data(), 16), 0) << i;
    prev = keys[i];
  }
}

TEST(PrefixHash, WireFormAndErrors) {
  auto k = prefix_block_keys("m", tokens(16))[0];
  EXPECT_EQ(BlockKey::from_bytes(k.to_bytes()), k);
  EXPECT_EQ(k.hex().size(), 32u);
  EXPECT_THROW(BlockKey::from_bytes("short"), Error);
  EXPECT_THROW(BlockKey::from_bytes(std::string(17, 'x')), Error);
  auto short_block = tokens(15);
  EXPECT_THROW(block_key("m", nullptr, short_block), Error);
  auto many = prefix_block_keys("m", tokens(160));
  std::unordered_set<BlockKey> set(many.begin(), many.end());
  EXPECT_EQ(set.size(), 10u);
}
