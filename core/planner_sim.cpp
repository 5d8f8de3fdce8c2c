#include "core/planner_sim.h"

#include <algorithm>
#include <deque>
#include <chrono>
#include <cmath>
#include <fstream>
#include <numeric>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "core/fair_queue.h"
#include "core/kv_cache.h"
#include "core/placement.h"
#include "core/prefill_speed.h"

namespace moemesh::planner {
namespace {

constexpr int64_t kBlock = KvCache::kBlockSize;
// The steps after a pause that may pay part of waking up (each the profile's idle_wake_decay of
// the one before's share: past these, under 1% of the first's even at a decay of 0.85).
constexpr int kWakeSteps = 32;

// Latencies into geometric bins (0.5% wide): percentiles of billions of samples in fixed memory.
class LatencyHistogram {
 public:
  void add(double s, int64_t n = 1) {
    const double v = std::max(s, kMin);
    const auto b = std::min<size_t>(kBins - 1, size_t(std::log(v / kMin) / kLogRatio));
    bins_[b] += n;
    count_ += n;
    sum_ += s * double(n);
  }
  LatencySummary summary() const {
    LatencySummary out;
    out.count = count_;
    if (count_ == 0) return out;
    out.mean = sum_ / double(count_);
    out.p50 = quantile(0.5);
    out.p90 = quantile(0.9);
    out.p99 = quantile(0.99);
    return out;
  }

 private:
  double quantile(double q) const {
    const double target = q * double(count_ - 1);
    int64_t seen = 0;
    for (size_t b = 0; b < kBins; ++b) {
      if (bins_[b] == 0) continue;
      if (double(seen + bins_[b]) > target) {
        const double frac = (target - double(seen) + 0.5) / double(bins_[b]);  // within the bin, log-linear
        return kMin * std::exp(kLogRatio * (double(b) + std::clamp(frac, 0.0, 1.0)));
      }
      seen += bins_[b];
    }
    return kMin * std::exp(kLogRatio * double(kBins));
  }
  static constexpr double kMin = 1e-6, kLogRatio = 0.004987541511;  // ln(1.005)
  static constexpr size_t kBins = 5200;                             // up to ~1.8e5 s
  std::vector<int64_t> bins_ = std::vector<int64_t>(kBins, 0);
  int64_t count_ = 0;
  double sum_ = 0;
};

// A compute (or link) resource: operations run first-come first-served in the gaps of its
// timeline of reservations; `busy` adds up what it served.
class Server {
 public:
  // Where an operation ready at `ready` would start, without reserving it.
  double earliest(double ready, double dur, double now) {
    while (head_ < iv_.size() && iv_[head_].second <= now) ++head_;
    if (head_ > 256 && head_ * 2 > iv_.size()) {
      iv_.erase(iv_.begin(), iv_.begin() + long(head_));
      head_ = 0;
    }
    double s = ready;
    for (size_t i = head_; i < iv_.size(); ++i) {
      if (iv_[i].second <= s) continue;
      if (iv_[i].first >= s + dur) break;  // fits in the gap before it
      s = std::max(s, iv_[i].second);
    }
    return s;
  }
  double reserve(double ready, double dur, double now) {
    const double s = earliest(ready, dur, now);
    busy += dur;
    auto i = size_t(std::lower_bound(iv_.begin() + long(head_), iv_.end(), std::make_pair(s, s)) - iv_.begin());
    if (i > head_ && iv_[i - 1].second >= s - 1e-12 && iv_[i - 1].second <= s) {
      iv_[i - 1].second = s + dur;  // adjacent: extend instead of inserting
    } else {
      iv_.insert(iv_.begin() + long(i), {s, s + dur});
    }
    return s + dur;
  }
  double busy = 0;

 private:
  std::vector<std::pair<double, double>> iv_;  // sorted by start, disjoint
  size_t head_ = 0;
};

// The KV store's puts (actors/block_store.h): stored one at a time in arrival order, and a
// lookup answered as soon as the put being stored is done, before the puts queued behind it.
class StorePuts {
 public:
  void put(double now, double seconds) {
    const double start = std::max(now, end_);
    end_ = start + seconds;
    q_.emplace_back(start, end_);
  }
  // (Puts sent with the lookup, just before it, are queued behind it: it overtakes them.)
  double lookup_start(double now) {
    while (!q_.empty() && q_.front().second <= now) q_.pop_front();
    return !q_.empty() && q_.front().first < now ? q_.front().second : now;
  }

 private:
  std::deque<std::pair<double, double>> q_;  // (start, end) of the puts not done, in order
  double end_ = 0;
};

// Several identical servers (a node's cores): an operation takes the one where it starts first.
class Cores {
 public:
  explicit Cores(int n = 1) : s_(size_t(std::max(1, n))) {}
  double earliest(double ready, double dur, double now) {
    double start = 0;
    first_free(ready, dur, now, start);
    return start;
  }
  double reserve(double ready, double dur, double now) {
    double start = 0;
    return s_[first_free(ready, dur, now, start)].reserve(ready, dur, now);
  }
  // An operation the OS shares over every core (a process that runs beside all the others): a
  // share of it on each, from where that core is free.
  double reserve_each(double ready, double dur, double now) {
    double end = ready;
    for (auto& s : s_) end = std::max(end, s.reserve(ready, dur / double(s_.size()), now));
    return end;
  }
  double busy() const {
    double b = 0;
    for (const auto& s : s_) b += s.busy;
    return b;
  }
  size_t size() const { return s_.size(); }

 private:
  // The core where an operation ready at `ready` starts first, and that start.
  size_t first_free(double ready, double dur, double now, double& start) {
    size_t best = 0;
    for (size_t i = 0; i < s_.size(); ++i) {
      const double e = s_[i].earliest(ready, dur, now);
      if (i == 0 || e < start) best = i, start = e;
      if (start <= ready) break;
    }
    return best;
  }
  std::vector<Server> s_;
};

// Walker's alias table: O(1) samples of a discrete distribution.
class Alias {
 public:
  explicit Alias(const std::vector<double>& w) : prob_(w.size()), alias_(w.size()) {
    const double total = std::accumulate(w.begin(), w.end(), 0.0);
    std::vector<double> p(w.size());
    std::vector<size_t> small, large;
    for (size_t i = 0; i < w.size(); ++i) {
      p[i] = w[i] / total * double(w.size());
      (p[i] < 1 ? small : large).push_back(i);
    }
    while (!small.empty() && !large.empty()) {
      const size_t s = small.back(), l = large.back();
      small.pop_back();
      prob_[s] = p[s];
      alias_[s] = l;
      p[l] -= 1 - p[s];
      if (p[l] < 1) {
        large.pop_back();
        small.push_back(l);
      }
    }
    for (size_t i : small) prob_[i] = 1;
    for (size_t i : large) prob_[i] = 1;
  }
  size_t sample(std::mt19937_64& rng) const {
    const size_t i = size_t(rng() % prob_.size());
    return std::uniform_real_distribution<double>(0, 1)(rng) < prob_[i] ? i : alias_[i];
  }

