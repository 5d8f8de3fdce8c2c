// Symmetric INT8 quantisation of KV rows with one f32 scale per (token, kv head): the format of
// the INT8 KV cache on every backend (the CUDA kernels quantise the same way).
#pragma once
#include <cstdint>

namespace moemesh::cpu {

// For each of n_rows rows of kv_heads * head_dim floats and each head h:
//   scale = max|x| / 127 (0 for an all-zero head), q = round(x / scale) clamped to [-127, 127].
// q [n_rows, kv_heads * head_dim], scales [n_rows, kv_heads].
void quantize_kv_int8(const float* x, int64_t n_rows, int64_t kv_heads, int64_t head_dim, int8_t* q,
                      float* scales);
// x = q * scale, the inverse layout of quantize_kv_int8.
void dequantize_kv_int8(const int8_t* q, const float* scales, int64_t n_rows, int64_t kv_heads, int64_t head_dim,
                        float* x);

}  // namespace moemesh::cpu
