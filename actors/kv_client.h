// The attention worker's client of moemesh-kvstore (protocol in actors/block_store.h): it
// fetches the longest stored prefix of a prompt's block chain and offers the blocks of finished
// sequences.
//
// The KV store is an optimisation, so nothing here is ever fatal: a fetch waits at most its
// deadline and then returns what it has (possibly nothing); after a failure, fetches are skipped
// for a back-off period so a dead store costs one deadline, not one per request; publishes are
// fire-and-forget (their acks and errors are only counted). Every failure is logged and counted.
//
// Like RemoteExpertExecutor, it has its own ZmqBridge with one DEALER socket; fetch() blocks the
// calling (compute) thread on a condition variable fulfilled by the bridge's I/O thread as the
// replies arrive. Never call fetch() from inside an actor. Thread-safe.
//
// fetch_many() asks for several chains at once (a step's new sequences): their requests go out
// together and are waited for together, so a step pays one round trip to the store, not one per
// new sequence. Its `give_up` is the caller's wait budget: what has not come by then is not
// waited for (the caller computes those positions instead). Unlike the store's own deadline, that
// is no failure and sets off no back-off: a store busy for a moment is still a store. Only a cut
// lookup whose reply has still not come when the store's deadline passes fails the store (seen at
// the next fetch).
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/zmq_bridge.h"
#include "core/prefix_hash.h"
#include "core/trace_ref.h"

namespace moemesh::actors {

using WaitUntil = std::chrono::steady_clock::time_point;
constexpr WaitUntil kWaitForTheStore = WaitUntil::max();  // no budget: the store's deadline alone

// One chain to look up: its block keys, and the sequence's span (named in the request so the
// store logs its span under it).
struct PrefixQuery {
  std::vector<BlockKey> keys;
  TraceRef trace;
};

// What the attention worker needs from a KV store; an interface so tests can use a map.
class PrefixStore {
 public:
  virtual ~PrefixStore() = default;
  // The blocks of the longest stored prefix of the chain `keys`, in order, each of exactly
  // `block_floats` floats ([layers, 2, kBlockTokens, kv_dim]). Never throws.
  // `trace`: the sequence's span, named in the request so the store logs its span under it.
  virtual std::vector<std::vector<float>> fetch(std::span<const BlockKey> keys, size_t block_floats,
                                                const TraceRef& trace = {}) = 0;
  // fetch() of each query, in order: for each the blocks that came by `give_up`. This default
  // asks them one after the other and has no budget; a store across a network asks them all at
  // once. Never throws.
  virtual std::vector<std::vector<std::vector<float>>> fetch_many(std::span<const PrefixQuery> queries,
                                                                  size_t block_floats,
                                                                  WaitUntil give_up = kWaitForTheStore);
  // Offers blocks (keys[i] names blocks[i]); returns without waiting for the store. Never throws.
  virtual void publish(std::span<const BlockKey> keys, std::vector<std::vector<float>> blocks,
                       const TraceRef& trace = {}) = 0;
};

struct KvClientOptions {
  std::string endpoint;                     // the store's ROUTER, tcp://host:port
  std::string model_id;                     // namespaces the keys in the store
  std::chrono::milliseconds deadline{500};  // per fetch round trip
  std::chrono::milliseconds backoff{5000};  // fetches skipped for this long after a failure
  std::string identity;                     // DEALER routing id (empty: ZeroMQ picks)
  std::vector<int64_t> block_shape;         // of the tensors put: [layers, 2, 16, kv_dim]
};

struct KvClientStats {
  std::atomic<uint64_t> fetches{0};           // chains looked up in the store
  std::atomic<uint64_t> fetched_blocks{0};    // blocks received and returned
  std::atomic<uint64_t> fetch_failures{0};    // timeouts, error replies, bad replies
  std::atomic<uint64_t> skipped_fetches{0};   // not asked: backing off after a failure
  std::atomic<uint64_t> published_blocks{0};  // blocks sent in KvPuts
  std::atomic<uint64_t> acked_blocks{0};      // blocks the store said it holds
  std::atomic<uint64_t> publish_failures{0};  // KvPuts answered with an error
  std::atomic<uint64_t> late_replies{0};      // replies after their fetch gave up
  std::atomic<uint64_t> cut_fetches{0};       // chains not waited for to their end: the caller's budget ran out
};

class KvClient : public PrefixStore {
 public:
  // Throws moemesh::Error on a malformed endpoint.
  KvClient(caf::actor_system& sys, KvClientOptions opts);
  ~KvClient() override;
  KvClient(const KvClient&) = delete;
  KvClient& operator=(const KvClient&) = delete;

  std::vector<std::vector<float>> fetch(std::span<const BlockKey> keys, size_t block_floats,
                                        const TraceRef& trace = {}) override;
  std::vector<std::vector<std::vector<float>>> fetch_many(std::span<const PrefixQuery> queries, size_t block_floats,
                                                          WaitUntil give_up = kWaitForTheStore) override;
  void publish(std::span<const BlockKey> keys, std::vector<std::vector<float>> blocks,
               const TraceRef& trace = {}) override;

  const KvClientOptions& options() const { return opts_; }
  const KvClientStats& stats() const { return *stats_; }

  struct Inflight;  // requests awaiting replies (shared with the bridge's handler)

 private:
  bool backing_off();
  // Forgets the cut lookups past the store's deadline; true if there were any (the store failed).
  bool abandoned_expired();
  void failed(const std::string& why);
  std::vector<int64_t> shape_for(size_t floats) const;

  KvClientOptions opts_;
  std::shared_ptr<KvClientStats> stats_;
  std::shared_ptr<Inflight> inflight_;
  ZmqBridge bridge_;
  int socket_ = -1;
  std::atomic<uint64_t> next_id_;
  std::atomic<int64_t> skip_until_ns_{0};  // steady_clock, fetches skipped before it
};

}  // namespace moemesh::actors
