// The attention worker's prefix cache in two tiers: recently used blocks in this process's
// memory (an LRU under a byte budget), in front of the shared KV store (optional).
//
// A fetch takes the chain's leading blocks from memory and asks the store only for the rest; what
// the store returns is kept in memory too. A publish lands in memory and is forwarded to the
// store. The memory tier is why the router places a request on the worker that last saw its
// prefix (prefix affinity): there, a hit costs a copy instead of a round trip. Thread-safe.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>

#include "actors/block_pool.h"
#include "actors/block_store.h"
#include "actors/kv_client.h"

namespace moemesh::actors {

struct TieredPrefixStats {
  uint64_t local_hit_blocks = 0;   // served from memory
  uint64_t remote_hit_blocks = 0;  // served by the store (then kept in memory)
  uint64_t evicted_blocks = 0;     // dropped from memory for room
  uint64_t bytes = 0;              // held in memory now
};

class TieredPrefixStore : public PrefixStore {
 public:
  // remote may be null (memory only). budget_bytes 0 keeps nothing in memory.
  TieredPrefixStore(std::shared_ptr<PrefixStore> remote, uint64_t budget_bytes);

  std::vector<std::vector<float>> fetch(std::span<const BlockKey> keys, size_t block_floats,
                                        const TraceRef& trace = {}) override;
  std::vector<std::vector<std::vector<float>>> fetch_many(std::span<const PrefixQuery> queries, size_t block_floats,
                                                          WaitUntil give_up = kWaitForTheStore) override;
  void publish(std::span<const BlockKey> keys, std::vector<std::vector<float>> blocks,
               const TraceRef& trace = {}) override;

  TieredPrefixStats stats() const;

 private:
  // A copy of `block` in the pool (its pages faulted in ahead, reused after an eviction).
  StoredBlock stored(const std::vector<float>& block);

  std::shared_ptr<PrefixStore> remote_;
  mutable std::mutex mu_;
  BlockStore memory_;  // the same LRU-under-a-budget the KV store keeps (no disk tier)
  std::shared_ptr<BlockPool> pool_;  // where memory_'s blocks live
  uint64_t local_hits_ = 0, remote_hits_ = 0;
};

}  // namespace moemesh::actors
