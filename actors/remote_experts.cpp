#include "actors/remote_experts.h"

#include <algorithm>
#include <condition_variable>
#include <random>
#include <set>

#include <spdlog/spdlog.h>

#include "actors/dispatch_frames.h"
#include "actors/metrics_util.h"
#include "core/dispatch_codec.h"
#include "core/engine.h"
#include "core/error.h"
#include "proto/control.pb.h"

namespace moemesh::actors {

// A reply whose payload is on a pair transport, handed by the bridge's handler to the receiving
// actor with the transport it decided on (decided once, where the header arrived).
struct PairReply {
  FramesPtr frames;
  std::shared_ptr<Transport> carrier;
};

}  // namespace moemesh::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::PairReply)

namespace moemesh::actors {

namespace {

using Clock = std::chrono::steady_clock;
using pair_reply_atom = caf::atom_constant<caf::atom("pairreply")>;

// One request to one host, as seen by the waiting run().
struct Outcome {
  bool done = false;
  Clock::time_point arrived;
  std::string error;   // empty: `reply` is a good DispatchResponse
  std::string reason;  // with an error: error_reply or bad_reply (the metric label)
  FramesPtr frames;    // keeps reply's views alive
  dispatch::Reply reply;
  std::shared_ptr<Transport> carrier;  // what carries reply's outputs
  bool received = false;               // outputs already taken off a pair transport (else in frames)
  std::vector<float> outputs;
};

struct Call {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Outcome> outcomes;
  size_t pending = 0;
};

// Why a request to a host failed (the failures/retries label).
// A host that timed out this many times within one call is given up for it.
constexpr int kMaxTimeoutsPerHost = 3;

// disconnected: the connection dropped while the request was in flight (failed at once).
constexpr const char* kFailureReasons[] = {"timeout", "error_reply", "bad_reply", "disconnected"};

// The traces of the forward pass's sequences whose rows are among `rows` (row indices of the
// pass's batch), distinct, at most dispatch::kMaxTraces.
std::vector<TraceRef> traces_of_rows(std::span<const StepInput> inputs, const std::vector<int32_t>& rows) {
  std::vector<TraceRef> out;
  if (inputs.empty() || rows.empty()) return out;
  std::vector<int64_t> ends;  // input i owns rows [ends[i-1], ends[i])
  int64_t end = 0;
  for (const StepInput& in : inputs) ends.push_back(end += int64_t(in.tokens.size()));
  for (int32_t row : rows) {
    const size_t i = size_t(std::upper_bound(ends.begin(), ends.end(), int64_t(row)) - ends.begin());
    if (i >= inputs.size() || !inputs[i].trace.valid()) continue;
    if (std::find(out.begin(), out.end(), inputs[i].trace) != out.end()) continue;
    out.push_back(inputs[i].trace);
    if (out.size() == dispatch::kMaxTraces) break;
  }
  return out;
}

}  // namespace

struct RemoteExpertExecutor::Metrics {
  struct Host {
    prometheus::Counter* requests;
    prometheus::Histogram* round_trip;
    std::map<std::string, prometheus::Counter*> failures;
  };