 private:
  std::vector<double> prob_;
  std::vector<size_t> alias_;
};

struct Seq {
  double arrival = 0, first_token = -1, last_token = 0;
  int64_t prompt = 1, output = 1, generated = 0, resumed = 0, prefilled = 0, restored = 0;
  int tenant = 0;
  int worker = -1;
  bool admitted = false, done = false;
  int client = -1;  // closed loop: the client that sent it

  int64_t context_len() const { return prompt + resumed; }
  bool prefilling() const { return prefilled < context_len(); }
  int64_t kv_tokens_next_step() const { return prefilling() ? context_len() + 1 : context_len() + generated - resumed; }
};

struct Work {
  uint32_t seq;
  int64_t tokens;  // budget tokens (chunk length, or 1 for decode)
  int64_t rows;    // positions computed (restored ones skipped)
  double ctx;      // positions attended, summed over rows
};

struct Lane {
  double rows = 0, prefill_rows = 0, ctx = 0, prefill_ctx = 0;  // rows, ctx: all (decode + prefill)
  double attn_end = 0;                                          // end of its latest attention
};

struct WorkerState {
  int node = 0;
  bool inflight = false;
  std::vector<uint32_t> running;  // sorted by id
  int64_t blocks_next = 0;        // KV blocks its running sequences hold in the next step
  std::vector<Work> work;         // the step in flight
  Lane lanes[2];
  int lane_count = 0, lanes_pending = 0;
  int64_t sampled = 0;  // rows of the step in flight that sample a token
  double lanes_done = 0, step_start = 0;
  double engine_start = 0;      // when the step in flight began computing (after its prefix lookup)
  PrefillSpeed prefill_speed;   // its price of a prompt position (wait budget), learnt as the worker learns it
  double last_step_end = -1e9;  // when its previous step ended
  int warm_steps = 0;           // steps since it was last idle long enough to go cold
  Cores server;                 // its own accelerator, or on shared cores its own timeline (one call at a time)
  std::vector<double> unpublished;  // the KV store's time for each put of the sequences its next step frees
  std::vector<double> publishing;   // those of the step in flight's frees: put when it ends
};

struct HostState {
  int node = 0;
  // Per layer, the batch last opened (actors/expert_batcher.h): it takes requests until its
  // window closes (`close`) or its compute starts.
  struct Open {
    double close = -1, start = 0, end = 0, rows = 0;
  };
  std::vector<Open> open;
  Cores server;
};

enum EvType : uint32_t { kArrival, kAdmit, kLane, kStepDone, kSample };

struct Event {
  double t;
  uint64_t order;
  EvType type;
  uint32_t a, b, c;
  bool operator>(const Event& o) const { return t != o.t ? t > o.t : order > o.order; }
};

class Simulator {
 public:
  Simulator(const CostProfile& p, const Deployment& d, const TrafficSpec& t, const ExpertLoad& load,
            const SimOptions& o)
      : p_(p), d_(d), t_(t), o_(o), rng_(t.seed * 7919 + 13), fair_() {
    d_.validate();
    const auto& m = p_.model;
    layers_ = m.num_hidden_layers;
    for (int64_t l = 0; l < layers_; ++l) moe_layers_ += m.is_moe_layer(l) ? 1 : 0;
    top_k_ = m.num_experts_per_tok;
    kv_blocks_ = std::max<int64_t>(
        1, (d_.kv_tokens_per_worker > 0 ? d_.kv_tokens_per_worker : p_.kv_tokens_per_worker) / kBlock);
    nodes_ = d_.nodes(p_);
    workers_.resize(size_t(d_.attention_workers));
    hosts_.resize(size_t(d_.expert_hosts));
    for (size_t w = 0; w < workers_.size(); ++w) workers_[w].node = int(w % size_t(nodes_));
    for (size_t h = 0; h < hosts_.size(); ++h) hosts_[h].node = int(h % size_t(nodes_));
    for (auto& h : hosts_) h.open.resize(size_t(layers_));
    node_servers_.assign(size_t(nodes_), Cores(p_.node_cores));
    nic_.resize(size_t(nodes_));
    // Placement: the coordinator's plan for one MoE layer (every layer is cut the same way).
    const int64_t experts = std::max<int64_t>(1, m.num_experts);
    if (int64_t(load.share.size()) != experts)
      throw Error("expert load has " + std::to_string(load.share.size()) + " experts, the model " +
                  std::to_string(experts));
    PlacementPlan plan({0}, int32_t(experts), int32_t(d_.expert_hosts), int32_t(d_.replicas));
    expert_hosts_.assign(size_t(experts), {});
    for (int32_t s = 0; s < plan.slots(); ++s)
      for (const auto& [layer, e] : plan.slot(s)) expert_hosts_[size_t(e)].push_back(s);
    host_busy_.assign(hosts_.size(), 0.0);
    open_slots_ = int64_t(workers_.size());
    host_share_.assign(hosts_.size(), 0.0);
    host_experts_.assign(hosts_.size(), 0);
    for (size_t e = 0; e < expert_hosts_.size(); ++e)
      for (int32_t h : expert_hosts_[e]) {
        host_share_[size_t(h)] += load.share[e] / double(expert_hosts_[e].size());
        host_experts_[size_t(h)] += 1;
      }
    expert_share_ = load.share;
    alias_ = std::make_unique<Alias>(load.share);
    max_share_host_ = size_t(std::max_element(host_share_.begin(), host_share_.end()) - host_share_.begin());
    // Exact per layer unless the run is large: then a step's lanes run as analytic layers.
    if (o_.layers_per_event > 0) {
      fast_ = o_.layers_per_event >= layers_;
    } else {
      const double reqs = t_.kind == TrafficSpec::Kind::trace    ? double(t_.trace.size())
                          : t_.requests > 0                      ? double(t_.requests)
                          : t_.kind == TrafficSpec::Kind::closed ? 1e9
                                                                 : t_.rate * t_.duration_s;
      fast_ = reqs * double(layers_) * double(d_.expert_hosts) > 2e8;
    }
  }

  SimResult run() {
    const auto wall0 = std::chrono::steady_clock::now();
    arrivals_ = open_loop_arrivals(t_);
    if (t_.kind == TrafficSpec::Kind::closed) {
      for (int c = 0; c < t_.concurrency && more_closed(); ++c) issue_closed(0.0);
    } else {
      for (size_t i = 0; i < arrivals_.size(); ++i) push(arrivals_[i].arrival_s, kArrival, uint32_t(i));
    }
    const double span = arrivals_.empty() ? t_.duration_s : arrivals_.back().arrival_s;
    const double limit = o_.max_sim_s > 0 ? o_.max_sim_s : 4 * span + 600;
    push(0.0, kSample);
    while (!ev_.empty()) {
      const Event e = ev_.top();
      ev_.pop();
      if (e.t > limit) break;
      now_ = e.t;
      ++events_;
      switch (e.type) {
        case kArrival:
          on_arrival(e.a);
          break;
        case kAdmit:
          on_admit(e.a);
          break;
        case kLane:
          on_lane(e.a, e.b, e.c);
          break;
        case kStepDone:
          on_step_done(e.a);
          break;
        case kSample:
          sample();
          if (live_ > 0 || !ev_.empty()) push(now_ + o_.sample_every_s, kSample);
          break;
      }
      if (live_ == 0 && pending_arrivals() == 0 && closed_done()) break;
    }
    return result(std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count());
  }

