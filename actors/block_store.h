// The KV store: content-addressed KV blocks (see core/prefix_hash.h) in a memory tier under a
// byte budget, evicted least-recently-used first (a get counts as a use), and optionally a disk
// tier (actors/block_store_disk.h) below it: blocks evicted from memory are written there, and a
// get that misses memory reads the disk and promotes a hit back into memory (the file stays, so
// a block evicted again is not rewritten).
//
// BlockStore is a plain class (unit-tested alone); spawn_block_store wraps it in an actor
// that serves the data-plane protocol on a ROUTER socket of the bridge:
//   KvPut{model_id, keys} + one tensor frame per key
//       -> KvPut{model_id, keys actually held} with the same request_id, no tensors (the ack)
//   KvGet{model_id, keys: a chain}
//       -> KvGetReply{found} + the tensor frames of the longest present prefix of the chain
//          (at most wire::kMaxTensors blocks: a longer chain is asked again from there)
//   anything undecodable or unexpected
//       -> Error + ErrorReply{code, message} (request_id 0 when the header was unreadable),
//          counted in moemesh_kvstore_bad_frames_total{reason}; the store carries on.
// A KvGet is answered before the KvPuts queued ahead of it (its caller waits for it, a put's
// caller does not), except those holding a block of its chain: what a client put, its next get
// finds. Puts are checked on arrival and stored in arrival order, one per turn of the mailbox.
#pragma once
#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include <caf/all.hpp>
#include <prometheus/registry.h>

#include "actors/zmq_bridge.h"
#include "core/dtype.h"
#include "core/prefix_hash.h"

namespace moemesh::actors {

// One block's tensor: its bytes stay with whoever owns them (a slot of actors/block_pool.h, a
// vector), shared, so a block being sent survives its own eviction.
struct StoredBlock {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::shared_ptr<const void> owner;
  const uint8_t* data = nullptr;
  size_t size = 0;

  static StoredBlock copy_of(DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes);
};

struct BlockStoreStats {
  uint64_t hits = 0, misses = 0, evictions = 0;  // hits of both tiers; evictions from memory
  uint64_t disk_hits = 0;                         // of `hits`, read from the disk tier
  uint64_t stored = 0, present = 0, too_large = 0;  // puts, by outcome
  uint64_t bytes = 0, blocks = 0;                   // held in memory now
};

class BlockDiskTier;

class BlockStore {
 public:
  // `disk` (optional) receives the blocks evicted from memory.
  explicit BlockStore(uint64_t budget_bytes, std::unique_ptr<BlockDiskTier> disk = nullptr);
  ~BlockStore();

  enum class Put { Stored, Present, TooLarge };
  // Stores a block, evicting the least recently used ones to make room. A key already held
  // keeps its block (same key, same content) and counts as used. A block over the whole
  // budget is refused.
  Put put(const BlockKey& key, StoredBlock block);
  // The block, counted as a hit (and used) or a miss. A disk hit is promoted into memory.
  std::optional<StoredBlock> get(const BlockKey& key);
  // The longest held prefix of `chain` (at most `limit` blocks): hits for those returned,
  // misses for the rest of the chain.
  std::vector<StoredBlock> get_chain(std::span<const BlockKey> chain, size_t limit = SIZE_MAX);
  // Writes every block held in memory to the disk tier (least recently used first, so recency
  // carries over); for a graceful shutdown, so a restart keeps the whole cache. Returns the
  // number written (0 without a disk tier).
  size_t spill_all();
  bool contains(const BlockKey& key) const { return map_.count(key) > 0; }  // in memory; no use, no count
  const BlockDiskTier* disk() const { return disk_.get(); }                 // null without a disk tier

  const BlockStoreStats& stats() const { return stats_; }
  uint64_t budget() const { return budget_; }

 private:
  struct Entry {
    StoredBlock block;
    std::list<BlockKey>::iterator lru;
  };
  void touch(Entry& e);
  void evict_one();
  void insert(const BlockKey& key, StoredBlock block);  // absent, fits the budget
  std::optional<StoredBlock> lookup(const BlockKey& key);  // either tier, uncounted

  uint64_t budget_;
  std::unique_ptr<BlockDiskTier> disk_;
  std::list<BlockKey> lru_;  // front: most recently used
  std::unordered_map<BlockKey, Entry> map_;
  BlockStoreStats stats_;
};

// Read by other threads (heartbeats, readiness) while the actor updates them.
struct BlockStoreGauges {
  std::atomic<uint64_t> bytes{0}, blocks{0};
};

struct BlockStoreOptions {
  uint64_t budget_bytes = 1ull << 30;
  std::string disk_dir;            // the disk tier's directory (with disk_budget_bytes > 0)
  uint64_t disk_budget_bytes = 0;  // 0: no disk tier
  std::shared_ptr<prometheus::Registry> registry;  // moemesh_kvstore_* metrics go here
  std::shared_ptr<BlockStoreGauges> gauges;        // optional
};

// Serves the protocol above on `socket` (a bound ROUTER of `bridge`) and routes it here.
caf::actor spawn_block_store(caf::actor_system& sys, ZmqBridge& bridge, int socket, BlockStoreOptions opts);
// The store's actor alone: it takes (zmq_recv_atom, socket, frames) and sends its replies to
// `replies` as (zmq_send_atom, socket, frames), as a bridge would (tests drive it directly).
caf::actor spawn_block_store(caf::actor_system& sys, caf::actor replies, int socket, BlockStoreOptions opts);

}  // namespace moemesh::actors