  explicit Metrics(std::shared_ptr<prometheus::Registry> reg)
      : registry(std::move(reg)),
        requests(metrics::counter_family(*registry, "moemesh_attention_dispatch_requests_total",
                                         "DispatchRequests sent, by expert host.")),
        round_trip(metrics::histogram_family(*registry, "moemesh_attention_dispatch_round_trip_seconds",
                                             "Time from sending a DispatchRequest to its good reply, by expert host.")),
        failures(metrics::counter_family(*registry, "moemesh_attention_dispatch_failures_total",
                                         "DispatchRequests that failed, by expert host and reason "
                                         "(timeout, error_reply, bad_reply).")),
        retried(metrics::counter_family(*registry, "moemesh_attention_dispatch_failovers_total",
                                        "Expert groups re-sent to another replica after a failed request, by reason.")),
        exhausted(metrics::counter_family(*registry, "moemesh_attention_dispatch_exhausted_total",
                                          "Layer dispatches given up (the step fails), by reason (no_host: no usable "
                                          "host within the uncovered wait, replicas_exhausted).")),
        hedges(metrics::counter_family(*registry, "moemesh_attention_dispatch_hedges_total",
                                       "Duplicate DispatchRequests sent to another replica because a host had not "
                                       "answered within the hedge delay, by outcome (won: the duplicate answered "
                                       "first; lost: the original did).")),
        uncovered_waits(metrics::counter_family(*registry, "moemesh_attention_dispatch_uncovered_waits_total",
                                                "Layer dispatches that waited for an expert with no usable host "
                                                "(none in the table, all disconnected or loading).")
                            .Add({})),
        uncovered_wait_seconds(
            metrics::histogram_family(*registry, "moemesh_attention_dispatch_uncovered_wait_seconds",
                                      "How long a layer dispatch waited for an expert with no usable host.")
                .Add({}, metrics::rpc_latency_buckets())),
        waiting(metrics::gauge_family(*registry, "moemesh_attention_dispatch_waiting_calls",
                                      "Layer dispatches waiting now for an expert with no usable host.")
                    .Add({})),
        deadline(metrics::gauge_family(*registry, "moemesh_attention_dispatch_deadline_seconds",
                                       "The adaptive dispatch deadline: a multiple of the recent round trips' p99, "
                                       "bounded by --dispatch-min-timeout-ms and --dispatch-timeout-ms.")
                     .Add({})),
        disconnected(metrics::gauge_family(*registry, "moemesh_attention_dispatch_disconnected_hosts",
                                           "Expert host endpoints whose connection is down (dropped, not back).")
                         .Add({})),
        late(metrics::counter_family(*registry, "moemesh_attention_dispatch_late_replies_total",
                                     "Replies that arrived after their deadline (dropped).")
                 .Add({})) {
    for (const char* r : kFailureReasons) retried_by[r] = &retried.Add({{"reason", r}});
    for (const char* r : {"no_host", "replicas_exhausted"}) exhausted_by[r] = &exhausted.Add({{"reason", r}});
    for (const char* o : {"won", "lost"}) hedges.Add({{"outcome", o}});  // exported at 0 from the start
  }

  Host& host(const std::string& name) {
    std::lock_guard<std::mutex> lk(mu);
    auto [it, added] = hosts.try_emplace(name);
    if (added) {
      const prometheus::Labels l{{"host", name}};
      it->second.requests = &requests.Add(l);
      it->second.round_trip = &round_trip.Add(l, metrics::rpc_latency_buckets());
      for (const char* r : kFailureReasons) it->second.failures[r] = &failures.Add({{"host", name}, {"reason", r}});
    }
    return it->second;
  }

  std::shared_ptr<prometheus::Registry> registry;  // outlives the references below
  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Family<prometheus::Histogram>& round_trip;
  prometheus::Family<prometheus::Counter>&failures, &retried, &exhausted;
  prometheus::Family<prometheus::Counter>& hedges;
  prometheus::Counter& uncovered_waits;
  prometheus::Histogram& uncovered_wait_seconds;
  prometheus::Gauge &waiting, &deadline, &disconnected;
  prometheus::Counter& late;
  std::map<std::string, prometheus::Counter*> retried_by, exhausted_by;  // fixed after construction
  std::mutex mu;
  std::map<std::string, Host> hosts;  // entries are never erased: references stay valid
};

struct RemoteExpertExecutor::Inflight {
  struct Waiter {
    std::shared_ptr<Call> call;
    size_t index;
    int socket;
  };
  std::mutex mu;  // taken before any Call::mu
  std::map<uint64_t, Waiter> waiting;
  std::set<std::string> down;            // endpoints whose connection dropped and has not come back
  std::condition_variable changed;       // (with mu) a connection came back or a new table arrived
  uint64_t generation = 0;               // bumped with each such change
  std::map<int, std::string> endpoints;  // bridge socket -> host endpoint (the transports' key)
  std::shared_ptr<PeerTransports> transports;
  std::shared_ptr<RemoteExpertsStats> stats;
  std::shared_ptr<Metrics> metrics;  // may be null

  // What carries the payload of a reply that came in `frames` frames on `socket`.
  std::shared_ptr<Transport> carrier_of(int socket, size_t frames) {
    std::lock_guard<std::mutex> lk(mu);
    auto it = endpoints.find(socket);
    return transports->carrying(it != endpoints.end() ? it->second : std::string(), frames);
  }

