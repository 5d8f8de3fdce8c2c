#include "actors/tiered_prefix_store.h"

#include <cstring>

#include "actors/block_store_disk.h"  // BlockStore's optional tier, complete for its constructor

namespace moemesh::actors {
namespace {

std::span<const uint8_t> bytes_of(const std::vector<float>& block) {
  return {reinterpret_cast<const uint8_t*>(block.data()), block.size() * sizeof(float)};
}

}  // namespace

TieredPrefixStore::TieredPrefixStore(std::shared_ptr<PrefixStore> remote, uint64_t budget_bytes)
    : remote_(std::move(remote)), memory_(budget_bytes), pool_(BlockPool::make(budget_bytes)) {}

StoredBlock TieredPrefixStore::stored(const std::vector<float>& block) {
  return pool_->copy_of(DType::F32, {int64_t(block.size())}, bytes_of(block));
}

std::vector<std::vector<float>> TieredPrefixStore::fetch(std::span<const BlockKey> keys, size_t block_floats,
                                                         const TraceRef& trace) {
  const PrefixQuery q{{keys.begin(), keys.end()}, trace};
  return std::move(fetch_many(std::span(&q, 1), block_floats)[0]);
}

std::vector<std::vector<std::vector<float>>> TieredPrefixStore::fetch_many(std::span<const PrefixQuery> queries,
                                                                           size_t block_floats, WaitUntil give_up) {
  std::vector<std::vector<std::vector<float>>> out(queries.size());
  std::vector<PrefixQuery> rests;  // what memory lacks, for the store
  std::vector<size_t> rest_of;     // rests[i] continues queries[rest_of[i]]
  {
    std::lock_guard lock(mu_);
    for (size_t q = 0; q < queries.size(); ++q) {
      const auto& keys = queries[q].keys;
      for (const BlockKey& k : keys) {
        auto b = memory_.get(k);
        if (!b || b->size != block_floats * sizeof(float)) break;
        std::memcpy(out[q].emplace_back(block_floats).data(), b->data, b->size);
      }
      local_hits_ += out[q].size();
      if (remote_ && out[q].size() < keys.size()) {
        rests.push_back({{keys.begin() + std::ptrdiff_t(out[q].size()), keys.end()}, queries[q].trace});
        rest_of.push_back(q);
      }
    }
  }
  if (rests.empty()) return out;
  // The store is asked without the lock: a fetch can wait for its deadline.
  auto more = remote_->fetch_many(rests, block_floats, give_up);
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < rests.size(); ++i) {
    auto& blocks = out[rest_of[i]];
    remote_hits_ += more[i].size();
    for (size_t b = 0; b < more[i].size(); ++b) {
      memory_.put(rests[i].keys[b], stored(more[i][b]));
      blocks.push_back(std::move(more[i][b]));
    }
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
