// The capacity planner's cost model: what one operation of the moemesh data path costs on a given
// hardware profile. A profile is a file (JSON): either measured on the machine at hand
// (`moemesh plan profile`, kind "measured") or derived from documented hardware figures through a
// roofline model (kind "roofline", not measured). The simulator (core/planner_sim.h) only asks
// the questions below, so both kinds are interchangeable.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/model_config.h"

namespace moemesh::planner {

// One kind of link between two processes: a message costs per_message_s of software overhead,
// latency_s on the wire and bytes / bandwidth_Bps of serialisation on the sender's link.
struct LinkCost {
  double latency_s = 0;
  double bandwidth_Bps = 1e9;
  double per_message_s = 0;
  double seconds(double bytes) const { return per_message_s + latency_s + bytes / bandwidth_Bps; }
};

// Costs of one model on one hardware profile. Times are seconds.
struct CostProfile {
  std::string name;   // e.g. "this-machine", "h100-roofline"
  std::string kind;   // "measured" or "roofline"
  std::string note;   // how it was obtained
  ModelConfig model;  // the model the costs are for

  // Attention side, per MoE/dense layer of one micro-batch: fixed + per row + per context token
  // attended (the sum over rows of the positions each row attends to), for decode rows and for
  // prefill rows apart (a prompt's positions are computed in a batch, by other kernels).
  double attn_fixed_s = 0, attn_per_row_s = 0, attn_per_ctx_s = 0;
  double attn_per_prefill_row_s = 0, attn_per_prefill_ctx_s = 0;
  // Attention worker, per step (embedding, final norm, lm_head, sampling, the step's RPC); per
  // row: each sampled row.
  double step_fixed_s = 0, step_per_row_s = 0;
  // A step that starts sequences takes this much longer on the worker (with shared node compute,
  // CPU on its cores) than its rows and its prefix lookup: a new sequence's set-up in the worker
  // and the router, the prompt's first pass. Measured apart by `plan profile --calibrate-url` (a
  // stream with short requests arriving beside it: how much longer its gaps are in which one
  // started, over their neighbours).
  double step_start_s = 0;
  // Expert host, per layer batch: fixed + per expert with rows + per (row, expert) assignment.
  double expert_fixed_s = 0, expert_per_expert_s = 0, expert_per_row_s = 0;
  // Per dispatch (one attention worker -> one expert host, one layer), beyond the link itself:
  // the hand-offs of the actors, the bridge and the compute pools on both sides. With shared
  // node compute it is CPU of the worker, once per micro-batch and MoE layer whatever the hosts
  // (the other micro-batch's turn waits for it), else latency per dispatch.
  double dispatch_overhead_s = 0;
  // Router, per generated token (streaming it to the client: with shared node compute CPU on the
  // node's cores, where `plan profile --calibrate-url` fits it including the benchmark client's
  // own CPU) and per request (the client's connection, HTTP, validation, tokenizing before
  // admission; requests do not queue for it).
  double router_per_token_s = 0, router_per_request_s = 0;
  // With shared node compute: the share of the per-request work that is CPU on the node's cores,
  // behind whatever they are busy with (the streaming of other requests' tokens); the rest runs
  // on the router's front alone. Fitted on a loaded calibration run's time to first token.
  double router_request_cpu_share = 0;
  // Interference of other work on the machine (a shared host's other jobs, the OS): each step
  // takes longer by an exponentially distributed share of its duration, of this mean (0: none).
  // Fitted on the spread of a calibration's inter-token latency; relative, because what the
  // other jobs take grows with the time a step is exposed to them.
  double step_jitter = 0;
  // Waking from idle: a worker's first step after it sat idle longer than idle_after_s takes
  // idle_wake_s longer, each next one idle_wake_decay of the one before's extra: threads and
  // cores that went to sleep, cold caches. On this machine a pause of 20 ms or more costs the
  // next request 1.2-1.5 ms of TTFT, 0.5-0.6 ms of its first inter-token gap and 0.1-0.3 ms of
  // each of the next six; one of 2 ms nothing (bench/idle_wake.py, docs/planner.md). Both fitted
  // on a calibration run with pauses between requests: its TTFT and its inter-token latency.
  double idle_wake_s = 0, idle_after_s = 0.01, idle_wake_decay = 0.4;
  // The prefix-cache lookup: a step that starts sequences whose prompts have a full KV block
  // waits this long for the KV store first (one round trip for all of them; a miss, as random
  // prompts are). Measured against a moemesh-kvstore process (`plan profile`).
  double prefix_lookup_s = 0;
  // The store serves one message at a time, in order. The router frees a finished sequence in the
  // worker's next step, which publishes its new full blocks first (actors/step_worker.cpp): they
  // take the store kv_put_s + kv_put_per_block_s per block, and that step's lookup waits behind them.
  double kv_put_s = 0, kv_put_per_block_s = 0;
  // Links: same node, other node; ZeroMQ (TCP) and NCCL (GPU to GPU).
  LinkCost zmq_local, zmq_remote, nccl_local, nccl_remote;
  // Every process of a node computes on the node's shared cores (a CPU machine): their compute
  // is serialised on one resource per node. False: each process has its own accelerator.
  bool shared_node_compute = false;
  int node_cores = 1;                    // with shared_node_compute: the cores the node's processes share
  int64_t activation_bytes = 4;          // bytes per hidden value on the wire (f32 on CPU, bf16 on GPUs)
  int64_t kv_bytes_per_token = 0;        // all layers, K and V
  int64_t kv_tokens_per_worker = 16384;  // KV capacity of one attention worker
  double node_cost_per_hour = 1.0;       // what one node costs (search minimises it)
  int gpus_per_node = 1;                 // processes (attention workers + expert hosts) per node
  // What a calibration against a running cluster measured and started from (`plan profile
  // --calibrate-url`), so `plan profile --refit` can fit it again; null when not calibrated.
  nlohmann::json calibration;