 private:
  void push(double t, EvType type, uint32_t a = 0, uint32_t b = 0, uint32_t c = 0) {
    ev_.push(Event{t, order_++, type, a, b, c});
  }
  int64_t pending_arrivals() const { return int64_t(arrivals_.size()) - arrived_; }
  bool closed_done() const { return t_.kind != TrafficSpec::Kind::closed || !more_closed(); }
  bool shared() const { return p_.shared_node_compute; }
  // A worker's or host's operation: on its own accelerator, or on shared cores where both its
  // process and one of the node's cores are free. A process runs one call at a time, so a
  // worker's two micro-batches take turns even when both cores are idle. The engine runs them on
  // two threads that may compute at once, but simulated so the validation matched fewer cells
  // (docs/planner.md, "Open points"): what else their overlap costs is not modelled.
  double run(Cores& own, int node, double ready, double dur) {
    if (!shared()) return own.reserve(ready, dur, now_);
    Cores& cores = node_servers_[size_t(node)];
    double s = ready;
    for (;;) {  // the first start free on both; it only moves later, so this ends
      const double a = own.earliest(s, dur, now_);
      const double b = cores.earliest(a, dur, now_);
      s = b;
      if (b <= a) break;
    }
    own.reserve(s, dur, now_);
    return cores.reserve(s, dur, now_);
  }
  double run_on(WorkerState& w, double ready, double dur) { return run(w.server, w.node, ready, dur); }
  double run_on(HostState& h, double ready, double dur) { return run(h.server, h.node, ready, dur); }

  // Closed loop: a client sends its next request as soon as its previous one ends.
  bool more_closed() const { return t_.requests > 0 ? issued_ < t_.requests : now_ < t_.duration_s; }
  void issue_closed(double t) {
    SimRequest r = sample_request(t_, issued_++, per_request_streams(t_) ? nullptr : &rng_);
    r.arrival_s = t;
    arrivals_.push_back(r);
    push(t, kArrival, uint32_t(arrivals_.size() - 1));
  }

  void on_arrival(uint32_t i) {
    ++arrived_;
    const SimRequest& r = arrivals_[i];
    Seq s;
    s.arrival = now_;
    s.prompt = r.prompt;
    s.output = r.output;
    s.tenant = r.tenant;
    // Prefix-cache hits: whole blocks of the prompt, never its last token.
    s.restored =
        std::min((r.prompt - 1) / kBlock * kBlock, int64_t(t_.prefix_hit_rate * double(r.prompt)) / kBlock * kBlock);
    seqs_.push_back(s);
    const auto id = uint32_t(seqs_.size() - 1);
    ++live_;
    if (first_arrival_ < 0) first_arrival_ = now_;
    // A request's own work before the queue (the client's connection and HTTP, the router's
    // parsing, what the calibration finds beyond the engine's costs): a delay of its own, not a
    // queue: the router admits a burst within 0.2 ms of each request's arrival
    // (moemesh_router_queue_time_seconds). On shared cores part of it is CPU, which the OS
    // time-shares with whatever else runs: spread over every core, it slows a step beside it (the
    // gaps of running streams in which a request arrived are 0.3-0.4 ms longer than the others,
    // docs/performance.md "Request by request"), where booked whole on a free core it did not.
    if (p_.router_per_request_s > 0) {
      // More CPU than latency (a share above 1) is work of several threads at once: it starts on
      // arrival, and on idle cores still ends within the latency (the share is at most the cores).
      const double cpu = shared() ? p_.router_per_request_s * p_.router_request_cpu_share : 0.0;
      double at = now_ + p_.router_per_request_s;
      if (cpu > 0)
        at =
            std::max(at, node_servers_[0].reserve_each(now_ + std::max(0.0, p_.router_per_request_s - cpu), cpu, now_));
      push(at, kAdmit, id);
      return;
    }
    on_admit(id);
  }

  void on_admit(uint32_t id) {
    fair_.push(id, tenant_name(seqs_[id].tenant), 1.0, Priority::Normal);
    pump(-1);
  }

  const std::string& tenant_name(int t) {
    static const std::string fallback = "default";
    return t_.tenants.empty() ? fallback : t_.tenants[size_t(t) % t_.tenants.size()];
  }

  int64_t seq_blocks(const Seq& s) const {
    return kv_blocks_held(s.kv_tokens_next_step(), s.prefilling() ? d_.step_token_budget + 1 : 1, 0);
  }
  void recount_blocks(WorkerState& w) {
    w.blocks_next = 0;
    for (uint32_t id : w.running) w.blocks_next += seq_blocks(seqs_[id]);
  }

  void requeue(WorkerState& w, uint32_t id) {
    Seq& s = seqs_[id];
    ++preemptions_;
    s.resumed = s.generated;
    s.prefilled = 0;
    // Its blocks went to the prefix cache as it was freed: resuming restores all full blocks.
    s.restored = (s.context_len() - 1) / kBlock * kBlock;
    s.worker = -1;
    w.running.erase(std::find(w.running.begin(), w.running.end(), id));
    fair_.push_front(id, tenant_name(s.tenant), 1.0, Priority::Normal);
  }

  void make_room(WorkerState& w) {
    while (w.running.size() > 1 && w.blocks_next > kv_blocks_) {
      const uint32_t victim = w.running.back();  // the newest
      w.blocks_next -= seq_blocks(seqs_[victim]);
      requeue(w, victim);
    }
  }

  // The scheduler's placement: most free KV blocks that fit, then fewest sequences; no overtaking.
  void place_waiting() {
    while (auto id = fair_.peek()) {
      if (open_slots_ == 0) break;
      Seq& s = seqs_[*id];
      const int64_t need = seq_blocks(s);
      int best = -1;
      std::pair<int64_t, int64_t> best_score{0, 0};
      for (size_t i = 0; i < workers_.size(); ++i) {
        const WorkerState& w = workers_[i];
        if (int64_t(w.running.size()) >= d_.max_running_per_worker) continue;
        const int64_t free = kv_blocks_ - w.blocks_next;
        if (free < need) continue;
        const std::pair<int64_t, int64_t> score{free, -int64_t(w.running.size())};
        if (best < 0 || score > best_score) best = int(i), best_score = score;
      }
      if (best < 0) break;
      fair_.pop();
      WorkerState& w = workers_[size_t(best)];
      s.worker = best;
      w.running.insert(std::upper_bound(w.running.begin(), w.running.end(), *id), *id);
      w.blocks_next += need;
      if (int64_t(w.running.size()) == d_.max_running_per_worker) --open_slots_;
      if (!s.admitted) {
        queue_hist_.add(now_ - s.arrival);
        s.admitted = true;
      }
      if (!w.inflight) idle_with_work_.push_back(best);
    }
  }

