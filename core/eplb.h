// Load-driven expert placement (the EPLB idea): a pure function from (placement, measured load,
// memory budgets, move budget, gain threshold) to a new placement and the moves that reach it.
//
// Model. An expert's load is the rows it computed over the load window; the attention workers
// spread an expert's rows evenly over its replicas (actors/remote_experts: least rows first), so a
// host's load is the sum over its experts of load(e) / replicas(e). Every step waits for the
// busiest host, so the objective is to minimise the busiest host's load.
//
// Algorithm (greedy, deterministic). Repeatedly take the busiest host and its expert with the
// largest per-replica share, and try, on every other host with room for it (memory budget):
//   - add a replica of it there (hot experts get more replicas), or
//   - move it there (drop it from the busiest host, when it has another replica or the move
//     keeps it covered),
// and, on a host without room, the same after dropping that host's coldest expert that has
// another replica (cold experts give replicas back). Each try loads one expert: it must fit the
// remaining move budget (bytes loaded in this call). The try that lowers the busiest host's load
// the most is applied; it stops when none lowers it. If the whole plan lowers the busiest load
// by less than `min_gain` (relative), the placement is returned unchanged: small gains are not
// worth moving weights for, and this keeps placement from flapping.
//
// Invariants of the result: every expert of the input (and every expert with load) is on at least
// `min_replicas` hosts (or on every host when there are fewer), no host is above its memory
// budget unless it already was (then it only shrinks), and the bytes of added experts are within
// the move budget. A new, empty host gets the hottest experts first (scaling out).
#pragma once
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/placement.h"

namespace moemesh {

struct EplbHost {
  std::string instance;
  std::set<ExpertKey> experts;
  int64_t memory_budget = 0;  // bytes of expert weights it may hold; 0: no limit
};

struct EplbOptions {
  int64_t expert_bytes = 1;  // bytes of one expert's weights (all experts of a model are alike)
  int64_t move_budget = 0;   // bytes of experts newly loaded per call; 0: no limit
  double min_gain = 0.05;    // relative drop of the busiest host's load needed to change anything
  int min_replicas = 1;      // copies every expert keeps
  // When set: only add experts, and only to this host (one joining the pool, which loads them
  // when it registers; the others keep what they hold). Scaling out with it puts the hottest
  // experts on the new host first.
  std::string grow_host = {};
};

struct EplbMove {
  std::string host;
  ExpertKey expert;
  bool add = true;  // false: drop it from the host
  bool operator==(const EplbMove&) const = default;
};

struct EplbPlan {
  std::vector<EplbHost> hosts;                   // the new placement, hosts in input order
  std::vector<EplbMove> moves;                   // adds and drops, in the order the algorithm chose them
  double busiest_before = 0, busiest_after = 0;  // the busiest host's load
  int64_t bytes_loaded = 0;
  bool changed() const { return !moves.empty(); }
};

// Host loads of a placement under the model above (experts with no host contribute nothing).
std::map<std::string, double> host_loads(const std::vector<EplbHost>& hosts, const std::map<ExpertKey, double>& load);

// Throws moemesh::Error on bad input: no hosts, a duplicate or empty instance name, a negative
// load, budget or expert size, min_gain outside [0, 1), min_replicas < 1.
EplbPlan plan_placement(const std::vector<EplbHost>& hosts, const std::map<ExpertKey, double>& load,
                        const EplbOptions& opts);

}  // namespace moemesh
