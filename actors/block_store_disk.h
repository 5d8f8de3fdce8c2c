// The KV store's disk tier: blocks evicted from memory, one file per block under a directory,
// named by the key's hex ("<32 hex>.kvb"), least-recently-used first out under a byte budget
// (whole files: header + payload).
//
// A file is written as "<hex>.kvb.tmp" and renamed into place, so a crash leaves at worst a
// temp file (ignored and deleted at start-up), never a torn block under a real name. Its header
// records the key, dtype, shape and payload size, and an XXH3-64 checksum of header and payload;
// a file that fails any check when read is counted (DiskTierStats::errors) and deleted, never
// served. Opening a directory indexes the files already there (a restarted pod keeps its cache),
// newest first by mtime, dropping unreadable headers and files beyond the budget. A read hit
// refreshes the file's mtime so that order survives a restart.
//
// The I/O is synchronous: the store's actor calls it in line. Each call touches one block, so
// its cost is bounded by the block size (tens of KiB to a few MiB); moving it to a worker pool
// is left for when the latency histograms say it matters.
#pragma once
#include <cstdint>
#include <filesystem>
#include <list>
#include <optional>
#include <string>
#include <unordered_map>

#include "actors/block_store.h"

namespace moemesh::actors {

struct DiskTierStats {
  uint64_t bytes = 0, blocks = 0;  // held now (file sizes)
  uint64_t written = 0, evictions = 0;
  // Files found bad and deleted, by cause: unreadable or inconsistent header, payload checksum
  // mismatch, write/read failure (disk full, permissions).
  uint64_t bad_header = 0, bad_checksum = 0, io = 0;
};

class BlockDiskTier {
 public:
  // Creates `dir` if missing and indexes it (throws moemesh::Error when it is not usable).
  BlockDiskTier(std::filesystem::path dir, uint64_t budget_bytes);

  // Writes the block unless already held (then it only counts as used). Evicts the least
  // recently used files to make room; a block over the whole budget or a failed write is
  // dropped (returns false): this is a cache.
  bool put(const BlockKey& key, const StoredBlock& block);
  // Reads and checks the block; a bad file is counted, deleted and reported as absent.
  std::optional<StoredBlock> get(const BlockKey& key);
  bool contains(const BlockKey& key) const { return map_.count(key) > 0; }

  const DiskTierStats& stats() const { return stats_; }
  uint64_t budget() const { return budget_; }
  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path path_of(const BlockKey& key) const;

 private:
  struct Entry {
    uint64_t file_bytes;
    std::list<BlockKey>::iterator lru;
  };
  void index();
  void add(const BlockKey& key, uint64_t file_bytes);  // as most recently used
  void remove(const BlockKey& key);
  void evict_one();

  std::filesystem::path dir_;
  uint64_t budget_;
  std::list<BlockKey> lru_;  // front: most recently used
  std::unordered_map<BlockKey, Entry> map_;
  DiskTierStats stats_;
};

}  // namespace moemesh::actors
