// BlockStore: byte budget, LRU eviction with gets refreshing recency, longest-prefix chain
// lookups, counters, and blocks that outlive their eviction while someone still holds them;
// the disk tier: spill on eviction, promotion on a hit, its own LRU and budget, re-indexing on
// restart, corrupt and torn files detected and dropped; the pool the store's blocks live in:
// slots reused, slabs as needed, heap past its limit, blocks outliving it; the store's actor
// answering gets before the puts queued ahead of them unless they need one.
#include <gtest/gtest.h>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>
#include <thread>

#include "actors/block_pool.h"
#include "actors/block_store.h"
#include "actors/block_store_disk.h"
#include "actors/dispatch_frames.h"
#include "core/wire.h"
#include "proto/dataplane.pb.h"
#include "core/error.h"

using namespace moemesh;
using namespace moemesh::actors;

namespace {

std::vector<BlockKey> chain(size_t n, const std::string& model = "m") {
  std::vector<int32_t> t(n * kBlockTokens);
  std::iota(t.begin(), t.end(), 0);
  return prefix_block_keys(model, t);
}

StoredBlock block(size_t bytes, uint8_t fill) {
  std::vector<uint8_t> b(bytes, fill);
  return StoredBlock::copy_of(DType::F32, {int64_t(bytes / 4)}, b);
}

}  // namespace

TEST(BlockStore, StoresAndReturnsBlocks) {
  BlockStore s(1000);
  auto k = chain(2);
  EXPECT_EQ(s.put(k[0], block(100, 7)), BlockStore::Put::Stored);
  auto got = s.get(k[0]);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->size, 100u);
  EXPECT_EQ(got->data[99], 7);
  EXPECT_EQ(got->shape, std::vector<int64_t>{25});
  EXPECT_FALSE(s.get(k[1]));
  EXPECT_EQ(s.stats().hits, 1u);
  EXPECT_EQ(s.stats().misses, 1u);
  EXPECT_EQ(s.stats().bytes, 100u);
  EXPECT_EQ(s.stats().blocks, 1u);
  // Same key again: the block held is kept.
  EXPECT_EQ(s.put(k[0], block(100, 9)), BlockStore::Put::Present);
  EXPECT_EQ(s.get(k[0])->data[0], 7);
  EXPECT_EQ(s.stats().bytes, 100u);
}

TEST(BlockStore, EvictsLeastRecentlyUsedWithinBudget) {
  BlockStore s(300);
  auto k = chain(5);
  for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(i)));
  EXPECT_EQ(s.stats().bytes, 300u);
  ASSERT_TRUE(s.get(k[0]));  // k0 is now the most recent: k1 is the oldest
  s.put(k[3], block(100, 3));
  EXPECT_TRUE(s.contains(k[0]));
  EXPECT_FALSE(s.contains(k[1]));
  EXPECT_TRUE(s.contains(k[2]));
  EXPECT_TRUE(s.contains(k[3]));
  EXPECT_EQ(s.stats().evictions, 1u);
  // A big block evicts as many as it needs.
  s.put(k[4], block(250, 4));
  EXPECT_EQ(s.stats().blocks, 1u);
  EXPECT_TRUE(s.contains(k[4]));
  EXPECT_EQ(s.stats().bytes, 250u);
  EXPECT_EQ(s.stats().evictions, 4u);
  EXPECT_LE(s.stats().bytes, s.budget());
}

TEST(BlockStore, RefusesABlockOverTheWholeBudget) {
  BlockStore s(100);
  auto k = chain(2);
  s.put(k[0], block(80, 1));
  EXPECT_EQ(s.put(k[1], block(101, 2)), BlockStore::Put::TooLarge);
  EXPECT_TRUE(s.contains(k[0]));  // nothing evicted for nothing
  EXPECT_EQ(s.stats().too_large, 1u);
  EXPECT_EQ(s.stats().evictions, 0u);
}