  // Decode the header (the payload's place depends on how the message came, `carrier`) and hand
  // the reply to its waiting call. A reply with its payload in its frames is delivered on the
  // bridge's I/O thread; one whose payload is on a pair transport on the receiving actor (a
  // thread of its own: taking the payload blocks until it is here), in the order the headers
  // arrive, whether or not anybody still waits for it (a late reply's payload must not be read
  // as the next one's). The outcome is set under `mu`, so once run() has withdrawn a request no
  // late reply can touch it.
  void deliver(const FramesPtr& frames, std::shared_ptr<Transport> carrier) {
    auto views = frame_views(*frames);
    const auto arrived = Clock::now();
    dispatch::Reply reply;
    std::string error, reason;
    uint64_t id = 0;
    bool received = false;
    std::vector<float> outputs;
    try {
      reply = dispatch::decode_reply(views, payload_of(*carrier));
      id = reply.request_id;
      if (!reply.ok) error = "error reply " + reply.error_code + ": " + reply.error_message, reason = "error_reply";
    } catch (const dispatch::DecodeError& e) {
      id = e.request_id();
      error = std::string("undecodable reply (") + e.code() + "): " + e.what();
      reason = "bad_reply";
      ++stats->bad_replies;
    }
    if (error.empty() && !carrier->payload_in_frames()) {
      try {
        outputs = receive_tensor(*carrier, size_t(reply.rows * reply.hidden), {});
        received = true;
      } catch (const Error& e) {
        error = e.what();
        reason = "bad_reply";
      }
    }
    std::lock_guard<std::mutex> lk(mu);
    auto it = waiting.find(id);
    if (it == waiting.end()) {
      if (id != 0) {
        ++stats->late_replies;
        if (metrics) metrics->late.Increment();
      }
      return;
    }
    auto [call, index, socket_] = it->second;
    waiting.erase(it);
    std::lock_guard<std::mutex> clk(call->mu);
    Outcome& o = call->outcomes[index];
    o.done = true;
    o.arrived = arrived;
    o.error = std::move(error);
    o.reason = std::move(reason);
    o.frames = frames;
    o.reply = std::move(reply);
    o.carrier = std::move(carrier);
    o.received = received;
    o.outputs = std::move(outputs);
    --call->pending;
    call->cv.notify_all();  // a hedged call may be done before every request is
  }

