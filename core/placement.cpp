#include "core/placement.h"

#include "core/eplb.h"
#include "core/error.h"

namespace moemesh {

size_t replica_rotation(int64_t layer, int32_t expert, uint64_t salt, size_t n) {
  if (n == 0) return 0;
  return size_t((uint64_t(layer) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(expert) * 0xC2B2AE3D27D4EB4Full) ^ salt) % n;
}

std::vector<const PlacementHost*> PlacementTable::hosts_for(int32_t layer, int32_t expert) const {
  std::vector<const PlacementHost*> out;
  for (const auto& h : hosts)
    if (h.experts.count({layer, expert})) out.push_back(&h);
  return out;
}

PlacementPlan::PlacementPlan(std::vector<int32_t> moe_layers, int32_t num_experts, int32_t slots, int32_t replicas) {
  if (slots < 1) throw Error("placement: need at least one expert host slot");
  if (replicas < 1) throw Error("placement: --replicas must be at least 1");
  if (replicas > slots)
    throw Error("placement: " + std::to_string(replicas) + " replicas need at least as many expert hosts (have " +
                std::to_string(slots) + ")");
  slot_experts_.resize(slots);
  int64_t i = 0;
  for (int32_t layer : moe_layers)
    for (int32_t e = 0; e < num_experts; ++e, ++i) {
      all_.emplace_back(layer, e);
      for (int32_t r = 0; r < replicas; ++r) slot_experts_[(i + r) % slots].insert({layer, e});
    }
}

Placement::Placement(PlacementPlan plan) : plan_(std::move(plan)) {
  for (int32_t s = 0; s < plan_.slots(); ++s) slot_sets_.push_back(plan_.slot(s));
}

std::set<ExpertKey> Placement::add_host(const std::string& instance, const std::string& endpoint,
                                        const std::set<ExpertKey>& pinned, Clock::time_point now) {
  auto it = hosts_.find(instance);
  if (it != hosts_.end() && it->second.endpoint == endpoint && (pinned.empty() || pinned == it->second.experts)) {
    it->second.last_seen = now;  // the same host again (a lost reply): same answer
    return it->second.experts;
  }
  Host h{endpoint, pinned, std::nullopt, now, !pinned.empty()};
  if (pinned.empty() && last_slot_.count(instance)) {
    h.slot = last_slot_[instance];
    h.experts = slot_sets_[size_t(*h.slot)];
  } else if (pinned.empty() && last_by_load_.count(instance)) {
    h.experts = last_by_load_[instance];  // what it loaded when it first came
  } else if (pinned.empty()) {
    std::set<int32_t> taken;
    for (const auto& [name, other] : hosts_)
      if (other.slot && name != instance) taken.insert(*other.slot);
    int32_t free_slot = -1;
    for (int32_t s = 0; s < plan_.slots() && free_slot < 0; ++s)
      if (!taken.count(s)) free_slot = s;
    if (free_slot < 0 && !load_.empty()) {
      // Scaling out: as many experts as a slot holds, chosen by load.
      const size_t room = largest_slot();
      std::vector<EplbHost> now_hosts;
      for (const auto& [name, other] : hosts_)
        if (name != instance) now_hosts.push_back({name, other.experts, 0});
      now_hosts.push_back({instance, {}, int64_t(room)});
      EplbOptions o;
      o.grow_host = instance;
      o.min_gain = 0;
      o.move_budget = int64_t(room);
      h.experts = plan_placement(now_hosts, load_, o).hosts.back().experts;
      if (!h.experts.empty()) {
        last_by_load_[instance] = h.experts;
        load_placed_ += h.experts.size();
      }
    }
    if (h.experts.empty()) {
      // More hosts than slots and no load known (or none to gain): extra copies of slots, round robin.
      if (free_slot < 0) free_slot = int32_t(hosts_.size()) % plan_.slots();
      h.slot = free_slot;
      h.experts = slot_sets_[size_t(free_slot)];
      last_slot_[instance] = free_slot;
    }
  }
  hosts_[instance] = std::move(h);
  rebuild();
  return hosts_[instance].experts;
}

bool Placement::reassign(const std::string& instance, std::set<ExpertKey> experts) {
  auto it = hosts_.find(instance);
  if (it == hosts_.end() || it->second.pinned) return false;
  Host& h = it->second;
  if (h.experts == experts) return true;
  if (h.slot)
    slot_sets_[size_t(*h.slot)] = experts;
  else
    last_by_load_[instance] = experts;
  h.experts = std::move(experts);
  rebuild();
  return true;
}

bool Placement::pinned(const std::string& instance) const {
  auto it = hosts_.find(instance);
  return it != hosts_.end() && it->second.pinned;
}

size_t Placement::largest_slot() const {
  size_t n = 0;
  for (int32_t s = 0; s < plan_.slots(); ++s) n = std::max(n, plan_.slot(s).size());
  return n;
}

bool Placement::touch(const std::string& instance, Clock::time_point now) {
  auto it = hosts_.find(instance);
  if (it == hosts_.end()) return false;
  it->second.last_seen = now;
  return true;
}

std::vector<std::string> Placement::expire(Clock::time_point now, Clock::duration timeout) {
  std::vector<std::string> dead;
  for (const auto& [name, h] : hosts_)
    if (now - h.last_seen > timeout) dead.push_back(name);
  for (const auto& name : dead) hosts_.erase(name);
  if (!dead.empty()) rebuild();
  return dead;
}

void Placement::remove_host(const std::string& instance) {
  if (hosts_.erase(instance)) rebuild();
}

std::vector<ExpertKey> Placement::uncovered() const {
  std::set<ExpertKey> covered;
  for (const auto& [name, h] : hosts_) covered.insert(h.experts.begin(), h.experts.end());
  std::vector<ExpertKey> out;
  for (const auto& k : plan_.all_experts())
    if (!covered.count(k)) out.push_back(k);
  return out;
}

void Placement::rebuild() {
  table_.hosts.clear();
  for (const auto& [name, h] : hosts_) table_.hosts.push_back({name, h.endpoint, h.experts});
  ++table_.version;
}

}  // namespace moemesh
