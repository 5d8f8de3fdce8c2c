#include "actors/scheduler.h"

#include <algorithm>
#include <cstring>
#include <tuple>
#include <unordered_map>
#include <deque>
#include <map>
#include <random>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/dispatch_frames.h"
#include "actors/step_server.h"
#include "actors/step_worker.h"
#include "core/fair_queue.h"
#include "core/prefix_hash.h"
#include "core/wire.h"
#include "proto/dataplane.pb.h"

namespace moemesh::actors {
namespace {

using Clock = std::chrono::steady_clock;
using sched_tick_atom = caf::atom_constant<caf::atom("schedtick")>;
using secs = std::chrono::duration<double>;

// Why a running sequence went back to the queue (the preemptions_total label).
constexpr const char* kPreemptReasons[] = {"kv_full", "worker_lost", "worker_error", "step_timeout"};

// The scheduler's series (docs/metrics.md). Per-tenant histograms are made on first use and
// cached: the tenant label is bounded (configured tenants only).
struct SchedulerMetrics {
  explicit SchedulerMetrics(std::shared_ptr<prometheus::Registry> reg)
      : registry(std::move(reg)),
        queue_time(
            metrics::histogram_family(*registry, "moemesh_router_queue_time_seconds",
                                      "Time from arrival at the router to the first step that admits the request.")),
        ttft(metrics::histogram_family(*registry, "moemesh_router_time_to_first_token_seconds",
                                       "Time from arrival at the router to the first generated token.")),
        itl(metrics::histogram_family(*registry, "moemesh_router_inter_token_latency_seconds",
                                      "Time between two consecutive generated tokens of one request.")),
        running(metrics::gauge_family(*registry, "moemesh_router_requests_running",
                                      "Requests admitted to an attention worker and not finished.")
                    .Add({})),
        waiting(metrics::gauge_family(*registry, "moemesh_router_requests_waiting",
                                      "Requests queued in the router, not yet admitted (including preempted ones).")
                    .Add({})),
        preempted(metrics::gauge_family(*registry, "moemesh_router_requests_preempted",
                                        "Queued requests that were preempted at least once (sent back to the queue).")
                      .Add({})),
        preemptions(metrics::counter_family(*registry, "moemesh_router_preemptions_total",
                                            "Running requests sent back to the queue, by reason.")),
        steps(
            metrics::counter_family(*registry, "moemesh_router_steps_total", "StepRequests sent to attention workers.")
                .Add({})),
        step_tokens(metrics::histogram_family(*registry, "moemesh_router_step_tokens",
                                              "Tokens (prefill chunks + decode tokens) in one StepRequest.")
                        .Add({}, metrics::step_token_buckets())),
        step_seconds(metrics::histogram_family(*registry, "moemesh_router_step_duration_seconds",
                                               "Round trip of one StepRequest, from send to the worker's answer.")
                         .Add({}, metrics::rpc_latency_buckets())) {
    for (const char* r : kPreemptReasons) preemptions.Add({{"reason", r}});
    per_tenant(metrics::kDefaultTenant);  // the series exist before the first request
  }

  struct Tenant {
    prometheus::Histogram *queue_time, *ttft, *itl;
  };
  Tenant& per_tenant(const std::string& tenant) {
    auto [it, added] = tenants.try_emplace(tenant);
    if (added) {
      const prometheus::Labels l{{"tenant", tenant}};
      it->second = {&queue_time.Add(l, metrics::request_latency_buckets()),
                    &ttft.Add(l, metrics::request_latency_buckets()), &itl.Add(l, metrics::token_latency_buckets())};
    }
    return it->second;
  }

