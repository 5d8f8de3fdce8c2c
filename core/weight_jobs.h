// The CPU kernels' matmul jobs (kernels/cpu/gemm.h) for the model's weights: the one place that
// turns a Weight (shape, dtype, bytes) into a product's operands.
#pragma once
#include <cstdint>
#include <span>

#include "core/checkpoint.h"
#include "kernels/cpu/gemm.h"

namespace moemesh {

// y[rows, w.rows()] = x[rows, w.cols()] · Wᵀ.
cpu::MatmulJob projection_job(const float* x, int64_t rows, const Weight& w, float* y);
// act[n, inter] = silu(gate(x_r)) ⊙ up(x_r) (inter = w.gate.rows()) for the listed rows of
// x [*, hidden], or for its first all_rows rows in order.
cpu::MatmulJob swiglu_job(const float* x, int64_t hidden, std::span<const int32_t> rows, const MlpWeights& w,
                          float* act);
cpu::MatmulJob swiglu_job(const float* x, int64_t hidden, int64_t all_rows, const MlpWeights& w, float* act);

}  // namespace moemesh