  void update_slots(WorkerState& w, size_t before) {
    const auto cap = size_t(d_.max_running_per_worker);
    if (before >= cap && w.running.size() < cap) ++open_slots_;
    if (before < cap && w.running.size() >= cap) --open_slots_;
  }

  // After a worker's step (or an arrival): preemption on that worker, placement, idle workers start.
  void pump(int worker) {
    if (worker >= 0) {
      WorkerState& w = workers_[size_t(worker)];
      const size_t before = w.running.size();
      make_room(w);
      update_slots(w, before);
      idle_with_work_.push_back(worker);
    }
    place_waiting();
    std::vector<int> starting;
    starting.swap(idle_with_work_);
    for (int i : starting) {
      WorkerState& w = workers_[size_t(i)];
      if (!w.inflight && (!w.running.empty() || !w.unpublished.empty())) send_step(i);
    }
  }

  void send_step(int wi) {
    WorkerState& w = workers_[size_t(wi)];
    w.work.clear();
    int64_t budget = d_.step_token_budget;
    for (uint32_t id : w.running) {
      const Seq& s = seqs_[id];
      if (s.prefilling()) continue;
      w.work.push_back({id, 1, 1, double(s.context_len() + s.generated - s.resumed)});
      --budget;
    }
    for (uint32_t id : w.running) {
      Seq& s = seqs_[id];
      if (!s.prefilling() || budget <= 0) continue;
      const int64_t n = std::min(s.context_len() - s.prefilled, budget);
      const int64_t from = std::max(s.prefilled, s.restored), to = s.prefilled + n;
      const int64_t rows = std::max<int64_t>(0, to - from);
      w.work.push_back({id, n, rows, double(rows) * double(from + to + 1) / 2.0});
      budget -= n;
    }
    // The sequences it frees offer their blocks once the step's answer is sent
    // (StepWorker::publish_freed); with no work the router still sends the frees (a step of its
    // own, actors/scheduler.cpp).
    if (w.work.empty()) {
      for (double put_s : w.unpublished) kv_puts_.put(now_, put_s);
      w.unpublished.clear();
      return;
    }
    w.publishing.swap(w.unpublished);
    w.unpublished.clear();
    w.inflight = true;
    w.step_start = now_;
    // Sequences the step starts with a full prompt block: the worker asks the KV store for their
    // prefixes first, all in one round trip, and waits at most what computing the positions it
    // asked for takes (its wait budget, actors/step_worker.h), at the price its own prefill-heavy
    // steps showed; before any, the whole round trip, as an idle machine answers it, after the
    // put the store is storing (the store answers a get before the puts queued behind that one).
    double start = now_, asked = 0;
    for (const Work& k : w.work)
      if (const Seq& s = seqs_[k.seq]; s.prefilled == 0 && s.context_len() > kBlock)
        asked += double((s.context_len() - 1) / kBlock * kBlock);
    if (const double price = w.prefill_speed.per_position_s(); asked > 0) {
      const double answer = kv_puts_.lookup_start(now_) - now_ + p_.prefix_lookup_s;
      start += price > 0 ? std::min(answer, asked * price) : answer;
    }
    if (p_.step_start_s > 0 &&
        std::any_of(w.work.begin(), w.work.end(), [&](const Work& k) { return seqs_[k.seq].prefilled == 0; }))
      start = shared() ? run_on(w, start, p_.step_start_s) : start + p_.step_start_s;
    w.engine_start = start;
    if (now_ - w.last_step_end > p_.idle_after_s) w.warm_steps = 0;
    ++steps_;
    // Lanes: two contiguous halves with rows as even as possible (core/engine.cpp).
    double total = 0;
    for (const Work& k : w.work) total += double(std::max<int64_t>(k.rows, 1));
    w.lane_count = d_.micro_batches == 2 && w.work.size() >= 2 ? 2 : 1;
    w.lanes[0] = w.lanes[1] = Lane{};
    size_t split = w.work.size();
    if (w.lane_count == 2) {
      double before = 0, best = -1;
      for (size_t k = 1; k < w.work.size(); ++k) {
        before += double(std::max<int64_t>(w.work[k - 1].rows, 1));
        const double imbalance = std::abs(total - 2 * before);
        if (best < 0 || imbalance < best) best = imbalance, split = k;
      }
    }
    w.sampled = 0;
    for (size_t k = 0; k < w.work.size(); ++k) {
      Lane& l = w.lanes[k < split ? 0 : 1];
      const Work& wk = w.work[k];
      const Seq& s = seqs_[wk.seq];
      const double rows = double(std::max<int64_t>(wk.rows, 1));
      l.rows += rows;
      if (s.prefilling()) {
        l.prefill_rows += rows;
        l.prefill_ctx += wk.ctx;
      }
      l.ctx += wk.ctx;
      w.sampled += !s.prefilling() || s.prefilled + wk.tokens >= s.context_len();
    }
    w.lanes_pending = w.lane_count;
    w.lanes_done = start;
    if (fast_) {
      finish_step_at(wi, start + analytic_lanes(w));
      return;
    }
    for (int l = 0; l < w.lane_count; ++l) push(start, kLane, uint32_t(wi), uint32_t(l), 0);
  }

