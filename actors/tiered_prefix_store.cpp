#include "actors/tiered_prefix_store.h"

#include <cstring>

namespace moemesh::actors {

size_t TieredPrefixStore::KeyHash::operator()(const BlockKey& k) const {
  size_t h;  // the key is already a hash: any 8 of its bytes will do
  std::memcpy(&h, k.bytes.data(), sizeof h);
  return h;
}

TieredPrefixStore::TieredPrefixStore(std::shared_ptr<PrefixStore> remote, uint64_t budget_bytes)
    : remote_(std::move(remote)), budget_(budget_bytes) {}

void TieredPrefixStore::keep(const BlockKey& key, std::vector<float> block) {
  const uint64_t size = block.size() * sizeof(float);
  if (size > budget_) return;
  if (auto it = index_.find(key); it != index_.end()) {  // same key, same content: refresh it
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  while (stats_.bytes + size > budget_ && !lru_.empty()) {
    stats_.bytes -= lru_.back().second.size() * sizeof(float);
    index_.erase(lru_.back().first);
    lru_.pop_back();
    ++stats_.evicted_blocks;
  }
  lru_.emplace_front(key, std::move(block));
  index_[key] = lru_.begin();
  stats_.bytes += size;
}

std::vector<std::vector<float>> TieredPrefixStore::fetch(std::span<const BlockKey> keys, size_t block_floats,
                                                         const TraceRef& trace) {
  std::vector<std::vector<float>> out;
  {
    std::lock_guard lock(mu_);
    for (const BlockKey& k : keys) {
      auto it = index_.find(k);
      if (it == index_.end() || it->second->second.size() != block_floats) break;
      lru_.splice(lru_.begin(), lru_, it->second);
      out.push_back(it->second->second);
    }
    stats_.local_hit_blocks += out.size();
  }
  if (!remote_ || out.size() == keys.size()) return out;
  // The store is asked without the lock: a fetch can wait for its deadline.
  const size_t have = out.size();
  auto more = remote_->fetch(keys.subspan(have), block_floats, trace);
  std::lock_guard lock(mu_);
  stats_.remote_hit_blocks += more.size();
  for (size_t i = 0; i < more.size(); ++i) {
    keep(keys[have + i], more[i]);
    out.push_back(std::move(more[i]));
  }
  return out;
}

void TieredPrefixStore::publish(std::span<const BlockKey> keys, std::vector<std::vector<float>> blocks,
                                const TraceRef& trace) {
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < keys.size() && i < blocks.size(); ++i) keep(keys[i], blocks[i]);
  }
  if (remote_) remote_->publish(keys, std::move(blocks), trace);
}

TieredPrefixStats TieredPrefixStore::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

}  // namespace moemesh::actors
