#include "core/fair_queue.h"

#include <algorithm>
#include <limits>

namespace moemesh {

FairQueue::Tenant& FairQueue::enter(const std::string& name, double weight, Priority priority) {
  auto [it, fresh] = tenants_.try_emplace(name);
  Tenant& t = it->second;
  t.weight = weight > 0 ? weight : 1.0;
  t.priority = priority;
  if (t.queue.empty()) {
    // Lift an idle tenant to the smallest counter among the backlogged ones: no saved-up credit.
    double lo = std::numeric_limits<double>::infinity();
    for (const auto& [n, o] : tenants_)
      if (!o.queue.empty()) lo = std::min(lo, o.counter);
    if (lo != std::numeric_limits<double>::infinity()) t.counter = std::max(t.counter, lo);
  }
  (void)fresh;
  return t;
}

void FairQueue::push(uint64_t id, const std::string& tenant, double weight, Priority priority) {
  enter(tenant, weight, priority).queue.push_back(id);
  ++size_;
}

void FairQueue::push_front(uint64_t id, const std::string& tenant, double weight, Priority priority) {
  enter(tenant, weight, priority).queue.push_front(id);
  ++size_;
}

const std::string* FairQueue::choose() const {
  const std::string* best = nullptr;
  const Tenant* bt = nullptr;
  for (const auto& [name, t] : tenants_) {
    if (t.queue.empty()) continue;
    if (!bt || t.priority < bt->priority || (t.priority == bt->priority && t.counter < bt->counter)) {
      best = &name;
      bt = &t;
    }
  }
  return best;
}

std::optional<uint64_t> FairQueue::peek() const {
  const std::string* name = choose();
  if (!name) return std::nullopt;
  return tenants_.at(*name).queue.front();
}

std::optional<uint64_t> FairQueue::pop() {
  const std::string* name = choose();
  if (!name) return std::nullopt;
  Tenant& t = tenants_.at(*name);
  uint64_t id = t.queue.front();
  t.queue.pop_front();
  --size_;
  return id;
}

bool FairQueue::remove(uint64_t id) {
  for (auto& [name, t] : tenants_) {
    auto it = std::find(t.queue.begin(), t.queue.end(), id);
    if (it != t.queue.end()) {
      t.queue.erase(it);
      --size_;
      return true;
    }
  }
  return false;
}

void FairQueue::charge(const std::string& tenant, int64_t prompt_tokens, int64_t output_tokens) {
  auto it = tenants_.find(tenant);
  if (it == tenants_.end()) return;
  it->second.counter +=
      (costs_.prompt_token * double(prompt_tokens) + costs_.output_token * double(output_tokens)) / it->second.weight;
}

double FairQueue::counter(const std::string& tenant) const {
  auto it = tenants_.find(tenant);
  return it == tenants_.end() ? 0.0 : it->second.counter;
}

}  // namespace moemesh