TEST(BlockStore, ChainReturnsTheLongestPresentPrefix) {
  BlockStore s(10000);
  auto k = chain(5);
  for (int i : {0, 1, 2, 4}) s.put(k[i], block(40, uint8_t(i)));
  auto got = s.get_chain(k);
  ASSERT_EQ(got.size(), 3u);  // k3 is missing, so k4 is unreachable
  for (int i = 0; i < 3; ++i) EXPECT_EQ(got[i].data[0], i);
  EXPECT_EQ(s.stats().hits, 3u);
  EXPECT_EQ(s.stats().misses, 2u);
  EXPECT_EQ(s.get_chain(k, 2).size(), 2u);
  EXPECT_TRUE(s.get_chain(chain(3, "other")).empty());
}

TEST(BlockStore, ChainLookupsRefreshRecency) {
  BlockStore s(300);
  auto k = chain(4);
  for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(i)));
  s.get_chain(std::span(k).subspan(0, 1));  // uses k0
  s.put(k[3], block(100, 3));
  EXPECT_TRUE(s.contains(k[0]));
  EXPECT_FALSE(s.contains(k[1]));
}

TEST(BlockStore, AHeldBlockOutlivesItsEviction) {
  BlockStore s(100);
  auto k = chain(2);
  s.put(k[0], block(100, 5));
  auto held = s.get(k[0]);
  s.put(k[1], block(100, 6));  // evicts k0
  EXPECT_FALSE(s.contains(k[0]));
  EXPECT_EQ(held->data[50], 5);  // still readable: the holder shares ownership
}

// ---- the pool the store's blocks live in -------------------------------------------------------

TEST(BlockPool, AReleasedSlotIsReusedForTheNextBlockOfItsSize) {
  auto pool = BlockPool::make(1 << 20, 64 << 10);
  std::vector<uint8_t> bytes(8192, 3);
  const uint8_t* first;
  {
    StoredBlock b = pool->copy_of(DType::F32, {2048}, bytes);
    first = b.data;
    EXPECT_EQ(b.size, 8192u);
    EXPECT_EQ(b.data[8191], 3);
    EXPECT_EQ(b.shape, std::vector<int64_t>{2048});
  }
  StoredBlock again = pool->copy_of(DType::F32, {2048}, bytes);
  EXPECT_EQ(again.data, first);
  EXPECT_EQ(pool->stats().slabs, 1u);
  EXPECT_EQ(pool->stats().released, 1u);
}

TEST(BlockPool, BlocksHeldTogetherGetDistinctSlotsAndSlabsAsNeeded) {
  auto pool = BlockPool::make(1 << 20, 32 << 10);  // four 8 KiB slots a slab
  std::vector<StoredBlock> held;
  for (int i = 0; i < 9; ++i) held.push_back(pool->copy_of(DType::F32, {2048}, std::vector<uint8_t>(8192, uint8_t(i))));
  for (int i = 0; i < 9; ++i) {
    EXPECT_EQ(held[size_t(i)].data[0], i);
    EXPECT_EQ(held[size_t(i)].data[8191], i);
  }
  EXPECT_EQ(pool->stats().slabs, 3u);
  // Another size takes a class of its own: none of the 8 KiB slots.
  StoredBlock other = pool->copy_of(DType::F32, {25}, std::vector<uint8_t>(100, 9));
  EXPECT_EQ(pool->stats().slabs, 4u);
  EXPECT_EQ(other.data[99], 9);
}

TEST(BlockPool, PastItsLimitABlockGetsHeapMemoryAndStaysCorrect) {
  auto pool = BlockPool::make(32 << 10, 32 << 10);  // room for one slab
  std::vector<StoredBlock> held;
  for (int i = 0; i < 6; ++i) held.push_back(pool->copy_of(DType::F32, {2048}, std::vector<uint8_t>(8192, uint8_t(i))));
  EXPECT_EQ(pool->stats().slabs, 1u);
  EXPECT_EQ(pool->stats().heap, 2u);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(held[size_t(i)].data[4096], i);
}

TEST(BlockPool, ABlockKeepsItsMemoryAfterThePoolAndTheStoreAreGone) {
  std::optional<StoredBlock> held;
  {
    auto pool = BlockPool::make(1 << 20);
    BlockStore s(1 << 20);
    auto k = chain(1);
    s.put(k[0], pool->copy_of(DType::F32, {25}, std::vector<uint8_t>(100, 4)));
    held = s.get(k[0]);
  }
  EXPECT_EQ(held->data[99], 4);  // the block holds the pool, and the pool its slab
}