  // A connection event of a host's socket (the bridge's monitor). A drop fails every request in
  // flight to that host at once (their groups go to a replica, or wait for one); a handshake
  // makes the host usable again.
  void on_event(int socket, const PeerEvent& e) {
    if (e.kind != PeerEvent::Disconnected && e.kind != PeerEvent::Connected) return;
    std::lock_guard<std::mutex> lk(mu);
    auto ep = endpoints.find(socket);
    if (ep == endpoints.end()) return;
    if (e.kind == PeerEvent::Connected) {
      if (down.erase(ep->second)) spdlog::info("expert dispatch: host {} is connected again", ep->second);
      ++generation;
      changed.notify_all();
    } else {
      down.insert(ep->second);
      size_t failed = 0;
      for (auto it = waiting.begin(); it != waiting.end();) {
        if (it->second.socket != socket) {
          ++it;
          continue;
        }
        auto [call, index, s] = it->second;
        it = waiting.erase(it);
        std::lock_guard<std::mutex> clk(call->mu);
        Outcome& o = call->outcomes[index];
        o.done = true;
        o.arrived = Clock::now();
        o.error = "the connection dropped with the request in flight";
        o.reason = "disconnected";
        ++failed;
        ++stats->disconnects;
        --call->pending;
        call->cv.notify_all();
      }
      spdlog::warn("expert dispatch: the connection to host {} dropped; {} request(s) in flight failed over at once",
                   ep->second, failed);
    }
    if (metrics) metrics->disconnected.Set(double(down.size()));
  }
};

std::optional<std::chrono::nanoseconds> RemoteExpertExecutor::hedge_after() const {
  if (opts_.hedge_p99_multiple <= 0) return std::nullopt;
  const auto p99 = deadline_.p99();
  if (p99.count() <= 0) return std::nullopt;
  return std::max<std::chrono::nanoseconds>(
      opts_.hedge_min, std::chrono::nanoseconds(int64_t(double(p99.count()) * opts_.hedge_p99_multiple)));
}

PlacementTable placement_from_proto(const pb::PlacementTable& msg) {
  PlacementTable t;
  t.version = msg.version();
  for (const auto& h : msg.hosts()) {
    if (!h.live()) continue;
    PlacementHost host{h.instance(), h.data_endpoint(), {}};
    for (const auto& e : h.experts()) host.experts.insert({e.layer(), e.expert()});
    t.hosts.push_back(std::move(host));
  }
  return t;
}

RemoteExpertExecutor::RemoteExpertExecutor(caf::actor_system& sys, RemoteExpertsOptions opts)
    : sys_(sys),
      opts_(std::move(opts)),
      stats_(std::make_shared<RemoteExpertsStats>()),
      inflight_(std::make_shared<Inflight>()),
      bridge_(sys),
      deadline_(AdaptiveDeadlineOptions{opts_.min_deadline, std::max(opts_.deadline, opts_.min_deadline),
                                        opts_.deadline_p99_multiple}),
      table_(std::make_shared<PlacementTable>()) {
  if (!opts_.transports) opts_.transports = std::make_shared<PeerTransports>();
  inflight_->transports = opts_.transports;
  inflight_->stats = stats_;
  if (opts_.metrics) {
    metrics_ = std::make_shared<Metrics>(opts_.metrics);
    inflight_->metrics = metrics_;
  }
  // Ids start at a random point so replies meant for an earlier process never match.
  std::random_device rd;
  next_id_ = ((uint64_t(rd()) << 32) | rd()) | 1;
  // State as a spawn argument, not a capture: CAF 0.17 trips UBSan on argument-less function actors.
  // Detached: receiving from a pair transport blocks until the payload is here.
  receiver_ = sys_.spawn<caf::detached>(
      [](caf::event_based_actor*, std::shared_ptr<Inflight> inflight) -> caf::behavior {
        return {[inflight](pair_reply_atom, const PairReply& r) { inflight->deliver(r.frames, r.carrier); },
                [inflight](zmq_event_atom, int socket, const PeerEvent& e) { inflight->on_event(socket, e); }};
      },
      inflight_);
  bridge_.start();
}

RemoteExpertExecutor::~RemoteExpertExecutor() {
  bridge_.stop();
  caf::anon_send_exit(receiver_, caf::exit_reason::user_shutdown);
}

void RemoteExpertExecutor::set_placement(PlacementTable table) {
  auto next = std::make_shared<const PlacementTable>(std::move(table));
  {
    std::lock_guard<std::mutex> lk(table_mu_);
    table_ = std::move(next);
  }
  std::lock_guard<std::mutex> lk(inflight_->mu);  // wake calls waiting for an uncovered expert
  ++inflight_->generation;
  inflight_->changed.notify_all();
}

bool RemoteExpertExecutor::disconnected(const std::string& endpoint) const {
  std::lock_guard<std::mutex> lk(inflight_->mu);
  return inflight_->down.count(endpoint) > 0;
}

std::shared_ptr<const PlacementTable> RemoteExpertExecutor::placement() const {
  std::lock_guard<std::mutex> lk(table_mu_);
  return table_;
}

int RemoteExpertExecutor::socket_for(const std::string& endpoint) {
  std::lock_guard<std::mutex> lk(sockets_mu_);
  if (auto it = sockets_.find(endpoint); it != sockets_.end()) return it->second;
  int s = bridge_.add({.name = "expert " + endpoint,
                       .type = zmq::socket_type::dealer,
                       .endpoint = endpoint,
                       .identity = opts_.identity,
                       .heartbeats = kDataPlaneHeartbeats,
                       .monitor = true});
  {
    std::lock_guard<std::mutex> ilk(inflight_->mu);
    inflight_->endpoints[s] = endpoint;
  }
  // Replies wake their waiting call from the bridge's thread (one thread hand-off fewer per round
  // trip than through the receiving actor), unless their payload must be taken off a pair transport.
  bridge_.route(s, [inflight = inflight_, receiver = receiver_](int socket, FramesPtr frames) {
    if (!frames || frames->empty()) return;
    auto carrier = inflight->carrier_of(socket, frames->size());
    if (carrier->payload_in_frames())
      inflight->deliver(frames, std::move(carrier));
    else
      caf::anon_send(receiver, pair_reply_atom::value, PairReply{std::move(frames), std::move(carrier)});
  });
  bridge_.watch(s, receiver_);
  sockets_[endpoint] = s;
  return s;
}

bool RemoteExpertExecutor::suspect(const std::string& endpoint) {
  std::lock_guard<std::mutex> lk(suspects_mu_);
  auto it = suspect_until_.find(endpoint);
  return it != suspect_until_.end() && Clock::now() < it->second;
}

void RemoteExpertExecutor::mark_failed(const std::string& endpoint) {
  std::lock_guard<std::mutex> lk(suspects_mu_);
  suspect_until_[endpoint] = Clock::now() + opts_.suspect_for;
}

void RemoteExpertExecutor::run(int64_t layer, const float* h, int64_t hidden, std::span<const ExpertGroup> groups,
                               std::vector<std::vector<float>>& outputs) {
  outputs.assign(groups.size(), {});
  std::vector<size_t> todo;
  for (size_t i = 0; i < groups.size(); ++i)
    if (!groups[i].rows.empty()) todo.push_back(i);

  std::map<std::string, std::string> failed;          // endpoint -> why: hosts given up within this call
  std::map<std::string, Clock::time_point> retry_at;  // hosts that answered not_ready: not before then
  std::map<std::string, std::string> unavailable;     // endpoint -> why it was skipped (for the error)
  std::map<std::string, int> timeouts;                // per host within this call
  bool stalling = false;                              // some expert has had no usable host
  Clock::time_point stalled_since{};                  // since then
  const std::string where = "layer " + std::to_string(layer);

  // Leaves the waiting state (metrics) however run() ends.
  struct WaitMark {
    RemoteExpertExecutor* self;
    bool on = false;
    void set(bool v) {
      if (v == on) return;
      on = v;
      self->stats_->waiting += v ? 1 : -1;
      if (self->metrics_) self->metrics_->waiting.Set(double(self->stats_->waiting.load()));
    }
    ~WaitMark() { set(false); }
  } waiting{this};

  while (!todo.empty()) {
    const auto table = placement();  // again each round: a new table may cover what was missing
    std::set<std::string> down;
    uint64_t generation;
    {
      std::lock_guard<std::mutex> lk(inflight_->mu);
      down = inflight_->down;
      generation = inflight_->generation;
    }
    const auto now = Clock::now();
    // Assign every pending group to one usable host: in the table, not given up in this call,
    // connected, not loading. Groups with none left usable but some host that may come back
    // wait; groups whose every host was given up fail the call.
    struct Target {
      const PlacementHost* host;
      std::vector<size_t> groups;
      int64_t rows = 0;
    };
    std::vector<Target> targets;
    std::vector<size_t> stalled;
    for (size_t gi : todo) {
      const ExpertGroup& g = groups[gi];
      std::vector<const PlacementHost*> cands;
      bool may_come_back = false;
      for (const PlacementHost* c : table->hosts_for(int32_t(layer), g.expert)) {
        if (failed.count(c->endpoint)) continue;
        if (down.count(c->endpoint)) {
          unavailable[c->endpoint] = c->instance + ": connection down";
          may_come_back = true;
        } else if (auto r = retry_at.find(c->endpoint); r != retry_at.end() && now < r->second) {
          may_come_back = true;
        } else {
          cands.push_back(c);
        }
      }
      if (cands.empty() && (may_come_back || failed.empty())) {
        stalled.push_back(gi);  // no host yet, or only hosts that may come back: wait (bounded)
        continue;
      }
      if (cands.empty()) {
        if (metrics_) metrics_->exhausted_by["replicas_exhausted"]->Increment();
        std::string msg = where + ": ";
        for (const auto& [ep, why] : failed) msg += "expert host " + ep + " failed: " + why + "; ";
        msg += "no other replica of expert " + std::to_string(g.expert);
        throw Error(msg);
      }
      // Least rows already given to it in this call; healthy before suspect; ties rotate.
      const size_t n = cands.size();
      const size_t rot = replica_rotation(layer, g.expert, opts_.salt, n);
      const PlacementHost* best = nullptr;
      std::pair<int, int64_t> best_score{0, 0};
      for (size_t j = 0; j < n; ++j) {
        const PlacementHost* c = cands[(rot + j) % n];
        int64_t assigned = 0;
        for (const Target& t : targets)
          if (t.host == c) assigned = t.rows;
        const std::pair<int, int64_t> score{suspect(c->endpoint) ? 1 : 0, assigned};
        if (!best || score < best_score) best = c, best_score = score;
      }
      auto it = std::find_if(targets.begin(), targets.end(), [&](const Target& t) { return t.host == best; });
      if (it == targets.end()) it = targets.insert(targets.end(), Target{best, {}, 0});
      it->groups.push_back(gi);
      it->rows += int64_t(g.rows.size());
    }

    if (!stalled.empty()) {
      if (!stalling) {
        stalling = true;
        stalled_since = now;
        ++stats_->uncovered_waits;
        if (metrics_) metrics_->uncovered_waits.Increment();
        spdlog::warn("expert dispatch {}: expert {} has no usable host (placement v{}); waiting up to {} ms for one",
                     where, groups[stalled[0]].expert, table->version, opts_.uncovered_wait.count());
      }
      waiting.set(true);
      if (now - stalled_since > opts_.uncovered_wait) {
        if (metrics_) {  // a wait that gives up is a wait too
          metrics_->exhausted_by["no_host"]->Increment();
          metrics_->uncovered_wait_seconds.Observe(std::chrono::duration<double>(now - stalled_since).count());
        }
        std::string msg = where + ": no usable expert host for expert " + std::to_string(groups[stalled[0]].expert) +
                          " within " + std::to_string(opts_.uncovered_wait.count()) + " ms (placement version " +
                          std::to_string(table->version) + ")";
        for (const auto& [ep, why] : unavailable) msg += "; " + ep + ": " + why;
        for (const auto& [ep, why] : failed) msg += "; expert host " + ep + " failed: " + why;
        throw Error(msg);
      }
    }
    if (targets.empty()) {
      // Nothing to send now: wait for a new table, a reconnection or the next retry time.
      auto until = now + std::chrono::milliseconds(50);
      for (const auto& [ep, t] : retry_at)
        if (t > now) until = std::min(until, t);
      const auto wait0 = Clock::now();
      std::unique_lock<std::mutex> lk(inflight_->mu);
      inflight_->changed.wait_until(lk, until, [&] { return inflight_->generation != generation; });
      lk.unlock();
      if (opts_.waits) opts_.waits->record(wait0, Clock::now());
      continue;
    }
    if (stalled.empty() && stalling) {
      if (metrics_)
        metrics_->uncovered_wait_seconds.Observe(std::chrono::duration<double>(now - stalled_since).count());
      stalling = false;
      waiting.set(false);
    }

    // One request per host; room for a hedged duplicate of each (outcome n + k).
    const size_t n = targets.size();
    auto call = std::make_shared<Call>();
    call->outcomes.resize(2 * n);
    call->pending = n;
    std::vector<uint64_t> ids(2 * n, 0);
    std::vector<Clock::time_point> sent(2 * n);
    std::vector<const PlacementHost*> hedge_host(n, nullptr);
    // Sends target `k`'s rows to `host` as request `slot`; false when its connection is down.
    auto send_request = [&](size_t k, const PlacementHost* host, size_t slot) {
      const Target& t = targets[k];
      std::vector<dispatch::Group> meta;
      std::vector<float> rows, one;
      std::vector<int32_t> row_ids;
      std::vector<LoraRef> adapters;  // those the rows name, each once
      rows.reserve(size_t(t.rows * hidden));
      for (size_t gi : t.groups) {
        const ExpertGroup& g = groups[gi];
        gather_rows(h, hidden, g.rows, one);
        rows.insert(rows.end(), one.begin(), one.end());
        meta.push_back({g.expert, int32_t(g.rows.size())});
        for (const LoraAdapter* a : g.adapters) {
          int32_t index = 0;
          if (a) {
            const LoraRef ref = a->ref();
            auto it = std::find(adapters.begin(), adapters.end(), ref);
            if (it == adapters.end()) it = adapters.insert(adapters.end(), ref);
            index = int32_t(it - adapters.begin()) + 1;
          }
          meta.back().adapter.push_back(index);
        }
        row_ids.insert(row_ids.end(), g.rows.begin(), g.rows.end());
      }
      const auto traces = traces_of_rows(current_forward_inputs(), row_ids);
      const int socket = socket_for(host->endpoint);
      ids[slot] = next_id_++;
      if (ids[slot] == 0) ids[slot] = next_id_++;
      {
        std::lock_guard<std::mutex> lk(inflight_->mu);
        if (inflight_->down.count(host->endpoint)) return false;
        inflight_->waiting[ids[slot]] = {call, slot, socket};
      }
      const auto via = opts_.transports->of(host->endpoint);
      send_message(
          dispatch::encode_request(ids[slot], int32_t(layer), meta, hidden, std::move(rows), table->version, traces,
                                   adapters),
          *via, {}, [&](FramesPtr frames) {
            sent[slot] = Clock::now();
            caf::anon_send(bridge_.actor(), zmq_send_atom::value, socket, std::move(frames));
          });
      ++stats_->requests;
      if (metrics_) metrics_->host(host->instance).requests->Increment();
      return true;
    };
    for (size_t k = 0; k < n; ++k)
      if (!send_request(k, targets[k].host, k)) {  // dropped since the choice: fail it now
        Outcome& o = call->outcomes[k];
        o.done = true;
        o.error = "the connection was down";
        o.reason = "disconnected";
        std::lock_guard<std::mutex> clk(call->mu);
        --call->pending;
      }

    const auto deadline = deadline_.current();
    if (metrics_) metrics_->deadline.Set(std::chrono::duration<double>(deadline).count());
    // Done when every target has a good reply (its own or its duplicate's), or both failed.
    auto ok = [&](size_t slot) { return call->outcomes[slot].done && call->outcomes[slot].error.empty(); };
    auto settled = [&] {
      for (size_t k = 0; k < n; ++k) {
        const bool hedged = hedge_host[k] != nullptr;
        if (ok(k) || (hedged && ok(n + k))) continue;
        if (call->outcomes[k].done && (!hedged || call->outcomes[n + k].done)) continue;
        return false;
      }
      return true;
    };
    {
      const auto wait0 = Clock::now();
      std::unique_lock<std::mutex> lk(call->mu);
      const auto hedge_delay = hedge_after();
      if (hedge_delay && *hedge_delay < deadline && !call->cv.wait_until(lk, wait0 + *hedge_delay, settled)) {
        // Slow hosts: the same rows to another replica that holds all of a target's experts.
        for (size_t k = 0; k < n; ++k) {
          if (call->outcomes[k].done) continue;
          for (const PlacementHost* c : table->hosts_for(int32_t(layer), groups[targets[k].groups[0]].expert)) {
            if (c == targets[k].host || down.count(c->endpoint) || failed.count(c->endpoint)) continue;
            bool all = true;
            for (size_t gi : targets[k].groups) all = all && c->experts.count({int32_t(layer), groups[gi].expert});
            if (!all) continue;
            lk.unlock();
            const bool sent_it = send_request(k, c, n + k);
            lk.lock();
            if (sent_it) {
              hedge_host[k] = c;
              ++call->pending;
            }
            break;
          }
        }
      }
      call->cv.wait_until(lk, wait0 + deadline, settled);
      if (opts_.waits) opts_.waits->record(wait0, Clock::now());
    }
    {
      std::lock_guard<std::mutex> lk(inflight_->mu);  // withdraw what did not answer in time
      for (uint64_t id : ids)
        if (id != 0) inflight_->waiting.erase(id);
    }
    {
      // A target whose duplicate answered well first takes that reply (and host); the original,
      // still on its way, is dropped as a late reply. An original that failed is forgotten.
      std::lock_guard<std::mutex> lk(call->mu);
      for (size_t k = 0; k < n; ++k) {
        if (!hedge_host[k]) continue;
        const bool won = !ok(k) && ok(n + k);
        ++(won ? stats_->hedge_wins : stats_->hedge_losses);
        if (metrics_) metrics_->hedges.Add({{"outcome", won ? "won" : "lost"}}).Increment();
        if (!won) continue;
        if (call->outcomes[k].done)
          spdlog::warn("expert dispatch {}: host {} failed ({}); its hedged duplicate on {} answered", where,
                       targets[k].host->instance, call->outcomes[k].error, hedge_host[k]->instance);
        call->outcomes[k] = std::move(call->outcomes[n + k]);
        targets[k].host = hedge_host[k];
        sent[k] = sent[n + k];
      }
    }

    std::vector<size_t> next = std::move(stalled);
    std::lock_guard<std::mutex> lk(call->mu);
    for (size_t k = 0; k < targets.size(); ++k) {
      const Target& t = targets[k];
      Outcome& o = call->outcomes[k];
      std::string error = !o.done ? "no reply within " + std::to_string(deadline.count()) + " ms" : o.error;
      std::string reason = !o.done ? "timeout" : o.reason;
      if (error.empty() && (o.reply.rows != t.rows || o.reply.hidden != hidden || o.reply.layer != layer)) {
        error = "reply of " + std::to_string(o.reply.rows) + "x" + std::to_string(o.reply.hidden) + " for layer " +
                std::to_string(o.reply.layer) + ", expected " + std::to_string(t.rows) + "x" + std::to_string(hidden);
        reason = "bad_reply";
      }
      std::vector<float> result;  // [t.rows, hidden], grouped as sent
      if (error.empty()) {
        try {
          result =
              o.received ? std::move(o.outputs) : receive_tensor(*o.carrier, size_t(t.rows * hidden), o.reply.outputs);
        } catch (const Error& e) {
          error = e.what();
          reason = "bad_reply";
        }
      }
      if (error.empty()) deadline_.observe(o.arrived - sent[k]);
      if (metrics_) {
        auto& hm = metrics_->host(t.host->instance);
        if (error.empty())
          hm.round_trip->Observe(std::chrono::duration<double>(o.arrived - sent[k]).count());
        else
          hm.failures.at(reason)->Increment(), metrics_->retried_by.at(reason)->Increment(double(t.groups.size()));
      }
      if (!error.empty()) {
        spdlog::warn("expert dispatch {}: host {} ({}) failed: {}", where, t.host->instance, t.host->endpoint, error);
        mark_failed(t.host->endpoint);
        ++stats_->host_failures;
        const bool loading = o.done && !o.reply.ok && o.reply.error_code == dispatch::kNotReady;
        if (loading) {
          retry_at[t.host->endpoint] = Clock::now() + opts_.retry_backoff;  // it is loading: again soon
          unavailable[t.host->endpoint] = t.host->instance + ": " + error;
        } else if (reason == "disconnected") {
          unavailable[t.host->endpoint] = t.host->instance + ": " + error;  // usable again once reconnected
        } else if (reason == "timeout" && ++timeouts[t.host->endpoint] < kMaxTimeoutsPerHost) {
          // Tried last from now on (suspect); with no other replica it is asked again rather
          // than the step failing: a slow host is not a dead one (a dead one disconnects).
          unavailable[t.host->endpoint] = t.host->instance + ": " + error;
        } else {
          failed[t.host->endpoint] = t.host->instance + ": " + error;
        }
        next.insert(next.end(), t.groups.begin(), t.groups.end());
        continue;
      }
      if (t.groups.size() == 1) {  // the whole result is the one group's
        outputs[t.groups[0]] = std::move(result);
        continue;
      }
      size_t offset = 0;
      for (size_t gi : t.groups) {
        const size_t count = groups[gi].rows.size() * size_t(hidden);
        outputs[gi].assign(result.begin() + ptrdiff_t(offset), result.begin() + ptrdiff_t(offset + count));
        offset += count;
      }
    }
    stats_->retries += next.size();
    std::sort(next.begin(), next.end());
    todo = std::move(next);
  }
  if (stalling && metrics_)
    metrics_->uncovered_wait_seconds.Observe(std::chrono::duration<double>(Clock::now() - stalled_since).count());
}

}  // namespace moemesh::actors
