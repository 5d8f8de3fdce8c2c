#include "actors/kv_client.h"

#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <random>

#include <spdlog/spdlog.h>

#include "actors/dispatch_frames.h"
#include "core/error.h"
#include "core/wire.h"
#include "proto/dataplane.pb.h"

namespace moemesh::actors {

namespace {

using Clock = std::chrono::steady_clock;

// A store answers at most this many blocks per KvGet (and we put at most this many per KvPut).
constexpr size_t kBlocksPerMessage = 16;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

struct Call {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  FramesPtr frames;  // the reply
};

}  // namespace

struct KvClient::Inflight {
  std::mutex mu;
  std::map<uint64_t, std::shared_ptr<Call>> fetches;
  // Fetches the caller stopped waiting for (its budget ran out), by id: when the store's own
  // deadline for them passes with no reply, the store has failed after all.
  std::map<uint64_t, Clock::time_point> abandoned;
  std::map<uint64_t, size_t> puts;  // request id -> blocks sent, until acked or given up
  std::shared_ptr<KvClientStats> stats;

  // On the bridge's I/O thread (it never blocks): hand a KvGet reply to its waiting fetch, count a
  // KvPut's ack. No actor between: a step's prefix lookup waits one thread hand-off less.
  void deliver(const FramesPtr& frames) {
    uint64_t id = 0;
    wire::Kind kind = wire::Kind::Error;
    std::string meta;
    try {
      wire::Header h = wire::decode_header({static_cast<const uint8_t*>((*frames)[0].data()), (*frames)[0].size()});
      id = h.request_id;
      kind = h.kind;
      meta = std::move(h.meta);
    } catch (const wire::WireError& e) {
      spdlog::warn("kvstore client: undecodable reply: {}", e.what());
      return;
    }
    std::unique_lock<std::mutex> lk(mu);
    if (abandoned.erase(id) > 0) {  // its reply came, after its caller had moved on
      fetches.erase(id);
      ++stats->late_replies;
      return;
    }
    if (auto it = fetches.find(id); it != fetches.end()) {
      auto call = it->second;
      fetches.erase(it);
      lk.unlock();
      std::lock_guard<std::mutex> clk(call->mu);
      call->done = true;
      call->frames = frames;
      call->cv.notify_all();
      return;
    }
    if (auto it = puts.find(id); it != puts.end()) {
      puts.erase(it);
      lk.unlock();
      if (kind == wire::Kind::KvPut) {
        pb::KvPut ack;
        if (ack.ParseFromString(meta)) stats->acked_blocks += uint64_t(ack.keys_size());
      } else {
        ++stats->publish_failures;
        pb::ErrorReply err;
        err.ParseFromString(meta);
        spdlog::warn("kvstore client: put refused: {} {}", err.code(), err.message());
      }
      return;
    }
    ++stats->late_replies;
  }
};

KvClient::KvClient(caf::actor_system& sys, KvClientOptions opts)
    : opts_(std::move(opts)),
      stats_(std::make_shared<KvClientStats>()),
      inflight_(std::make_shared<Inflight>()),
      bridge_(sys) {
  inflight_->stats = stats_;
  std::random_device rd;  // ids start at a random point: replies meant for an earlier process never match
  next_id_ = ((uint64_t(rd()) << 32) | rd()) | 1;
  // A bounded queue: while the store is away, puts beyond it are dropped (and counted by the bridge).
  socket_ = bridge_.add({.name = "kvstore " + opts_.endpoint,
                         .type = zmq::socket_type::dealer,
                         .endpoint = opts_.endpoint,
                         .identity = opts_.identity,
                         .send_hwm = 64,
                         .recv_hwm = 1000,
                         .heartbeats = kDataPlaneHeartbeats});
  bridge_.route(socket_, [inflight = inflight_](int, FramesPtr frames) {
    if (frames && !frames->empty()) inflight->deliver(frames);
  });
  bridge_.start();
}

KvClient::~KvClient() { bridge_.stop(); }

bool KvClient::backing_off() { return now_ns() < skip_until_ns_.load(); }

void KvClient::failed(const std::string& why) {
  ++stats_->fetch_failures;
  skip_until_ns_ = now_ns() + std::chrono::duration_cast<std::chrono::nanoseconds>(opts_.backoff).count();
  spdlog::warn("kvstore client: {} ({}); prefix cache off for {} ms", why, opts_.endpoint, opts_.backoff.count());
}

std::vector<std::vector<std::vector<float>>> PrefixStore::fetch_many(std::span<const PrefixQuery> queries,
                                                                     size_t block_floats, WaitUntil) {
  std::vector<std::vector<std::vector<float>>> out;
  out.reserve(queries.size());
  for (const PrefixQuery& q : queries) out.push_back(fetch(q.keys, block_floats, q.trace));
  return out;
}

namespace {

// Appends the blocks of a KvGet reply for a chain of `asked` keys; returns how many it held.
// Throws (Error, WireError) on an error reply or a malformed one.
size_t take_reply(const Frames& frames, size_t asked, size_t block_floats, std::vector<std::vector<float>>& blocks) {
  wire::Header r = wire::decode(frame_views(frames));
  if (r.kind == wire::Kind::Error) {
    pb::ErrorReply err;
    err.ParseFromString(r.meta);
    throw Error("KvGet refused: " + err.code() + ": " + err.message());
  }
  pb::KvGetReply meta;
  if (r.kind != wire::Kind::KvGetReply || !meta.ParseFromString(r.meta))
    throw Error(std::string("unexpected reply to KvGet: ") + wire::kind_name(r.kind));
  if (!meta.error().empty()) throw Error("KvGet failed: " + meta.error());
  if (meta.found() < 0 || size_t(meta.found()) > asked || size_t(meta.found()) != r.tensors.size())
    throw Error("KvGetReply says " + std::to_string(meta.found()) + " blocks for a chain of " + std::to_string(asked) +
                " with " + std::to_string(r.tensors.size()) + " tensors");
  const size_t found = size_t(meta.found());
  for (size_t i = 0; i < found; ++i) {
    // A block of another shape (another model under the same id, another layout) is unusable.
    const auto& d = r.tensors[i];
    const zmq::message_t& f = frames[1 + i];
    if (d.dtype != DType::F32 || f.size() != block_floats * sizeof(float))
      throw Error("block " + std::to_string(blocks.size()) + " has " + std::to_string(f.size()) + " bytes, expected " +
                  std::to_string(block_floats * sizeof(float)));
    std::memcpy(blocks.emplace_back(block_floats).data(), f.data(), f.size());
  }
  return found;
}

}  // namespace

std::vector<std::vector<float>> KvClient::fetch(std::span<const BlockKey> keys, size_t block_floats,
                                                const TraceRef& trace) {
  const PrefixQuery q{{keys.begin(), keys.end()}, trace};
  return std::move(fetch_many(std::span(&q, 1), block_floats)[0]);
}

bool KvClient::abandoned_expired() {
  std::lock_guard<std::mutex> lk(inflight_->mu);
  bool expired = false;
  const auto now = Clock::now();
  for (auto it = inflight_->abandoned.begin(); it != inflight_->abandoned.end();) {
    if (it->second > now) {
      ++it;
      continue;
    }
    inflight_->fetches.erase(it->first);
    it = inflight_->abandoned.erase(it);
    expired = true;
  }
  return expired;
}

std::vector<std::vector<std::vector<float>>> KvClient::fetch_many(std::span<const PrefixQuery> queries,
                                                                  size_t block_floats, WaitUntil give_up) {
  // Lookups cut by a budget whose reply never came within the store's deadline: a store that
  // answers nothing is a failed store, however short the waits for it were. Other cut lookups of
  // the same outage expire while the client backs off: the store is not found failed again.
  if (abandoned_expired() && !backing_off())
    failed("no KvGet reply within " + std::to_string(opts_.deadline.count()) + " ms");
  std::vector<std::vector<std::vector<float>>> found(queries.size());
  std::vector<size_t> asking;  // the queries whose chain goes on
  for (size_t q = 0; q < queries.size(); ++q)
    if (!queries[q].keys.empty()) asking.push_back(q);
  if (asking.empty()) return found;
  if (backing_off()) {
    stats_->skipped_fetches += asking.size();
    return found;
  }
  stats_->fetches += asking.size();
  // Chains are asked in rounds, all chains' requests of a round sent before waiting for any: each
  // reply holds at most kBlocksPerMessage blocks, and a round that comes back short ends its chain.
  bool failure = false;
  while (!asking.empty() && !failure) {
    if (Clock::now() >= give_up) {  // chains that go on past the budget: what came so far
      stats_->cut_fetches += asking.size();
      break;
    }
    struct Round {
      size_t query, asked;
      uint64_t id;
      std::shared_ptr<Call> call;
    };
    std::vector<Round> round;
    for (size_t q : asking) {
      const auto& keys = queries[q].keys;
      const size_t first = found[q].size(), n = std::min(kBlocksPerMessage, keys.size() - first);
      pb::KvGet get;
      get.set_model_id(opts_.model_id);
      for (size_t i = first; i < first + n; ++i) *get.add_keys() = keys[i].to_bytes();
      if (queries[q].trace.valid()) trace_to_proto(queries[q].trace, get.mutable_trace());
      wire::Header h;
      h.kind = wire::Kind::KvGet;
      h.request_id = next_id_++;
      h.meta = get.SerializeAsString();
      auto call = std::make_shared<Call>();
      {
        std::lock_guard<std::mutex> lk(inflight_->mu);
        inflight_->fetches[h.request_id] = call;
      }
      round.push_back({q, n, h.request_id, call});
      auto frames = std::make_shared<Frames>();
      frames->push_back(frame_of(wire::encode_header(h)));
      caf::anon_send(bridge_.actor(), zmq_send_atom::value, socket_, std::move(frames));
    }
    const auto deadline = Clock::now() + opts_.deadline;
    const bool budget_first = give_up < deadline;
    asking.clear();
    for (const Round& r : round) {
      bool done;
      {
        std::unique_lock<std::mutex> lk(r.call->mu);
        done = r.call->cv.wait_until(lk, std::min(deadline, give_up), [&] { return r.call->done; });
      }
      if (!done) {
        std::unique_lock<std::mutex> lk(inflight_->mu);
        if (budget_first) {  // the caller stops waiting; the store is not at fault unless it never answers
          if (inflight_->fetches.count(r.id)) {
            inflight_->abandoned[r.id] = deadline;
          } else {  // answered between the wait and the lock: late all the same
            ++stats_->late_replies;
          }
          ++stats_->cut_fetches;
          continue;
        }
        inflight_->fetches.erase(r.id);  // withdraw it: a late reply is only counted
        lk.unlock();
        if (!failure) failed("no KvGet reply within " + std::to_string(opts_.deadline.count()) + " ms");
        failure = true;
        continue;
      }
      try {  // on a bad reply, keep the whole blocks before it
        auto& blocks = found[r.query];
        if (take_reply(*r.call->frames, r.asked, block_floats, blocks) == r.asked &&
            blocks.size() < queries[r.query].keys.size())
          asking.push_back(r.query);
      } catch (const std::exception& e) {  // WireError or Error
        if (!failure) failed(e.what());
        failure = true;
      }
    }
  }
  for (const auto& blocks : found) stats_->fetched_blocks += blocks.size();
  return found;
}

std::vector<int64_t> KvClient::shape_for(size_t floats) const {
  int64_t n = opts_.block_shape.empty() ? 0 : 1;
  for (int64_t d : opts_.block_shape) n *= d;
  return n == int64_t(floats) ? opts_.block_shape : std::vector<int64_t>{int64_t(floats)};
}

void KvClient::publish(std::span<const BlockKey> keys, std::vector<std::vector<float>> blocks, const TraceRef& trace) {
  if (keys.size() != blocks.size()) {
    spdlog::error("kvstore client: publish of {} keys with {} blocks ignored", keys.size(), blocks.size());
    return;
  }
  if (keys.empty() || backing_off()) return;  // a store that does not answer gets no puts either
  for (size_t first = 0; first < keys.size(); first += kBlocksPerMessage) {
    const size_t n = std::min(kBlocksPerMessage, keys.size() - first);
    pb::KvPut put;
    put.set_model_id(opts_.model_id);
    if (trace.valid()) trace_to_proto(trace, put.mutable_trace());
    wire::Header h;
    h.kind = wire::Kind::KvPut;
    h.request_id = next_id_++;
    auto frames = std::make_shared<Frames>();
    frames->emplace_back();  // the header, once the descriptors are known
    for (size_t i = first; i < first + n; ++i) {
      *put.add_keys() = keys[i].to_bytes();
      h.tensors.push_back({DType::F32, shape_for(blocks[i].size())});
      frames->push_back(frame_of(std::move(blocks[i])));
    }
    h.meta = put.SerializeAsString();
    (*frames)[0] = frame_of(wire::encode_header(h));
    {
      std::lock_guard<std::mutex> lk(inflight_->mu);
      // Acks that never came (a store restarted mid-put) are forgotten rather than kept forever.
      if (inflight_->puts.size() > 4096) inflight_->puts.clear();
      inflight_->puts[h.request_id] = n;
    }
    caf::anon_send(bridge_.actor(), zmq_send_atom::value, socket_, std::move(frames));
    stats_->published_blocks += n;
  }
}

}  // namespace moemesh::actors
