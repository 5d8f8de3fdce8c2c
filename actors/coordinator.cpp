#include "actors/coordinator.h"

#include <algorithm>
#include <deque>
#include <map>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "actors/cluster_status.h"
#include "actors/metrics_util.h"
#include "actors/transport.h"
#include "core/placement.h"
#include "proto/control.pb.h"

namespace moemesh::actors {
namespace {

using Clock = std::chrono::steady_clock;

// Rows per (layer, expert) that heartbeats reported within the last `window`: a sliding sum,
// so the imbalance gauge follows the recent load and forgets old bursts.
class LoadWindow {
 public:
  void add(Clock::time_point t, const pb::Heartbeat& hb) {
    std::vector<std::pair<ExpertKey, uint64_t>> rows;
    for (const auto& l : hb.load())
      if (l.rows() > 0) rows.push_back({{l.layer(), l.expert()}, l.rows()});
    if (rows.empty()) return;
    for (const auto& [k, n] : rows) totals_[k] += n;
    entries_.emplace_back(t, std::move(rows));
  }
  void expire(Clock::time_point now, Clock::duration window) {
    while (!entries_.empty() && now - entries_.front().first > window) {
      for (const auto& [k, n] : entries_.front().second)
        if ((totals_[k] -= n) == 0) totals_.erase(k);
      entries_.pop_front();
    }
  }
  // Rows per expert in the window (what the placement of a host beyond the slots is chosen by).
  std::map<ExpertKey, double> totals() const {
    std::map<ExpertKey, double> out;
    for (const auto& [k, n] : totals_) out[k] = double(n);
    return out;
  }
  // max / mean of the rows of the layer's experts (idle experts count as 0); 0 when the
  // layer computed nothing in the window.
  double imbalance(int32_t layer, int32_t num_experts) const {
    uint64_t max = 0, sum = 0;
    for (auto it = totals_.lower_bound({layer, 0}); it != totals_.end() && it->first.first == layer; ++it) {
      max = std::max(max, it->second);
      sum += it->second;
    }
    if (sum == 0 || num_experts <= 0) return 0;
    return double(max) / (double(sum) / num_experts);
  }

 private:
  std::deque<std::pair<Clock::time_point, std::vector<std::pair<ExpertKey, uint64_t>>>> entries_;
  std::map<ExpertKey, uint64_t> totals_;
};

// The coordinator's series (docs/metrics.md), refreshed on every tick.
struct CoordinatorMetrics {
  CoordinatorMetrics(std::shared_ptr<prometheus::Registry> reg, const CoordinatorConfig& cfg)
      : registry(std::move(reg)),
        live_hosts(metrics::gauge_family(*registry, "moemesh_coordinator_live_hosts",
                                         "Registered members that sent a heartbeat within the timeout, by role.")),
        expected_expert_hosts(metrics::gauge_family(*registry, "moemesh_coordinator_expected_expert_hosts",
                                                    "Expert host slots the placement is cut for (--expert-hosts).")
                                  .Add({})),
        placement_version(metrics::gauge_family(*registry, "moemesh_coordinator_placement_version",
                                                "Version of the newest placement table.")
                              .Add({})),
        host_experts(metrics::gauge_family(*registry, "moemesh_coordinator_host_experts",
                                           "Experts (layer, expert pairs) each live expert host serves.")),
        expert_replicas(metrics::gauge_family(*registry, "moemesh_coordinator_expert_replicas",
                                              "Live expert hosts serving each (layer, expert); 0: no live host.")),
        uncovered(metrics::gauge_family(*registry, "moemesh_coordinator_uncovered_experts",
                                        "Routed experts with no live host (the cluster is not ready while any exist).")
                      .Add({})),
        imbalance(
            metrics::gauge_family(*registry, "moemesh_coordinator_expert_load_imbalance_ratio",
                                  "Per MoE layer, max / mean of the rows computed per expert over the load window "
                                  "(1: balanced; 0: no rows in the window).")),
        expired(metrics::counter_family(*registry, "moemesh_coordinator_expired_members_total",
                                        "Members removed because they missed their heartbeats, by role.")),
        moves(metrics::counter_family(*registry, "moemesh_coordinator_placement_moves_total",
                                      "Experts placed, added or dropped on expert hosts by measured load (a host "
                                      "beyond the slots gets the hottest experts; live re-placements move them).")
                  .Add({})),
        rebalances(metrics::counter_family(*registry, "moemesh_coordinator_rebalances_total",
                                           "Live load-driven re-placements, by outcome (done, aborted).")),
        rebalancing(metrics::gauge_family(*registry, "moemesh_coordinator_rebalancing",
                                          "1 while a live re-placement is loading, switching or dropping experts.")
                        .Add({})),
        restarts(metrics::gauge_family(*registry, "moemesh_coordinator_member_restarts",
                                       "Times a supervisor restarted each member, as it said when it registered "
                                       "(moemesh up; kept after the member leaves), by role and host.")) {
    expected_expert_hosts.Set(cfg.expert_hosts);
    for (pb::Role r : {pb::ATTENTION, pb::EXPERT, pb::KVSTORE}) {
      live[r] = &live_hosts.Add({{"role", role_name(r)}});
      expired_by_role[r] = &expired.Add({{"role", role_name(r)}});
    }
    for (int32_t layer : cfg.moe_layers) {
      imbalance_by_layer[layer] = &imbalance.Add({{"layer", std::to_string(layer)}});
      for (int32_t e = 0; e < cfg.num_experts; ++e)
        replicas[{layer, e}] = &expert_replicas.Add({{"layer", std::to_string(layer)}, {"expert", std::to_string(e)}});
    }
  }