  std::shared_ptr<prometheus::Registry> registry;  // outlives the references below
  prometheus::Family<prometheus::Histogram>&queue_time, &ttft, &itl;
  prometheus::Gauge &running, &waiting, &preempted;
  prometheus::Family<prometheus::Counter>& preemptions;
  prometheus::Counter& steps;
  prometheus::Histogram &step_tokens, &step_seconds;
  std::map<std::string, Tenant> tenants;
};

struct Seq {
  GenerationRequestPtr req;
  caf::response_promise promise;
  std::shared_ptr<GenerationResult> result = std::make_shared<GenerationResult>();
  std::string worker;            // empty while waiting
  int64_t prefilled = 0;         // context positions sent so far
  int64_t resumed = 0;           // generated tokens that are part of the context (after a preemption)
  std::vector<BlockKey> prefix;  // its prompt's full blocks (salted), for prefix affinity
  int attempts = 0;              // failures (worker lost, error, timeout); preemptions do not count
  int requeues = 0;              // times sent back to the queue, for any reason
  std::string failed_on;         // the worker of its latest failure: placed elsewhere when another has room
  bool admitted_once = false, first_token_seen = false;  // queue time and TTFT count once
  Clock::time_point last_token_at;

  // The context the worker prefills: the prompt, then the tokens generated before a preemption.
  int64_t context_len() const { return int64_t(req->prompt.size()) + resumed; }
  int32_t context_at(int64_t i) const {
    const auto p = int64_t(req->prompt.size());
    return i < p ? req->prompt[size_t(i)] : result->tokens[size_t(i - p)];
  }
  bool prefilling() const { return prefilled < context_len(); }
  // KV positions it holds after its next step: the whole context is reserved while it prefills.
  int64_t kv_tokens_next_step() const {
    return prefilling() ? context_len() + 1 : context_len() + int64_t(result->tokens.size()) - resumed;
  }
};

// The prompt-prefix blocks a worker was sent recently (bounded, oldest forgotten first): a new
// request goes preferably where its prefix is, as that worker's memory tier likely still holds it.
class RecentPrefixes {
 public:
  void add(const std::vector<BlockKey>& keys) {
    for (const BlockKey& k : keys) {
      auto [it, fresh] = stamp_.try_emplace(k, 0);
      it->second = ++clock_;
      order_.emplace_back(clock_, k);
    }
    while (stamp_.size() > kMaxKeys && !order_.empty()) {  // forget the least recently sent
      auto [t, k] = order_.front();
      order_.pop_front();
      if (auto it = stamp_.find(k); it != stamp_.end() && it->second == t) stamp_.erase(it);
    }
  }
  // How many leading blocks of `keys` this worker was sent.
  size_t matching(const std::vector<BlockKey>& keys) const {
    size_t n = 0;
    while (n < keys.size() && stamp_.count(keys[n])) ++n;
    return n;
  }

 private:
  static constexpr size_t kMaxKeys = 8192;
  std::unordered_map<BlockKey, uint64_t> stamp_;  // key -> when it was last sent
  std::deque<std::pair<uint64_t, BlockKey>> order_;
  uint64_t clock_ = 0;
};

struct Worker {
  std::string instance, endpoint;
  int socket = -1;        // -1 until the bridge opened our DEALER to it
  uint64_t inflight = 0;  // request id of the step in flight, 0 when idle
  Clock::time_point sent_at;
  std::set<uint64_t> running;  // sequences it holds
  std::vector<uint64_t> to_free;
  bool listed = true;       // still in the coordinator's list
  int64_t kv_blocks = 0;    // its KV cache size, as it registered (0: unknown)
  RecentPrefixes prefixes;  // prompt blocks placed on it (prefix affinity)
};

struct SchedulerState {
  SchedulerConfig cfg;
  ZmqBridge* bridge = nullptr;
  std::map<uint64_t, Seq> seqs;
  FairQueue waiting;                      // token-fair across tenants, priority first (core/fair_queue.h)
  std::map<std::string, Worker> workers;  // by instance
  std::map<std::string, int> sockets;     // endpoint -> socket, reused across re-registrations
  uint64_t next_seq = 1, next_request = 1;
  // This run, in every step: a worker that sees another one drops the sequences of the old run
  // (a restarted router counts its ids from 1 again and would never free them).
  uint64_t epoch = std::random_device{}() * uint64_t(0x9E3779B97F4A7C15) | 1;
  uint64_t steps = 0, requeued = 0;
  std::unique_ptr<SchedulerMetrics> metrics;  // null without a registry
  static inline const char* name = "scheduler";