  // Seconds of one micro-batch's attention for one layer.
  double attention_layer_s(double decode_rows, double decode_ctx, double prefill_rows, double prefill_ctx) const {
    return attn_fixed_s + attn_per_row_s * decode_rows + attn_per_ctx_s * decode_ctx +
           attn_per_prefill_row_s * prefill_rows + attn_per_prefill_ctx_s * prefill_ctx;
  }
  double step_s(double rows) const { return step_fixed_s + step_per_row_s * rows; }
  // Seconds of one expert host batch for one layer.
  double expert_batch_s(double active_experts, double rows) const {
    return expert_fixed_s + expert_per_expert_s * active_experts + expert_per_row_s * rows;
  }
  // Bytes of one dispatch each way for `rows` (row, expert) assignments.
  double dispatch_bytes(double rows) const { return 256 + rows * double(model.hidden_size * activation_bytes); }
  const LinkCost& link(bool nccl, bool same_node) const {
    return nccl ? (same_node ? nccl_local : nccl_remote) : (same_node ? zmq_local : zmq_remote);
  }

  nlohmann::json to_json() const;
  static CostProfile from_json(const nlohmann::json& j);  // throws moemesh::Error naming the bad field
  static CostProfile load(const std::filesystem::path& file);
  void save(const std::filesystem::path& file) const;
};

// Documented figures of an accelerator and its node (dense BF16 FLOP/s, HBM bandwidth, links).
struct Hardware {
  std::string name;
  double flops = 0;        // dense BF16, per GPU
  double mem_bw_Bps = 0;   // HBM
  double mem_bytes = 0;    // HBM capacity
  double nvlink_Bps = 0;   // per GPU, one direction
  double network_Bps = 0;  // per GPU (InfiniBand / RoCE NIC), one direction
  double node_cost_per_hour = 0;
  int gpus_per_node = 8;
};
const std::vector<Hardware>& known_hardware();      // h100, h200, a100
const Hardware& hardware(const std::string& name);  // throws on an unknown name

// The roofline profile of `model` (bf16 weights and KV) on `hw`: every operation takes the longer
// of its bytes over the achievable memory bandwidth and its FLOPs over the achievable FLOP/s,
// plus a kernel-launch floor. Labelled kind "roofline": not measured.
CostProfile roofline_profile(const ModelConfig& model, const Hardware& hw);

// The same model on what `tests/gpu/run.sh` measured (its bench.md, bench_gpu_kernels' table):
// the measured copy bandwidth, the fastest bf16 matmul's FLOP/s, the fastest kernel's time as the
// launch floor. Links, memory and price come from the known hardware the device's name names
// (h100 when none). Kind "benchmarked". Throws moemesh::Error when the text has no device line
// or no bf16 matmul row.
CostProfile gpu_results_profile(const ModelConfig& model, const std::string& bench_md);

// A DeepSeek-MoE-16B-shaped config (28 layers, the first dense, 64 routed experts top-6 + 2
// shared, hidden 2048, expert width 1408): the docs' worked example.
ModelConfig deepseek_moe_16b_config();

// Least squares y ≈ X·b (rows of X are the features of one sample); small dense systems only.
std::vector<double> fit_linear(const std::vector<std::vector<double>>& x, const std::vector<double>& y);

}  // namespace moemesh::planner
