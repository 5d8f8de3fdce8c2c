// Memory for the KV store's blocks, in slabs whose pages are faulted in with one call when the
// slab is made (MAP_POPULATE), and slots reused once the block in them is released.
//
// Why: a block copied into fresh heap memory faults its pages in one at a time on the store's
// thread, while the lookups queued behind the put wait. On this project's 2-core VM a page fault
// costs ~11 us (an 8 KiB block: 22 us of a put's ~45 us per block); populating a slab costs ~1
// us per page, and a reused slot none. Stores that pin memory for RDMA or GPU copies use such a
// pool for the same reason.
//
// Slots come in size classes (a block's bytes rounded up to 64); a class grows a slab at a time.
// The slabs together stay under `limit_bytes` (the store's memory budget): past it, or when the
// kernel refuses a slab, a block gets plain heap memory as before. Slabs go back to the kernel
// when the pool does, which is when the last block from it is released. Thread-safe: a block's
// last reference may drop on a ZeroMQ thread (a reply sent zero-copy).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_map>
#include <vector>

#include "actors/block_store.h"

namespace moemesh::actors {

struct BlockPoolStats {
  uint64_t slabs = 0, slab_bytes = 0;  // made so far (never unmapped while the pool lives)
  uint64_t released = 0;               // slots given back by blocks gone
  uint64_t heap = 0;                   // blocks given heap memory: past the limit, or no slab to be had
};

class BlockPool : public std::enable_shared_from_this<BlockPool> {
 public:
  // Made shared: every block holds the pool, so its memory outlives the store. Slabs of
  // `slab_bytes` (0: 8 MiB, or the limit when that is smaller, so a small store still has one).
  static std::shared_ptr<BlockPool> make(uint64_t limit_bytes, size_t slab_bytes = 0);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // A block holding a copy of `bytes`; its memory returns to the pool when the last copy of
  // the block is gone.
  StoredBlock copy_of(DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes);

  BlockPoolStats stats() const;

 private:
  BlockPool(uint64_t limit_bytes, size_t slab_bytes);
  uint8_t* take(size_t slot_bytes);  // null: heap instead
  void give_back(uint8_t* slot, size_t slot_bytes);

  const uint64_t limit_;
  const size_t slab_bytes_;
  mutable std::mutex mu_;
  std::unordered_map<size_t, std::vector<uint8_t*>> free_;  // by slot size
  std::vector<std::pair<void*, size_t>> slabs_;             // mapped regions
  BlockPoolStats stats_;
};

}  // namespace moemesh::actors
