// The in-process reference engine: a whole model on one CPU, paged KV cache, batched steps.
// Every other execution path (attention workers + expert hosts) must reproduce its logits.
//
// The compute runs on a ComputeBackend (core/compute_backend.h; CPU unless EngineOptions says
// otherwise); per layer:
//   backend.attention_block  x += o_proj(attention(rope(qkv(rmsnorm(x)))))  (writes the KV cache)
//   ffn_block                x += moe(rmsnorm(x)) or dense_mlp(rmsnorm(x))
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "core/checkpoint.h"
#include "core/compute_backend.h"
#include "core/kv_cache.h"
#include "core/logits_summary.h"
#include "core/model_config.h"
#include "core/moe.h"
#include "core/trace_ref.h"

namespace moemesh {

// x [rows, hidden] += the layer's FFN on rmsnorm(x): routed experts through `experts` (+ shared
// experts computed here) for MoE layers, the dense MLP otherwise. Gating (top-k) runs on the host.
// row_adapters: each row's LoRA adapter (null: base; empty: none), applied to the router, the
// shared and dense MLPs here and handed with the rows to the experts.
void ffn_block(const ModelConfig& cfg, const LayerWeights& lw, int64_t layer, ComputeBackend& backend,
               ExpertExecutor& experts, float* x, int64_t rows, std::span<const LoraAdapter* const> row_adapters = {});

struct EngineOptions {
  int64_t kv_blocks = 256;                            // KV pool size in blocks of KvCache::kBlockSize tokens
  KvDType kv_dtype = KvDType::F32;                    // INT8: ~1/4 of the memory, logits within docs/gpu.md's bound
  std::shared_ptr<ComputeBackend> backend = nullptr;  // null: the CPU backend
};

// One sequence's part of a step.
struct StepInput {
  SeqId seq = 0;
  std::vector<int32_t> tokens;  // new tokens (a prefill chunk, or one decode token)
  bool all_logits = false;      // logits of every new position, not only the last
  // Opaque to the engine: the request these rows serve, so an ExpertExecutor that traces can
  // name it (actors/remote_experts.cpp puts it in its DispatchRequests).
  TraceRef trace{};
  // Instead of the last position's logits, their summary for a sampler (core/logits_summary.h):
  // on a GPU backend the row never leaves the device. Ignored with all_logits.
  std::optional<LogitsRequest> summary{};
  // The LoRA adapter this sequence runs with (null: the base model); loaded for this process's
  // share of the model.
  std::shared_ptr<const LoraAdapter> adapter{};
};

// The inputs of the forward pass running on the calling thread, in row order (their tokens
// are the rows an ExpertExecutor's groups index); empty outside Engine::step.
std::span<const StepInput> current_forward_inputs();

// Which threads ran the latest step's forward passes ("lanes": one, or two with micro-batches)
// and when each finished, so a caller can split the step's wall time into phases.
struct StepLanes {
  using Clock = std::chrono::steady_clock;
  Clock::time_point start, end;
  std::vector<std::pair<std::thread::id, Clock::time_point>> lanes;  // thread, when its pass ended
};

struct StepOptions {
  // 2: the batch's sequences are split into two halves (by rows) that run on two threads, so
  // the attention of one overlaps the expert round trip of the other. Each half is computed
  // exactly as a batch of its own; logits equal the one-batch path up to sgemm row-count effects.
  // Used only when the batch has at least two sequences.
  int micro_batches = 1;
};

// How the latest step spent its time (micro_batches == 2 only; zeros otherwise).
struct MicroBatchTiming {
  int micro_batches = 1;
  double step_seconds = 0;
  // Time during which one micro-batch had its experts in flight while the other computed.
  double overlap_seconds = 0;
};

struct StepOutput {
  SeqId seq = 0;
  int64_t first_position = 0;  // position of the first logits row
  int64_t n = 0;               // logits rows
  std::vector<float> logits;   // [n, vocab]; empty when a summary was asked for
  std::optional<LogitsSummary> summary;
  std::vector<float> final_hidden;  // with a summary: the final-normed row, for Engine::full_logits
};

class Engine {
 public:
  // Maps the checkpoint's weights: all of them, or only the attention side when routed experts
  // are computed by `experts`. The config's gating_temperature is taken as it is now.
  explicit Engine(std::shared_ptr<const Checkpoint> ckpt, EngineOptions opts = {},
                  std::shared_ptr<ExpertExecutor> experts = nullptr);
  // Weights owned elsewhere; `owner` keeps their bytes alive. Null `experts`: local experts.
  Engine(ModelConfig cfg, ModelWeights weights, EngineOptions opts = {},
         std::shared_ptr<ExpertExecutor> experts = nullptr, std::shared_ptr<const void> owner = nullptr);

  Engine(const Engine&) = delete;  // the local expert executor points into weights_
  Engine& operator=(const Engine&) = delete;

  const ModelConfig& config() const { return cfg_; }
  ComputeBackend& backend() { return *backend_; }
  const ModelWeights& weights() const { return weights_; }
  KvCache& kv_cache() { return *kv_; }

  SeqId create_sequence() { return kv_->create_sequence(); }
  void free_sequence(SeqId seq) { kv_->free_sequence(seq); }
  int64_t sequence_length(SeqId seq) const { return kv_->length(seq); }

  // Runs every input's new tokens as rows of one batch through the model and appends them to
  // their sequences' caches. All-or-nothing: on an error (unknown sequence, bad token id, out of
  // KV blocks) no cache changes. Outputs are in input order. KV cache room is reserved for
  // the whole batch up front, so the micro-batches only read the pool's bookkeeping.
  std::vector<StepOutput> step(std::span<const StepInput> batch, StepOptions opts = {});
  // The full logits row of an output that carries a summary (when the summary cannot decide).
  std::vector<float> full_logits(const StepOutput& out);
  const MicroBatchTiming& last_timing() const { return timing_; }
  const StepLanes& last_lanes() const { return lanes_; }

 private:
  void validate();
  // Runs inputs (already validated, room reserved) through the model; leaves lengths alone.
  std::vector<StepOutput> forward(std::span<const StepInput> part, ExpertExecutor& experts);

  std::shared_ptr<const void> owner_;
  ModelConfig cfg_;
  ModelWeights weights_;
  std::shared_ptr<ComputeBackend> backend_;
  std::shared_ptr<ExpertExecutor> experts_;
  std::unique_ptr<KvCache> kv_;
  MicroBatchTiming timing_;
  StepLanes lanes_;
};

}  // namespace moemesh
