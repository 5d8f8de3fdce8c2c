#include "core/eplb.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "core/error.h"

namespace moemesh {
namespace {

struct State {
  std::vector<EplbHost> hosts;
  std::map<ExpertKey, int> replicas;
  std::vector<double> loads;  // per host
};

double load_of(const std::map<ExpertKey, double>& load, const ExpertKey& k) {
  auto it = load.find(k);
  return it == load.end() ? 0.0 : it->second;
}

void recompute(State& s, const std::map<ExpertKey, double>& load) {
  s.replicas.clear();
  for (const auto& h : s.hosts)
    for (const auto& k : h.experts) ++s.replicas[k];
  s.loads.assign(s.hosts.size(), 0.0);
  for (size_t i = 0; i < s.hosts.size(); ++i)
    for (const auto& k : s.hosts[i].experts) s.loads[i] += load_of(load, k) / s.replicas[k];
}

// One candidate change: add `expert` to host `to`, optionally dropping it from `from` (a move) and
// optionally first dropping `evict` from `to` (to make room).
struct Change {
  ExpertKey expert;
  size_t to = 0;
  std::optional<size_t> from;
  std::optional<ExpertKey> evict;
  double new_max = std::numeric_limits<double>::infinity();
  double spread = 0;  // sum of squared host loads after it: lower wins a tie (more even)
  int cost = 0;       // changes made: fewer wins a remaining tie
};

// The busiest host's load after `c`, and the sum of the squared loads (on a copy of the loads).
std::pair<double, double> max_after(const State& s, const std::map<ExpertKey, double>& load, const Change& c) {
  std::vector<double> l = s.loads;
  auto reshare = [&](const ExpertKey& k, int before, int after, std::optional<size_t> leaving,
                     std::optional<size_t> joining) {
    const double w = load_of(load, k);
    for (size_t i = 0; i < s.hosts.size(); ++i) {
      const bool holds = s.hosts[i].experts.count(k) > 0;
      if (leaving && i == *leaving) {
        l[i] -= w / before;
      } else if (holds) {
        l[i] += w / after - w / before;
      }
    }
    if (joining) l[*joining] += w / after;
  };
  if (c.evict) reshare(*c.evict, s.replicas.at(*c.evict), s.replicas.at(*c.evict) - 1, c.to, std::nullopt);
  const int r = s.replicas.count(c.expert) ? s.replicas.at(c.expert) : 0;
  if (c.from)
    reshare(c.expert, r, r, c.from, c.to);
  else
    reshare(c.expert, std::max(r, 1), r + 1, std::nullopt, c.to);
  double squares = 0;
  for (double x : l) squares += x * x;
  return {*std::max_element(l.begin(), l.end()), squares};
}

bool has_room(const EplbHost& h, const EplbOptions& o, size_t extra = 1) {
  return h.memory_budget <= 0 || int64_t(h.experts.size() + extra) * o.expert_bytes <= h.memory_budget;
}

}  // namespace

std::map<std::string, double> host_loads(const std::vector<EplbHost>& hosts, const std::map<ExpertKey, double>& load) {
  State s{hosts, {}, {}};
  recompute(s, load);
  std::map<std::string, double> out;
  for (size_t i = 0; i < hosts.size(); ++i) out[hosts[i].instance] = s.loads[i];
  return out;
}

EplbPlan plan_placement(const std::vector<EplbHost>& hosts, const std::map<ExpertKey, double>& load,
                        const EplbOptions& opts) {
  if (hosts.empty()) throw Error("placement plan: no expert hosts");
  std::set<std::string> names;
  for (const auto& h : hosts) {
    if (h.instance.empty()) throw Error("placement plan: an expert host without an instance name");
    if (!names.insert(h.instance).second) throw Error("placement plan: expert host " + h.instance + " listed twice");
    if (h.memory_budget < 0) throw Error("placement plan: negative memory budget for " + h.instance);
  }
  for (const auto& [k, w] : load)
    if (!(w >= 0))
      throw Error("placement plan: load of layer " + std::to_string(k.first) + " expert " + std::to_string(k.second) +
                  " is negative or not a number");
  if (opts.expert_bytes < 1) throw Error("placement plan: expert_bytes must be at least 1");
  if (opts.move_budget < 0) throw Error("placement plan: negative move budget");
  if (!(opts.min_gain >= 0 && opts.min_gain < 1)) throw Error("placement plan: min_gain must be in [0, 1)");
  if (opts.min_replicas < 1) throw Error("placement plan: min_replicas must be at least 1");
  if (!opts.grow_host.empty() && !names.count(opts.grow_host))
    throw Error("placement plan: the host to grow, " + opts.grow_host + ", is not among the hosts");
  // May `i` take experts? (With grow_host only that one.)
  auto may_take = [&](size_t i) { return opts.grow_host.empty() || hosts[i].instance == opts.grow_host; };

  EplbPlan plan;
  State s{hosts, {}, {}};
  recompute(s, load);
  plan.busiest_before = *std::max_element(s.loads.begin(), s.loads.end());
  int64_t budget = opts.move_budget > 0 ? opts.move_budget : std::numeric_limits<int64_t>::max();
  auto add = [&](size_t to, const ExpertKey& k) {
    s.hosts[to].experts.insert(k);
    plan.moves.push_back({s.hosts[to].instance, k, true});
    plan.bytes_loaded += opts.expert_bytes;
    budget -= opts.expert_bytes;
  };
  auto drop = [&](size_t from, const ExpertKey& k) {
    s.hosts[from].experts.erase(k);
    plan.moves.push_back({s.hosts[from].instance, k, false});
  };

  // Coverage first: every known expert on min_replicas hosts (or all of them), the least loaded first.
  std::set<ExpertKey> known;
  for (const auto& [k, w] : load) known.insert(k);
  for (const auto& h : hosts) known.insert(h.experts.begin(), h.experts.end());
  const int want = std::min<int>(opts.min_replicas, int(hosts.size()));
  for (const ExpertKey& k : known) {
    while ((s.replicas.count(k) ? s.replicas[k] : 0) < want && budget >= opts.expert_bytes) {
      std::optional<size_t> to;
      for (size_t i = 0; i < s.hosts.size(); ++i)
        if (may_take(i) && !s.hosts[i].experts.count(k) && has_room(s.hosts[i], opts) &&
            (!to || s.loads[i] < s.loads[*to]))
          to = i;
      if (!to) break;
      add(*to, k);
      recompute(s, load);
    }
  }
  const State covered = s;
  const size_t coverage_moves = plan.moves.size();
  const int64_t coverage_bytes = plan.bytes_loaded;

  // Then the busiest host, one loaded expert at a time.
  for (int round = 0; round < 100000 && budget >= opts.expert_bytes; ++round) {
    const size_t busy = size_t(std::max_element(s.loads.begin(), s.loads.end()) - s.loads.begin());
    const double current = s.loads[busy];
    if (current <= 0) break;
    Change best;
    auto consider = [&](Change c) {
      std::tie(c.new_max, c.spread) = max_after(s, load, c);
      const double eps = 1e-12 * std::max(1.0, c.new_max);
      if (std::isinf(best.new_max) || c.new_max < best.new_max - eps ||
          (std::abs(c.new_max - best.new_max) <= eps &&
           (c.spread < best.spread * (1 - 1e-12) ||
            (std::abs(c.spread - best.spread) <= 1e-12 * std::max(1.0, best.spread) && c.cost < best.cost))))
        best = c;
    };
    // Its experts, largest per-replica share first.
    std::vector<std::pair<double, ExpertKey>> mine;
    for (const auto& k : s.hosts[busy].experts)
      if (load_of(load, k) > 0) mine.push_back({load_of(load, k) / s.replicas[k], k});
    std::sort(mine.begin(), mine.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (const auto& [share, k] : mine) {
      for (size_t t = 0; t < s.hosts.size(); ++t) {
        if (t == busy || s.hosts[t].experts.count(k) || !may_take(t)) continue;
        std::vector<std::optional<ExpertKey>> evictions;
        if (has_room(s.hosts[t], opts)) {
          evictions.push_back(std::nullopt);
        } else if (opts.grow_host.empty()) {
          // Room by giving back the coldest replica there that has another copy.
          std::optional<ExpertKey> cold;
          for (const auto& c : s.hosts[t].experts)
            if (s.replicas[c] > opts.min_replicas && has_room(s.hosts[t], opts, 0) &&
                (!cold || load_of(load, c) / s.replicas[c] < load_of(load, *cold) / s.replicas[*cold]))
              cold = c;
          if (cold) evictions.push_back(cold);
        }
        for (const auto& ev : evictions) {
          const int extra = ev ? 1 : 0;
          consider({k, t, std::nullopt, ev, 0, 0, 1 + extra});                      // another replica
          if (opts.grow_host.empty()) consider({k, t, busy, ev, 0, 0, 2 + extra});  // a move
        }
      }
    }
    if (!(best.new_max < current - 1e-9 * std::max(1.0, current))) break;
    if (best.evict) drop(best.to, *best.evict);
    add(best.to, best.expert);
    if (best.from) drop(*best.from, best.expert);
    recompute(s, load);
  }

  plan.busiest_after = *std::max_element(s.loads.begin(), s.loads.end());
  const double before = *std::max_element(covered.loads.begin(), covered.loads.end());
  if (plan.moves.size() > coverage_moves && before - plan.busiest_after < opts.min_gain * before) {
    s = covered;  // not worth moving weights for
    plan.moves.resize(coverage_moves);
    plan.bytes_loaded = coverage_bytes;
    plan.busiest_after = before;
  }
  plan.hosts = std::move(s.hosts);
  return plan;
}

}  // namespace moemesh
