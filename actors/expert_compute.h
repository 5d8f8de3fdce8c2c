// The expert host's compute side: the experts it holds, the compute backend they run on
// (`--device`), a pool of compute threads (never the actor scheduler's), and batched execution
// (one backend MLP per expert over the rows of every request in a batch).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "actors/trace_span.h"
#include "core/checkpoint.h"
#include "core/compute_backend.h"
#include "core/dispatch_codec.h"
#include "core/expert_set.h"
#include "core/lora_cache.h"

namespace moemesh::actors {

// Fixed-size thread pool; tasks run in submission order, several at a time.
class ComputePool {
 public:
  explicit ComputePool(int threads);
  ~ComputePool();  // close()
  ComputePool(const ComputePool&) = delete;
  ComputePool& operator=(const ComputePool&) = delete;

  // Queues `task`; false (and the task dropped) once the pool is closed.
  bool submit(std::function<void()> task);
  // Runs what is queued, then joins the threads; later submits are refused. Idempotent, from any
  // thread but the pool's own.
  void close();
  int threads() const { return int(threads_.size()); }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  std::mutex join_mu_;
  std::vector<std::thread> threads_;
};

// The experts one host serves, mapped from the checkpoint (only those tensors), and the backend
// that computes them (the CPU reference unless `--device` names another). The set can change
// while batches run (live re-placement, assign()): a batch holds the weights it computes with,
// so a dropped expert's tensors are unmapped only when the last batch using them finishes.
class HostedExperts {
 public:
  // Throws moemesh::Error when the set names experts the model does not have.
  // lora_cache_bytes bounds the LoRA adapters (their expert modules) kept loaded.
  HostedExperts(std::shared_ptr<Checkpoint> ckpt, ExpertSet experts,
                std::shared_ptr<ComputeBackend> backend = cpu_backend(), uint64_t lora_cache_bytes = 256ull << 20);
  ~HostedExperts();
  HostedExperts(const HostedExperts&) = delete;
  HostedExperts& operator=(const HostedExperts&) = delete;

  const ModelConfig& config() const { return ckpt_->config(); }
  int64_t hidden() const { return config().hidden_size; }
  ExpertSet experts() const;  // a copy: the set may change
  bool holds(int32_t layer, int32_t expert) const;
  // The expert's weights, kept alive as long as the pointer; null when it is not held.
  std::shared_ptr<const MlpWeights> mlp(int32_t layer, int32_t expert) const;
  ComputeBackend& backend() const { return *backend_; }
  uint64_t mapped_bytes() const { return ckpt_->mapped_bytes(); }
  // The bytes these experts' tensors take in the checkpoint (what mapped_bytes() must equal).
  uint64_t expected_bytes() const;
  // Makes `want` the set: maps the experts it lacks, then drops the others. Throws
  // moemesh::Error (holding what it held) when `want` names experts the model does not have.
  void assign(const ExpertSet& want);
  // The adapter `ref` names, with the modules of every expert held now (from the LoRA cache, or
  // read from its folder). Throws moemesh::Error for an adapter that does not load.
  std::shared_ptr<const LoraAdapter> adapter(const LoraRef& ref) const;
  LoraCache::Stats lora_stats() const { return lora_->stats(); }

 private:
  std::map<ExpertKey, std::shared_ptr<const MlpWeights>> load(const ExpertSet& keys);
  void release(ExpertKey key, const MlpWeights& w);

  std::shared_ptr<Checkpoint> ckpt_;
  std::shared_ptr<ComputeBackend> backend_;
  std::mutex load_mu_;     // one assign at a time; releases wait for it (a mapping is shared)
  mutable std::mutex mu_;  // experts_
  std::map<ExpertKey, std::shared_ptr<const MlpWeights>> experts_;
  std::unique_ptr<LoraCache> lora_;
};

class Transport;  // actors/transport.h

// One accepted request waiting in or running with a batch.
struct PendingRequest {
  std::string peer;  // ROUTER routing id of the sender
  uint64_t request_id = 0;
  std::vector<dispatch::Group> groups;
  std::vector<LoraRef> adapters;  // what the groups' adapter indexes name
  std::vector<float> rows;        // [sum(groups.rows), hidden]
  // How the request came: its reply goes back the same way, so a request sent before the pair
  // switched is not answered over the new transport. Null: ZeroMQ frames.
  std::shared_ptr<Transport> via;
  // When the request names traces: this host's span under the first, the others as links.
  std::optional<trace::OpenSpan> span;
  std::vector<TraceRef> traces;
};

// A batch of requests for one layer, and (after compute) their outputs in request order.
struct BatchJob {
  int32_t layer = 0;
  std::vector<PendingRequest> requests;
  std::vector<std::vector<float>> outputs;  // per request, [its rows, hidden]
  std::string error;                        // non-empty: the batch failed (all its requests)
  std::string error_code;                   // its dispatch error code (core/dispatch_codec.h)
  int experts = 0;                          // distinct experts computed
  std::chrono::steady_clock::time_point queued, started, finished;

  // private to run_batch
  std::atomic<int> remaining{0};
  std::mutex error_mu;
};
using BatchJobPtr = std::shared_ptr<BatchJob>;

// Runs the batch on the pool: every expert computes the rows of every request that chose it (in
// request order) through ComputeBackend::grouped_mlp, split into as many calls as the backend
// can use at once (CPU and CUDA: one call for the layer's batch, the CPU one spread over the
// kernels' pool, the CUDA one as grouped GEMMs over all the experts); the results are split
// back per request. `done` is called once, on a pool thread, when the last call finishes.
void run_batch(const HostedExperts& experts, ComputePool& pool, BatchJobPtr job, std::function<void(BatchJobPtr)> done);

}  // namespace moemesh::actors
