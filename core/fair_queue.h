// Token-fair admission across tenants: a virtual token counter (VTC, "Fairness in Serving
// Large Language Models", Sheng et al., OSDI '24).
//
// Each tenant has a counter of the service it received, in tokens divided by its weight
// (prompt and output tokens each with their own cost). The next request admitted comes from
// the highest priority class that has waiting requests and, within it, from the tenant with
// the smallest counter; FIFO within a tenant. A tenant that was idle re-enters at the smallest
// counter of the tenants with waiting requests, so idling earns no credit and a newcomer cannot
// starve the others either. Not thread-safe: the scheduler actor owns it.
#pragma once
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>

#include "core/tenants.h"

namespace moemesh {

struct FairCosts {
  double prompt_token = 1.0;
  double output_token = 2.0;  // decode steps cost more than prefill tokens per token
};

class FairQueue {
 public:
  explicit FairQueue(FairCosts costs = {}) : costs_(costs) {}

  // `priority` is the request's own (its tenant's class, possibly lowered per request).
  void push(uint64_t id, const std::string& tenant, double weight, Priority priority);
  // Front of its tenant's queue at that priority (a preempted request goes back first).
  void push_front(uint64_t id, const std::string& tenant, double weight, Priority priority);
  std::optional<uint64_t> pop();
  std::optional<uint64_t> peek() const;
  bool remove(uint64_t id);  // a cancelled request
  bool empty() const { return size_ == 0; }
  size_t size() const { return size_; }

  // Service given to a tenant (prefill and decode tokens as they are computed).
  void charge(const std::string& tenant, int64_t prompt_tokens, int64_t output_tokens);
  double counter(const std::string& tenant) const;

 private:
  static constexpr int kClasses = 3;  // Priority::High, Normal, Low
  struct Tenant {
    double weight = 1.0;
    double counter = 0;
    std::deque<uint64_t> queue[kClasses];  // FIFO per priority class
    bool idle() const;
    int best_class() const;  // highest priority class with a waiting request; kClasses when idle
  };
  Tenant& enter(const std::string& tenant, double weight);
  Tenant* choose();
  const Tenant* choose() const;

  FairCosts costs_;
  std::map<std::string, Tenant> tenants_;
  size_t size_ = 0;
};

}  // namespace moemesh