  // Rows per host for a lane's `assign` (row, expert) assignments of one layer: sampled as the
  // gate would route them when few (each row's top-k distinct), else their expected values.
  // Sampled, they go as actors/remote_experts.cpp sends them: grouped by expert (in id order),
  // each group to the replica given the fewest rows so far in this call, ties broken by
  // replica_rotation (a salt per worker).
  void route(double assign, uint32_t layer, uint32_t worker, std::vector<std::pair<int32_t, double>>& per_host,
             std::vector<double>& active) {
    per_host.clear();
    active.clear();
    const size_t hosts = hosts_.size();
    if (assign < 4.0 * double(hosts)) {
      scratch_rows_.assign(hosts, 0.0);
      scratch_active_.assign(hosts, 0.0);
      touched_.clear();
      drawn_experts_.clear();
      // Each row's top-k are distinct experts (drawn by load until k differ).
      const size_t k = size_t(std::min<int64_t>(top_k_, int64_t(expert_share_.size())));
      for (int64_t row = 0; row < int64_t(assign) / std::max<int64_t>(1, top_k_); ++row) {
        const size_t first = drawn_experts_.size();
        for (int tries = 0; drawn_experts_.size() - first < k && tries < 64; ++tries)
          if (const size_t e = alias_->sample(rng_);
              std::find(drawn_experts_.begin() + ptrdiff_t(first), drawn_experts_.end(), e) == drawn_experts_.end())
            drawn_experts_.push_back(e);
      }
      std::sort(drawn_experts_.begin(), drawn_experts_.end());
      for (size_t i = 0; i < drawn_experts_.size();) {
        const size_t e = drawn_experts_[i];
        size_t rows = 0;
        for (; i < drawn_experts_.size() && drawn_experts_[i] == e; ++i) ++rows;
        const auto& hs = expert_hosts_[e];
        const size_t n = hs.size();
        const size_t rot = replica_rotation(layer, int32_t(e), uint64_t(worker + 1) * 0x165667B19E3779F9ull, n);
        int32_t h = hs[rot];
        for (size_t j = 1; j < n; ++j)
          if (const int32_t c = hs[(rot + j) % n]; scratch_rows_[size_t(c)] < scratch_rows_[size_t(h)]) h = c;
        if (scratch_rows_[size_t(h)] == 0) touched_.push_back(h);
        scratch_rows_[size_t(h)] += double(rows);
        scratch_active_[size_t(h)] += 1;
      }
      for (int32_t h : touched_) {
        per_host.emplace_back(h, scratch_rows_[size_t(h)]);
        active.push_back(scratch_active_[size_t(h)]);
      }
      return;
    }
    for (size_t h = 0; h < hosts; ++h) {
      const double r = assign * host_share_[h];
      if (r <= 0) continue;
      per_host.emplace_back(int32_t(h), r);
      const double n = double(host_experts_[h]);
      active.push_back(n * (1 - std::exp(-r / n)));
    }
  }

  double lane_attention(const Lane& l) const {
    return p_.attention_layer_s(l.rows - l.prefill_rows, l.ctx - l.prefill_ctx, l.prefill_rows, l.prefill_ctx);
  }

  // One lane, one layer, exact: attention on its worker, dispatch to the hosts, their batches,
  // the answers back.
  void on_lane(uint32_t wi, uint32_t lane, uint32_t layer) {
    WorkerState& w = workers_[wi];
    Lane& l = w.lanes[lane];
    const double attn = lane_attention(l);
    const double a_end = run_on(w, now_, attn);
    attn_busy_ += attn;
    double done = a_end;
    if (p_.model.is_moe_layer(layer)) {
      // On shared cores the lane's own hand-offs of this layer's dispatch (the bridge, waking on
      // the replies) are CPU of its worker, once per lane and layer whatever the hosts: the
      // other lane's turn waits for them. Measured: two lanes of one row each take 21-29% longer
      // per token than one lane of two rows (docs/planner.md); as a per-dispatch cost on any core
      // the simulator had them 8% faster.
      const double sent = shared() ? run_on(w, a_end, p_.dispatch_overhead_s) : a_end;
      route(l.rows * double(top_k_), layer, wi, per_host_, active_);
      ++dispatch_rounds_;
      for (size_t k = 0; k < per_host_.size(); ++k) {
        const auto [hi, rows] = per_host_[k];
        HostState& h = hosts_[size_t(hi)];
        const bool same = h.node == w.node;
        const LinkCost& link = p_.link(d_.nccl, same);
        const double bytes = p_.dispatch_bytes(rows);
        double arrive = sent;
        if (!same) {
          arrive = nic_[size_t(w.node)].reserve(sent, bytes / link.bandwidth_Bps, now_);
          arrive += link.latency_s + link.per_message_s;
        } else {
          arrive += link.seconds(bytes);
        }
        if (!shared()) arrive += p_.dispatch_overhead_s;
        double end;
        auto& open = h.open[layer];
        ++dispatches_;
        if (arrive <= open.close && arrive <= open.start) {  // joins the layer's batch still open
          // Its rows, and the experts they add to the batch's (expected, over the host's n).
          const double n = double(host_experts_[size_t(hi)]);
          const double added = n * (std::exp(-open.rows / n) - std::exp(-(open.rows + rows) / n));
          const double extra = p_.expert_per_row_s * rows + p_.expert_per_expert_s * added;
          open.rows += rows;
          end = run_on(h, open.end, extra);
          expert_busy_ += extra;
          host_busy_[size_t(hi)] += extra;
          open.end = end;
        } else {
          const double window = d_.attention_workers > 1 ? d_.expert_batch_window_s : 0.0;
          const double dur = p_.expert_batch_s(active_[k], rows);
          end = run_on(h, arrive + window, dur);
          expert_busy_ += dur;
          host_busy_[size_t(hi)] += dur;
          open = {arrive + window, end - dur, end, rows};
          ++batches_;
        }
        double back;
        if (!same) {
          back =
              nic_[size_t(h.node)].reserve(end, bytes / link.bandwidth_Bps, now_) + link.latency_s + link.per_message_s;
        } else {
          back = end + link.seconds(bytes);
        }
        done = std::max(done, back);
      }
      expert_wait_ += done - a_end;
    }
    lane_time_ += done - now_;
    if (int64_t(layer) + 1 < layers_) {
      push(done, kLane, wi, lane, layer + 1);
      return;
    }
    w.lanes_done = std::max(w.lanes_done, done);
    if (--w.lanes_pending == 0) finish_step_at(int(wi), w.lanes_done);
  }

