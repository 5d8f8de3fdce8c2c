#include "core/fair_queue.h"

#include <algorithm>
#include <limits>
#include <utility>

namespace moemesh {

bool FairQueue::Tenant::idle() const { return best_class() == kClasses; }

int FairQueue::Tenant::best_class() const {
  int c = 0;
  while (c < kClasses && queue[c].empty()) ++c;
  return c;
}

FairQueue::Tenant& FairQueue::enter(const std::string& name, double weight) {
  Tenant& t = tenants_[name];
  t.weight = weight > 0 ? weight : 1.0;
  if (t.idle()) {
    // Lift an idle tenant to the smallest counter among the backlogged ones: no saved-up credit.
    double lo = std::numeric_limits<double>::infinity();
    for (const auto& [n, o] : tenants_)
      if (!o.idle()) lo = std::min(lo, o.counter);
    if (lo != std::numeric_limits<double>::infinity()) t.counter = std::max(t.counter, lo);
  }
  return t;
}

void FairQueue::push(uint64_t id, const std::string& tenant, double weight, Priority priority) {
  enter(tenant, weight).queue[int(priority)].push_back(id);
  ++size_;
}

void FairQueue::push_front(uint64_t id, const std::string& tenant, double weight, Priority priority) {
  enter(tenant, weight).queue[int(priority)].push_front(id);
  ++size_;
}

// The highest priority class with waiting requests; within it, the tenant with the least service.
const FairQueue::Tenant* FairQueue::choose() const {
  const Tenant* best = nullptr;
  for (const auto& [name, t] : tenants_) {
    const int c = t.best_class();
    if (c == kClasses) continue;
    const int bc = best ? best->best_class() : kClasses;
    if (!best || c < bc || (c == bc && t.counter < best->counter)) best = &t;
  }
  return best;
}

FairQueue::Tenant* FairQueue::choose() { return const_cast<Tenant*>(std::as_const(*this).choose()); }

std::optional<uint64_t> FairQueue::peek() const {
  const Tenant* t = choose();
  if (!t) return std::nullopt;
  return t->queue[t->best_class()].front();
}

std::optional<uint64_t> FairQueue::pop() {
  Tenant* t = choose();
  if (!t) return std::nullopt;
  auto& q = t->queue[t->best_class()];
  const uint64_t id = q.front();
  q.pop_front();
  --size_;
  return id;
}

bool FairQueue::remove(uint64_t id) {
  for (auto& [name, t] : tenants_)
    for (auto& q : t.queue) {
      auto it = std::find(q.begin(), q.end(), id);
      if (it != q.end()) {
        q.erase(it);
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
