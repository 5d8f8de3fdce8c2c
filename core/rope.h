// Rotary position embedding parameters: the inverse frequencies and the attention factor that
// the RoPE kernels (kernels/cpu/ops.h, kernels/cuda/api.cuh) take as plain numbers, computed from
// a model's `rope_theta` and `rope_scaling` the way Hugging Face transformers'
// modeling_rope_utils.py does:
//
//   default  inv_freq[i] = 1 / theta^(2i / head_dim)
//   linear   inv_freq / factor
//   dynamic  NTK-aware: theta' = theta * (factor * L / max_pos - (factor - 1))^(d / (d - 2)) with L the
//            length a forward call sees (positions 0 .. L-1; below max_pos: the default frequencies).
//            As in HF generation, a position keeps the rotation of the call that computed it.
//   yarn     DeepSeek's YaRN: frequencies interpolated by factor below the ramp [low, high] of
//            dimensions (beta_fast / beta_slow rotations over original_max_position_embeddings),
//            extrapolated above; cos/sin scaled by the attention factor
//            mscale(factor, mscale) / mscale(factor, mscale_all_dim) (or rope_scaling's
//            attention_factor), mscale(s, m) = 0.1 m ln s + 1 (1 for s <= 1).
//   llama3   Llama 3.1: wavelengths above original / low_freq_factor divided by factor, below
//            original / high_freq_factor kept, smoothly interpolated between.
#pragma once
#include <cstdint>
#include <vector>

#include "core/model_config.h"

namespace moemesh {

struct RopeTable {
  std::vector<double> inv_freq;   // head_dim / 2 entries
  double attention_factor = 1.0;  // multiplies cos and sin (yarn)
};

// The table of a forward call whose longest sequence spans positions [0, seq_len) (only the
// dynamic type depends on seq_len).
RopeTable rope_table(const ModelConfig& cfg, int64_t seq_len);
// Whether rope_table depends on seq_len (dynamic scaling): then each sequence of a batch gets its own.
bool rope_depends_on_length(const ModelConfig& cfg);

// The attention score scale: 1 / sqrt(head_dim), times mscale(factor, mscale_all_dim)^2 for a
// DeepSeek model under yarn scaling with mscale_all_dim set (DeepSeek-V2/V3's softmax_scale).
double attention_score_scale(const ModelConfig& cfg);

}  // namespace moemesh