  // A step's lanes over all layers at once (large runs): per layer a lane computes its attention
  // (the two lanes take turns on the worker) and waits for its dispatch to the busiest host.
  // Expert hosts merge the requests of one layer that arrive within the batching window
  // (actors/expert_batcher.h): with the recent dispatch rate (update_load), a batch holds
  // m = 1 + (requests per layer per second) x window of them, at most one per lane of each
  // worker, and its fixed and per-expert costs are shared by all m. Queueing at the hosts and
  // NICs is M/D/1 at their recent utilisation; an overloaded host stretches the steps.
  double analytic_lanes(WorkerState& w) {
    double cycle_attn = 0, max_dispatch = 0, attn_sum = 0, host_work = 0, nic_work = 0, disp_max = 0, disp_all = 0;
    const double window = d_.attention_workers > 1 ? d_.expert_batch_window_s : 0.0;
    for (int l = 0; l < w.lane_count; ++l) {
      const Lane& lane = w.lanes[l];
      const double a = lane_attention(lane);
      attn_sum += a;
      const double assign = lane.rows * double(top_k_);
      // The busiest host: touched with probability `touch`, then with r rows of n experts.
      const double share = host_share_[max_share_host_];
      const double touch = 1 - std::pow(1 - share, assign);
      const double r = touch > 0 ? assign * share / touch : 0;
      const double n = double(host_experts_[max_share_host_]);
      const double m = merge_max_;
      const double merged = p_.expert_batch_s(n * (1 - std::exp(-m * r / n)), m * r);
      const double own = (merged - p_.expert_per_row_s * m * r) / m + p_.expert_per_row_s * r;
      const bool remote = nodes_ > 1;
      const LinkCost& link = p_.link(d_.nccl, !remote);
      const double remote_share = remote ? 1.0 - 1.0 / double(nodes_) : 0.0;
      const double nic_serial =
          assign * remote_share * double(p_.model.hidden_size * p_.activation_bytes) / link.bandwidth_Bps;
      const double wait_e = rho_expert_ / (2 * (1 - rho_expert_)) * merged;
      const double wait_n = rho_nic_ / (2 * (1 - rho_nic_)) * nic_serial;
      // The first request of a batch waits the whole window, the later ones what is left of it.
      const double wait_w = window * (1 + (m - 1) / 2) / m;
      const double d = 2 * link.seconds(p_.dispatch_bytes(r)) + (shared() ? 0.0 : p_.dispatch_overhead_s) + wait_w +
                       wait_e + merged + 2 * (nic_serial + wait_n);
      max_dispatch = std::max(max_dispatch, d);
      cycle_attn = std::max(cycle_attn, a);
      // Utilisation bookkeeping: the busiest host, all hosts (merged as the mean host), the NICs.
      const double moe = double(moe_layers_);
      const double touched = hosts_touched(assign);
      const double experts = double(expert_share_.size());
      const double mm = merge_mean_;
      expert_busy_ += moe * (touched * p_.expert_fixed_s / mm +
                             p_.expert_per_expert_s * experts * (1 - std::exp(-mm * assign / experts)) / mm +
                             p_.expert_per_row_s * assign);
      host_work += moe * touch * own;
      disp_max += moe * touch;
      disp_all += moe * touched;
      dispatches_ += moe * touched;
      dispatch_rounds_ += moe;
      batches_ += moe * touched / mm;
      nic_work += moe * 2 * nic_serial;
    }
    attn_busy_ += attn_sum * double(layers_);
    // Two lanes ping-pong: a layer takes the longer of both attentions back to back and one
    // attention plus its dispatch round trip.
    // On shared cores each lane's hand-offs of a MoE layer are its worker's work (on_lane).
    const double hand_off = shared() ? p_.dispatch_overhead_s : 0.0;
    const double moe_attn = attn_sum + double(w.lane_count) * hand_off, moe_cycle = cycle_attn + hand_off;
    const double per_layer_moe =
        w.lane_count == 2 ? std::max(moe_attn, moe_cycle + max_dispatch) : moe_attn + max_dispatch;
    const double per_layer_dense = attn_sum;
    expert_wait_ += double(moe_layers_) * max_dispatch * double(w.lane_count);
    const double t =
        overload_ * (double(moe_layers_) * per_layer_moe + double(layers_ - moe_layers_) * per_layer_dense);
    lane_time_ += t * double(w.lane_count);
    max_host_busy_ += host_work;
    nic_busy_ += nic_work;
    update_load(t, host_work, nic_work, disp_max, disp_all);
    return t;
  }

  // Expected expert hosts one lane's `assign` assignments touch (a table, by whole assignments).
  double hosts_touched(double assign) {
    const auto k = size_t(std::max(0.0, std::round(assign)));
    while (touched_table_.size() <= k) {
      const double a = double(touched_table_.size());
      double t = 0;
      for (double sh : host_share_) t += 1 - std::pow(1 - sh, a);
      touched_table_.push_back(t);
    }
    return touched_table_[k];
  }

  // Requests a host's batch merges (analytic mode), from its recent dispatch rate.
  double merge_factor(double dispatches_per_s_per_host) const {
    const double window = d_.attention_workers > 1 ? d_.expert_batch_window_s : 0.0;
    const double cap = double(d_.attention_workers) * double(d_.micro_batches);
    return std::clamp(1 + dispatches_per_s_per_host / double(std::max<int64_t>(1, moe_layers_)) * window, 1.0, cap);
  }

  void finish_step_at(int wi, double lanes_done) {
    WorkerState& w = workers_[size_t(wi)];
    learn_prefill_speed(w, lanes_done - w.engine_start);
    const double dur = p_.step_s(double(w.sampled));
    attn_busy_ += dur;
    double end = fast_ ? lanes_done + dur : run_on(w, lanes_done, dur);
    if (p_.step_jitter > 0)
      end += (end - w.step_start) * std::exponential_distribution<double>(1 / p_.step_jitter)(rng_);
    // Waking from idle: the first steps after a pause are slower, by a share that falls each step.
    if (p_.idle_wake_s > 0 && w.warm_steps < kWakeSteps)
      end += p_.idle_wake_s * std::pow(p_.idle_wake_decay, w.warm_steps);
    w.warm_steps = std::min(w.warm_steps + 1, kWakeSteps);
    w.last_step_end = end;
    push(end, kStepDone, uint32_t(wi));
  }

  // What a worker learns of its prefill speed from a step: as StepWorker::learn_prefill_speed.
  void learn_prefill_speed(WorkerState& w, double engine_s) {
    int64_t rows = 0, prompt = 0;
    for (const Work& k : w.work) {
      rows += std::max<int64_t>(k.rows, 1);
      if (seqs_[k.seq].prefilling()) prompt += k.rows;
    }
    w.prefill_speed.add(rows, prompt, engine_s);
  }

  void on_step_done(uint32_t wi) {
    WorkerState& w = workers_[wi];
    w.inflight = false;
    for (double put_s : w.publishing) kv_puts_.put(now_, put_s);
    w.publishing.clear();
    int64_t tokens = 0;
    const size_t before = w.running.size();
    for (const Work& k : w.work) {
      Seq& s = seqs_[k.seq];
      if (s.worker != int(wi) || s.done) continue;
      if (s.prefilling()) {
        s.prefilled += k.tokens;
        charge_prompt_ += k.tokens;
        if (s.prefilling()) continue;
      }
      // A sampled token: the client sees it once the router has streamed it, which on shared
      // cores is CPU beside the next step (one token after another, on whichever core is free).
      ++tokens;
      ++s.generated;
      const double seen =
          p_.router_per_token_s > 0 && shared() ? node_servers_[0].reserve(now_, p_.router_per_token_s, now_) : now_;
      if (s.first_token < 0) {
        s.first_token = seen;
        ttft_.add(seen - s.arrival);
      } else {  // after a preemption the gap includes the wait to resume, as the router counts it
        itl_.add(seen - s.last_token);
        if (o_.trace_requests) trace_itl_[k.seq].push_back(seen - s.last_token);
      }
      s.last_token = seen;
      if (s.generated >= s.output) {
        s.done = true;
        if (const double put_s = put_seconds(s); put_s > 0) w.unpublished.push_back(put_s);
        e2e_.add(seen - s.arrival);
        if (o_.trace_requests) trace(k.seq, seen);
        ++completed_;
        out_tokens_ += s.generated;
        last_done_ = std::max(last_done_, seen);
        --live_;
        w.running.erase(std::find(w.running.begin(), w.running.end(), k.seq));
        if (t_.kind == TrafficSpec::Kind::closed && more_closed()) issue_closed(seen);
      }
    }
    update_slots(w, before);
    window_tokens_ += tokens;
    if (tokens > 0) fair_.charge(tenant_name(0), charge_prompt_, tokens);
    charge_prompt_ = 0;
    recount_blocks(w);
    pump(int(wi));
  }

