// The LoRA adapter cache's metrics, the same on attention workers and expert hosts under their
// service's prefix (docs/metrics.md), e.g. for "moemesh_attention":
//   moemesh_attention_lora_cache_events_total{event="hit"|"miss"|"eviction"}
//   moemesh_attention_lora_cache_bytes, moemesh_attention_lora_cache_adapters
// The cache keeps totals; update() turns them into counter increments.
#pragma once
#include <mutex>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "core/lora_cache.h"

namespace moemesh::actors {

class LoraCacheMetrics {
 public:
  LoraCacheMetrics(prometheus::Registry& reg, const std::string& prefix)
      : events_(prometheus::BuildCounter()
                    .Name(prefix + "_lora_cache_events_total")
                    .Help("LoRA adapter cache lookups by outcome (hit, miss = read from its folder) and evictions")
                    .Register(reg)),
        hits_(events_.Add({{"event", "hit"}})),
        misses_(events_.Add({{"event", "miss"}})),
        evictions_(events_.Add({{"event", "eviction"}})),
        bytes_(prometheus::BuildGauge()
                   .Name(prefix + "_lora_cache_bytes")
                   .Help("Bytes of LoRA adapter weights this process holds loaded")
                   .Register(reg)
                   .Add({})),
        adapters_(prometheus::BuildGauge()
                      .Name(prefix + "_lora_cache_adapters")
                      .Help("LoRA adapters this process holds loaded")
                      .Register(reg)
                      .Add({})) {}

  void update(const LoraCache::Stats& s) {
    std::lock_guard<std::mutex> lk(mu_);
    hits_.Increment(double(s.hits - last_.hits));
    misses_.Increment(double(s.misses - last_.misses));
    evictions_.Increment(double(s.evictions - last_.evictions));
    bytes_.Set(double(s.bytes));
    adapters_.Set(double(s.adapters));
    last_ = s;
  }

 private:
  prometheus::Family<prometheus::Counter>& events_;
  prometheus::Counter &hits_, &misses_, &evictions_;
  prometheus::Gauge &bytes_, &adapters_;
  std::mutex mu_;
  LoraCache::Stats last_;
};

}  // namespace moemesh::actors
