// Live load-driven re-placement (EPLB) as a state machine the coordinator drives: when to plan
// (core/eplb.h decides what, layer by layer), and the order of a move that loses and stalls nothing.
//
// A re-placement runs in three phases:
//   1. Loading: every host that gains experts is told to hold the union of its old and new sets
//      (AssignExperts); it maps the new ones and answers (ExpertsLoaded). Nothing routes to them
//      yet. A refusal, a host that leaves, or `load_timeout` aborts the whole move: the hosts
//      that loaded are told their old sets again, and the placement never changed.
//   2. Switching: the placement gets the new sets (one table version, published by the caller);
//      it waits until every attention worker has applied that version (their heartbeats), or
//      `switch_timeout`.
//   3. Dropping: hosts that lose experts are told their new sets and unmap the rest. A dispatch
//      still on its way to a dropped expert is answered unknown_expert and goes to a replica.
// Then it is idle for `interval` before planning again. Hosts registered with pinned experts
// are never re-placed (with any, nothing is).
#pragma once
#include <chrono>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/eplb.h"
#include "core/placement.h"

namespace moemesh {

struct RebalanceOptions {
  std::chrono::milliseconds interval{0};  // 0: never re-place
  // In each layer a host may hold this much more than its share of the layer's experts (its room).
  double headroom = 0.25;
  int max_moves = 8;       // experts newly loaded per re-placement (the move budget)
  double min_gain = 0.10;  // relative drop of the busiest host's load worth a move
  double min_rows = 1000;  // rows in the load window before the load is trusted
  int min_replicas = 1;
  std::chrono::milliseconds load_timeout{30000};
  std::chrono::milliseconds switch_timeout{5000};
};

// What the caller must do after a call: send these assignments, publish the table if asked.
struct RebalanceActions {
  struct Assign {
    std::string instance;
    uint64_t version = 0;
    std::set<ExpertKey> experts;
  };
  std::vector<Assign> assign;
  bool publish = false;          // the placement changed
  std::vector<std::string> log;  // what happened, a line each
};

class LiveRebalancer {
 public:
  using Clock = std::chrono::steady_clock;
  enum class Phase { Idle, Loading, Switching, Dropping };

  explicit LiveRebalancer(RebalanceOptions opts);

  // Every coordinator tick. `load`: rows per expert in the load window; `hosts_ready`: every
  // expert host says ready; `worker_versions`: the table version each attention worker applied.
  RebalanceActions tick(Clock::time_point now, Placement& placement, const std::map<ExpertKey, double>& load,
                        bool hosts_ready, const std::vector<uint64_t>& worker_versions);
  // A host's ExpertsLoaded: `error` non-empty when it refused.
  RebalanceActions on_loaded(Clock::time_point now, Placement& placement, const std::string& instance, uint64_t version,
                             const std::string& error);

  Phase phase() const { return phase_; }
  uint64_t rebalances() const { return done_; }  // re-placements completed
  uint64_t moves() const { return moves_; }      // experts added or dropped by them
  uint64_t aborted() const { return aborted_; }
  const RebalanceOptions& options() const { return opts_; }

 private:
  void plan(Clock::time_point now, Placement& placement, const std::map<ExpertKey, double>& load,
            RebalanceActions& out);
  void switch_placement(Clock::time_point now, Placement& placement, RebalanceActions& out);
  void drop(Clock::time_point now, RebalanceActions& out);
  void abort(const std::string& why, RebalanceActions& out);
  void finish(RebalanceActions& out);

  RebalanceOptions opts_;
  Phase phase_ = Phase::Idle;
  Clock::time_point next_plan_{}, since_{};
  uint64_t version_ = 0;  // of the move in progress
  struct Change {
    std::set<ExpertKey> before, after, both;
    bool loaded = false;
  };
  std::map<std::string, Change> changes_;
  std::set<std::string> pending_;  // hosts whose answer the phase waits for
  uint64_t table_version_ = 0;     // Switching: what the workers must have applied
  size_t planned_moves_ = 0;
  uint64_t done_ = 0, moves_ = 0, aborted_ = 0;
  bool said_pinned_ = false;
};

}  // namespace moemesh