  // The store's time for a finished sequence's full blocks that it does not hold yet.
  double put_seconds(const Seq& s) const {
    const int64_t full = (s.context_len() + s.generated - s.resumed - 1) / kBlock, first = s.restored / kBlock;
    return full > first ? p_.kv_put_s + p_.kv_put_per_block_s * double(full - first) : 0.0;
  }

  void sample() {
    TimelineSample s;
    s.t = now_;
    s.waiting = int64_t(fair_.size());
    int64_t blocks = 0;
    for (const auto& w : workers_) {
      s.running += int64_t(w.running.size());
      blocks += w.blocks_next;
    }
    s.kv_used = double(blocks) / double(kv_blocks_ * int64_t(workers_.size()));
    kv_peak_ = std::max(kv_peak_, s.kv_used);
    s.output_tok_s = double(window_tokens_) / o_.sample_every_s;
    window_tokens_ = 0;
    timeline_.push_back(s);
  }

  // The analytic mode's view of the load: rates of the busiest host's work, the NICs' bytes and
  // the dispatches, as moving averages over ~10 recent steps (the demand of a step is added when
  // it starts). They set the M/D/1 waits and the batches' merging.
  void update_load(double step_s, double host_work, double nic_work, double disp_max, double disp_all) {
    const double dt = std::max(0.0, now_ - load_t_);
    load_t_ = now_;
    step_avg_ += (step_s - step_avg_) * 0.05;
    const double tau = std::clamp(10 * step_avg_, 1e-4, 10.0), keep = std::exp(-dt / tau);
    rate_host_ = rate_host_ * keep + host_work / tau;
    rate_nic_ = rate_nic_ * keep + nic_work / tau;
    rate_disp_max_ = rate_disp_max_ * keep + disp_max / tau;
    rate_disp_all_ = rate_disp_all_ * keep + disp_all / tau;
    // Demand beyond the busiest host's capacity queues: the steps stretch (integral control on
    // the smoothed rate) until the host serves what arrives, at ~97% busy; they relax below it.
    overload_ = std::max(1.0, overload_ * std::exp((rate_host_ - 0.97) * dt / tau));
    rho_expert_ = std::min(0.99, rate_host_);
    rho_nic_ = std::min(0.99, rate_nic_ / double(nodes_));
    merge_max_ = merge_factor(rate_disp_max_);
    merge_mean_ = merge_factor(rate_disp_all_ / double(hosts_.size()));
  }

  void trace(uint32_t id, double end) {
    const Seq& s = seqs_[id];
    bench::Outcome t;
    t.start_s = s.arrival;
    t.end_s = end;
    t.ttft_s = s.first_token - s.arrival;
    t.itl_s = std::move(trace_itl_[id]);
    trace_itl_.erase(id);
    t.prompt_tokens = s.prompt;
    t.output_tokens = s.generated;
    t.tenant = s.tenant;
    traces_.push_back(std::move(t));
  }

  SimResult result(double wall) {
    SimResult r;
    r.traces = std::move(traces_);
    r.requests = int64_t(seqs_.size());
    r.completed = completed_;
    r.unfinished = live_;
    r.preemptions = preemptions_;
    r.steps = steps_;
    r.duration_s = std::max(1e-9, last_done_ - std::max(0.0, first_arrival_));
    r.requests_per_s = double(completed_) / r.duration_s;
    r.output_tok_s = double(out_tokens_) / r.duration_s;
    r.ttft = ttft_.summary();
    r.itl = itl_.summary();
    r.e2e = e2e_.summary();
    r.queue = queue_hist_.summary();
    const double span = std::max(1e-9, now_ - std::max(0.0, first_arrival_));
    r.attention_util = attn_busy_ / (span * double(workers_.size()));
    r.expert_util = expert_busy_ / (span * double(hosts_.size()));
    if (fast_) {
      r.expert_util_max = max_host_busy_ / span;
    } else {
      r.expert_util_max = *std::max_element(host_busy_.begin(), host_busy_.end()) / span;
    }
    double nic = fast_ ? nic_busy_ : 0;
    if (!fast_)
      for (const auto& n : nic_) nic += n.busy;
    r.network_util = nic / (span * double(nodes_));
    if (shared()) {
      double b = 0;
      for (const auto& n : node_servers_) b += n.busy();
      r.node_util = b / (span * double(nodes_) * double(node_servers_[0].size()));
    }
    r.kv_used_peak = kv_peak_;
    r.expert_wait_share = lane_time_ > 0 ? expert_wait_ / lane_time_ : 0;
    r.dispatches_per_batch = batches_ > 0 ? dispatches_ / batches_ : 0;
    r.hosts_per_dispatch = dispatch_rounds_ > 0 ? dispatches_ / dispatch_rounds_ : 0;
    r.timeline = std::move(timeline_);
    r.events = events_;
    r.layers_per_event = fast_ ? layers_ : 1;
    r.wall_s = wall;
    // The bottleneck: a saturated resource first, then KV capacity, then what a step waits on.
    std::vector<std::pair<double, std::string>> util = {
        {r.attention_util, "attention compute (attention workers busy)"},
        {r.expert_util_max, "expert compute (the busiest expert host)"},
        {r.network_util, "network (node links busy with expert dispatch)"},
        {r.node_util, "the node's shared cores (every process computes on them)"}};
    std::sort(util.begin(), util.end(), std::greater<>());
    if (util[0].first >= 0.8)
      r.bottleneck = util[0].second;
    else if (r.preemptions > 0 || r.kv_used_peak > 0.95)
      r.bottleneck = "KV cache capacity (preemptions)";
    else if (r.queue.p90 > 0.5 * std::max(1e-9, r.ttft.p90) && r.queue.count > 0)
      r.bottleneck = "admission (max running sequences per worker)";
    else if (r.expert_wait_share > 0.5)
      r.bottleneck = "expert dispatch latency (a round trip per MoE layer per step)";
    else
      r.bottleneck = "attention step latency";
    return r;
  }