TEST(BlockPool, BlocksReleasedOnOtherThreadsReturnTheirSlots) {
  auto pool = BlockPool::make(1 << 20, 64 << 10);
  std::vector<StoredBlock> blocks;
  for (int i = 0; i < 8; ++i) blocks.push_back(pool->copy_of(DType::F32, {2048}, std::vector<uint8_t>(8192, 1)));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([mine = std::vector<StoredBlock>(blocks.begin() + 2 * t,
                                                          blocks.begin() + 2 * t + 2)]() mutable { mine.clear(); });
  blocks.clear();
  for (auto& t : threads) t.join();
  for (int i = 0; i < 8; ++i) blocks.push_back(pool->copy_of(DType::F32, {2048}, std::vector<uint8_t>(8192, 2)));
  EXPECT_EQ(pool->stats().released, 8u);
  EXPECT_EQ(pool->stats().slabs, 1u);  // the eight slots again, no new slab
}

// ---- the disk tier --------------------------------------------------------------------------

namespace {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path = fs::temp_directory_path() /
                  ("moemesh-kvdisk-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
  size_t files() const { return size_t(std::distance(fs::directory_iterator(path), fs::directory_iterator())); }
};

// Memory for `mem` bytes of blocks; the disk budget counts whole files (header + payload).
BlockStore tiered(const TempDir& d, uint64_t mem, uint64_t disk) {
  return BlockStore(mem, std::make_unique<BlockDiskTier>(d.path, disk));
}

// One 100-byte block's file: header (with a one-dim shape) plus payload.
uint64_t file_bytes_of_100() {
  TempDir d;
  BlockDiskTier t(d.path, 1 << 20);
  t.put(chain(1)[0], block(100, 0));
  return t.stats().bytes;
}

}  // namespace

TEST(BlockStoreDisk, EvictedBlocksSpillToDiskAndAreServedFromThere) {
  TempDir d;
  auto s = tiered(d, 200, 1 << 20);
  auto k = chain(3);
  for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(10 + i)));
  EXPECT_FALSE(s.contains(k[0]));  // evicted from memory...
  ASSERT_TRUE(s.disk()->contains(k[0]));  // ...into a file named by the key
  EXPECT_TRUE(fs::exists(d.path / (k[0].hex() + ".kvb")));
  EXPECT_EQ(s.disk()->stats().written, 1u);

  auto got = s.get(k[0]);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->size, 100u);
  EXPECT_EQ(got->data[0], 10);
  EXPECT_EQ(got->data[99], 10);
  EXPECT_EQ(got->shape, std::vector<int64_t>{25});
  EXPECT_EQ(got->dtype, DType::F32);
  EXPECT_EQ(s.stats().hits, 1u);
  EXPECT_EQ(s.stats().disk_hits, 1u);
  // Promoted: back in memory (evicting k1 to disk in turn), and the next get is a memory hit.
  EXPECT_TRUE(s.contains(k[0]));
  EXPECT_FALSE(s.contains(k[1]));
  EXPECT_TRUE(s.disk()->contains(k[1]));
  ASSERT_TRUE(s.get(k[0]));
  EXPECT_EQ(s.stats().disk_hits, 1u);
  EXPECT_EQ(s.stats().hits, 2u);
}

TEST(BlockStoreDisk, ChainsRunAcrossBothTiers) {
  TempDir d;
  auto s = tiered(d, 200, 1 << 20);
  auto k = chain(4);
  for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(i)));  // k0 on disk, k1 k2 in memory
  auto got = s.get_chain(k);
  ASSERT_EQ(got.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(got[i].data[0], i);
  EXPECT_EQ(s.stats().hits, 3u);
  EXPECT_EQ(s.stats().misses, 1u);
  EXPECT_GE(s.stats().disk_hits, 1u);
}

