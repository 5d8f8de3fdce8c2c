// Content addresses of KV blocks, for prefix reuse across requests and workers.
//
// A block holds the K/V of kBlockTokens consecutive tokens, and its K/V depend on every token
// before it. So a block's key chains the keys before it:
//   key_0 = XXH3_128(model_id, 0,       tokens[0..16))
//   key_i = XXH3_128(model_id, key_i-1, tokens[16i..16i+16))
// and one key names a whole prefix. Only full blocks get keys.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/kv_cache.h"

namespace moemesh {

inline constexpr int64_t kBlockTokens = KvCache::kBlockSize;

struct BlockKey {
  static constexpr size_t kBytes = 16;
  std::array<uint8_t, kBytes> bytes{};  // XXH128's canonical (big-endian) form

  // The wire form (a `bytes` field of proto/dataplane.proto); throws moemesh::Error unless
  // exactly 16 bytes.
  static BlockKey from_bytes(std::string_view b);
  std::string to_bytes() const { return std::string(bytes.begin(), bytes.end()); }
  std::string hex() const;

  bool operator==(const BlockKey&) const = default;
};

// Key of one block given the key of the block before it (nullptr for the first block).
// `tokens` must hold exactly kBlockTokens ids (else moemesh::Error).
BlockKey block_key(std::string_view model_id, const BlockKey* previous, std::span<const int32_t> tokens);

// Keys of every full block of `tokens`, in order (a trailing partial block gets none).
std::vector<BlockKey> prefix_block_keys(std::string_view model_id, std::span<const int32_t> tokens);

}  // namespace moemesh

template <>
struct std::hash<moemesh::BlockKey> {
  size_t operator()(const moemesh::BlockKey& k) const noexcept {
    size_t h;  // already a good hash: any 8 of its bytes will do
    static_assert(sizeof h <= moemesh::BlockKey::kBytes);
    __builtin_memcpy(&h, k.bytes.data(), sizeof h);
    return h;
  }
};