  const CostProfile& p_;
  Deployment d_;
  const TrafficSpec& t_;
  SimOptions o_;
  std::vector<bench::Outcome> traces_;
  std::unordered_map<uint32_t, std::vector<double>> trace_itl_;  // of unfinished requests, when tracing
  std::mt19937_64 rng_;
  FairQueue fair_;
  int64_t layers_ = 0, moe_layers_ = 0, top_k_ = 2, kv_blocks_ = 0;
  int nodes_ = 1;
  bool fast_ = false;
  std::vector<WorkerState> workers_;
  std::vector<HostState> hosts_;
  std::vector<Cores> node_servers_;
  StorePuts kv_puts_;
  std::vector<Server> nic_;
  std::vector<std::vector<int32_t>> expert_hosts_;
  std::vector<double> host_share_, expert_share_;
  std::vector<int64_t> host_experts_;
  std::vector<double> host_busy_;
  std::unique_ptr<Alias> alias_;
  size_t max_share_host_ = 0;
  std::vector<SimRequest> arrivals_;
  std::vector<Seq> seqs_;
  std::priority_queue<Event, std::vector<Event>, std::greater<>> ev_;
  uint64_t order_ = 0;
  double now_ = 0;
  int64_t arrived_ = 0, issued_ = 0, live_ = 0, completed_ = 0, out_tokens_ = 0, preemptions_ = 0, steps_ = 0;
  int64_t events_ = 0, window_tokens_ = 0, charge_prompt_ = 0;
  int64_t open_slots_ = 0;
  double first_arrival_ = -1, last_done_ = 0;
  std::vector<int> idle_with_work_;
  std::vector<std::pair<int32_t, double>> per_host_;
  std::vector<double> active_, scratch_rows_, scratch_active_;
  std::vector<int32_t> touched_;
  std::vector<size_t> drawn_experts_;  // route(): each row's top-k draws, then sorted by expert
  LatencyHistogram ttft_, itl_, e2e_, queue_hist_;
  double attn_busy_ = 0, expert_busy_ = 0, max_host_busy_ = 0, nic_busy_ = 0, expert_wait_ = 0, lane_time_ = 0;
  double rho_expert_ = 0, rho_nic_ = 0, merge_max_ = 1, merge_mean_ = 1, dispatches_ = 0, batches_ = 0,
         dispatch_rounds_ = 0;
  double overload_ = 1, load_t_ = 0, step_avg_ = 0, rate_host_ = 0, rate_nic_ = 0, rate_disp_max_ = 0,
         rate_disp_all_ = 0;
  std::vector<double> touched_table_;
  double kv_peak_ = 0;
  std::vector<TimelineSample> timeline_;
};

}  // namespace

int Deployment::nodes(const CostProfile& p) const {
  const int ppn = processes_per_node > 0 ? processes_per_node : p.gpus_per_node;
  return std::max(1, (attention_workers + expert_hosts + ppn - 1) / ppn);
}

std::string Deployment::describe() const {
  std::ostringstream o;
  o << attention_workers << " attention workers, " << expert_hosts << " expert hosts, " << replicas
    << (replicas == 1 ? " replica" : " replicas") << ", " << micro_batches << " micro-batch"
    << (micro_batches == 1 ? "" : "es") << ", step budget " << step_token_budget << ", " << (nccl ? "NCCL" : "ZeroMQ");
  return o.str();
}

void Deployment::validate() const {
  if (attention_workers < 1 || expert_hosts < 1)
    throw Error("deployment: at least one attention worker and one expert host");
  if (replicas < 1 || replicas > expert_hosts)
    throw Error("deployment: replicas must be between 1 and the expert hosts");
  if (micro_batches != 1 && micro_batches != 2) throw Error("deployment: micro-batches must be 1 or 2");
  if (step_token_budget < 1 || max_running_per_worker < 1)
    throw Error("deployment: step budget and max running must be positive");
}

ExpertLoad ExpertLoad::uniform(int64_t experts) {
  return {std::vector<double>(size_t(std::max<int64_t>(1, experts)), 1.0 / double(std::max<int64_t>(1, experts)))};
}

ExpertLoad ExpertLoad::zipf(int64_t experts, double s, uint64_t seed) {
  const auto n = size_t(std::max<int64_t>(1, experts));
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);  // hot experts land anywhere in the placement
  ExpertLoad l{std::vector<double>(n)};
  double total = 0;
  for (size_t i = 0; i < n; ++i) total += l.share[order[i]] = 1.0 / std::pow(double(i + 1), s);
  for (auto& v : l.share) v /= total;
  return l;
}

ExpertLoad ExpertLoad::load(const std::string& file, int64_t experts) {
  std::ifstream in(file);
  if (!in) throw Error(file + ": cannot read the expert load");
  std::stringstream buf;
  buf << in.rdbuf();
  std::vector<double> v;
  const std::string text = buf.str();
  if (text.find('[') != std::string::npos) {
    try {
      v = nlohmann::json::parse(text).get<std::vector<double>>();
    } catch (const std::exception& e) {
      throw Error(file + ": expected a JSON array of numbers: " + e.what());
    }
  } else {
    std::istringstream lines(text);
    for (double x; lines >> x;) v.push_back(x);
  }
  if (int64_t(v.size()) != experts)
    throw Error(file + ": " + std::to_string(v.size()) + " loads for a model of " + std::to_string(experts) +
                " experts");
  double total = 0;
  for (double x : v) {
    if (x < 0) throw Error(file + ": negative load");
    total += x;
  }
  if (total <= 0) throw Error(file + ": all loads are zero");
  for (auto& x : v) x /= total;
  return {v};
}

SimResult simulate(const CostProfile& profile, const Deployment& dep, const TrafficSpec& traffic,
                   const ExpertLoad& load, const SimOptions& opts) {
  Simulator sim(profile, dep, traffic, load, opts);
  return sim.run();
}

nlohmann::json SimResult::to_json() const {
  auto lat = [](const LatencySummary& s) {
    return nlohmann::json{{"count", s.count},
                          {"mean_ms", s.mean * 1e3},
                          {"p50_ms", s.p50 * 1e3},
                          {"p90_ms", s.p90 * 1e3},
                          {"p99_ms", s.p99 * 1e3}};
  };
  return {{"requests", requests},
          {"completed", completed},
          {"unfinished", unfinished},
          {"preemptions", preemptions},
          {"steps", steps},
          {"duration_s", duration_s},
          {"requests_per_s", requests_per_s},
          {"output_tokens_per_s", output_tok_s},
          {"ttft_ms", lat(ttft)},
          {"itl_ms", lat(itl)},
          {"e2e_ms", lat(e2e)},
          {"queue_ms", lat(queue)},
          {"utilisation",
           {{"attention", attention_util},
            {"expert_mean", expert_util},
            {"expert_max", expert_util_max},
            {"network", network_util},
            {"node_cores", node_util}}},
          {"kv_used_peak", kv_used_peak},
          {"expert_wait_share", expert_wait_share},
          {"dispatches_per_batch", dispatches_per_batch},
          {"hosts_per_dispatch", hosts_per_dispatch},
          {"bottleneck", bottleneck},
          {"events", events},
          {"layers_per_event", layers_per_event},
          {"wall_s", wall_s}};
}

std::string timeline_csv(const SimResult& r) {
  std::ostringstream o;
  o << "t_s,waiting,running,kv_used,output_tok_s\n";
  for (const auto& s : r.timeline)
    o << s.t << "," << s.waiting << "," << s.running << "," << s.kv_used << "," << s.output_tok_s << "\n";
  return o.str();
}

}  // namespace moemesh::planner
