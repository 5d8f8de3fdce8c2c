// Causal grouped-query attention over a paged KV cache (CPU reference).
#pragma once
#include <cstdint>

namespace moemesh::cpu {

// A sequence's keys and values, laid out in fixed-size blocks: block b holds positions
// [b*block_size, (b+1)*block_size), each row kv_heads*head_dim values.
// F32 storage: k_blocks/v_blocks. INT8 storage (k_blocks null): k_q/v_q rows of int8 and
// k_scale/v_scale [block_size, kv_heads] f32 per block (kernels/cpu/kv_int8.h's format).
struct PagedKV {
  const float* const* k_blocks = nullptr;
  const float* const* v_blocks = nullptr;
  int64_t block_size = 16;
  const int8_t* const* k_q = nullptr;
  const int8_t* const* v_q = nullptr;
  const float* const* k_scale = nullptr;
  const float* const* v_scale = nullptr;
};

struct AttentionShape {
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;  // each kv head serves n_heads / n_kv_heads query heads
  int64_t head_dim = 0;
  int64_t sliding_window = 0;  // 0: none; else query i sees keys j with i - window < j <= i
};

// out[n_q, n_heads*head_dim] = softmax(q·K^T / sqrt(head_dim)) · V for queries at positions
// q_pos[n_q] of one sequence whose cache holds keys 0 .. max(q_pos) (at least). Causal: a
// query sees keys at positions <= its own. Scores and softmax in f32 with max subtraction.
// INT8: a score is scale_k · (q · k_q), a value row scale_v · v_q (dequantised on the fly).
void paged_attention(const float* q, int64_t n_q, const int32_t* q_pos, const AttentionShape& shape,
                     const PagedKV& kv, float* out);

}  // namespace moemesh::cpu
