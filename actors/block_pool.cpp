#include "actors/block_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace moemesh::actors {

namespace {

constexpr size_t kSlotAlign = 64;
constexpr uint64_t kDefaultSlabBytes = 8u << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

std::shared_ptr<BlockPool> BlockPool::make(uint64_t limit_bytes, size_t slab_bytes) {
  if (slab_bytes == 0) slab_bytes = size_t(std::min<uint64_t>(limit_bytes, kDefaultSlabBytes));
  return std::shared_ptr<BlockPool>(new BlockPool(limit_bytes, slab_bytes));
}

BlockPool::BlockPool(uint64_t limit_bytes, size_t slab_bytes) : limit_(limit_bytes), slab_bytes_(slab_bytes) {}

BlockPool::~BlockPool() {
  for (auto [p, n] : slabs_) munmap(p, n);
}

BlockPoolStats BlockPool::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

uint8_t* BlockPool::take(size_t slot) {
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t per_slab = std::max<size_t>(1, slab_bytes_ / slot);
  const size_t len = round_up(per_slab * slot, page);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (auto it = free_.find(slot); it != free_.end() && !it->second.empty()) {
      uint8_t* p = it->second.back();
      it->second.pop_back();
      return p;
    }
    if (stats_.slab_bytes + len > limit_) return nullptr;
    stats_.slab_bytes += len;  // reserved before the (slow) mapping, so concurrent takes see it
  }
  // Outside the lock: populating a slab takes ~1 us a page, and releases must not wait for it.
  void* mem = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  std::lock_guard<std::mutex> lk(mu_);
  if (mem == MAP_FAILED) {
    stats_.slab_bytes -= len;
    return nullptr;
  }
  slabs_.emplace_back(mem, len);
  ++stats_.slabs;
  auto& free = free_[slot];
  auto* base = static_cast<uint8_t*>(mem);
  for (size_t i = per_slab; i-- > 1;) free.push_back(base + i * slot);  // handed out from the slab's start
  return base;
}

void BlockPool::give_back(uint8_t* slot_ptr, size_t slot) {
  std::lock_guard<std::mutex> lk(mu_);
  free_[slot].push_back(slot_ptr);
  ++stats_.released;
}

StoredBlock BlockPool::copy_of(DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes) {
  const size_t slot = round_up(std::max<size_t>(bytes.size(), 1), kSlotAlign);
  uint8_t* p = take(slot);
  if (!p) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      ++stats_.heap;
    }
    return StoredBlock::copy_of(dtype, std::move(shape), bytes);
  }
  if (!bytes.empty()) std::memcpy(p, bytes.data(), bytes.size());
  StoredBlock b{dtype, std::move(shape), nullptr, p, bytes.size()};
  // The owner's deleter returns the slot; it holds the pool, so the slab outlives every block in it.
  b.owner = std::shared_ptr<const void>(p, [pool = shared_from_this(), slot](const void* q) {
    pool->give_back(static_cast<uint8_t*>(const_cast<void*>(q)), slot);
  });
  return b;
}

}  // namespace moemesh::actors
