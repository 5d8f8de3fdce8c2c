// The router's scheduler: iteration-level batching over the attention workers.
//
// Requests wait in a queue; every attention worker with no step in flight gets the next
// StepRequest: one decode token for each of its running sequences, plus prefill chunks of
// newly admitted sequences under a per-step token budget (long prompts are chunked, so they
// do not stall decoding). Sampling happens on the worker with the request's seed; the
// scheduler appends tokens, applies max_tokens / EOS / stop ids, and frees finished
// sequences with the worker's next step. A worker that disappears or stops answering has its
// sequences re-queued from the start (same seed, so the same output): nothing accepted is lost.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <caf/all.hpp>
#include <prometheus/registry.h>

#include "actors/coordinator.h"
#include "actors/metrics_util.h"
#include "actors/zmq_bridge.h"
#include "core/sampler.h"
#include "core/tenants.h"

namespace moemesh::actors {

struct GenerationRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;  // the router always sets a seed
  int64_t max_tokens = 16;
  bool return_logits = false;  // the logits of every sampled position (tests, debugging)
  std::string tenant = metrics::kDefaultTenant;  // fair-share account and metric label
  double weight = 1.0;                           // the tenant's share of service
  Priority priority = Priority::Normal;          // orders admission and preemption
  // Prefix-cache namespace: requests with different salts never share cached blocks.
  std::string cache_salt;
  std::string traceparent;  // W3C trace context, passed to the attention worker
  // When the router received the request: queue time and time to first token count from here.
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
};

struct GenerationResult {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::vector<std::vector<std::pair<int32_t, float>>> top_logprobs;
  std::vector<std::vector<float>> logits;  // when asked
  std::string finish_reason;               // "stop", "length" or "error"
  std::string error;
  bool bad_request = false;  // the request itself can never be served (the front end answers 400)
  int64_t cached_tokens = 0;
  std::string worker;  // the attention worker that served it
};

using GenerationRequestPtr = std::shared_ptr<const GenerationRequest>;
using GenerationResultPtr = std::shared_ptr<const GenerationResult>;

using generate_atom = caf::atom_constant<caf::atom("generate")>;
using sched_stats_atom = caf::atom_constant<caf::atom("schedstat")>;

struct SchedulerConfig {
  std::string instance = "router";     // our routing identity towards the workers
  int64_t step_token_budget = 512;     // prefill + decode tokens per worker step
  int64_t max_running_per_worker = 64;
  std::chrono::milliseconds step_timeout{30000};
  std::vector<int32_t> eos_ids;
  int max_attempts = 3;  // a request re-queued more often than this fails
  // Where the moemesh_router_* scheduler metrics go (docs/metrics.md); none without it.
  std::shared_ptr<prometheus::Registry> metrics;
};

// (generate_atom, GenerationRequestPtr) -> GenerationResultPtr, answered when the request ends.
// (workers_atom, WorkerList) from the coordinator updates the worker set.
// (sched_stats_atom) -> std::string: JSON counters {waiting, running, steps, requeued}.
caf::actor spawn_scheduler(caf::actor_system& sys, ZmqBridge& bridge, SchedulerConfig cfg);

}  // namespace moemesh::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::GenerationRequestPtr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::GenerationResultPtr)
