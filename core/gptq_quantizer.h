// The weight quantizers of `moemesh quantize` for one Linear weight W [out, in]: round to nearest
// (RTN) and GPTQ (Frantar et al. 2022, as AutoGPTQ's gptq.py runs it), and the GPTQ v1 tensors
// they are stored as (docs/quantization.md).
//
// Both use one group convention, that of tests/reference/gptq_reference.py: per output row and
// group of inputs the range holds 0, the f16 scale is rounded up (sym: absmax / (2^(b-1) - 1),
// zero 2^(b-1); asym: (max - min) / (2^b - 1), zero = round(-min / scale) kept >= 1, since v1
// stores zero - 1), and q = clamp(round(w / scale) + zero, 0, 2^b - 1). GPTQ computes with the
// stored f16 scale, so the error it feeds back is the one the checkpoint has.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moemesh {

struct QuantOptions {
  int bits = 4;
  int64_t group_size = 128;  // -1: one group over the whole input
  bool sym = true;
  bool desc_act = false;  // GPTQ only: columns in order of descending H_ii, groups by that order
  double damp = 0.01;     // GPTQ only: λ = damp · mean(diag H) added to the diagonal
  int64_t groups(int64_t in) const { return group_size < 0 ? 1 : (in + group_size - 1) / group_size; }
};

// H = 2/n · Σ x xᵀ over the n input rows of a Linear (AutoGPTQ's add_batch), accumulated in f64.
class Hessian {
 public:
  explicit Hessian(int64_t columns);
  // Adds `rows` rows of x (row r at x + r·ld; ld 0: columns), or the listed rows of x.
  void add(const float* x, int64_t rows, int64_t ld = 0);
  void add_rows(const float* x, int64_t ld, std::span<const int32_t> rows);
  int64_t columns() const { return n_; }
  int64_t samples() const { return rows_; }
  // H[i, j] (0 before any row).
  double at(int64_t i, int64_t j) const;
  // The full symmetric matrix [columns, columns].
  std::vector<double> matrix() const;

 private:
  void flush() const;
  int64_t n_ = 0, rows_ = 0;
  // Pending rows are a cache of what was added: reading H adds them first.
  mutable std::vector<double> xtx_;      // upper triangle of XᵀX
  mutable std::vector<double> pending_;  // rows converted to f64, added in one dsyrk
  mutable int64_t pending_rows_ = 0;
};

// One quantized Linear: codes in the input's own column order.
struct QuantizedLinear {
  int bits = 4;
  int64_t out = 0, in = 0, group_size = 128;
  std::vector<uint8_t> q;        // [out, in]: 0 .. 2^bits - 1
  std::vector<uint16_t> scales;  // [groups, out], float16 bits
  std::vector<int32_t> zeros;    // [groups, out]: 1 .. 2^bits - 1 (v1 stores zero - 1)
  std::vector<int32_t> g_idx;    // [in]: the group of each input column
  int64_t groups() const { return int64_t(scales.size()) / (out ? out : 1); }
  // W [out, in] as dequantization gives it back: scale · (q - zero), exact in f32.
  std::vector<float> dequantize() const;
};

// The GPTQ v1 tensors of a Linear, as AutoGPTQ writes them.
struct PackedLinear {
  std::vector<int32_t> qweight;  // [in / p, out]: packed along the input
  std::vector<int32_t> qzeros;   // [groups, out / p]: zero - 1, packed along the output
  std::vector<uint16_t> scales;  // [groups, out], float16
  std::vector<int32_t> g_idx;    // [in]
};
PackedLinear pack_gptq_v1(const QuantizedLinear& q);

// Round to nearest per group (g_idx[i] = i / G). `name` (the tensor) goes into the errors: a
// non-finite weight, or weights too large for f16 scales.
QuantizedLinear quantize_rtn(const float* w, int64_t out, int64_t in, const QuantOptions& o, const std::string& name);

// GPTQ on W [out, in] with the Hessian of its inputs: columns whose H_ii is 0 (never active)
// are zeroed, λ = damp · mean(diag H) is added to the diagonal, U = chol(H⁻¹) (upper); then, in
// the column order (descending H_ii with desc_act), each column is rounded and its error,
// divided by U_ii, is fed back into the columns after it (row i of U), within blocks of up to 128
// columns and lazily, as one product, after each block. A group's scales and zeros are computed
// when it starts, from the updated weights (blocks start wherever a group does, so these are
// fully updated; AutoGPTQ reads the block's stale copy for a group that starts inside a block).
//
// The solver holds what depends on H alone (dead columns, order, U), so the Linears that share
// an input (q/k/v, an expert's w1/w3) factor it once. Its constructor throws moemesh::Error
// naming `name` when H has no rows or is not positive definite after dampening.
class GptqSolver {
 public:
  GptqSolver(const Hessian& h, const QuantOptions& o, const std::string& name);
  QuantizedLinear quantize(const float* w, int64_t out, int64_t in, const std::string& name) const;

 private:
  QuantOptions o_;
  int64_t n_ = 0;
  std::vector<bool> dead_;
  std::vector<int32_t> perm_;  // position -> input column
  std::vector<double> u_;      // [n, n], upper: chol(H⁻¹) in the permuted order
};

inline QuantizedLinear quantize_gptq(const float* w, int64_t out, int64_t in, const Hessian& h, const QuantOptions& o,
                                     const std::string& name) {
  return GptqSolver(h, o, name).quantize(w, out, in, name);
}

}  // namespace moemesh
