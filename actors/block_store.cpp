#include "actors/block_store.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <cstring>
#include <optional>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <spdlog/spdlog.h>

#include "actors/block_pool.h"
#include "actors/block_store_disk.h"
#include "actors/trace_span.h"
#include "core/error.h"
#include "core/trace_ref.h"
#include "core/wire.h"
#include "proto/dataplane.pb.h"

namespace moemesh::actors {

// ---- BlockStore ----------------------------------------------------------------------------

StoredBlock StoredBlock::copy_of(DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes) {
  auto owned = std::make_shared<std::vector<uint8_t>>(bytes.begin(), bytes.end());
  StoredBlock b{dtype, std::move(shape), nullptr, owned->data(), owned->size()};
  b.owner = std::move(owned);
  return b;
}

BlockStore::BlockStore(uint64_t budget_bytes, std::unique_ptr<BlockDiskTier> disk)
    : budget_(budget_bytes), disk_(std::move(disk)) {}

BlockStore::~BlockStore() = default;

void BlockStore::touch(Entry& e) { lru_.splice(lru_.begin(), lru_, e.lru); }

void BlockStore::evict_one() {
  auto it = map_.find(lru_.back());
  if (disk_) disk_->put(it->first, it->second.block);  // spill; a failed write only loses a cached block
  stats_.bytes -= it->second.block.size;
  stats_.blocks -= 1;
  stats_.evictions += 1;
  map_.erase(it);
  lru_.pop_back();
}

void BlockStore::insert(const BlockKey& key, StoredBlock block) {
  while (stats_.bytes + block.size > budget_) evict_one();
  lru_.push_front(key);
  stats_.bytes += block.size;
  stats_.blocks += 1;
  map_.emplace(key, Entry{std::move(block), lru_.begin()});
}

size_t BlockStore::spill_all() {
  if (!disk_) return 0;
  const uint64_t before = disk_->stats().written;
  for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) disk_->put(*it, map_.at(*it).block);
  return size_t(disk_->stats().written - before);
}

BlockStore::Put BlockStore::put(const BlockKey& key, StoredBlock block) {
  if (auto it = map_.find(key); it != map_.end()) {
    touch(it->second);
    ++stats_.present;
    return Put::Present;
  }
  if (block.size > budget_) {
    ++stats_.too_large;
    return Put::TooLarge;
  }
  insert(key, std::move(block));
  ++stats_.stored;
  return Put::Stored;
}

std::optional<StoredBlock> BlockStore::lookup(const BlockKey& key) {
  if (auto it = map_.find(key); it != map_.end()) {
    touch(it->second);
    return it->second.block;
  }
  if (!disk_) return std::nullopt;
  auto block = disk_->get(key);
  if (!block) return std::nullopt;
  ++stats_.disk_hits;
  if (block->size <= budget_) insert(key, *block);  // promote: the next get is served from memory
  return block;
}

std::optional<StoredBlock> BlockStore::get(const BlockKey& key) {
  auto block = lookup(key);
  ++(block ? stats_.hits : stats_.misses);
  return block;
}

std::vector<StoredBlock> BlockStore::get_chain(std::span<const BlockKey> chain, size_t limit) {
  std::vector<StoredBlock> out;
  for (const BlockKey& key : chain) {
    if (out.size() >= limit) break;
    auto block = lookup(key);
    if (!block) break;
    out.push_back(std::move(*block));
  }
  stats_.hits += out.size();
  stats_.misses += chain.size() - out.size();
  return out;
}

// ---- the actor ------------------------------------------------------------------------------