TEST(BlockStoreDisk, DiskEvictsLeastRecentlyUsedFilesWithinItsBudget) {
  TempDir d;
  const uint64_t f = file_bytes_of_100();
  auto s = tiered(d, 100, 2 * f);  // memory holds one block, disk two
  auto k = chain(5);
  for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(i)));  // disk: k0 k1; memory: k2
  EXPECT_EQ(s.disk()->stats().blocks, 2u);
  ASSERT_TRUE(s.get(k[0]));  // promoted; k2 spills and k1 is the oldest file, so it goes
  EXPECT_TRUE(s.disk()->contains(k[0]));  // the file stays after promotion
  EXPECT_TRUE(s.disk()->contains(k[2]));
  EXPECT_FALSE(s.disk()->contains(k[1]));
  EXPECT_FALSE(fs::exists(s.disk()->path_of(k[1])));
  EXPECT_EQ(s.disk()->stats().evictions, 1u);
  EXPECT_LE(s.disk()->stats().bytes, s.disk()->budget());
  EXPECT_EQ(d.files(), 2u);
  // Evicting k0 from memory again rewrites nothing: its file is there.
  const auto written = s.disk()->stats().written;
  s.put(k[3], block(100, 3));
  EXPECT_EQ(s.disk()->stats().written, written);
  EXPECT_FALSE(s.get(k[1]));
}

TEST(BlockStoreDisk, ABlockOverTheDiskBudgetIsNotWritten) {
  TempDir d;
  auto s = tiered(d, 1000, 50);
  auto k = chain(2);
  s.put(k[0], block(1000, 1));
  s.put(k[1], block(1000, 2));  // evicts k0, which does not fit on disk
  EXPECT_FALSE(s.disk()->contains(k[0]));
  EXPECT_EQ(s.disk()->stats().bytes, 0u);
  EXPECT_EQ(d.files(), 0u);
}

TEST(BlockStoreDisk, ARestartReindexesTheDirectoryNewestFirstWithinTheBudget) {
  TempDir d;
  const uint64_t f = file_bytes_of_100();
  auto k = chain(4);
  {
    auto s = tiered(d, 100, 10 * f);
    for (int i = 0; i < 4; ++i) s.put(k[i], block(100, uint8_t(20 + i)));  // k0..k2 on disk
  }
  // Make the order unambiguous (mtime granularity): k0 oldest, k2 newest.
  const auto now = fs::file_time_type::clock::now();
  for (int i = 0; i < 3; ++i) fs::last_write_time(d.path / (k[i].hex() + ".kvb"), now - std::chrono::hours(3 - i));
  {
    BlockDiskTier t(d.path, 10 * f);
    EXPECT_EQ(t.stats().blocks, 3u);
    auto got = t.get(k[1]);
    ASSERT_TRUE(got);
    EXPECT_EQ(got->data[42], 21);
  }
  // A smaller budget after the restart keeps the newest files and deletes the rest.
  for (int i = 0; i < 3; ++i) fs::last_write_time(d.path / (k[i].hex() + ".kvb"), now - std::chrono::hours(3 - i));
  BlockDiskTier t(d.path, 2 * f);
  EXPECT_EQ(t.stats().blocks, 2u);
  EXPECT_FALSE(t.contains(k[0]));
  EXPECT_TRUE(t.contains(k[1]));
  EXPECT_TRUE(t.contains(k[2]));
  EXPECT_FALSE(fs::exists(d.path / (k[0].hex() + ".kvb")));
  // The store on top serves them from disk.
  auto s = BlockStore(1000, std::make_unique<BlockDiskTier>(d.path, 2 * f));
  auto got = s.get(k[2]);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->data[0], 22);
}

