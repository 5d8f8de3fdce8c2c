// The whole host-callable surface of the CUDA backend (the DeepEP shape): plain functions taking
// device pointers, sizes and a cudaStream_t, each validating its arguments and returning a Status.
// This header has no device code, so plain C++ translation units (g++) include it too.
//
// Semantics match the CPU reference in kernels/cpu/ops.h: activations are f32 row-major
// [rows, cols]; weights may be F32, F16 or BF16; accumulation is f32. Every launch is asynchronous
// on `stream`; a returned Status reports bad arguments and launch errors, not errors that happen
// later on the device (synchronise and call check_last_error() for those).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace moemesh::cuda {

// ---------------------------------------------------------------------------------------------
// Status: ok, or one readable line that says what went wrong and where ("file:line: message").

class [[nodiscard]] Status {
 public:
  Status() = default;  // ok
  static Status error(const char* file, int line, std::string message) {
    Status s;
    s.message_ = std::string(file) + ":" + std::to_string(line) + ": " + std::move(message);
    return s;
  }
  bool ok() const { return message_.empty(); }
  const std::string& message() const { return message_; }

 private:
  std::string message_;  // empty means ok
};

// Translates a CUDA / cuBLAS result into a Status carrying the caller's file:line.
Status from_cuda(cudaError_t err, const char* file, int line, const char* what);
Status from_cublas(cublasStatus_t st, const char* file, int line, const char* what);

#define MOEMESH_CUDA_ERROR(msg) ::moemesh::cuda::Status::error(__FILE__, __LINE__, (msg))
#define MOEMESH_CUDA_RETURN_IF_ERROR(expr)             \
  do {                                                 \
    ::moemesh::cuda::Status moemesh_status_ = (expr);  \
    if (!moemesh_status_.ok()) return moemesh_status_; \
  } while (0)