  // KV blocks a sequence holds during its next step, as the worker's cache counts them
  // (kv_blocks_held: bounded by the sliding window; a prefill chunk adds up to the step budget).
  int64_t seq_blocks(const Seq& s) const {
    const int64_t tokens = s.kv_tokens_next_step();
    return kv_blocks_held(tokens, s.prefilling() ? cfg.step_token_budget + 1 : 1, cfg.sliding_window);
  }
  int64_t blocks_next_step(const Worker& w) const {
    int64_t n = 0;
    for (uint64_t id : w.running) n += seq_blocks(seqs.at(id));
    return n;
  }
};

using Self = caf::stateful_actor<SchedulerState>;

void finish(Self* self, uint64_t id, std::string reason, std::string error = {}) {
  auto& st = self->state;
  auto it = st.seqs.find(id);
  if (it == st.seqs.end()) return;
  Seq& s = it->second;
  s.result->finish_reason = std::move(reason);
  s.result->error = std::move(error);
  s.result->worker = s.worker;
  auto wit = st.workers.find(s.worker);
  if (wit != st.workers.end() && wit->second.running.erase(id)) wit->second.to_free.push_back(id);
  if (s.worker.empty()) st.waiting.remove(id);
  s.promise.deliver(GenerationResultPtr(s.result));
  st.seqs.erase(it);
}

// Back to the queue, first in its tenant's line; it resumes from where it was (see the header).
// `reason` is one of kPreemptReasons; only failures count towards max_attempts.
void requeue(Self* self, uint64_t id, const char* reason, const std::string& why, bool failure = true) {
  auto& st = self->state;
  Seq& s = st.seqs.at(id);
  if (failure && ++s.attempts >= st.cfg.max_attempts) {
    finish(self, id, "error", "gave up after " + std::to_string(s.attempts) + " attempts: " + why);
    return;
  }
  if (st.metrics) st.metrics->preemptions.Add({{"reason", reason}}).Increment();
  spdlog::log(failure ? spdlog::level::warn : spdlog::level::debug, "scheduler: sequence {} re-queued ({})", id, why);
  ++st.requeued;
  ++s.requeues;
  s.resumed = int64_t(s.result->tokens.size());
  s.prefilled = 0;
  if (failure) s.failed_on = s.worker;
  s.worker.clear();
  st.waiting.push_front(id, s.req->tenant, s.req->weight, s.req->priority);
}

void publish_gauges(SchedulerState& st) {
  if (!st.metrics) return;
  size_t running = 0, preempted = 0;
  for (const auto& [n, w] : st.workers) running += w.running.size();
  for (const auto& [id, s] : st.seqs) preempted += s.requeues > 0 && s.worker.empty();
  st.metrics->running.Set(double(running));
  st.metrics->waiting.Set(double(st.waiting.size()));
  st.metrics->preempted.Set(double(preempted));
}

bool usable(const Worker& w) { return w.listed && w.socket >= 0; }

// KV pressure on an idle worker: preempt the newest sequences of the lowest priority until the
// rest fit its next step (one always stays: a lone sequence that cannot fit fails on its own).
void make_room(Self* self, Worker& w) {
  auto& st = self->state;
  if (w.kv_blocks <= 0) return;
  while (w.running.size() > 1 && st.blocks_next_step(w) > w.kv_blocks) {
    auto victim = std::max_element(w.running.begin(), w.running.end(), [&](uint64_t a, uint64_t b) {
      const auto pa = st.seqs.at(a).req->priority, pb = st.seqs.at(b).req->priority;
      return pa != pb ? pa < pb : a < b;  // lowest priority (largest enum), then newest (largest id)
    });
    const uint64_t id = *victim;
    w.running.erase(victim);
    w.to_free.push_back(id);
    requeue(self, id, "kv_full", "KV cache of " + w.instance + " is full", /*failure=*/false);
  }
}

// Places waiting sequences, in fair order, on a usable worker with room for the sequence's
// context: one other than the worker it last failed on (a worker that stopped answering looks
// the emptiest), then the one that was sent the longest part of its prompt's prefix, then the one
// with the most free KV blocks, then the one with fewest sequences. Stops at the first sequence
// that fits nowhere (no overtaking, so fairness and priorities hold).
void place_waiting(Self* self) {
  auto& st = self->state;
  while (auto id = st.waiting.peek()) {
    Seq& s = st.seqs.at(*id);
    Worker* best = nullptr;
    std::tuple<bool, size_t, int64_t, int64_t> best_score;  // (not failed there, prefix blocks, free, -sequences)
    for (auto& [name, w] : st.workers) {
      if (!usable(w) || int64_t(w.running.size()) >= st.cfg.max_running_per_worker) continue;
      const int64_t free = w.kv_blocks > 0 ? w.kv_blocks - st.blocks_next_step(w) : INT64_MAX / 2;
      if (free < st.seq_blocks(s)) continue;
      const auto score =
          std::make_tuple(name != s.failed_on, w.prefixes.matching(s.prefix), free, -int64_t(w.running.size()));
      if (!best || score > best_score) {
        best = &w;
        best_score = score;
      }
    }
    if (!best) break;
    st.waiting.pop();
    s.worker = best->instance;
    best->running.insert(*id);
    best->prefixes.add(s.prefix);
    if (!s.admitted_once && st.metrics) {
      st.metrics->per_tenant(s.req->tenant).queue_time->Observe(secs(Clock::now() - s.req->arrival).count());
      s.admitted_once = true;
    }
  }
}

// A prefill chunk of the context (at most `budget` tokens; none when the budget is spent).
void add_prefill(SchedulerState& st, pb::StepRequest& req, uint64_t id, Seq& s, int64_t& budget) {
  if (budget <= 0) return;
  auto* w = req.add_work();
  w->set_seq(id);
  const int64_t n = std::min(s.context_len() - s.prefilled, budget);
  for (int64_t i = 0; i < n; ++i) w->add_tokens(s.context_at(s.prefilled + i));
  if (s.prefilled == 0) {
    w->set_is_first(true);
    sampling_to_proto(s.req->sampling, w->mutable_sampling());
    for (int32_t t : s.req->prompt) w->add_prompt(t);
    for (int64_t i = 0; i < s.resumed; ++i) w->add_generated(s.result->tokens[size_t(i)]);
    w->set_cache_salt(s.req->cache_salt);
    w->set_traceparent(s.req->traceparent);
    if (!s.req->constraint.empty()) {
      w->set_constraint(s.req->constraint);
      w->set_max_tokens(s.req->max_tokens);
    }
    if (!s.req->adapter.empty()) {
      auto* a = w->mutable_adapter();
      a->set_name(s.req->adapter.name);
      a->set_path(s.req->adapter.path);
      a->set_key(s.req->adapter.key);
    }
  }
  s.prefilled += n;
  budget -= n;
  st.waiting.charge(s.req->tenant, n, 0);  // service is counted as it is given
  w->set_sample(!s.prefilling());
  w->set_return_logits(w->sample() && s.req->return_logits);
}

void add_decode(pb::StepRequest& req, uint64_t id, const Seq& s, int64_t& budget) {
  auto* w = req.add_work();
  w->set_seq(id);
  w->add_tokens(s.result->tokens.back());
  w->set_sample(true);
  w->set_return_logits(s.req->return_logits);
  budget -= 1;
}

void send_step(Self* self, Worker& w) {
  auto& st = self->state;
  pb::StepRequest req;
  int64_t budget = st.cfg.step_token_budget;
  for (uint64_t id : w.to_free) req.add_free(id);
  w.to_free.clear();
  // Decode tokens first: running sequences never wait behind a long prompt.
  for (uint64_t id : w.running)
    if (!st.seqs.at(id).prefilling()) add_decode(req, id, st.seqs.at(id), budget);
  for (uint64_t id : w.running)
    if (st.seqs.at(id).prefilling()) add_prefill(st, req, id, st.seqs.at(id), budget);
  if (req.work().empty() && req.free().empty()) return;
  const uint64_t rid = st.next_request++;
  req.set_step(rid);
  req.set_router_epoch(st.epoch);
  w.inflight = req.work().empty() ? 0 : rid;  // a free-only step needs no answer to go on
  w.sent_at = Clock::now();
  ++st.steps;
  if (st.metrics) {
    st.metrics->steps.Increment();
    st.metrics->step_tokens.Observe(double(st.cfg.step_token_budget - budget));
  }
  self->send(st.bridge->actor(), zmq_send_atom::value, w.socket,
             message_frames({}, wire::Kind::StepRequest, rid, req.SerializeAsString(), {}));
}

void pump(Self* self) {
  auto& st = self->state;
  for (auto& [name, w] : st.workers)
    if (usable(w) && w.inflight == 0) make_room(self, w);
  place_waiting(self);
  for (auto& [name, w] : st.workers)
    if (usable(w) && w.inflight == 0) send_step(self, w);
  publish_gauges(st);
}

void on_step_response(Self* self, int socket, const Frames& frames) {
  auto& st = self->state;
  Worker* w = nullptr;
  for (auto& [name, cand] : st.workers)
    if (cand.socket == socket) w = &cand;
  if (!w) return;
  wire::Header h;
  try {
    h = wire::decode(frame_views(frames, 0));
  } catch (const wire::WireError& e) {
    spdlog::error("scheduler: bad frame from {}: {}", w->instance, e.what());
    return;
  }
  if (h.request_id != w->inflight) return;  // a late answer to a step we gave up on
  w->inflight = 0;
  const auto now = Clock::now();
  if (st.metrics) st.metrics->step_seconds.Observe(secs(now - w->sent_at).count());
  if (h.kind == wire::Kind::Error) {
    pb::ErrorReply e;
    e.ParseFromString(h.meta);
    spdlog::error("scheduler: worker {} refused step {}: {} {}", w->instance, h.request_id, e.code(), e.message());
    for (uint64_t id : std::vector<uint64_t>(w->running.begin(), w->running.end())) {
      w->running.erase(id);
      w->to_free.push_back(id);
      requeue(self, id, "worker_error", "worker error: " + e.message());
    }
    pump(self);
    return;
  }
  pb::StepResponse resp;
  if (h.kind != wire::Kind::StepResponse || !resp.ParseFromString(h.meta)) {
    spdlog::error("scheduler: unexpected reply from {}", w->instance);
    pump(self);
    return;
  }
  for (const auto& r : resp.results()) {
    auto it = st.seqs.find(r.seq());
    if (it == st.seqs.end() || it->second.worker != w->instance) continue;
    Seq& s = it->second;
    if (!r.error().empty()) {
      w->running.erase(r.seq());  // the worker already freed it
      if (r.error().rfind("kv_full", 0) == 0)
        requeue(self, r.seq(), "kv_full", r.error());
      else
        finish(self, r.seq(), "error", r.error());
      continue;
    }
    if (r.cached_tokens() > 0 && s.resumed == 0) s.result->cached_tokens = r.cached_tokens();
    if (r.token() < 0) continue;  // a prefill chunk that did not sample
    auto& res = *s.result;
    res.tokens.push_back(r.token());
    st.waiting.charge(s.req->tenant, 0, 1);
    res.logprobs.push_back(r.logprob());
    if (st.metrics) {
      auto& tm = st.metrics->per_tenant(s.req->tenant);
      if (!s.first_token_seen)
        tm.ttft->Observe(secs(now - s.req->arrival).count());
      else if (res.tokens.size() > 1)  // a re-queued request's replayed first token is no inter-token gap
        tm.itl->Observe(secs(now - s.last_token_at).count());
      s.first_token_seen = true;
      s.last_token_at = now;
    }
    std::vector<std::pair<int32_t, float>> top;
    for (const auto& t : r.top()) top.emplace_back(t.token(), t.logprob());
    if (s.req->listener) {
      auto ev = std::make_shared<TokenEvent>();
      ev->index = s.req->index;
      ev->token = r.token();
      ev->logprob = r.logprob();
      ev->top = top;
      self->send(s.req->listener, gen_token_atom::value, TokenEventPtr(std::move(ev)));
    }
    res.top_logprobs.push_back(std::move(top));
    if (r.logits_tensor() >= 0 && size_t(r.logits_tensor()) + 1 < frames.size()) {
      const auto& f = frames[size_t(r.logits_tensor()) + 1];
      std::vector<float> row(f.size() / sizeof(float));
      std::memcpy(row.data(), f.data(), row.size() * sizeof(float));
      res.logits.push_back(std::move(row));
    }
    const auto& sp = s.req->sampling;
    const bool eos = !sp.ignore_eos && std::count(st.cfg.eos_ids.begin(), st.cfg.eos_ids.end(), r.token());
    const bool stop_id = std::count(sp.stop_token_ids.begin(), sp.stop_token_ids.end(), r.token());
    if (eos || stop_id)
      finish(self, r.seq(), "stop");
    else if (int64_t(res.tokens.size()) >= s.req->max_tokens)
      finish(self, r.seq(), "length");
  }
  pump(self);
}

// The coordinator's list of ready workers: open sockets to new ones, re-queue the sequences
// of workers that left.
void on_workers(Self* self, const std::vector<AttentionWorker>& list) {
  auto& st = self->state;
  std::set<std::string> present;
  for (const auto& aw : list) {
    present.insert(aw.instance);
    auto [it, added] = st.workers.try_emplace(aw.instance);
    Worker& w = it->second;
    w.listed = true;
    w.kv_blocks = aw.kv_blocks;
    if (!added && w.endpoint == aw.endpoint) continue;
    w.instance = aw.instance;
    w.endpoint = aw.endpoint;
    auto sock = st.sockets.find(aw.endpoint);
    if (sock != st.sockets.end()) {
      w.socket = sock->second;
      continue;
    }
    w.socket = -1;
    SocketSpec spec{.name = "step:" + aw.instance,
                    .type = zmq::socket_type::dealer,
                    .endpoint = aw.endpoint,
                    .identity = st.cfg.instance,
                    .heartbeats = kDataPlaneHeartbeats};
    self->request(st.bridge->actor(), std::chrono::seconds(10), zmq_open_atom::value, spec)
        .then(
            [=](int socket) {
              self->state.sockets[aw.endpoint] = socket;
              self->state.bridge->route(socket, caf::actor_cast<caf::actor>(self));
              auto wi = self->state.workers.find(aw.instance);
              if (wi != self->state.workers.end() && wi->second.endpoint == aw.endpoint) wi->second.socket = socket;
              spdlog::info("scheduler: attention worker {} at {}", aw.instance, aw.endpoint);
              pump(self);
            },
            [=](caf::error& e) {
              spdlog::error("scheduler: cannot connect to {}: {}", aw.endpoint, self->system().render(e));
            });
  }
  for (auto& [name, w] : st.workers) {
    if (present.count(name) || !w.listed) continue;
    w.listed = false;
    w.inflight = 0;
    for (uint64_t id : std::vector<uint64_t>(w.running.begin(), w.running.end())) {
      w.running.erase(id);
      requeue(self, id, "worker_lost", "attention worker " + name + " left");
    }
  }
  pump(self);
}

caf::behavior scheduler(Self* self, ZmqBridge* bridge, SchedulerConfig cfg) {
  self->state.cfg = std::move(cfg);
  self->state.bridge = bridge;
  if (self->state.cfg.metrics) self->state.metrics = std::make_unique<SchedulerMetrics>(self->state.cfg.metrics);
  self->delayed_send(self, std::chrono::milliseconds(500), sched_tick_atom::value);
  return {
      [=](generate_atom, GenerationRequestPtr req) -> caf::result<GenerationResultPtr> {
        auto& st = self->state;
        auto refuse = [](int status, std::string why) {
          auto r = std::make_shared<GenerationResult>();
          r->finish_reason = "error";
          r->refused_status = status;
          r->error = std::move(why);
          return GenerationResultPtr(r);
        };
        if (req->prompt.empty()) return refuse(400, "empty prompt");
        if (req->max_tokens < 1) return refuse(400, "max_tokens must be at least 1");
        // A sequence must fit one worker's KV cache: refuse at once what no worker could ever hold,
        // instead of failing it after retries.
        int64_t most_tokens = 0;
        bool any_worker = false;
        for (const auto& [name, w] : st.workers) {
          any_worker |= w.listed;
          if (w.listed) most_tokens = std::max(most_tokens, w.kv_blocks * kBlockTokens);
        }
        if (!any_worker) return refuse(503, "no attention worker is ready yet; retry shortly");
        if (st.waiting.size() >= st.cfg.max_waiting)
          return refuse(
              503, "the server is overloaded (" + std::to_string(st.waiting.size()) + " requests queued); retry later");
        const int64_t need = int64_t(req->prompt.size()) + req->max_tokens;
        // Under a sliding window a sequence holds O(window) blocks whatever its length.
        const bool fits =
            kv_blocks_held(need, st.cfg.step_token_budget + 1, st.cfg.sliding_window) * kBlockTokens <= most_tokens;
        if (most_tokens > 0 && !fits)
          return refuse(400, "the prompt (" + std::to_string(req->prompt.size()) + " tokens) plus max_tokens (" +
                                 std::to_string(req->max_tokens) + ") need " + std::to_string(need) +
                                 " tokens of KV cache; the largest attention worker holds " +
                                 std::to_string(most_tokens));
        const uint64_t id = st.next_seq++;
        auto rp = self->make_response_promise();
        Seq s;
        // Only blocks before the last prompt token can be restored (that one is always computed).
        const auto restorable = (req->prompt.size() - 1) / size_t(kBlockTokens) * size_t(kBlockTokens);
        s.prefix = prefix_block_keys(req->cache_salt, std::span(req->prompt).first(restorable));
        s.req = std::move(req);
        s.promise = rp;
        st.seqs.emplace(id, std::move(s));
        st.waiting.push(id, st.seqs.at(id).req->tenant, st.seqs.at(id).req->weight, st.seqs.at(id).req->priority);
        pump(self);
        return caf::delegated<GenerationResultPtr>();
      },
      [=](gen_cancel_atom, caf::actor listener, int index) {
        std::vector<uint64_t> ids;
        for (const auto& [id, s] : self->state.seqs)
          if (s.req->listener == listener && (index < 0 || s.req->index == index)) ids.push_back(id);
        for (uint64_t id : ids) finish(self, id, "cancelled");
        if (!ids.empty()) pump(self);  // frees their KV blocks now if the worker is idle
      },
      [=](zmq_recv_atom, int socket, FramesPtr frames) {
        if (frames) on_step_response(self, socket, *frames);
      },
      [=](workers_atom, WorkerList list) {
        if (list) on_workers(self, *list);
      },
      [=](sched_tick_atom) {
        auto& st = self->state;
        const auto now = Clock::now();
        for (auto& [name, w] : st.workers) {
          if (w.inflight == 0 || now - w.sent_at < st.cfg.step_timeout) continue;
          spdlog::error("scheduler: step {} on {} timed out", w.inflight, name);
          w.inflight = 0;
          for (uint64_t id : std::vector<uint64_t>(w.running.begin(), w.running.end())) {
            w.running.erase(id);
            w.to_free.push_back(id);
            requeue(self, id, "step_timeout", "step timed out on " + name);
          }
        }
        pump(self);
        self->delayed_send(self, std::chrono::milliseconds(500), sched_tick_atom::value);
      },
      [=](sched_stats_atom) {
        auto& st = self->state;
        size_t running = 0;
        for (const auto& [n, w] : st.workers) running += w.running.size();
        nlohmann::json j{
            {"waiting", st.waiting.size()}, {"running", running}, {"steps", st.steps}, {"requeued", st.requeued}};
        return j.dump();
      },
  };
}

}  // namespace

caf::actor spawn_scheduler(caf::actor_system& sys, ZmqBridge& bridge, SchedulerConfig cfg) {
  return sys.spawn(scheduler, &bridge, std::move(cfg));
}

}  // namespace moemesh::actors