namespace {

// A request that decoded but cannot be served; reason is the metric label.
struct Rejected : std::runtime_error {
  Rejected(std::string reason, const std::string& what) : std::runtime_error(what), reason(std::move(reason)) {}
  std::string reason;
};

// The tiered series carry tier="memory" and, with a disk tier, tier="disk" (no disk series without one).
struct Metrics {
  Metrics(prometheus::Registry& r, bool disk_tier)
      : bytes_family(prometheus::BuildGauge()
                         .Name("moemesh_kvstore_bytes")
                         .Help("Bytes of KV blocks held, by tier (disk: whole files).")
                         .Register(r)),
        blocks_family(
            prometheus::BuildGauge().Name("moemesh_kvstore_blocks").Help("KV blocks held, by tier.").Register(r)),
        budget_family(
            prometheus::BuildGauge().Name("moemesh_kvstore_budget_bytes").Help("Byte budget, by tier.").Register(r)),
        hits_family(prometheus::BuildCounter()
                        .Name("moemesh_kvstore_hits_total")
                        .Help("Blocks asked for and returned, by the tier that held them.")
                        .Register(r)),
        evictions_family(prometheus::BuildCounter()
                             .Name("moemesh_kvstore_evictions_total")
                             .Help("Blocks evicted to stay within a tier's budget (from memory: to disk when "
                                   "there is a disk tier).")
                             .Register(r)),
        disk_errors(prometheus::BuildCounter()
                        .Name("moemesh_kvstore_disk_errors_total")
                        .Help("Disk tier files found bad (bad_header, checksum) or failed I/O (io), by reason; "
                              "each such file is deleted.")
                        .Register(r)),
        misses(prometheus::BuildCounter()
                   .Name("moemesh_kvstore_misses_total")
                   .Help("Blocks asked for and not returned (absent, or after the first absent one of a chain).")
                   .Register(r)
                   .Add({})),
        puts(prometheus::BuildCounter()
                 .Name("moemesh_kvstore_put_blocks_total")
                 .Help("Blocks offered, by result (stored, present, too_large).")
                 .Register(r)),
        bad_frames(prometheus::BuildCounter()
                       .Name("moemesh_kvstore_bad_frames_total")
                       .Help("Messages answered with an error, by reason.")
                       .Register(r)),
        pool_bytes(prometheus::BuildGauge()
                       .Name("moemesh_kvstore_pool_bytes")
                       .Help("Memory mapped in slabs for the blocks put (held ones and free slots for the next).")
                       .Register(r)
                       .Add({})),
        put_seconds(latency(r, "moemesh_kvstore_put_duration_seconds", "Time to store one KvPut message.")),
        get_seconds(latency(r, "moemesh_kvstore_get_duration_seconds", "Time to answer one KvGet message.")),
        stored(puts.Add({{"result", "stored"}})),
        present(puts.Add({{"result", "present"}})),
        too_large(puts.Add({{"result", "too_large"}})),
        memory(tier(prometheus::Labels{{"tier", "memory"}})) {
    if (disk_tier) disk = tier(prometheus::Labels{{"tier", "disk"}});
  }

  // One tier's series.
  struct Tier {
    prometheus::Gauge *bytes, *blocks, *budget;
    prometheus::Counter *hits, *evictions;
  };
  Tier tier(const prometheus::Labels& l) {
    return {&bytes_family.Add(l), &blocks_family.Add(l), &budget_family.Add(l), &hits_family.Add(l),
            &evictions_family.Add(l)};
  }

  static prometheus::Histogram& latency(prometheus::Registry& r, const char* name, const char* help) {
    return prometheus::BuildHistogram()
        .Name(name)
        .Help(help)
        .Register(r)
        .Add({}, prometheus::Histogram::BucketBoundaries{1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                                                         1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1});
  }

