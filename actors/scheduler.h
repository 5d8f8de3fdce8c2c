// The router's scheduler: iteration-level batching over the attention workers.
//
// Requests wait in a token-fair queue (core/fair_queue.h). A waiting request is placed on the
// attention worker with the most free KV blocks that can hold its context (the scheduler
// keeps each worker's block count from the tokens it sent). Every worker with no step in
// flight gets the next StepRequest: one decode token for each of its running sequences, then
// prefill chunks under a per-step token budget (long prompts are chunked, so they do not stall
// decoding). Sampling happens on the worker with the request's seed; the scheduler appends
// tokens, applies max_tokens / EOS / stop ids, and frees finished sequences with the worker's
// next step.
//
// Preemption: when a worker's running sequences will not fit its KV cache in the next step,
// the newest sequences of the lowest priority go back to the queue; their blocks are offered
// to the KV store as they are freed. A preempted sequence resumes later, on any worker, by
// prefilling prompt + the tokens it already generated (mostly restored from the KV store)
// with its sampler replayed to the same position: the output is identical, and tokens already
// streamed are not sent again. A worker that disappears or stops answering has its sequences
// resumed the same way: nothing accepted is lost.
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
#include "core/lora_ref.h"
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
  std::string constraint;   // constrained decoding spec (core/constrained_decoding.h), "" for none
  LoraRef adapter;          // the LoRA adapter it runs with (empty: the base model)
  // Streaming: when set, gets a (gen_token_atom, TokenEventPtr) per generated token, and may
  // send (gen_cancel_atom, listener) to end its requests early (client gone, stop string).
  caf::actor listener;
  int index = 0;  // the choice this request produces (n > 1), echoed in its token events
  // When the router received the request: queue time and time to first token count from here.
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
};

struct GenerationResult {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::vector<std::vector<std::pair<int32_t, float>>> top_logprobs;
  std::vector<std::vector<float>> logits;  // when asked
  std::string finish_reason;               // "stop", "length", "cancelled" or "error"
  std::string error;
  // Refused as a whole, with this HTTP status: 400 (no worker's KV cache could hold it) or
  // 503 (no attention worker ready, or the queue is full); 0 otherwise.
  int refused_status = 0;
  int64_t cached_tokens = 0;
  std::string worker;  // the attention worker that served it
};

// One generated token, as it is sampled.
struct TokenEvent {
  int index = 0;  // GenerationRequest::index
  int32_t token = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
};

using GenerationRequestPtr = std::shared_ptr<const GenerationRequest>;
using GenerationResultPtr = std::shared_ptr<const GenerationResult>;
using TokenEventPtr = std::shared_ptr<const TokenEvent>;

using generate_atom = caf::atom_constant<caf::atom("generate")>;
using gen_token_atom = caf::atom_constant<caf::atom("gentoken")>;
using gen_cancel_atom = caf::atom_constant<caf::atom("gencancel")>;
using sched_stats_atom = caf::atom_constant<caf::atom("schedstat")>;

struct SchedulerConfig {
  std::string instance = "router";     // our routing identity towards the workers
  int64_t step_token_budget = 512;     // prefill + decode tokens per worker step
  int64_t max_running_per_worker = 64;
  size_t max_waiting = 4096;  // more queued requests than this: new ones get 503
  std::chrono::milliseconds step_timeout{30000};
  std::vector<int32_t> eos_ids;
  int max_attempts = 3;  // a request re-queued more often than this fails
  // The model's sliding window (0: none): a sequence under one holds only the KV blocks its window
  // still sees (core/kv_cache.h), so its block count stops growing with its context.
  int64_t sliding_window = 0;
  // Where the moemesh_router_* scheduler metrics go (docs/metrics.md); none without it.
  std::shared_ptr<prometheus::Registry> metrics;
};

// (generate_atom, GenerationRequestPtr) -> GenerationResultPtr, answered when the request ends.
// (gen_cancel_atom, caf::actor listener, int index) ends that listener's request of that index,
// or all of its requests with index -1 ("cancelled"), freeing their KV blocks on the worker.
// (workers_atom, WorkerList) from the coordinator updates the worker set.
// (sched_stats_atom) -> std::string: JSON counters {waiting, running, steps, requeued}.
caf::actor spawn_scheduler(caf::actor_system& sys, ZmqBridge& bridge, SchedulerConfig cfg);

}  // namespace moemesh::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::GenerationRequestPtr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::GenerationResultPtr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::TokenEventPtr)