#define MOEMESH_CUDA_TRY(call) \
  MOEMESH_CUDA_RETURN_IF_ERROR(::moemesh::cuda::from_cuda((call), __FILE__, __LINE__, #call))
#define MOEMESH_CUBLAS_TRY(call) \
  MOEMESH_CUDA_RETURN_IF_ERROR(::moemesh::cuda::from_cublas((call), __FILE__, __LINE__, #call))

// ---------------------------------------------------------------------------------------------
// Devices

// Number of CUDA devices; 0 (never a crash) when there is no driver or no device. Probed once.
int device_count();
// Why device_count() is 0: cudaGetErrorString of the probe ("" when it succeeded).
const char* device_error();
// The sticky/last launch error as a Status (ok when none).
Status check_last_error();

// ---------------------------------------------------------------------------------------------
// Elementwise and row kernels (kernels/cuda/norm_rope_act.cu)

// y = x / sqrt(mean(x^2) + eps) * weight, per row. weight [dim] in F32/F16/BF16.
Status rmsnorm(const float* x, const void* weight, DType wdtype, int64_t rows, int64_t dim, double eps, float* y,
               cudaStream_t stream);

// Fused residual add + RMSNorm: x += residual (in place), then y = rmsnorm(x). y may not alias x.
Status add_rmsnorm(float* x, const float* residual, const void* weight, DType wdtype, int64_t rows, int64_t dim,
                   double eps, float* y, cudaStream_t stream);

// Rotary embedding in place, HF "rotate_half" (pairs i and i + head_dim/2), on
// x[rows, n_heads * head_dim]; positions[rows] (device). sin/cos in double, the rotation in f32,
// as in the CPU reference.
Status rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, const int32_t* positions, double theta,
            cudaStream_t stream);

// The same with given frequencies (RoPE scaling: core/rope.h computes them): pair i turns by
// position * inv_freq[i]; cos and sin are multiplied by attention_factor (YaRN). Passed by value
// (a kernel argument), so no device buffer is needed; head_dim / 2 <= kMaxRopePairs.
inline constexpr int kMaxRopePairs = 128;
struct RopeFrequencies {
  double inv_freq[kMaxRopePairs] = {};
  double attention_factor = 1.0;
};
Status rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, const int32_t* positions,
            const RopeFrequencies& freqs, cudaStream_t stream);

// out[rows, n] = silu(gate) * up. out may alias gate or up.
Status silu_mul(const float* gate, const float* up, int64_t rows, int64_t n, float* out, cudaStream_t stream);

// silu_mul with gate, up and out in `dtype` (F32/F16/BF16; the math in f32, rounded once).
Status silu_mul_as(const void* gate, const void* up, int64_t rows, int64_t n, void* out, DType dtype,
                   cudaStream_t stream);

// x[n] += y[n] (the residual add after attention / the MLP).
Status add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream);

// Gathers rows of table [vocab, dim] (F32/F16/BF16) into out[n, dim] as f32. ids live on the
// device, so they cannot be checked here: an id outside [0, vocab) yields a row of NaN (loud,
// never an out-of-bounds read). Ids are meant to be validated on the host before upload.
Status embedding(const void* table, DType dtype, int64_t vocab, int64_t dim, const int32_t* ids, int64_t n, float* out,
                 cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Gating (kernels/cuda/gating.cu)

// softmax(logits / temperature) then top-k per row. ids/weights [rows, k], ordered by weight
// descending, ties: lower expert id first. When renormalize, the k weights sum to 1.
// n_experts <= kMaxGatingExperts, 1 <= k <= n_experts.
inline constexpr int64_t kMaxGatingExperts = 2048;
Status topk_gating(const float* logits, int64_t rows, int64_t n_experts, int64_t k, float temperature, bool renormalize,
                   int32_t* ids, float* weights, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Dense matmul via cuBLAS (kernels/cuda/gemm.cu)

// y[rows, out] = x[rows, in] · W[out, in]^T (W is a Linear weight, HF layout), f32 accumulate
// (CUBLAS_COMPUTE_32F: no TF32). With an F16/BF16 W, cuBLAS needs both inputs in that type, so x
// is first rounded to W's dtype in `workspace` (activations lose precision the way they do in
// vLLM/SGLang; the output stays f32). `workspace` needs matmul_workspace_bytes(...) bytes (0 for
// F32: pass nullptr). rows, in and out must each fit in an int (cuBLAS's index type).
size_t matmul_workspace_bytes(int64_t rows, int64_t in, DType wdtype);
Status matmul(cublasHandle_t blas, const float* x, int64_t rows, int64_t in, const void* w, DType wdtype, int64_t out,
              float* y, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// An INT4/INT8 weight (kernels/cpu/quant_matrix.h's QuantMatrix) on the device: the codes in the
// CPU layout (rows of padded_in values; INT4 blocks of 32 in 16 bytes, byte j = value j | value
// j + 16 << 4), per (row, group) scale and scaled zero (value = q·scale - scaled_zero), and per
// padded position its group and its input channel (-1: padding). All device pointers.
struct QuantWeight {
  int bits = 4;
  int64_t out = 0, in = 0, padded_in = 0, groups = 0;
  const uint8_t* q = nullptr;
  const float* scale = nullptr;
  const float* scaled_zero = nullptr;
  const int32_t* group_of = nullptr;
  const int32_t* source = nullptr;
};

// y[rows, out] = x[rows, in] · dequantized(m)ᵀ in f32 (each weight exact, as on the CPU). Up to
// kQuantGemvRows rows a warp per output and row reads the codes directly (decode); more rows
// dequantize m once into `workspace` (f32 [out, in]) and multiply with cuBLAS (prefill).
constexpr int64_t kQuantGemvRows = 8;
size_t quant_matmul_workspace_bytes(int64_t rows, const QuantWeight& m);
Status quant_matmul(cublasHandle_t blas, const float* x, int64_t rows, const QuantWeight& m, float* y, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream);

// The experts of a layer in one cuBLAS call (cublasGemmGroupedBatchedEx): for each group i,
// y[i][rows[i], out] = x[i][rows[i], in] · w[i][out, in]^T, every matrix in `dtype` (F32, F16 or
// BF16: cuBLAS's grouped GEMM wants one type throughout), f32 accumulation. rows, x, w and y are
// host arrays of `groups` entries (x/w/y: device matrices); device_pointers is device scratch for
// 3 * groups pointers, which must stay untouched until the GEMM has run on `stream`.
Status grouped_matmul(cublasHandle_t blas, int64_t groups, const int64_t* rows, int64_t in, int64_t out,
                      const void* const* x, const void* const* w, void* const* y, DType dtype, void** device_pointers,
                      cudaStream_t stream);

// Owns a cuBLAS handle (pure f32 math mode). Create after the device is selected.
class Blas {
 public:
  Blas() = default;
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  Status init();
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Expert rows (kernels/cuda/moe.cu)

// out[n, dim] (in out_dtype: F32/F16/BF16) = rows index[n] of x[x_rows, dim] (f32): the rows of
// every expert of a layer, expert after expert, as the grouped GEMM reads them. An index outside
// [0, x_rows) yields a row of NaN (index lives on the device and cannot be checked here).
Status gather_rows(const float* x, int64_t x_rows, int64_t dim, const int32_t* index, int64_t n, void* out,
                   DType out_dtype, cudaStream_t stream);
// out[n] (f32) = in[n] (F32/F16/BF16).
Status widen_to_f32(const void* in, DType dtype, int64_t n, float* out, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Logits summaries for sampling (kernels/cuda/sampling.cu; host reference: core/logits_summary.h)

inline constexpr int64_t kMaxSummaryTopK = 1024;

// Per row r of logits [rows, vocab]: top_ids/top_values [rows, k] the k largest, by value
// descending, ties lowest id (1 <= k <= min(vocab, kMaxSummaryTopK)); lse[r] = log Σ exp(x);
// lse_scaled[r] = log Σ exp(x / temperature[r]) (temperature[r] <= 0: the same as lse). For j in
// [watch_offsets[r], watch_offsets[r + 1]): watch_values[j] = logits[r, watch_ids[j]], -inf for
// an id outside [0, vocab). watch_offsets has rows + 1 entries; watch_ids / watch_values may be
// null when every row watches nothing.
Status logits_summary(const float* logits, int64_t rows, int64_t vocab, int64_t k, const float* temperature,
                      const int32_t* watch_ids, const int32_t* watch_offsets, int32_t* top_ids, float* top_values,
                      float* lse, float* lse_scaled, float* watch_values, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Attention over a paged KV cache (kernels/cuda/attention.cu)
//
// KV cache: k_cache and v_cache are each f32 [num_blocks, kKvBlockTokens, n_kv_heads, head_dim]:
// a token's K (or V) for all KV heads is one contiguous row, so appending a token is one write.
// Token t of a sequence lives in block block_table[seq][t / 16] at offset t % 16 (its "slot" is
// block * 16 + offset). block_tables is int32 [n_seqs, max_blocks_per_seq].
//
// Queries: q [rows, n_heads, head_dim]. Row r belongs to sequence row_seq[r] and sits at position
// row_pos[r]; it attends causally to that sequence's cached tokens p with
//   max(0, row_pos - sliding_window + 1) <= p <= row_pos   (sliding_window 0: no window),
// i.e. the window counts the query itself (HF Mistral / flash-attn window (W-1, 0)). A decode step
// is one row per sequence with row_pos = seq_len - 1; a prefill chunk is several rows of one
// sequence (correct, not tuned for it). The row's own K/V must already be in the cache
// (paged_kv_write). GQA: query head h reads KV head h / (n_heads / n_kv_heads).
// out [rows, n_heads, head_dim] = softmax(scale · q·K^T) · V, computed with an online softmax in f32.
// Device-side data cannot be checked on the host, so a row whose row_seq is outside [0, n_seqs),
// whose row_pos is negative or beyond its block table (>= max_blocks_per_seq * 16), or that meets
// a block id outside [0, num_blocks) gets NaN: loud, never an out-of-bounds read.

inline constexpr int64_t kKvBlockTokens = 16;
inline constexpr int64_t kMaxAttentionHeadDim = 256;
inline constexpr int64_t kMaxKvSplits = 64;

struct PagedAttentionConfig {
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;            // <= kMaxAttentionHeadDim
  int64_t num_blocks = 0;          // blocks in k_cache / v_cache
  int64_t max_blocks_per_seq = 0;  // row stride of block_tables
  float scale = 0.0f;              // usually 1 / sqrt(head_dim)
  int64_t sliding_window = 0;      // 0: attend to the whole prefix
  // Split-K (flash-decoding): each row's attended tokens are cut into this many parts, computed by
  // blocks of their own and merged by log-sum-exp; > 1 needs a workspace of
  // split_workspace_bytes(rows). Worth it when rows * n_heads blocks would leave the GPU idle
  // (decode over long contexts): kv_splits_for() picks it.
  int64_t kv_splits = 1;

  // Checks every field; the kernels call it first.
  Status validate() const;
  // Sizes, computed in one place.
  int64_t kv_row_floats() const { return n_kv_heads * head_dim; }  // one token, all KV heads
  int64_t block_floats() const { return kKvBlockTokens * kv_row_floats(); }
  size_t cache_bytes() const { return size_t(num_blocks * block_floats()) * sizeof(float); }  // each of K, V
  size_t split_workspace_bytes(int64_t rows) const {
    return kv_splits > 1 ? size_t(rows * n_heads * kv_splits * (head_dim + 2)) * sizeof(float) : 0;
  }
};

// Splits for rows over contexts of up to max_tokens: enough blocks for ~4 waves over sm_count
// multiprocessors, each split at least 256 tokens, at most kMaxKvSplits.
inline int64_t kv_splits_for(int64_t rows, int64_t n_heads, int64_t max_tokens, int sm_count) {
  const int64_t blocks = rows * n_heads, want = 4 * int64_t(sm_count > 0 ? sm_count : 1);
  if (blocks >= want) return 1;
  int64_t s = (want + blocks - 1) / blocks;
  s = s < max_tokens / 256 ? s : max_tokens / 256;
  return s < 1 ? 1 : (s > kMaxKvSplits ? kMaxKvSplits : s);
}

// Writes rows of new keys/values k, v [rows, n_kv_heads, head_dim] into the cache at
// slots[rows] (slot = block * 16 + offset). A negative slot is skipped (padding rows);
// a slot beyond the cache is skipped too (never an out-of-bounds write).
Status paged_kv_write(const PagedAttentionConfig& cfg, const float* k, const float* v, int64_t rows,
                      const int32_t* slots, float* k_cache, float* v_cache, cudaStream_t stream);

// workspace: split_workspace_bytes(rows) of device memory when cfg.kv_splits > 1 (else unused).
Status paged_attention(const PagedAttentionConfig& cfg, const float* q, int64_t rows, const int32_t* row_seq,
                       const int32_t* row_pos, const int32_t* block_tables, int64_t n_seqs, const float* k_cache,
                       const float* v_cache, float* out, cudaStream_t stream, float* workspace = nullptr);

// INT8 KV cache: k_q/v_q int8 [num_blocks, 16, n_kv_heads, head_dim] and k_scale/v_scale f32
// [num_blocks, 16, n_kv_heads]: one symmetric scale per (token, kv head), scale = max|x| / 127,
// q = round-half-even(x / scale) clamped to [-127, 127] (0 for an all-zero head), exactly the CPU
// format of kernels/cpu/kv_int8.h. Slots, block tables, windows and NaN-on-bad-input as above.
struct Int8KvCache {
  int8_t* k_q = nullptr;
  int8_t* v_q = nullptr;
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  size_t values_bytes(const PagedAttentionConfig& c) const { return size_t(c.num_blocks * c.block_floats()); }
  size_t scales_bytes(const PagedAttentionConfig& c) const {
    return size_t(c.num_blocks * kKvBlockTokens * c.n_kv_heads) * sizeof(float);
  }
};

// Quantises rows of k, v [rows, n_kv_heads, head_dim] into the cache at slots[rows].
Status paged_kv_write_int8(const PagedAttentionConfig& cfg, const float* k, const float* v, int64_t rows,
                           const int32_t* slots, const Int8KvCache& cache, cudaStream_t stream);

// paged_attention over an INT8 cache: scores scale_k · (q · k_q), values scale_v · v_q.
Status paged_attention_int8(const PagedAttentionConfig& cfg, const float* q, int64_t rows, const int32_t* row_seq,
                            const int32_t* row_pos, const int32_t* block_tables, int64_t n_seqs,
                            const Int8KvCache& cache, float* out, cudaStream_t stream, float* workspace = nullptr);

}  // namespace moemesh::cuda
