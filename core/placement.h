// Expert placement: which expert host serves which (layer, expert).
//
// The coordinator cuts the model's experts into `slots` (one per expected expert host), each
// expert in `replicas` consecutive slots, so every expert has a home on at least one host and
// R copies when R hosts or more exist. A host that registers without pinned experts takes the
// first free slot — or the slot of a host that died, which is how a replacement takes over
// its experts. A host beyond the slots (the pool scaled out) gets, once load has been measured
// (set_load), the experts that lower the busiest host's load the most, hottest first
// (core/eplb.h, grow mode, as many as a slot holds); before any load is known, a copy of a slot,
// round robin. The table clients see lists only live hosts.
#pragma once
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace moemesh {

using ExpertKey = std::pair<int32_t, int32_t>;  // (layer, expert)

struct PlacementHost {
  std::string instance;
  std::string endpoint;
  std::set<ExpertKey> experts;
};

struct PlacementTable {
  uint64_t version = 0;
  std::vector<PlacementHost> hosts;  // live hosts only, ordered by instance
  // Hosts serving (layer, expert), in table order; empty when none.
  std::vector<const PlacementHost*> hosts_for(int32_t layer, int32_t expert) const;
};

// Which of an expert's n replicas a client tries first for (layer, expert): a rotation fixed per
// layer, expert and client (salt), so replicas given equal rows share the load instead of the
// first always winning the tie. The attention worker and the planner's simulator both use it.
size_t replica_rotation(int64_t layer, int32_t expert, uint64_t salt, size_t n);

class PlacementPlan {
 public:
  // moe_layers: the layers that have routed experts. Throws moemesh::Error on bad sizes.
  PlacementPlan(std::vector<int32_t> moe_layers, int32_t num_experts, int32_t slots, int32_t replicas);

  int32_t slots() const { return int32_t(slot_experts_.size()); }
  const std::set<ExpertKey>& slot(int32_t i) const { return slot_experts_.at(i); }
  const std::vector<ExpertKey>& all_experts() const { return all_; }

 private:
  std::vector<ExpertKey> all_;
  std::vector<std::set<ExpertKey>> slot_experts_;
};

// The coordinator's view of expert hosts: registration, liveness, and the table it publishes.
class Placement {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Placement(PlacementPlan plan);

  // Registers (or re-registers) a host. Pinned experts are taken as given; otherwise the host
  // gets the slot it had before, if any, else the first free slot. Returns the experts it must serve. Bumps the version
  // when anything changed.
  std::set<ExpertKey> add_host(const std::string& instance, const std::string& endpoint,
                               const std::set<ExpertKey>& pinned, Clock::time_point now);
  // A heartbeat; false when the host is unknown (it must register again).
  bool touch(const std::string& instance, Clock::time_point now);
  // Drops hosts silent for longer than timeout; returns their names.
  std::vector<std::string> expire(Clock::time_point now, Clock::duration timeout);
  void remove_host(const std::string& instance);
  // The measured rows per expert (the coordinator's load window), for hosts beyond the slots.
  void set_load(std::map<ExpertKey, double> load) { load_ = std::move(load); }
  // Experts placed by load on hosts beyond the slots, since the start.
  uint64_t load_placed() const { return load_placed_; }

  // Live re-placement (EPLB): the host serves `experts` from now on, and a host that later takes
  // its slot (a replacement after it dies) gets them too. False, and nothing changes, for an
  // unknown or a pinned host.
  bool reassign(const std::string& instance, std::set<ExpertKey> experts);
  // Hosts registered with their experts given (--experts): re-placement leaves them alone.
  bool pinned(const std::string& instance) const;
  // The most experts any slot was cut with (what a host's memory is sized for).
  size_t largest_slot() const;

  const PlacementTable& table() const { return table_; }
  // Experts with no live host (the cluster is not ready while any exist).
  std::vector<ExpertKey> uncovered() const;
  const PlacementPlan& plan() const { return plan_; }

 private:
  struct Host {
    std::string endpoint;
    std::set<ExpertKey> experts;
    std::optional<int32_t> slot;
    Clock::time_point last_seen;
    bool pinned = false;
  };
  void rebuild();

  PlacementPlan plan_;
  std::map<std::string, Host> hosts_;
  std::vector<std::set<ExpertKey>> slot_sets_;  // what each slot holds now (the plan's, then re-placed)
  // The slot each host last had, kept after it expires: a host that comes back still serves
  // (and has loaded) its old slot's experts, so it gets that slot again.
  std::map<std::string, int32_t> last_slot_;
  std::map<std::string, std::set<ExpertKey>> last_by_load_;  // the same for hosts placed by load
  std::map<ExpertKey, double> load_;
  uint64_t load_placed_ = 0;
  PlacementTable table_;
};

}  // namespace moemesh