TEST(BlockStoreDisk, ACorruptFileIsDetectedCountedAndDeleted) {
  TempDir d;
  auto k = chain(2);
  fs::path file;
  {
    auto s = tiered(d, 100, 1 << 20);
    s.put(k[0], block(100, 7));
    s.put(k[1], block(100, 8));  // k0 to disk
    file = s.disk()->path_of(k[0]);
  }
  {  // flip one payload byte: the size and header still look right
    std::fstream io(file, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(-10, std::ios::end);
    io.put(char(0x55));
  }
  auto s = tiered(d, 100, 1 << 20);
  ASSERT_TRUE(s.disk()->contains(k[0]));  // the header indexes fine...
  EXPECT_FALSE(s.get(k[0]));              // ...but it is never served
  EXPECT_EQ(s.disk()->stats().bad_checksum, 1u);
  EXPECT_FALSE(s.disk()->contains(k[0]));
  EXPECT_FALSE(fs::exists(file));
  EXPECT_EQ(s.stats().misses, 1u);
}

TEST(BlockStoreDisk, UnreadableFilesAndTornTempFilesAreDroppedAtStartUp) {
  TempDir d;
  auto k = chain(3);
  {
    auto s = tiered(d, 100, 1 << 20);
    for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(i)));  // k0 k1 on disk
  }
  fs::resize_file(d.path / (k[0].hex() + ".kvb"), 30);  // truncated: header cut short
  std::ofstream(d.path / (k[2].hex() + ".kvb.tmp")) << "half a block";  // a crash mid-write
  std::ofstream(d.path / "README") << "not ours";  // other files are left alone
  BlockDiskTier t(d.path, 1 << 20);
  EXPECT_EQ(t.stats().blocks, 1u);
  EXPECT_TRUE(t.contains(k[1]));
  EXPECT_FALSE(t.contains(k[0]));
  EXPECT_FALSE(t.contains(k[2]));
  EXPECT_EQ(t.stats().bad_header, 1u);
  EXPECT_FALSE(fs::exists(d.path / (k[0].hex() + ".kvb")));
  EXPECT_FALSE(fs::exists(d.path / (k[2].hex() + ".kvb.tmp")));
  EXPECT_TRUE(fs::exists(d.path / "README"));
}

TEST(BlockStoreDisk, AFileUnderTheWrongNameIsNotServedForThatKey) {
  TempDir d;
  auto k = chain(3);
  {
    auto s = tiered(d, 100, 1 << 20);
    s.put(k[0], block(100, 1));
    s.put(k[1], block(100, 2));  // k0 to disk
  }
  fs::rename(d.path / (k[0].hex() + ".kvb"), d.path / (k[2].hex() + ".kvb"));
  BlockDiskTier t(d.path, 1 << 20);
  EXPECT_FALSE(t.contains(k[2]));
  EXPECT_EQ(t.stats().bad_header, 1u);
}

TEST(BlockStoreDisk, AnUnusableDirectoryIsAClearError) {
  TempDir d;
  std::ofstream(d.path / "file") << "x";
  try {
    BlockDiskTier t(d.path / "file", 1000);
    FAIL() << "expected an error";
  } catch (const moemesh::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--disk-dir"), std::string::npos) << e.what();
  }
}

