// The operations of LoRA training (`moemesh finetune`, core/lora_train.h), forward and backward,
// written by hand on row-major buffers. Each forward computes what the inference path computes
// (core/compute_backend.cpp's CPU attention block, core/moe.cpp's routing, kernels/cpu/ops.h),
// keeping what its backward needs. Backward functions accumulate (+=) into input gradients unless
// they say "overwrites". Templated on the element type: float for training, double for the
// finite-difference gradient checks (tests/unit/test_lora_train.cpp).
#pragma once
#include <cstdint>
#include <vector>

#include "core/model_config.h"

namespace moemesh::lora_ops {

// C[m, n] = alpha · op(A) · op(B) + beta · C (row-major; op(A) [m, k], op(B) [k, n]).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, const T* b, T beta, T* c);

// A Linear y = x·Wᵀ with an optional LoRA adapter: + scale · (x·Aᵀ)·Bᵀ.
template <typename T>
struct Linear {
  const T* w = nullptr;  // [out, in]
  int64_t out = 0, in = 0;
  const T* a = nullptr;  // [r, in]; null: no adapter
  const T* b = nullptr;  // [out, r]
  int64_t r = 0;
  T scale = 0;
};

// y[n, out] = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (overwrites y); u[n, r] = x·Aᵀ kept for the backward pass.
template <typename T>
void linear_forward(const Linear<T>& l, const T* x, int64_t n, T* y, std::vector<T>& u);
// dx[n, in] += dy·W + scale·(dy·B)·A (dx may be null), da[r, in] and db[out, r] += their
// gradients (null: frozen adapter).
template <typename T>
void linear_backward(const Linear<T>& l, const T* x, const T* u, const T* dy, int64_t n, T* dx, T* da, T* db);

// y = x / sqrt(mean(x²) + eps) · w per row (as cpu::rmsnorm: sum of squares in double);
// inv[n] keeps the row's 1 / rms.
template <typename T>
void rmsnorm_forward(const T* x, const T* w, int64_t n, int64_t d, double eps, T* y, T* inv);
template <typename T>
void rmsnorm_backward(const T* x, const T* w, const T* inv, const T* dy, int64_t n, int64_t d, T* dx);

// RoPE, HF rotate_half pairs (i, i + head_dim/2), positions 0..n-1, in place on x[n, heads·head_dim].
// inverse: the transposed rotation, i.e. the backward pass of the forward rotation.
template <typename T>
void rope(T* x, int64_t n, int64_t heads, int64_t head_dim, const double* inv_freq, double attention_factor,
          bool inverse);

// Causal GQA attention of one sequence at positions 0..n-1: q [n, H·hd], k/v [n, KV·hd],
// out [n, H·hd] (overwrites). window > 0: query i sees keys j with i - window < j <= i.
// p [H, n, n] keeps the probabilities.
struct AttentionDims {
  int64_t heads = 0, kv_heads = 0, head_dim = 0, window = 0;
  double scale = 1.0;
};
template <typename T>
void attention_forward(const AttentionDims& s, const T* q, const T* k, const T* v, int64_t n, T* out,
                       std::vector<T>& p);
// dq, dk, dv (overwrites) from dout.
template <typename T>
void attention_backward(const AttentionDims& s, const T* q, const T* k, const T* v, const T* p, const T* dout,
                        int64_t n, T* dq, T* dk, T* dv);

// act = silu(g) · u, element-wise over n values.
template <typename T>
void swiglu_forward(const T* g, const T* u, int64_t n, T* act);
// dg, du (overwrites) from dact.
template <typename T>
void swiglu_backward(const T* g, const T* u, const T* dact, int64_t n, T* dg, T* du);

// The MoE gate as core/moe.cpp route_from_logits: softmax((logits + router_bias) / temperature),
// top-k (ties: lower id), then Mixtral renormalises; DeepSeek renormalises (w / (Σw + 1e-20))
// when norm_topk_prob and k > 1, then scales by routed_scaling_factor.
template <typename T>
struct Gating {
  int64_t n = 0, experts = 0, k = 0;
  std::vector<T> p;          // [n, experts] softmax
  std::vector<int32_t> ids;  // [n, k]
  std::vector<T> w;          // [n, k] mixing weights
};
template <typename T>
void gating_forward(const ModelConfig& cfg, const T* logits, int64_t n, Gating<T>& g);
// dlogits [n, experts] (overwrites) from the mixing weights' gradient dw [n, k]; the choice of
// experts is piecewise constant and has none.
template <typename T>
void gating_backward(const ModelConfig& cfg, const Gating<T>& g, const T* dw, T* dlogits);

// Σ over rows of -log softmax(logits)[target] (in double). With dlogits: (softmax - onehot) ·
// grad_scale (overwrites).
template <typename T>
double cross_entropy(const T* logits, const int32_t* targets, int64_t n, int64_t vocab, T grad_scale, T* dlogits);

}  // namespace moemesh::lora_ops
