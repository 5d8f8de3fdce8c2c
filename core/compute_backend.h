// One compute interface for the model's work, chosen at start-up (`--device cpu|cuda[:N]`).
// The Engine (and so the attention worker) and the expert host's SwiGLU call only this; which
// backend runs is decided once, by make_compute_backend (core/backend_factory.h).
//
// The granularity is the engine's: whole attention halves of a layer and whole SwiGLU MLPs,
// with activations in host memory between calls (the expert dispatch needs host rows for
// ZeroMQ anyway). A backend keeps its weights where it computes: the CUDA backend uploads each
// weight once, on first use, and keeps the KV blocks in a preallocated device pool (its
// make_kv_cache). The CPU backend is the reference: its numerics are the engine's.
#pragma once
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/checkpoint.h"
#include "core/kv_cache.h"
#include "core/logits_summary.h"
#include "core/lora.h"
#include "core/model_config.h"

namespace moemesh {

// Where each sequence's new tokens sit in a step's batch of rows.
struct BatchLayout {
  struct Span {
    SeqId seq = 0;
    int64_t row0 = 0;                      // first row in the batch
    int64_t n = 0;                         // new tokens of this sequence
    int64_t pos0 = 0;                      // position of the first new token (tokens already cached)
    const LoraAdapter* adapter = nullptr;  // the LoRA adapter its rows use (null: the base model)
  };
  std::vector<Span> spans;
  std::vector<int32_t> positions;  // per row
  int64_t rows = 0;
};

// One expert's share of a grouped MLP call: the rows of x it computes (any order, repeats
// allowed) and where its [rows.size(), hidden] results go.
struct ExpertRows {
  const MlpWeights* weights = nullptr;
  std::span<const int32_t> rows;
  float* out = nullptr;
  // Per entry of rows: the LoRA deltas of this expert that row adds (null: none); empty: none.
  std::span<const MlpLora* const> lora{};
};

// GPTQ calibration (core/gptq_calibrate.cpp) needs each o_proj's input, the attention output
// [rows, heads · head_dim]: the CPU backend's attention_block hands it to the observer set on the
// calling thread, if any (none set: one thread-local test per layer).
using AttentionObserver = std::function<void(int64_t layer, const float* attn, int64_t rows, int64_t width)>;
// Sets this thread's observer (null: none); returns the previous one.
const AttentionObserver* set_attention_observer(const AttentionObserver* observer);

struct DeviceSpec {
  enum class Kind { Cpu, Cuda };
  Kind kind = Kind::Cpu;
  int index = 0;            // CUDA device ordinal
  std::string str() const;  // "cpu", "cuda:0"
};
// "cpu", "cuda" (= cuda:0) or "cuda:N"; anything else is a moemesh::Error naming the forms.
DeviceSpec parse_device(std::string_view s);

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;
  // "cpu", or "cuda:0 (NVIDIA H200)".
  virtual std::string name() const = 0;
  // The device's identity across processes (a GPU's UUID, "GPU-..."); empty for the CPU.
  virtual std::string device_id() const { return {}; }

  // The KV cache whose storage this backend's attention reads and writes.
  virtual std::unique_ptr<KvCache> make_kv_cache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks,
                                                 KvCacheFormat format) = 0;

  // out[n, dim] = rows `ids` of the table (ids already validated).
  virtual void embedding(const Weight& table, const int32_t* ids, int64_t n, float* out) = 0;
  // y = rmsnorm(x) * w, per row.
  virtual void rmsnorm(const float* x, const Weight& w, int64_t rows, double eps, float* y) = 0;
  // y[rows, w.rows()] = x[rows, w.cols()] · W^T.
  virtual void matmul(const float* x, int64_t rows, const Weight& w, float* y) = 0;
  // x [layout.rows, hidden] += o_proj(attention(rope(qkv(rmsnorm(x))))) of layer `layer`; stores
  // the new K/V rows into kv (room reserved, a cache from make_kv_cache) at the spans' positions.
  // A span with an adapter adds its q/k/v/o LoRA deltas (CPU backend only: others refuse).
  virtual void attention_block(const ModelConfig& cfg, const LayerWeights& lw, int64_t layer, KvCache& kv,
                               const BatchLayout& layout, float* x) = 0;
  // SwiGLU: out[rows, hidden] = down(silu(gate(x)) * up(x)). LoRA deltas go through grouped_mlp.
  virtual void mlp(const MlpWeights& w, const float* x, int64_t rows, int64_t hidden, float* out) = 0;
  // The SwiGLU MLPs of several experts of one layer in one call, each over its rows of
  // x[x_rows, hidden] (the rows are gathered by the backend). The default is one mlp() per
  // expert; the CUDA backend gathers on the device and runs each projection of all the experts
  // as one grouped GEMM.
  virtual void grouped_mlp(const float* x, int64_t x_rows, int64_t hidden, std::span<const ExpertRows> experts);
  // Per row of x [rows, lm_head.cols()] (final-normed hidden states): its lm_head logits
  // summarised as requests[row] asks (core/logits_summary.h). The default computes the rows with
  // matmul() and summarises them on the host; the CUDA backend keeps the logits on the device and
  // copies back only the summaries.
  virtual std::vector<LogitsSummary> logits_summaries(const float* x, int64_t rows, const Weight& lm_head,
                                                      std::span<const LogitsRequest> requests);
  // Forgets whatever the backend keeps for w (the CUDA backend's device copy): called before w's
  // host memory goes away, e.g. when an expert host drops an expert, so a tensor mapped later at
  // the same address is not mistaken for it.
  virtual void release(const Weight& w) { (void)w; }
  // How many calls are worth running at once from several threads (default: no limit). The CPU
  // backend says 1: each call already spreads over the process's kernel pool; a GPU backend
  // serialises its calls, so splitting work across threads only adds launches.
  virtual int useful_concurrency() const { return std::numeric_limits<int>::max(); }

 protected:
  // The argument checks every implementation of grouped_mlp / logits_summaries makes first;
  // moemesh::Error naming what is wrong.
  static void check_expert_rows(int64_t x_rows, std::span<const ExpertRows> experts);
  // For backends that do not apply LoRA: a moemesh::Error when a span or an expert's rows ask for it.
  void refuse_lora(const BatchLayout& layout) const;
  void refuse_lora(std::span<const ExpertRows> experts) const;
  static void check_logits_requests(int64_t rows, std::span<const LogitsRequest> requests);
};

// The CPU reference backend (stateless: one instance serves every thread).
std::shared_ptr<ComputeBackend> cpu_backend();

}  // namespace moemesh
