#include "core/prefix_hash.h"

#include <cstring>

// Header-only xxHash: nothing to link, so moemesh_core stays self-contained.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/error.h"

namespace moemesh {

BlockKey BlockKey::from_bytes(std::string_view b) {
  if (b.size() != kBytes)
    throw Error("block key of " + std::to_string(b.size()) + " bytes, expected " + std::to_string(kBytes));
  BlockKey k;
  std::memcpy(k.bytes.data(), b.data(), kBytes);
  return k;
}

std::string BlockKey::hex() const {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (uint8_t b : bytes) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

BlockKey block_key(std::string_view model_id, const BlockKey* previous, std::span<const int32_t> tokens) {
  if (int64_t(tokens.size()) != kBlockTokens)
    throw Error("a KV block holds " + std::to_string(kBlockTokens) + " tokens, got " + std::to_string(tokens.size()));
  // model_id is length-prefixed so that no (model, tokens) pair can alias another.
  XXH3_state_t state;
  XXH3_128bits_reset(&state);
  uint32_t len = uint32_t(model_id.size());
  XXH3_128bits_update(&state, &len, sizeof len);  // little-endian hosts only (as the wire codec)
  XXH3_128bits_update(&state, model_id.data(), model_id.size());
  BlockKey zero;
  XXH3_128bits_update(&state, (previous ? previous : &zero)->bytes.data(), BlockKey::kBytes);
  XXH3_128bits_update(&state, tokens.data(), tokens.size_bytes());
  XXH128_canonical_t canon;
  XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(&state));
  BlockKey k;
  std::memcpy(k.bytes.data(), canon.digest, BlockKey::kBytes);
  return k;
}

std::vector<BlockKey> prefix_block_keys(std::string_view model_id, std::span<const int32_t> tokens) {
  std::vector<BlockKey> keys;
  size_t n = tokens.size() / size_t(kBlockTokens);
  keys.reserve(n);
  for (size_t i = 0; i < n; ++i)
    keys.push_back(block_key(model_id, i ? &keys.back() : nullptr, tokens.subspan(i * kBlockTokens, kBlockTokens)));
  return keys;
}

}  // namespace moemesh
