// Matrix products with weights read in their stored type (F32, F16, BF16): y = x · Wᵀ.
//
// Activations x are f32 rows; W is a Linear weight [out, in] (Hugging Face layout) that is
// converted to f32 inside the inner loop, in registers, and never copied. Accumulation is f32.
// With BF16 weights the x rows are rounded to bf16 first (as cuBLAS, oneDNN and llama.cpp do), so
// that AVX512-BF16 can multiply bf16 pairs; every ISA does the same rounding.
// Each output value is a function of its weight row and its x row alone (the same k order
// whatever the batch, the tile or the thread split), so a row's result does not depend on which
// other rows share the batch. Work is split by output columns over the compute pool
// (kernels/cpu/thread_pool.h): each thread streams its own slice of the weights once per panel
// of rows, so batch 1 reads every weight byte once and a batch of rows reuses each loaded
// weight across the rows (register tiles of up to 4 weight rows × 6 x rows).
#pragma once
#include <cstdint>
#include <span>

#include "core/dtype.h"
#include "kernels/cpu/quant_matrix.h"

namespace moemesh::cpu {

struct MatmulJob {
  enum class Epilogue {
    Store,   // y = x·Wᵀ
    Add,     // y += x·Wᵀ (a residual add fused into the product)
    SwiGlu,  // y = silu(x·Wᵀ) ⊙ (x·W_upᵀ): an MLP's gate and up projections in one pass over x
  };
  const float* x = nullptr;
  int64_t rows = 0;  // rows of the product
  int64_t in = 0;    // W's columns = the length of an x row
  // When set, row r of the product reads x row x_rows[r] (a gather, e.g. an expert's tokens).
  const int32_t* x_rows = nullptr;
  int64_t ldx = 0;  // floats between x rows; 0: in
  const void* w = nullptr;
  DType wdtype = DType::F32;
  int64_t out = 0;  // W's rows
  float* y = nullptr;
  int64_t ldy = 0;  // floats between y rows; 0: out
  Epilogue epilogue = Epilogue::Store;
  const void* w_up = nullptr;  // SwiGlu only: same shape and dtype as w
  // INT4/INT8 weights: when set, used instead of w and wdtype (wq_up instead of w_up), [out, in].
  const QuantMatrix* wq = nullptr;
  const QuantMatrix* wq_up = nullptr;
};

// A low-rank product (LoRA's B·A): for r < rows,
//   y[y_rows[r]] = or += (x[x_rows[r]] · Aᵀ) · Bᵀ    (x_rows / y_rows null: row r)
// with A [rank, in] and B given transposed, bt [rank, out], in one dtype. A BF16 product rounds x
// to bf16 for A, as a BF16 MatmulJob does; the rank-long intermediate t stays f32, and B·t is
// summed as rows of bt scaled by t's entries (no horizontal sums over a short rank). Split by rows,
// not by output columns: a task forms its rows' t once and then all their outputs, and a row's
// result depends on its own x row alone.
struct LowRankJob {
  const float* x = nullptr;
  int64_t rows = 0;
  int64_t in = 0;
  const int32_t* x_rows = nullptr;
  int64_t ldx = 0;  // 0: in
  const void* a = nullptr;
  const void* bt = nullptr;
  DType wdtype = DType::F32;
  int64_t rank = 0;
  int64_t out = 0;
  float* y = nullptr;
  const int32_t* y_rows = nullptr;
  int64_t ldy = 0;  // 0: out
  bool add = true;  // false: store
};

// Runs every job; all of them share one parallel section (q, k and v of a layer, or the gate and
// up projections of all its experts, with their LoRA deltas, cost one hand-out of work, not one
// each), so no job may write what another reads or writes. Throws moemesh::Error, before
// computing anything, for a job with a null pointer, a negative size, a weight type other than
// F32/F16/BF16, or a quantized matrix of another shape.
void matmul(std::span<const MatmulJob> jobs, std::span<const LowRankJob> low_rank = {});

// One job: y[rows, out] = x[rows, in] · W[out, in]ᵀ.
void matmul(const float* x, int64_t rows, int64_t in, const void* w, DType wdtype, int64_t out, float* y);

// SiLU as the MLP applies it: g / (1 + e^-g).
inline float silu(float g) { return g / (1.0f + __builtin_expf(-g)); }

}  // namespace moemesh::cpu
