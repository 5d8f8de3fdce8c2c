#include "core/live_rebalance.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>

#include "core/error.h"

namespace moemesh {
namespace {

std::string count_text(size_t n, const char* what) { return std::to_string(n) + " " + what + (n == 1 ? "" : "s"); }

}  // namespace

LiveRebalancer::LiveRebalancer(RebalanceOptions opts) : opts_(opts) {
  if (opts_.headroom < 0) throw Error("rebalance: the headroom must not be negative");
  if (opts_.max_moves < 1) throw Error("rebalance: the move budget must be at least 1 expert");
  if (opts_.min_gain < 0 || opts_.min_gain >= 1) throw Error("rebalance: the minimum gain must be in [0, 1)");
}

RebalanceActions LiveRebalancer::tick(Clock::time_point now, Placement& placement,
                                      const std::map<ExpertKey, double>& load, bool hosts_ready,
                                      const std::vector<uint64_t>& worker_versions) {
  RebalanceActions out;
  switch (phase_) {
    case Phase::Idle:
      if (opts_.interval.count() <= 0 || now < next_plan_) break;
      next_plan_ = now + opts_.interval;
      if (hosts_ready && placement.uncovered().empty()) plan(now, placement, load, out);
      break;
    case Phase::Loading: {
      for (const auto& name : pending_)
        if (placement.table().hosts.end() == std::find_if(placement.table().hosts.begin(),
                                                          placement.table().hosts.end(),
                                                          [&](const PlacementHost& h) { return h.instance == name; }))
          return abort("expert host " + name + " left while loading", out), out;
      if (now - since_ > opts_.load_timeout) abort(count_text(pending_.size(), "host") + " did not load in time", out);
      break;
    }
    case Phase::Switching: {
      const bool all =
          std::all_of(worker_versions.begin(), worker_versions.end(), [&](uint64_t v) { return v >= table_version_; });
      if (!all && now - since_ <= opts_.switch_timeout) break;
      if (!all)
        out.log.push_back("re-placement " + std::to_string(version_) +
                          ": not every attention worker applied placement v" + std::to_string(table_version_) +
                          " in time; dropping anyway (late dispatches go to replicas)");
      drop(now, out);
      break;
    }
    case Phase::Dropping:
      if (now - since_ > opts_.load_timeout) {
        out.log.push_back("re-placement " + std::to_string(version_) + ": " + count_text(pending_.size(), "host") +
                          " did not confirm the drop in time");
        finish(out);
      }
      break;
  }
  return out;
}

RebalanceActions LiveRebalancer::on_loaded(Clock::time_point now, Placement& placement, const std::string& instance,
                                           uint64_t version, const std::string& error) {
  RebalanceActions out;
  if (version != version_ || !pending_.count(instance)) return out;  // an old or a repeated answer
  if (phase_ == Phase::Loading) {
    if (!error.empty()) {
      abort("expert host " + instance + " refused: " + error, out);
      return out;
    }
    changes_[instance].loaded = true;
    pending_.erase(instance);
    if (pending_.empty()) switch_placement(now, placement, out);
  } else if (phase_ == Phase::Dropping) {
    if (!error.empty())
      out.log.push_back("re-placement " + std::to_string(version_) + ": expert host " + instance +
                        " could not drop: " + error);
    pending_.erase(instance);
    if (pending_.empty()) finish(out);
  }
  return out;
}

void LiveRebalancer::plan(Clock::time_point now, Placement& placement, const std::map<ExpertKey, double>& load,
                          RebalanceActions& out) {
  double rows = 0;
  for (const auto& [k, n] : load) rows += n;
  if (rows < opts_.min_rows) return;
  const PlacementTable& table = placement.table();
  if (table.hosts.size() < 2) return;
  for (const auto& h : table.hosts)
    if (placement.pinned(h.instance)) {
      if (!said_pinned_)
        out.log.push_back("no live re-placement: expert host " + h.instance +
                          " was started with pinned experts (--experts)");
      said_pinned_ = true;
      return;
    }
  // Layer by layer: every layer's step waits for its own busiest host, so the objective is the
  // sum over layers of each layer's busiest host's load, and each layer is planned on its own
  // (hottest layers first, while the move budget lasts). A host's room in a layer is its share of
  // the layer's experts plus the headroom.
  std::map<int32_t, std::map<ExpertKey, double>> layer_load;
  for (const auto& [k, n] : load) layer_load[k.first][k] = n;
  std::set<int32_t> layers;
  for (const auto& h : table.hosts)
    for (const auto& k : h.experts) layers.insert(k.first);
  std::vector<std::pair<double, int32_t>> order;  // (the layer's rows, layer), hottest first
  for (int32_t layer : layers) {
    double rows_l = 0;
    for (const auto& [k, n] : layer_load[layer]) rows_l += n;
    order.push_back({-rows_l, layer});
  }
  std::sort(order.begin(), order.end());
  std::vector<EplbHost> hosts;  // the whole placement, as planned so far
  for (const auto& h : table.hosts) hosts.push_back({h.instance, h.experts, 0});
  int64_t moves_left = opts_.max_moves;
  size_t moves = 0;
  double before = 0, after = 0;
  for (const auto& [hotness, layer] : order) {
    std::set<ExpertKey> in_layer;
    std::vector<EplbHost> part;
    for (const auto& h : hosts) {
      EplbHost x{h.instance, {}, 0};
      for (const auto& k : h.experts)
        if (k.first == layer) x.experts.insert(k), in_layer.insert(k);
      part.push_back(std::move(x));
    }
    const double share = double(in_layer.size()) * opts_.min_replicas / double(part.size());
    for (auto& x : part)
      x.memory_budget = std::max(int64_t(std::ceil(share * (1.0 + opts_.headroom))), int64_t(x.experts.size()));
    EplbOptions eo;
    eo.expert_bytes = 1;
    eo.move_budget = moves_left;
    eo.min_gain = opts_.min_gain;
    eo.min_replicas = opts_.min_replicas;
    if (moves_left <= 0) break;
    const EplbPlan p = plan_placement(part, layer_load[layer], eo);
    before += p.busiest_before;
    after += p.changed() ? p.busiest_after : p.busiest_before;
    if (!p.changed()) continue;
    moves += p.moves.size();
    moves_left -= p.bytes_loaded;
    for (size_t i = 0; i < hosts.size(); ++i) {
      std::erase_if(hosts[i].experts, [&](const ExpertKey& k) { return k.first == layer; });
      hosts[i].experts.insert(p.hosts[i].experts.begin(), p.hosts[i].experts.end());
    }
  }
  if (moves == 0) return;
  ++version_;
  changes_.clear();
  pending_.clear();
  for (size_t i = 0; i < hosts.size(); ++i) {
    const PlacementHost& was = table.hosts[i];
    if (hosts[i].experts == was.experts) continue;
    Change c{was.experts, hosts[i].experts, was.experts, false};
    c.both.insert(c.after.begin(), c.after.end());
    if (c.both != c.before) {
      out.assign.push_back({was.instance, version_, c.both});
      pending_.insert(was.instance);
    }
    changes_[was.instance] = std::move(c);
  }
  planned_moves_ = moves;
  char gain[128];
  std::snprintf(gain, sizeof gain, "sum over layers of the busiest host's load %.0f -> %.0f rows", before, after);
  out.log.push_back("re-placement " + std::to_string(version_) + ": " + count_text(moves, "move") + " on " +
                    count_text(changes_.size(), "host") + " (" + gain + ")");
  phase_ = Phase::Loading;
  since_ = now;
  if (pending_.empty()) switch_placement(now, placement, out);
}

void LiveRebalancer::switch_placement(Clock::time_point now, Placement& placement, RebalanceActions& out) {
  for (const auto& [name, c] : changes_) placement.reassign(name, c.after);
  table_version_ = placement.table().version;
  out.publish = true;
  phase_ = Phase::Switching;
  since_ = now;
}

void LiveRebalancer::drop(Clock::time_point now, RebalanceActions& out) {
  pending_.clear();
  for (const auto& [name, c] : changes_)
    if (c.both != c.after) {
      out.assign.push_back({name, version_, c.after});
      pending_.insert(name);
    }
  phase_ = Phase::Dropping;
  since_ = now;
  if (pending_.empty()) finish(out);
}

void LiveRebalancer::abort(const std::string& why, RebalanceActions& out) {
  for (const auto& [name, c] : changes_)
    if (c.loaded) out.assign.push_back({name, version_, c.before});  // unload what it loaded for nothing
  out.log.push_back("re-placement " + std::to_string(version_) + " aborted: " + why);
  ++aborted_;
  changes_.clear();
  pending_.clear();
  phase_ = Phase::Idle;
}

void LiveRebalancer::finish(RebalanceActions& out) {
  ++done_;
  moves_ += planned_moves_;
  out.log.push_back("re-placement " + std::to_string(version_) + " done: " + count_text(planned_moves_, "move"));
  changes_.clear();
  pending_.clear();
  phase_ = Phase::Idle;
}

}  // namespace moemesh
