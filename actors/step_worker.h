// The attention worker's step logic: one StepRequest in, one StepResponse out.
//
// It owns the Engine (attention side; routed experts go through whatever ExpertExecutor the
// engine was built with) and each sequence's sampler. Problems of one sequence (unknown id,
// bad token, no KV room) fail that sequence only — it is freed and its result carries the
// error — and the rest of the step goes on. Not thread-safe: one compute thread calls it.
//
// Prefix cache (when a PrefixStore is given): on a sequence's first chunk the whole prompt's
// full 16-token blocks are keyed (core/prefix_hash.h) and the longest stored prefix is copied
// into the sequence's KV cache, always leaving the last prompt token to compute so there are
// logits to sample. The lookups of all the sequences a step starts go to the store together
// (PrefixStore::fetch_many): one round trip per step. Prompt positions already restored are skipped in every chunk that
// covers them (the router sends the prompt in chunks and does not know). When the router frees a sequence, its full
// blocks (prompt and generated tokens) not restored from the store are offered to it.
//
// Requests carry a cache salt (the router gives each tenant its own): blocks are keyed under
// model id + salt, so one tenant's prompts never hit another's cached blocks.
//
// Tracing: a sequence whose first chunk carries a traceparent gets a span ("sequence", peer
// router) from its first chunk until it is freed, logged as one JSON line (actors/trace_span.h);
// its expert dispatches and KV store requests name that span as their parent.
//
// Micro-batches: with micro_batches == 2 a step of two or more sequences runs as two halves on
// two threads (Engine::step), so one half's attention overlaps the other's expert round trip.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "actors/kv_client.h"
#include "actors/step_phases.h"
#include "actors/trace_span.h"
#include "core/constrained_decoding.h"
#include "core/engine.h"
#include "core/lora_cache.h"
#include "core/prefill_speed.h"
#include "core/sampler.h"
#include "proto/dataplane.pb.h"

namespace moemesh::actors {

SamplingParams sampling_from_proto(const pb::SamplingParams& p);
void sampling_to_proto(const SamplingParams& s, pb::SamplingParams* p);

struct StepWorkerOptions {
  std::shared_ptr<PrefixStore> prefix_store;    // null: no prefix cache
  std::string model_id;                         // namespaces the block keys
  int micro_batches = 2;                        // 1, or 2 (used for steps of >= 2 sequences)
  std::shared_ptr<ExpertWaitLog> expert_waits;  // what the expert executor recorded; null: not measured
  // Sample from the backend's logits summaries (core/logits_summary.h) and fetch a full row only
  // when a summary cannot decide: on a GPU the logits then stay on the device.
  bool sample_from_summaries = false;
  // The tokenizer's tokens as bytes, for constrained decoding; null: constrained requests fail.
  std::shared_ptr<const TokenVocabulary> vocabulary;
  // Where sequences' LoRA adapters are loaded (their attention-side modules); null: a sequence
  // with an adapter fails.
  std::shared_ptr<LoraCache> lora_cache;
  // A step waits for the KV store at most as long as computing the positions it asked for would
  // take (measured on this worker's prefill steps): the step's running sequences wait with it, and
  // a hit can save no more than that. False: up to the store's own deadline.
  bool prefix_wait_budget = true;
};

// Totals since start (read on the compute thread, or after it is done with a step).
struct StepWorkerCounts {
  uint64_t prefix_query_tokens = 0;       // prompt tokens of first chunks looked up in the store
  uint64_t prefix_hit_tokens = 0;         // of them, restored from the store
  uint64_t prompt_tokens_computed = 0;    // prompt positions run through the model
  uint64_t prompt_tokens_skipped = 0;     // prompt positions sent by the router but already restored
  uint64_t published_blocks = 0;          // blocks offered to the store
  uint64_t microbatch_steps = 0;          // steps run as two micro-batches
  double microbatch_step_seconds = 0;     // their wall time
  double microbatch_overlap_seconds = 0;  // of it, one half's experts in flight while the other computed
  double last_overlap_ratio = 0;          // of the latest such step
  uint64_t sampled_from_summary = 0;      // tokens chosen from a logits summary
  uint64_t sampled_from_full_row = 0;     // tokens chosen from a full logits row
  uint64_t constrained_tokens = 0;        // tokens chosen under a constraint (structured output, tool call)
  uint64_t constraint_mask_misses = 0;    // of them, with a mask computed rather than cached
  LoraCache::Stats lora;                  // the LoRA cache's totals
};

class StepWorker {
 public:
  StepWorker(std::shared_ptr<Engine> engine, std::vector<int32_t> eos_ids, StepWorkerOptions opts = {});

