// How far a quantized model's next-token distributions are from its float original's
// (`moemesh quantize-eval`): both run on the same token windows in the in-process engine.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/checkpoint.h"

namespace moemesh {

struct DistributionDiff {
  int64_t positions = 0;  // next-token distributions compared
  double mean_kl = 0;     // mean over positions of KL(p_ref || p_quant), nats
  double max_kl = 0;
  double top1_agreement = 0;  // fraction of positions with the same argmax
  double nll = 0;             // mean -log p_quant(next token) over positions that have one
  double reference_nll = 0;   // the same for p_ref
};

// Each window is one fresh sequence; every position's distribution counts. One result per
// entry of `quantized`, in order.
std::vector<DistributionDiff> compare_next_token(const std::shared_ptr<const Checkpoint>& reference,
                                                 std::span<const std::shared_ptr<const Checkpoint>> quantized,
                                                 std::span<const std::vector<int32_t>> windows);

}  // namespace moemesh
