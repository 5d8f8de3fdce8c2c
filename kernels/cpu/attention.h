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
  double scale = 0.0;          // scores are q·k times this; 0: 1 / sqrt(head_dim)
  // Split-K: the keys of each (query rows, kv head) task are cut into this many parts computed
  // in parallel and merged by log-sum-exp. 0: chosen from the compute pool's threads and the
  // context (decode over a long context splits; short ones and prefill with enough tasks do not).
  int64_t kv_splits = 0;
};

// out[n_q, n_heads*head_dim] = softmax(q·K^T / sqrt(head_dim)) · V for queries at positions
// q_pos[n_q] of one sequence whose cache holds keys 0 .. max(q_pos) (at least). Causal: a
// query sees keys at positions <= its own. Scores and softmax in f32 with max subtraction.
// INT8: a score is scale_k · (q · k_q), a value row scale_v · v_q (dequantised on the fly).
// Only the blocks some query's window sees are read: a released block's pointer may be null.
// Work: tasks of up to 16 query rows × one kv head × one split of the keys, keys in tiles of 512
// with an online softmax (memory per task independent of the context length).
void paged_attention(const float* q, int64_t n_q, const int32_t* q_pos, const AttentionShape& shape, const PagedKV& kv,
                     float* out);

}  // namespace moemesh::cpu
