// CPU element-wise and row kernels: the reference every other backend is checked against.
// Activations are f32, row-major [rows, cols]. Weights may be F32, F16 or BF16; accumulation is
// f32. Matrix products are in kernels/cpu/gemm.h.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace moemesh::cpu {

// y = x / sqrt(mean(x^2) + eps) * weight, per row. weight may be F32/F16/BF16.
void rmsnorm(const float* x, const void* weight, DType wdtype, int64_t rows, int64_t dim, double eps, float* y);

// Rotary embedding, HF "rotate_half" convention (pairs i and i + head_dim/2), in place on
// x[rows, n_heads * head_dim]; positions[rows]. inv_freq[head_dim/2] are the pairs' frequencies
// (RoPE scaling is in them: core/rope.h); cos and sin (in double, then f32) are multiplied by
// attention_factor (YaRN), the rotation is in f32.
void rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, const int32_t* positions, const double* inv_freq,
          double attention_factor = 1.0);
// The unscaled frequencies 1 / theta^(2i / head_dim).
void rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, const int32_t* positions, double theta);

// out[rows, n] = silu(gate) * up, gate/up [rows, n]
void silu_mul(const float* gate, const float* up, int64_t rows, int64_t n, float* out);

// Row-wise softmax in place; logits divided by temperature first.
void softmax(float* x, int64_t rows, int64_t n, float temperature = 1.0f);

// log Σ exp(x[i] · scale) over x[0, n): a logits row's log-normaliser at temperature 1 / scale.
// The exponentials are the SIMD softmax tile's (within 2 ulp), summed in f32 lanes over chunks
// of 2048 and the chunks in f64. -inf when every x is -inf.
double log_sum_exp(const float* x, int64_t n, float scale);

// Gating: softmax(logits / temperature) then top-k per row. ids/weights [rows, k], ordered by
// weight descending (ties: lower expert id first). When renormalize, the k weights sum to 1.
void topk_gating(const float* logits, int64_t rows, int64_t n_experts, int64_t k, float temperature, bool renormalize,
                 int32_t* ids, float* weights);

// Gathers embedding rows (F32/F16/BF16 table [vocab, dim]) into out[n, dim].
void embedding(const void* table, DType dtype, int64_t dim, const int32_t* ids, int64_t n, float* out);

}  // namespace moemesh::cpu