  std::shared_ptr<prometheus::Registry> registry;  // outlives the references below
  prometheus::Family<prometheus::Gauge>& live_hosts;
  prometheus::Gauge& expected_expert_hosts;
  prometheus::Gauge& placement_version;
  prometheus::Family<prometheus::Gauge>&host_experts, &expert_replicas;
  prometheus::Gauge& uncovered;
  prometheus::Family<prometheus::Gauge>& imbalance;
  prometheus::Family<prometheus::Counter>& expired;
  prometheus::Counter& moves;
  prometheus::Family<prometheus::Counter>& rebalances;
  prometheus::Gauge& rebalancing;
  prometheus::Family<prometheus::Gauge>& restarts;
  std::map<pb::Role, prometheus::Gauge*> live;
  std::map<pb::Role, prometheus::Counter*> expired_by_role;
  std::map<int32_t, prometheus::Gauge*> imbalance_by_layer;
  std::map<ExpertKey, prometheus::Gauge*> replicas;
  std::map<std::string, prometheus::Gauge*> per_host;  // host_experts series of live hosts
};

struct Member {
  pb::Role role = pb::ROLE_UNKNOWN;
  std::string data_endpoint, admin_endpoint;
  std::string control_peer;  // routing id of its control DEALER (where relayed messages go)
  TransportCaps caps;        // what it registered (gpu, nccl)
  Clock::time_point last_seen;
  pb::Heartbeat last;  // the newest heartbeat
  uint64_t rows_total = 0;
  uint32_t restarts = 0;  // as it registered
  AttentionWorker worker;
};

struct CoordinatorState {
  CoordinatorConfig cfg;
  caf::actor bridge, listener;
  int control = -1, publish = -1;
  std::unique_ptr<Placement> placement;
  std::unique_ptr<LiveRebalancer> rebalancer;
  std::map<std::string, Member> members;
  std::vector<AttentionWorker> last_workers;  // as last told to the listener
  LoadWindow load;
  bool suspect_armed = false;                   // a fast-removal check is scheduled
  Clock::time_point last_drop{};                // the latest control connection drop
  uint64_t expired = 0;                         // members removed since start
  std::unique_ptr<CoordinatorMetrics> metrics;  // null without a registry
  static inline const char* name = "coordinator";
};

using Self = caf::stateful_actor<CoordinatorState>;

FramesPtr control_frames(const zmq::message_t* peer, const pb::ControlMessage& msg) {
  auto frames = std::make_shared<Frames>();
  if (peer) frames->emplace_back(peer->data(), peer->size());
  std::string bytes = msg.SerializeAsString();
  frames->emplace_back(bytes.data(), bytes.size());
  return frames;
}

pb::PlacementTable table_message(const CoordinatorState& st) {
  pb::PlacementTable t;
  const auto& table = st.placement->table();
  t.set_version(table.version);
  t.set_num_experts(st.cfg.num_experts);
  t.set_num_layers(int32_t(st.cfg.moe_layers.size()));
  for (const auto& h : table.hosts) {
    auto* e = t.add_hosts();
    e->set_instance(h.instance);
    e->set_data_endpoint(h.endpoint);
    e->set_live(true);
    if (auto m = st.members.find(h.instance); m != st.members.end()) {
      e->set_gpu(m->second.caps.gpu);
      e->set_nccl(m->second.caps.nccl);
      e->set_gpu_id(m->second.caps.gpu_id);
    }
    for (const auto& [layer, expert] : h.experts) {
      auto* id = e->add_experts();
      id->set_layer(layer);
      id->set_expert(expert);
    }
  }
  return t;
}

void publish_table(Self* self) {
  pb::ControlMessage m;
  *m.mutable_placement() = table_message(self->state);
  self->send(self->state.bridge, zmq_send_atom::value, self->state.publish, control_frames(nullptr, m));
}

bool cluster_ready(const CoordinatorState& st) {
  if (!st.placement->uncovered().empty()) return false;
  for (const auto& [name, m] : st.members)
    if (m.role == pb::ATTENTION && m.worker.ready) return true;
  return false;
}

// Tells the listener when the ready attention workers (or their endpoints) change.
void notify_workers(Self* self) {
  std::vector<AttentionWorker> ready;
  for (const auto& [name, m] : self->state.members)
    if (m.role == pb::ATTENTION && m.worker.ready) ready.push_back(m.worker);
  auto same = [](const AttentionWorker& a, const AttentionWorker& b) {
    return a.instance == b.instance && a.endpoint == b.endpoint;
  };
  if (ready.size() == self->state.last_workers.size() &&
      std::equal(ready.begin(), ready.end(), self->state.last_workers.begin(), same))
    return;
  self->state.last_workers = ready;
  if (self->state.listener)
    self->send(self->state.listener, workers_atom::value,
               WorkerList(std::make_shared<std::vector<AttentionWorker>>(ready)));
}

void on_register(Self* self, const zmq::message_t& peer, const pb::Register& r) {
  auto& st = self->state;
  pb::ControlMessage reply;
  auto* rr = reply.mutable_register_reply();
  if (r.instance().empty() || r.role() == pb::ROLE_UNKNOWN) {
    rr->set_ok(false);
    rr->set_error("register needs an instance name and a role");
  } else if (!st.cfg.model_id.empty() && !r.model_id().empty() && r.model_id() != st.cfg.model_id) {
    rr->set_ok(false);
    rr->set_error("model mismatch: coordinator serves " + st.cfg.model_id + ", " + r.instance() + " has " +
                  r.model_id());
  } else {
    Member& m = st.members[r.instance()];
    m.role = r.role();
    m.data_endpoint = r.data_endpoint();
    m.admin_endpoint = r.admin_endpoint();
    m.control_peer = peer.to_string();
    m.caps = {r.gpu(), r.nccl(), r.gpu_id()};
    m.last_seen = Clock::now();
    m.restarts = r.restarts();
    if (st.metrics)  // kept after the member leaves; set now, so status and /metrics agree at once
      st.metrics->restarts.Add({{"role", role_name(r.role())}, {"host", r.instance()}}).Set(double(r.restarts()));
    if (r.restarts() > 0)
      spdlog::info("coordinator: {} registered after {} restart(s) by its supervisor", r.instance(), r.restarts());
    rr->set_ok(true);
    if (r.role() == pb::EXPERT) {
      std::set<ExpertKey> pinned;
      for (const auto& e : r.experts()) pinned.insert({e.layer(), e.expert()});
      st.load.expire(m.last_seen, st.cfg.load_window);
      st.placement->set_load(st.load.totals());  // a host beyond the slots gets the hottest experts
      const uint64_t placed_before = st.placement->load_placed();
      auto assigned = st.placement->add_host(r.instance(), r.data_endpoint(), pinned, m.last_seen);
      if (st.placement->load_placed() > placed_before) {
        spdlog::info(
            "coordinator: expert host {} is beyond the {} slots: it gets the {} experts that lower the "
            "busiest host's load the most (measured load, hottest first)",
            r.instance(), st.cfg.expert_hosts, assigned.size());
        if (st.metrics) st.metrics->moves.Increment(double(st.placement->load_placed() - placed_before));
      }
      for (const auto& [layer, expert] : assigned) {
        auto* id = rr->add_assigned();
        id->set_layer(layer);
        id->set_expert(expert);
      }
      spdlog::info("coordinator: expert host {} at {} serves {} experts (placement v{})", r.instance(),
                   r.data_endpoint(), assigned.size(), st.placement->table().version);
    } else if (r.role() == pb::ATTENTION) {
      m.worker.instance = r.instance();
      m.worker.endpoint = r.data_endpoint();
      m.worker.kv_blocks = r.kv_blocks();
      spdlog::info("coordinator: attention worker {} at {} ({} KV blocks)", r.instance(), r.data_endpoint(),
                   r.kv_blocks());
    } else {
      spdlog::info("coordinator: {} {} at {}", pb::Role_Name(r.role()), r.instance(), r.data_endpoint());
    }
    rr->set_placement_version(st.placement->table().version);
  }
  self->send(st.bridge, zmq_send_atom::value, st.control, control_frames(&peer, reply));
  if (rr->ok()) publish_table(self);
}

void on_heartbeat(Self* self, const zmq::message_t& peer, const pb::Heartbeat& hb) {
  auto& st = self->state;
  auto it = st.members.find(hb.instance());
  if (it == st.members.end()) {  // we expired it, or we restarted: ask it to register again
    pb::ControlMessage reply;
    reply.mutable_register_reply()->set_ok(false);
    reply.mutable_register_reply()->set_error("unknown instance " + hb.instance() + ": register again");
    self->send(st.bridge, zmq_send_atom::value, st.control, control_frames(&peer, reply));
    return;
  }
  Member& m = it->second;
  m.last_seen = Clock::now();
  m.last = hb;
  for (const auto& l : hb.load()) m.rows_total += l.rows();
  if (m.role == pb::EXPERT) st.load.add(m.last_seen, hb);
  if (m.role == pb::EXPERT) st.placement->touch(hb.instance(), m.last_seen);
  if (m.role == pb::ATTENTION) {
    m.worker.ready = hb.ready();
    m.worker.kv_free_blocks = hb.kv_free_blocks();
    notify_workers(self);
  }
}

// Why the pair may not use NCCL ("" when it may): both registered in their roles, both with a
// GPU and NCCL (choose_transport), and an id of ncclUniqueId's size.
std::string nccl_pair_refusal(const CoordinatorState& st, const pb::NcclPairId& m) {
  auto worker = st.members.find(m.attention_instance());
  auto host = st.members.find(m.expert_instance());
  if (worker == st.members.end() || worker->second.role != pb::ATTENTION)
    return "no attention worker " + m.attention_instance() + " is registered";
  if (host == st.members.end() || host->second.role != pb::EXPERT)
    return "no expert host " + m.expert_instance() + " is registered";
  if (choose_transport(worker->second.caps, host->second.caps) != TransportKind::Nccl)
    return "the pair rule picks ZeroMQ: NCCL needs gpu and nccl on both sides, on different GPUs (worker gpu=" +
           std::to_string(worker->second.caps.gpu) + " nccl=" + std::to_string(worker->second.caps.nccl) + " " +
           worker->second.caps.gpu_id + ", host gpu=" + std::to_string(host->second.caps.gpu) +
           " nccl=" + std::to_string(host->second.caps.nccl) + " " + host->second.caps.gpu_id + ")";
  if (m.unique_id().size() != kNcclUniqueIdBytes)
    return "the NCCL unique id has " + std::to_string(m.unique_id().size()) + " bytes, expected " +
           std::to_string(kNcclUniqueIdBytes);
  return {};
}

// Relays one step of a pair's NCCL bootstrap (proto/control.proto: NcclPairId). Only the
// worker may offer and only the host may answer, each from its registered control socket.
void on_nccl_pair(Self* self, const zmq::message_t& peer, const pb::NcclPairId& m) {
  auto& st = self->state;
  auto send_to = [&](const std::string& routing_id, const pb::NcclPairId& body) {
    pb::ControlMessage out;
    *out.mutable_nccl_pair_id() = body;
    const zmq::message_t to(routing_id.data(), routing_id.size());
    self->send(st.bridge, zmq_send_atom::value, st.control, control_frames(&to, out));
  };
  const bool offer = m.stage() == pb::NcclPairId::OFFER;
  const std::string& sender = offer ? m.attention_instance() : m.expert_instance();
  auto from = st.members.find(sender);
  if (from == st.members.end() || from->second.control_peer != peer.to_string()) {
    spdlog::warn("coordinator: NCCL pair message for {} <-> {} from a peer that is not {}: dropped",
                 m.attention_instance(), m.expert_instance(), sender);
    return;
  }
  if (!offer) {  // the host's answer goes to the worker as it is
    spdlog::info("coordinator: NCCL pair {} <-> {}: {}", m.attention_instance(), m.expert_instance(),
                 m.stage() == pb::NcclPairId::JOINED ? std::string("joined") : "rejected by the host: " + m.error());
    if (auto w = st.members.find(m.attention_instance()); w != st.members.end()) send_to(w->second.control_peer, m);
    return;
  }
  if (const std::string why = nccl_pair_refusal(st, m); !why.empty()) {
    spdlog::info("coordinator: NCCL pair {} <-> {} refused: {}", m.attention_instance(), m.expert_instance(), why);
    pb::NcclPairId no = m;
    no.set_stage(pb::NcclPairId::REJECTED);
    no.clear_unique_id();
    no.set_error(why);
    send_to(from->second.control_peer, no);
    return;
  }
  send_to(st.members.at(m.expert_instance()).control_peer, m);
}

std::string status_bytes(const CoordinatorState& st) {
  pb::ClusterStatus s;
  s.set_model_id(st.cfg.model_id);
  s.set_placement_version(st.placement->table().version);
  s.set_ready(cluster_ready(st));
  s.set_replicas(st.cfg.replicas);
  s.set_expired_members(st.expired);
  s.set_placement_moves(st.placement->load_placed() + st.rebalancer->moves());
  s.set_rebalances(st.rebalancer->rebalances());
  s.set_rebalancing(st.rebalancer->phase() != LiveRebalancer::Phase::Idle);
  for (const auto& [layer, expert] : st.placement->uncovered()) {
    auto* id = s.add_uncovered();
    id->set_layer(layer);
    id->set_expert(expert);
  }
  auto now = Clock::now();
  for (const auto& [name, m] : st.members) {
    auto* o = s.add_services();
    o->set_instance(name);
    o->set_role(m.role);
    o->set_data_endpoint(m.data_endpoint);
    o->set_admin_endpoint(m.admin_endpoint);
    o->set_live(true);
    o->set_ready(m.role == pb::ATTENTION ? m.worker.ready : m.last.ready());
    o->set_last_heartbeat_age_s(std::chrono::duration<double>(now - m.last_seen).count());
    o->set_rows_total(m.rows_total);
    o->set_kv_free_blocks(m.last.kv_free_blocks());
    o->set_resident_bytes(m.last.resident_bytes());
    o->set_mapped_weight_bytes(m.last.mapped_weight_bytes());
    o->set_restarts(m.restarts);
    o->set_waiting_dispatches(m.last.waiting_dispatches());
    for (const auto& h : st.placement->table().hosts)
      if (h.instance == name)
        for (const auto& [layer, expert] : h.experts) {
          auto* id = o->add_experts();
          id->set_layer(layer);
          id->set_expert(expert);
        }
  }
  return s.SerializeAsString();
}

// Removes the members silent for longer than `timeout` (the heartbeat timeout, or the suspect
// grace after a control connection dropped).
void expire(Self* self, Clock::duration timeout, bool after_drop = false) {
  auto& st = self->state;
  auto now = Clock::now();
  bool changed = false;
  for (auto it = st.members.begin(); it != st.members.end();) {
    if (now - it->second.last_seen > timeout) {
      spdlog::warn(
          "coordinator: {} missed its heartbeats, removed{}", it->first,
          after_drop
              ? fmt::format(" (a control connection dropped; silent for {} ms)",
                            std::chrono::duration_cast<std::chrono::milliseconds>(now - it->second.last_seen).count())
              : std::string());
      ++st.expired;
      if (it->second.role == pb::EXPERT) st.placement->remove_host(it->first);
      if (st.metrics && st.metrics->expired_by_role.count(it->second.role))
        st.metrics->expired_by_role[it->second.role]->Increment();
      it = st.members.erase(it);
      changed = true;
    } else {
      ++it;
    }
  }
  if (changed) notify_workers(self);
  auto missing = st.placement->uncovered();
  if (changed && !missing.empty())
    spdlog::warn("coordinator: {} experts have no live host (e.g. layer {} expert {})", missing.size(),
                 missing[0].first, missing[0].second);
}

// Carries out what the rebalancer asked for: assignments to hosts, a new table, log lines.
void apply(Self* self, const RebalanceActions& a) {
  auto& st = self->state;
  for (const auto& line : a.log) spdlog::info("coordinator: {}", line);
  for (const auto& as : a.assign) {
    auto m = st.members.find(as.instance);
    if (m == st.members.end()) continue;  // it left; the rebalancer sees that on its tick
    pb::ControlMessage msg;
    auto* body = msg.mutable_assign_experts();
    body->set_version(as.version);
    for (const auto& [layer, expert] : as.experts) {
      auto* id = body->add_experts();
      id->set_layer(layer);
      id->set_expert(expert);
    }
    const zmq::message_t to(m->second.control_peer.data(), m->second.control_peer.size());
    self->send(st.bridge, zmq_send_atom::value, st.control, control_frames(&to, msg));
  }
  if (a.publish) publish_table(self);
}

// Runs one rebalancer step (a tick or an answer), carries it out and counts what it did.
template <class Step>
void rebalancer_step(Self* self, Step step) {
  auto& st = self->state;
  LiveRebalancer& r = *st.rebalancer;
  const uint64_t done = r.rebalances(), aborted = r.aborted(), moves = r.moves();
  apply(self, step(r));
  if (!st.metrics) return;
  st.metrics->rebalances.Add({{"outcome", "done"}}).Increment(double(r.rebalances() - done));
  st.metrics->rebalances.Add({{"outcome", "aborted"}}).Increment(double(r.aborted() - aborted));
  st.metrics->moves.Increment(double(r.moves() - moves));
  st.metrics->rebalancing.Set(r.phase() != LiveRebalancer::Phase::Idle);
}

void rebalance_tick(Self* self) {
  auto& st = self->state;
  bool hosts_ready = true;
  std::vector<uint64_t> versions;  // what each attention worker applied
  for (const auto& [name, m] : st.members) {
    if (m.role == pb::EXPERT) hosts_ready = hosts_ready && m.last.ready();
    if (m.role == pb::ATTENTION) versions.push_back(m.last.placement_version());
  }
  rebalancer_step(self, [&](LiveRebalancer& r) {
    return r.tick(Clock::now(), *st.placement, st.load.totals(), hosts_ready, versions);
  });
}

void publish_metrics(CoordinatorState& st) {
  st.load.expire(Clock::now(), st.cfg.load_window);
  if (!st.metrics) return;
  auto& m = *st.metrics;
  std::map<pb::Role, int> live;
  for (const auto& [name, member] : st.members) ++live[member.role];
  for (auto& [role, g] : m.live) g->Set(live[role]);
  const PlacementTable& table = st.placement->table();
  m.placement_version.Set(double(table.version));
  std::map<ExpertKey, int> copies;
  std::map<std::string, prometheus::Gauge*> hosts;
  for (const auto& h : table.hosts) {
    for (const auto& k : h.experts) ++copies[k];
    auto it = m.per_host.find(h.instance);
    prometheus::Gauge* g = it != m.per_host.end() ? it->second : &m.host_experts.Add({{"host", h.instance}});
    g->Set(double(h.experts.size()));
    hosts[h.instance] = g;
  }
  for (auto& [name, g] : m.per_host)  // a host that left takes its series with it
    if (!hosts.count(name)) m.host_experts.Remove(g);
  m.per_host = std::move(hosts);
  int uncovered = 0;
  for (auto& [key, g] : m.replicas) {
    const int n = copies.count(key) ? copies[key] : 0;
    g->Set(n);
    uncovered += n == 0;
  }
  m.uncovered.Set(uncovered);
  for (auto& [layer, g] : m.imbalance_by_layer) g->Set(st.load.imbalance(layer, st.cfg.num_experts));
}

caf::behavior coordinator(Self* self, ZmqBridge* bridge, int control, int publish, CoordinatorConfig cfg,
                          caf::actor listener) {
  auto& st = self->state;
  st.bridge = bridge->actor();
  st.control = control;
  st.publish = publish;
  st.listener = std::move(listener);
  st.placement =
      std::make_unique<Placement>(PlacementPlan(cfg.moe_layers, cfg.num_experts, cfg.expert_hosts, cfg.replicas));
  st.cfg = std::move(cfg);
  if (st.cfg.metrics) st.metrics = std::make_unique<CoordinatorMetrics>(st.cfg.metrics, st.cfg);
  st.cfg.rebalance.min_replicas = st.cfg.replicas;
  st.rebalancer = std::make_unique<LiveRebalancer>(st.cfg.rebalance);
  self->send(self, tick_atom::value);
  return {
      [=](zmq_recv_atom, int, FramesPtr frames) {
        // ROUTER: [peer id, ControlMessage]
        if (!frames || frames->size() != 2) {
          spdlog::warn("coordinator: dropped a control message of {} frames", frames ? frames->size() : 0);
          return;
        }
        pb::ControlMessage msg;
        const auto& body = (*frames)[1];
        if (!msg.ParseFromArray(body.data(), int(body.size()))) {
          spdlog::warn("coordinator: dropped an unparsable control message ({} bytes)", body.size());
          return;
        }
        const auto& peer = (*frames)[0];
        switch (msg.body_case()) {
          case pb::ControlMessage::kRegister:
            on_register(self, peer, msg.register_());
            break;
          case pb::ControlMessage::kHeartbeat:
            on_heartbeat(self, peer, msg.heartbeat());
            break;
          case pb::ControlMessage::kNcclPairId:
            on_nccl_pair(self, peer, msg.nccl_pair_id());
            break;
          case pb::ControlMessage::kExpertsLoaded: {
            const auto& l = msg.experts_loaded();
            auto& st = self->state;
            auto m = st.members.find(l.instance());
            if (m == st.members.end() || m->second.control_peer != peer.to_string()) break;  // not who it says
            rebalancer_step(self, [&](LiveRebalancer& r) {
              return r.on_loaded(Clock::now(), *st.placement, l.instance(), l.version(), l.error());
            });
            break;
          }
          case pb::ControlMessage::kStatusRequest: {
            pb::ControlMessage reply;
            reply.mutable_status()->ParseFromString(status_bytes(self->state));
            self->send(self->state.bridge, zmq_send_atom::value, self->state.control, control_frames(&peer, reply));
            break;
          }
          default:
            spdlog::warn("coordinator: unexpected control message kind {}", int(msg.body_case()));
        }
      },
      [=](zmq_event_atom, int, const PeerEvent& e) {
        // A member's control connection dropped (it died, or its pings went unanswered): check
        // who is silent one grace later, rather than after the whole heartbeat timeout.
        if (e.kind != PeerEvent::Disconnected || self->state.cfg.suspect_grace.count() <= 0) return;
        self->state.last_drop = Clock::now();
        if (self->state.suspect_armed) return;  // that check arms the next one if it comes too early for this drop
        self->state.suspect_armed = true;
        self->delayed_send(self, self->state.cfg.suspect_grace, suspect_atom::value);
      },
      [=](suspect_atom) {
        auto& st = self->state;
        st.suspect_armed = false;
        expire(self, st.cfg.suspect_grace, /*after_drop=*/true);
        publish_table(self);
        // A drop while this check was pending (a second member died): its own check, one grace
        // after it, or that member would wait for the whole heartbeat timeout.
        const auto next = st.last_drop + st.cfg.suspect_grace;
        if (const auto now = Clock::now(); next > now) {
          st.suspect_armed = true;
          self->delayed_send(
              self, std::chrono::duration_cast<std::chrono::milliseconds>(next - now) + std::chrono::milliseconds(1),
              suspect_atom::value);
        }
      },
      [=](tick_atom) {
        expire(self, self->state.cfg.heartbeat_timeout);
        publish_table(self);
        publish_metrics(self->state);  // expires the load window too
        rebalance_tick(self);
        self->delayed_send(self, self->state.cfg.publish_interval, tick_atom::value);
      },
      [=](ready_atom) { return cluster_ready(self->state); },
      [=](status_atom) { return status_bytes(self->state); },
  };
}

}  // namespace

caf::actor spawn_coordinator(caf::actor_system& sys, ZmqBridge& bridge, int control, int publish, CoordinatorConfig cfg,
                             caf::actor listener) {
  // Its own thread: heartbeats must be stamped on time even when the router is busy.
  caf::actor a = sys.spawn<caf::detached>(coordinator, &bridge, control, publish, std::move(cfg), std::move(listener));
  bridge.route(control, a);
  bridge.watch(control, a);
  return a;
}

}  // namespace moemesh::actors
