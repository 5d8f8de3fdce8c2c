// Shared pieces of the Prometheus metrics (docs/metrics.md is the contract): bucket sets, the
// tenant label, and small builders that keep the registrations short.
//
// Bucket sets carry an edge on each SLO threshold docs/operations.md uses (TTFT 0.5/1/2 s,
// ITL 50/100 ms, E2E 10/30 s), so an SLO ratio is read from one bucket, not interpolated.
#pragma once
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace moemesh::actors::metrics {

// Tenants do not exist yet: every per-tenant series carries this one value (bounded).
inline constexpr const char* kDefaultTenant = "default";

// Request-level latencies (queue time, TTFT, end-to-end): 1 ms to 10 minutes.
inline prometheus::Histogram::BucketBoundaries request_latency_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10,
          15,    20,     30,    45,   60,    90,   120, 180,  300, 600};
}

// Inter-token latency: fine from 1 ms (decode steps of a small model take a few ms).
inline prometheus::Histogram::BucketBoundaries token_latency_buckets() {
  return {0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
          0.075, 0.1,   0.15,  0.2,   0.3,    0.5,  0.75,  1,    2.5,   5,    10};
}

// One network round trip or one compute step: 50 µs to 10 s.
inline prometheus::Histogram::BucketBoundaries rpc_latency_buckets() {
  return {5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

// Tokens in one scheduler step.
inline prometheus::Histogram::BucketBoundaries step_token_buckets() {
  return {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};
}

inline prometheus::Family<prometheus::Counter>& counter_family(prometheus::Registry& r, const std::string& name,
                                                               const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r);
}
inline prometheus::Family<prometheus::Gauge>& gauge_family(prometheus::Registry& r, const std::string& name,
                                                           const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r);
}
inline prometheus::Family<prometheus::Histogram>& histogram_family(prometheus::Registry& r, const std::string& name,
                                                                   const std::string& help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r);
}

}  // namespace moemesh::actors::metrics