TEST(BlockStoreDisk, SpillAllKeepsTheMemoryTierForTheNextStart) {
  TempDir d;
  auto k = chain(3);
  {
    auto s = tiered(d, 200, 1 << 20);
    for (int i = 0; i < 3; ++i) s.put(k[i], block(100, uint8_t(30 + i)));  // k0 on disk already
    EXPECT_EQ(s.spill_all(), 2u);
    EXPECT_EQ(s.spill_all(), 0u);  // nothing new to write
  }
  auto s = tiered(d, 200, 1 << 20);
  auto got = s.get_chain(k);
  ASSERT_EQ(got.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(got[i].data[7], 30 + i);
  EXPECT_EQ(s.stats().disk_hits, 3u);
}

// ---- the store's actor: the order it answers in ------------------------------------------------

namespace {

// What the store sent back: (kind, request id, blocks found for a KvGetReply).
struct Reply {
  wire::Kind kind;
  uint64_t id;
  int found;
};

FramesPtr request(wire::Kind kind, uint64_t id, const std::vector<BlockKey>& keys, uint8_t fill) {
  wire::Header h;
  h.kind = kind;
  h.request_id = id;
  auto frames = std::make_shared<Frames>();
  frames->emplace_back("client", 6);  // the peer id a ROUTER puts first
  std::vector<zmq::message_t> tensors;
  if (kind == wire::Kind::KvPut) {
    pb::KvPut put;
    put.set_model_id("m");
    for (const auto& k : keys) {
      *put.add_keys() = k.to_bytes();
      h.tensors.push_back({DType::F32, {25}});
      tensors.push_back(frame_of(std::vector<uint8_t>(100, fill)));
    }
    h.meta = put.SerializeAsString();
  } else {
    pb::KvGet get;
    get.set_model_id("m");
    for (const auto& k : keys) *get.add_keys() = k.to_bytes();
    h.meta = get.SerializeAsString();
  }
  frames->push_back(frame_of(wire::encode_header(h)));
  for (auto& t : tensors) frames->push_back(std::move(t));
  return frames;
}

}  // namespace

TEST(BlockStoreActor, AGetIsAnsweredBeforeThePutsQueuedAheadOfItUnlessItNeedsOne) {
  caf::actor_system_config cfg;
  cfg.set("scheduler.policy", caf::atom("testing"));
  caf::actor_system sys{cfg};
  auto& sched = dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler());
  auto replies = std::make_shared<std::vector<Reply>>();
  auto recorder = sys.spawn(
      [](caf::event_based_actor*, std::shared_ptr<std::vector<Reply>> out) -> caf::behavior {
        return {[out](zmq_send_atom, int, FramesPtr f) {
          wire::Header h = wire::decode_header(frame_views(*f)[1]);
          pb::KvGetReply r;
          const int found = h.kind == wire::Kind::KvGetReply && r.ParseFromString(h.meta) ? r.found() : -1;
          out->push_back({h.kind, h.request_id, found});
        }};
      },
      replies);
  BlockStoreOptions o;
  o.budget_bytes = 1 << 20;
  auto store = spawn_block_store(sys, recorder, 0, o);
  const auto a = chain(1, "a"), b = chain(4, "b"), c = chain(1, "c");
  auto send = [&](FramesPtr f) { caf::anon_send(store, zmq_recv_atom::value, 0, std::move(f)); };

  send(request(wire::Kind::KvPut, 1, a, 1));
  sched.run();
  ASSERT_EQ(replies->size(), 1u);

  // Four puts, then a get of what was stored before them, all in the mailbox at once: the get is
  // answered first, the puts after it in their order.
  for (uint64_t i = 0; i < 4; ++i) send(request(wire::Kind::KvPut, 2 + i, {b[i]}, 2));
  send(request(wire::Kind::KvGet, 6, a, 0));
  sched.run();
  ASSERT_EQ(replies->size(), 6u);
  EXPECT_EQ((*replies)[1].kind, wire::Kind::KvGetReply);
  EXPECT_EQ((*replies)[1].id, 6u);
  EXPECT_EQ((*replies)[1].found, 1);
  for (uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ((*replies)[2 + i].kind, wire::Kind::KvPut);
    EXPECT_EQ((*replies)[2 + i].id, 2 + i);
  }

  // A get that needs a queued put: that put (and the ones before it) first, then the get, which
  // finds its block; the put queued after them waits.
  send(request(wire::Kind::KvPut, 7, {b[0]}, 3));
  send(request(wire::Kind::KvPut, 8, c, 3));
  send(request(wire::Kind::KvPut, 9, {chain(1, "d")[0]}, 3));
  send(request(wire::Kind::KvGet, 10, c, 0));
  sched.run();
  ASSERT_EQ(replies->size(), 10u);
  const std::vector<uint64_t> order{(*replies)[6].id, (*replies)[7].id, (*replies)[8].id, (*replies)[9].id};
  EXPECT_EQ(order, (std::vector<uint64_t>{7, 8, 10, 9}));
  EXPECT_EQ((*replies)[8].found, 1);

  // A put that does not parse is refused at once, ahead of nothing.
  auto bad = request(wire::Kind::KvPut, 11, c, 4);
  bad->pop_back();  // a tensor frame short of its header
  send(bad);
  sched.run();
  ASSERT_EQ(replies->size(), 11u);
  EXPECT_EQ((*replies)[10].kind, wire::Kind::Error);
  EXPECT_EQ((*replies)[10].id, 11u);
  caf::anon_send_exit(store, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(recorder, caf::exit_reason::user_shutdown);
  sched.run();
}