  // logits: receives the logits rows asked for (SeqResult.logits_tensor indexes it). The blocks
  // of the sequences it frees are copied out then and offered to the prefix cache by
  // publish_freed(), or at the start of the next run().
  pb::StepResponse run(const pb::StepRequest& req, std::vector<std::vector<float>>& logits);
  // Offers the freed sequences' blocks to the prefix cache. The step server calls it once the
  // step's answer is on its way: the offer (the memory tier's copy, the store's messages) is
  // then off the step's critical path, in the time the router takes to send the next step.
  void publish_freed();

  int64_t free_blocks() const { return engine_->kv_cache().free_blocks(); }
  int64_t num_blocks() const { return engine_->kv_cache().num_blocks(); }
  size_t sequences() const { return seqs_.size(); }
  uint64_t prompt_tokens_computed() const { return counts_.prompt_tokens_computed; }
  uint64_t prompt_tokens_skipped() const { return counts_.prompt_tokens_skipped; }
  const StepWorkerCounts& counts() const {
    if (opts_.lora_cache) counts_.lora = opts_.lora_cache->stats();
    return counts_;
  }
  // The latest run()'s wall time by phase (actors/step_phases.h).
  const StepPhases& last_phases() const { return phases_; }

 private:
  struct Seq {
    SeqId id = 0;
    Sampler sampler;
    std::vector<int32_t> tokens;            // as far as known: the prompt, then each decode token fed
    int64_t prompt_len = 0;                 // the context to prefill: prompt, plus generated tokens when resumed
    int64_t fed = 0;                        // positions the router has sent so far
    int64_t restored = 0;                   // leading positions copied from the store (whole blocks)
    std::string key_ns;                     // prefix-cache key namespace: model id, plus the request's cache salt
    std::optional<trace::OpenSpan> span{};  // when the router sent a traceparent
    std::shared_ptr<ConstrainedDecoder> constraint{};  // structured output / forced tool call
    std::shared_ptr<const LoraAdapter> adapter{};      // its LoRA adapter (null: the base model)
    int64_t steps = 0, generated = 0;                  // span attributes
    TraceRef trace() const { return span ? trace::ref_of(span->ctx) : TraceRef{}; }
  };
  // Frees the sequence; with `publish`, first gathers its new full blocks for the store. `end`
  // says why, in its span.
  void release(uint64_t seq, bool publish = false, const char* end = "freed");
  // A step's new sequences' stored prefixes (by router sequence id), asked of the store at once,
  // within the wait budget (StepWorkerOptions::prefix_wait_budget).
  using PrefixBlocks = std::map<uint64_t, std::vector<std::vector<float>>>;
  PrefixBlocks fetch_prefixes(const std::vector<const pb::SeqWork*>& work);
  // After an engine step: its time per computed position, when mostly prompt positions.
  void learn_prefill_speed(const std::vector<StepInput>& inputs, uint64_t prompt_computed_before,
                           double engine_seconds);
  // Copies the first of `blocks` (at most max_blocks) into the sequence's KV cache.
  void restore_prefix(Seq& s, int64_t max_blocks, const std::vector<std::vector<float>>& blocks);
  // Copies the sequence's new full blocks out of the KV cache for publish_freed().
  void gather_blocks(const Seq& s);
  // The masks of a constraint spec, compiled once (throws what compile_constraint throws).
  std::shared_ptr<GrammarMasks> masks_for(const std::string& spec);

  std::shared_ptr<Engine> engine_;
  std::vector<int32_t> eos_ids_;
  StepWorkerOptions opts_;
  // Seconds this worker's engine takes per prompt position (0 until a mostly-prefill step ran).
  // Prices the KV store wait budget.
  PrefillSpeed prefill_speed_;
  std::map<uint64_t, Seq> seqs_;                                // by the router's sequence id
  uint64_t router_epoch_ = 0;                                   // the run of the router they belong to
  std::map<std::string, std::shared_ptr<GrammarMasks>> masks_;  // by constraint spec
  mutable StepWorkerCounts counts_;
  StepPhases phases_;
  struct Publication {
    std::vector<BlockKey> keys;
    std::vector<std::vector<float>> blocks;
    TraceRef trace;
  };
  std::vector<Publication> freed_;  // blocks gathered from freed sequences, not offered yet
};

}  // namespace moemesh::actors