  prometheus::Family<prometheus::Gauge>&bytes_family, &blocks_family, &budget_family;
  prometheus::Family<prometheus::Counter>&hits_family, &evictions_family, &disk_errors;
  prometheus::Counter& misses;
  prometheus::Family<prometheus::Counter>& puts;
  prometheus::Family<prometheus::Counter>& bad_frames;
  prometheus::Gauge& pool_bytes;
  prometheus::Histogram &put_seconds, &get_seconds;
  prometheus::Counter &stored, &present, &too_large;
  Tier memory;
  std::optional<Tier> disk;
};

// A put parsed and checked on arrival (bad input is answered at once), stored when its turn comes.
struct QueuedPut {
  zmq::message_t peer;
  wire::Header header;
  pb::KvPut put;
  std::vector<BlockKey> keys;
  FramesPtr frames;  // [peer (moved out), header, tensors...]
};

using drain_atom = caf::atom_constant<caf::atom("kvdrain")>;

struct StoreState {
  // CAF destroys the state when the actor exits: a graceful shutdown keeps the memory tier on disk.
  ~StoreState() {
    if (!store || !store->disk()) return;
    auto t0 = std::chrono::steady_clock::now();
    size_t n = store->spill_all();
    spdlog::info("kvstore: wrote {} blocks from memory to the disk tier at exit in {:.3f} s", n,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::shared_ptr<BlockStore> store;  // shared only to pass it in: CAF copies spawn arguments
  std::shared_ptr<BlockPool> pool;    // the memory of the blocks put
  std::shared_ptr<prometheus::Registry> registry;  // outlives the metric references below
  std::unique_ptr<Metrics> metrics;
  std::shared_ptr<BlockStoreGauges> gauges;
  BlockStoreStats published;  // what the counters already show
  DiskTierStats published_disk;
  caf::actor bridge;
  int socket = -1;
  std::deque<QueuedPut> queued;  // puts not stored yet, in arrival order
  bool drain_sent = false;       // a drain_atom is on its way to the store
};

using Self = caf::stateful_actor<StoreState>;

// Counts on-event: the series appears with the first error of its reason.
void count_disk_errors(Metrics& m, const char* reason, uint64_t now, uint64_t before) {
  if (now > before) m.disk_errors.Add({{"reason", reason}}).Increment(double(now - before));
}

void publish(StoreState& s) {
  const auto& now = s.store->stats();
  auto& m = *s.metrics;
  m.memory.hits->Increment(double((now.hits - now.disk_hits) - (s.published.hits - s.published.disk_hits)));
  m.misses.Increment(double(now.misses - s.published.misses));
  m.memory.evictions->Increment(double(now.evictions - s.published.evictions));
  m.stored.Increment(double(now.stored - s.published.stored));
  m.present.Increment(double(now.present - s.published.present));
  m.too_large.Increment(double(now.too_large - s.published.too_large));
  m.memory.bytes->Set(double(now.bytes));
  m.memory.blocks->Set(double(now.blocks));
  if (s.pool) m.pool_bytes.Set(double(s.pool->stats().slab_bytes));
  if (const BlockDiskTier* disk = s.store->disk(); disk && m.disk) {
    const auto& d = disk->stats();
    const auto& was = s.published_disk;
    m.disk->hits->Increment(double(now.disk_hits - s.published.disk_hits));
    m.disk->evictions->Increment(double(d.evictions - was.evictions));
    m.disk->bytes->Set(double(d.bytes));
    m.disk->blocks->Set(double(d.blocks));
    count_disk_errors(m, "bad_header", d.bad_header, was.bad_header);
    count_disk_errors(m, "checksum", d.bad_checksum, was.bad_checksum);
    count_disk_errors(m, "io", d.io, was.io);
    s.published_disk = d;
  }
  if (s.gauges) {
    s.gauges->bytes = now.bytes;
    s.gauges->blocks = now.blocks;
  }
  s.published = now;
}

void reply(Self* self, zmq::message_t&& peer, const wire::Header& h, std::vector<zmq::message_t> tensors = {}) {
  auto frames = std::make_shared<Frames>();
  frames->push_back(std::move(peer));
  frames->push_back(frame_of(wire::encode_header(h)));
  for (auto& t : tensors) frames->push_back(std::move(t));
  self->send(self->state.bridge, zmq_send_atom::value, self->state.socket, std::move(frames));
}

void reply_error(Self* self, zmq::message_t&& peer, uint64_t request_id, const std::string& reason,
                 const std::string& message) {
  self->state.metrics->bad_frames.Add({{"reason", reason}}).Increment();
  spdlog::debug("kvstore: request {} rejected ({}): {}", request_id, reason, message);
  pb::ErrorReply err;
  err.set_code(reason);
  err.set_message(message);
  wire::Header h;
  h.kind = wire::Kind::Error;
  h.request_id = request_id;
  h.meta = err.SerializeAsString();
  reply(self, std::move(peer), h);
}

std::vector<BlockKey> parse_keys(const google::protobuf::RepeatedPtrField<std::string>& keys) {
  std::vector<BlockKey> out;
  out.reserve(keys.size());
  for (int i = 0; i < keys.size(); ++i) {
    if (keys[i].size() != BlockKey::kBytes)
      throw Rejected("bad_key", "key " + std::to_string(i) + " has " + std::to_string(keys[i].size()) +
                                    " bytes, expected " + std::to_string(BlockKey::kBytes));
    out.push_back(BlockKey::from_bytes(keys[i]));
  }
  return out;
}

// Throws on bad input, leaving `peer` to answer it.
QueuedPut parse_put(zmq::message_t& peer, wire::Header& h, FramesPtr frames) {
  pb::KvPut put;
  if (!put.ParseFromString(h.meta)) throw wire::WireError(wire::ErrorCode::BadMeta, "KvPut metadata does not parse");
  if (size_t(put.keys_size()) != h.tensors.size())
    throw Rejected("bad_request", "KvPut has " + std::to_string(put.keys_size()) + " keys but " +
                                      std::to_string(h.tensors.size()) + " tensor frames");
  auto keys = parse_keys(put.keys());
  return QueuedPut{std::move(peer), std::move(h), std::move(put), std::move(keys), std::move(frames)};
}

void store_put(Self* self, QueuedPut& q) {
  auto t0 = std::chrono::steady_clock::now();
  const wire::Header& h = q.header;
  const pb::KvPut& put = q.put;
  const auto& keys = q.keys;
  std::optional<trace::OpenSpan> span;
  if (auto parent = trace_from_proto(put.trace())) span.emplace(trace::child_of(*parent));
  auto& store = *self->state.store;
  pb::KvPut ack;
  ack.set_model_id(put.model_id());
  for (size_t i = 0; i < keys.size(); ++i) {
    const zmq::message_t& frame = (*q.frames)[2 + i];
    const auto& desc = h.tensors[i];
    // Copied into the pool (pages faulted in ahead), not kept in its frame: a frame is fresh
    // heap whose pages fault in one by one, and a small one may pin a whole receive buffer.
    StoredBlock block =
        self->state.pool->copy_of(desc.dtype, desc.shape, {static_cast<const uint8_t*>(frame.data()), frame.size()});
    if (store.put(keys[i], std::move(block)) != BlockStore::Put::TooLarge) *ack.add_keys() = put.keys(int(i));
  }
  publish(self->state);
  wire::Header out;
  out.kind = wire::Kind::KvPut;
  out.request_id = h.request_id;
  std::memcpy(out.trace_id, h.trace_id, sizeof out.trace_id);
  out.meta = ack.SerializeAsString();
  // Observed before the reply leaves, so a client that scrapes after its answer sees it counted.
  self->state.metrics->put_seconds.Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  if (span)
    span->finish("kvstore", "kv_put",
                 {{"peer", trace::peer_name(q.peer.to_string_view())},
                  {"model_id", put.model_id()},
                  {"blocks", keys.size()},
                  {"held", ack.keys_size()}});
  reply(self, std::move(q.peer), out);
}

// Stores the first `n` queued puts, in order.
void store_queued(Self* self, size_t n) {
  auto& queue = self->state.queued;
  for (; n > 0 && !queue.empty(); --n) {
    QueuedPut q = std::move(queue.front());
    queue.pop_front();
    try {
      store_put(self, q);
    } catch (const std::exception& e) {  // a bug, not bad input (that was refused on arrival)
      spdlog::error("kvstore: put {} failed: {}", q.header.request_id, e.what());
      reply_error(self, std::move(q.peer), q.header.request_id, "internal", e.what());
    }
  }
}

void handle_get(Self* self, zmq::message_t&& peer, const wire::Header& h) {
  auto t0 = std::chrono::steady_clock::now();
  pb::KvGet get;
  if (!get.ParseFromString(h.meta)) throw wire::WireError(wire::ErrorCode::BadMeta, "KvGet metadata does not parse");
  if (!h.tensors.empty()) throw Rejected("bad_request", "KvGet carries no tensor frames");
  auto keys = parse_keys(get.keys());
  // A get goes before the puts queued ahead of it, except those holding a block of its chain:
  // what a client put, its next get finds.
  const auto& queue = self->state.queued;
  size_t needed = 0;
  for (size_t i = 0; i < queue.size(); ++i)
    for (const BlockKey& k : queue[i].keys)
      if (std::find(keys.begin(), keys.end(), k) != keys.end()) needed = i + 1;
  store_queued(self, needed);
  std::optional<trace::OpenSpan> span;
  if (auto parent = trace_from_proto(get.trace())) span.emplace(trace::child_of(*parent));
  auto blocks = self->state.store->get_chain(keys, wire::kMaxTensors);
  publish(self->state);

  pb::KvGetReply meta;
  meta.set_found(int32_t(blocks.size()));
  wire::Header out;
  out.kind = wire::Kind::KvGetReply;
  out.request_id = h.request_id;
  std::memcpy(out.trace_id, h.trace_id, sizeof out.trace_id);
  out.meta = meta.SerializeAsString();
  std::vector<zmq::message_t> tensors;
  for (const auto& b : blocks) {
    out.tensors.push_back({b.dtype, b.shape});
    // Zero-copy: the frame holds a reference to the block until ZeroMQ has sent it.
    auto* hold = new std::shared_ptr<const void>(b.owner);
    tensors.emplace_back(
        const_cast<uint8_t*>(b.data), b.size,
        [](void*, void* hint) { delete static_cast<std::shared_ptr<const void>*>(hint); }, hold);
  }
  self->state.metrics->get_seconds.Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  if (span)
    span->finish("kvstore", "kv_get", {{"peer", trace::peer_name(peer.to_string_view())}, {"model_id", get.model_id()},
                                       {"blocks", keys.size()}, {"found", blocks.size()}});
  reply(self, std::move(peer), out, std::move(tensors));
}

void handle(Self* self, const FramesPtr& framed) {
  Frames& frames = *framed;
  if (frames.empty()) return;  // a ROUTER always gives the peer's id: nothing to answer
  zmq::message_t peer = std::move(frames[0]);
  if (frames.size() < 2) return reply_error(self, std::move(peer), 0, "truncated", "message has no header frame");
  std::vector<wire::Frame> spans;
  for (size_t i = 1; i < frames.size(); ++i)
    spans.emplace_back(static_cast<const uint8_t*>(frames[i].data()), frames[i].size());
  uint64_t request_id = 0;
  try {
    request_id = wire::decode_header(spans[0]).request_id;
  } catch (const wire::WireError&) {
  }
  try {
    wire::Header h = wire::decode(spans);
    switch (h.kind) {
      case wire::Kind::KvPut: {
        // Queued: the gets that come before it is stored are answered first (their callers wait on
        // them; a put's caller does not), one put stored per turn of the mailbox.
        auto& s = self->state;
        s.queued.push_back(parse_put(peer, h, framed));
        if (!s.drain_sent) {
          s.drain_sent = true;
          self->send(self, drain_atom::value);
        }
        return;
      }
      case wire::Kind::KvGet: return handle_get(self, std::move(peer), h);
      default:
        throw Rejected("bad_request", std::string("the KV store serves KvPut and KvGet, not ") + wire::kind_name(h.kind));
    }
  } catch (const wire::WireError& e) {
    reply_error(self, std::move(peer), request_id, wire::error_code_name(e.code()), e.what());
  } catch (const Rejected& e) {
    reply_error(self, std::move(peer), request_id, e.reason, e.what());
  } catch (const std::exception& e) {  // a bug, not bad input: answer it and keep serving
    spdlog::error("kvstore: request {} failed: {}", request_id, e.what());
    reply_error(self, std::move(peer), request_id, "internal", e.what());
  }
}

caf::behavior block_store(Self* self, BlockStoreOptions opts, caf::actor bridge, int socket,
                          std::shared_ptr<BlockStore> store) {
  auto& s = self->state;
  const bool has_disk = store->disk() != nullptr;
  s.store = std::move(store);
  s.pool = BlockPool::make(opts.budget_bytes);
  s.registry = std::move(opts.registry);
  s.metrics = std::make_unique<Metrics>(*s.registry, has_disk);
  s.metrics->memory.budget->Set(double(opts.budget_bytes));
  if (has_disk) s.metrics->disk->budget->Set(double(opts.disk_budget_bytes));
  publish(s);  // what the disk tier found at start-up
  s.gauges = std::move(opts.gauges);
  s.bridge = std::move(bridge);
  s.socket = socket;
  return {
      [self](zmq_recv_atom, int, FramesPtr frames) {
        if (frames) handle(self, frames);
      },
      [self](drain_atom) {
        auto& s = self->state;
        store_queued(self, 1);
        s.drain_sent = !s.queued.empty();
        if (s.drain_sent) self->send(self, drain_atom::value);  // behind what came meanwhile
      },
  };
}

}  // namespace

caf::actor spawn_block_store(caf::actor_system& sys, caf::actor replies, int socket, BlockStoreOptions opts) {
  if (!opts.registry) opts.registry = std::make_shared<prometheus::Registry>();
  // Opened (and indexed) here, so an unusable directory fails the caller, not the actor.
  std::unique_ptr<BlockDiskTier> disk;
  if (opts.disk_budget_bytes > 0) {
    if (opts.disk_dir.empty()) throw Error("--disk-budget-bytes needs --disk-dir");
    disk = std::make_unique<BlockDiskTier>(opts.disk_dir, opts.disk_budget_bytes);
  }
  auto store = std::make_shared<BlockStore>(opts.budget_bytes, std::move(disk));
  return sys.spawn(block_store, std::move(opts), std::move(replies), socket, std::move(store));
}

caf::actor spawn_block_store(caf::actor_system& sys, ZmqBridge& bridge, int socket, BlockStoreOptions opts) {
  auto actor = spawn_block_store(sys, bridge.actor(), socket, std::move(opts));
  bridge.route(socket, actor);
  return actor;
}

}  // namespace moemesh::actors
