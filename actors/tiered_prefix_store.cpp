#include "actors/tiered_prefix_store.h"

#include <cstring>

#include "actors/block_store_disk.h"  // BlockStore's optional tier, complete for its constructor

namespace moemesh::actors {
namespace {

// A block as the memory tier holds it: the vector itself owns the bytes (no copy).
StoredBlock stored(std::vector<float> block) {
  auto owned = std::make_shared<std::vector<float>>(std::move(block));
  StoredBlock b{DType::F32, {int64_t(owned->size())}, nullptr, reinterpret_cast<const uint8_t*>(owned->data()),
                owned->size() * sizeof(float)};
  b.owner = std::move(owned);
  return b;
}

}  // namespace

TieredPrefixStore::TieredPrefixStore(std::shared_ptr<PrefixStore> remote, uint64_t budget_bytes)
    : remote_(std::move(remote)), memory_(budget_bytes) {}

std::vector<std::vector<float>> TieredPrefixStore::fetch(std::span<const BlockKey> keys, size_t block_floats,
                                                         const TraceRef& trace) {
  std::vector<std::vector<float>> out;
  {
    std::lock_guard lock(mu_);
    for (const BlockKey& k : keys) {
      auto b = memory_.get(k);
      if (!b || b->size != block_floats * sizeof(float)) break;
      std::vector<float>& v = out.emplace_back(block_floats);
      std::memcpy(v.data(), b->data, b->size);
    }
    local_hits_ += out.size();
  }
  if (!remote_ || out.size() == keys.size()) return out;
  // The store is asked without the lock: a fetch can wait for its deadline.
  const size_t have = out.size();
  auto more = remote_->fetch(keys.subspan(have), block_floats, trace);
  std::lock_guard lock(mu_);
  remote_hits_ += more.size();
  for (size_t i = 0; i < more.size(); ++i) {
    memory_.put(keys[have + i], stored(more[i]));
    out.push_back(std::move(more[i]));
  }
  return out;
}

void TieredPrefixStore::publish(std::span<const BlockKey> keys, std::vector<std::vector<float>> blocks,
                                const TraceRef& trace) {
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < keys.size() && i < blocks.size(); ++i) memory_.put(keys[i], stored(blocks[i]));
  }
  if (remote_) remote_->publish(keys, std::move(blocks), trace);
}

TieredPrefixStats TieredPrefixStore::stats() const {
  std::lock_guard lock(mu_);
  return {local_hits_, remote_hits_, memory_.stats().evictions, memory_.stats().bytes};
}

}  // namespace moemesh::actors
