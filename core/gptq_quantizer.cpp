#include "core/gptq_quantizer.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/dtype.h"
#include "core/error.h"

namespace moemesh {
namespace {

constexpr int64_t kPendingRows = 256;  // rows converted to f64 per dsyrk
constexpr int64_t kBlock = 128;        // GPTQ's column block (AutoGPTQ's blocksize)

// The smallest float16 >= max(x, 2^-14) (the smallest normal: a group of zeros still divides).
uint16_t f16_ceil(double x, const std::string& tensor) {
  x = std::max(x, 0x1p-14);
  uint16_t h = f32_to_f16(float(x));
  while (h < 0x7c00 && double(f16_to_f32(h)) < x) ++h;
  while (h > 0 && double(f16_to_f32(uint16_t(h - 1))) >= x) --h;
  if (h >= 0x7c00) throw Error("tensor " + tensor + ": weights too large for float16 scales");
  return h;
}

// The scale and zero of one output row's group, from its min (<= 0) and max (>= 0).
void group_params(double lo, double hi, const QuantOptions& o, const std::string& tensor, uint16_t& scale,
                  int32_t& zero) {
  const int64_t maxq = (int64_t(1) << o.bits) - 1, half = int64_t(1) << (o.bits - 1);
  if (o.sym) {
    scale = f16_ceil(std::max(-lo, hi) / double(half - 1), tensor);
    zero = int32_t(half);
    return;
  }
  scale = f16_ceil((hi - lo) / double(maxq), tensor);
  zero = int32_t(std::nearbyint(-lo / double(f16_to_f32(scale))));  // ties to even, as NumPy
  if (zero < 1) {  // stored as zero - 1: keep zero >= 1 and stretch the scale so hi still fits
    scale = f16_ceil(hi / double(maxq - 1), tensor);
    zero = 1;
  }
}

int quantize_value(double w, double scale, int32_t zero, int64_t maxq) {
  return int(std::clamp(int64_t(std::nearbyint(w / scale)) + zero, int64_t(0), maxq));
}

void check_finite(const float* w, int64_t out, int64_t in, const std::string& name) {
  for (int64_t j = 0; j < out; ++j)
    for (int64_t i = 0; i < in; ++i)
      if (!std::isfinite(w[j * in + i]))
        throw Error("tensor " + name + " holds a non-finite value at [" + std::to_string(j) + ", " + std::to_string(i) +
                    "]");
}

void check_shape(int64_t out, int64_t in, const QuantOptions& o, const std::string& name) {
  if (o.bits != 4 && o.bits != 8)
    throw Error("tensor " + name + ": " + std::to_string(o.bits) + " bits (expected 4 or 8)");
  if (out <= 0 || in <= 0 || o.group_size == 0 || o.group_size < -1)
    throw Error("tensor " + name + ": cannot quantize [" + std::to_string(out) + ", " + std::to_string(in) +
                "] in groups of " + std::to_string(o.group_size));
}

QuantizedLinear empty_result(int64_t out, int64_t in, const QuantOptions& o) {
  QuantizedLinear r;
  r.bits = o.bits, r.out = out, r.in = in, r.group_size = o.group_size;
  r.q.assign(size_t(out * in), 0);
  r.scales.assign(size_t(o.groups(in) * out), 0);
  r.zeros.assign(size_t(o.groups(in) * out), 0);
  r.g_idx.resize(size_t(in));
  return r;
}

// In place: a (row-major, n x n with row stride lda, symmetric) = L Lᵀ, L in the lower triangle
// (the upper is not read). Returns false when a pivot is not positive. Row-oriented
// (Cholesky–Crout): every inner product runs over two contiguous row prefixes.
bool cholesky_unblocked(double* a, int64_t n, int64_t lda) {
  for (int64_t j = 0; j < n; ++j) {
    double* rj = a + j * lda;
    double d = rj[j];
    for (int64_t k = 0; k < j; ++k) d -= rj[k] * rj[k];
    if (!(d > 0) || !std::isfinite(d)) return false;
    const double ljj = std::sqrt(d);
    rj[j] = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      double* ri = a + i * lda;
      double s = ri[j];
      for (int64_t k = 0; k < j; ++k) s -= ri[k] * rj[k];
      ri[j] = s / ljj;
    }
  }
  return true;
}

// The same, by panels of 128 (a few thousand columns): the panel below each diagonal block and
// the trailing update are BLAS calls, so the O(n³) work runs at GEMM speed.
bool cholesky_lower(std::vector<double>& m, int64_t n) {
  constexpr int64_t nb = 128;
  double* a = m.data();
  for (int64_t k = 0; k < n; k += nb) {
    const int64_t b = std::min(nb, n - k), rest = n - k - b;
    double* akk = a + k * n + k;
    if (!cholesky_unblocked(akk, b, n)) return false;
    if (rest == 0) break;
    double* panel = akk + b * n;  // rows k+b.., columns k..k+b
    cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, int(rest), int(b), 1.0, akk, int(n),
                panel, int(n));
    cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, int(rest), int(b), -1.0, panel, int(n), 1.0, panel + b,
                int(n));
  }
  return true;
}

// The block length: every group starts at a block start, so a group's parameters are computed
// when all earlier columns' errors have reached all of its columns.
int64_t block_for(int64_t group, int64_t in) {
  if (group < 0 || group >= in || group % kBlock == 0) return kBlock;
  if (group < kBlock) return kBlock / group * group;
  int64_t d = kBlock;
  while (group % d) --d;
  return d >= 32 ? d : group;
}

}  // namespace

Hessian::Hessian(int64_t columns) : n_(columns), xtx_(size_t(columns * columns), 0.0) {
  if (columns <= 0) throw Error("hessian: " + std::to_string(columns) + " columns");
  pending_.resize(size_t(kPendingRows * columns));
}

void Hessian::add(const float* x, int64_t rows, int64_t ld) {
  if (ld == 0) ld = n_;
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(x + r * ld, x + r * ld + n_, pending_.begin() + pending_rows_ * n_);
    if (++pending_rows_ == kPendingRows) flush();
  }
  rows_ += rows;
}

void Hessian::add_rows(const float* x, int64_t ld, std::span<const int32_t> rows) {
  for (int32_t r : rows) add(x + int64_t(r) * ld, 1, ld);
}

void Hessian::flush() const {
  if (pending_rows_ == 0) return;
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(n_), int(pending_rows_), 1.0, pending_.data(), int(n_), 1.0,
              xtx_.data(), int(n_));
  pending_rows_ = 0;
}

double Hessian::at(int64_t i, int64_t j) const {
  flush();
  return rows_ == 0 ? 0.0 : 2.0 / double(rows_) * xtx_[size_t(std::min(i, j) * n_ + std::max(i, j))];
}

std::vector<double> Hessian::matrix() const {
  std::vector<double> h(size_t(n_ * n_));
  for (int64_t i = 0; i < n_; ++i)
    for (int64_t j = 0; j < n_; ++j) h[size_t(i * n_ + j)] = at(i, j);
  return h;
}

std::vector<float> QuantizedLinear::dequantize() const {
  std::vector<float> w(size_t(out * in));
  for (int64_t j = 0; j < out; ++j)
    for (int64_t i = 0; i < in; ++i) {
      const size_t g = size_t(g_idx[size_t(i)] * out + j);
      w[size_t(j * in + i)] = float(double(f16_to_f32(scales[g])) * double(int(q[size_t(j * in + i)]) - zeros[g]));
    }
  return w;
}

PackedLinear pack_gptq_v1(const QuantizedLinear& ql) {
  const int64_t p = 32 / ql.bits, out = ql.out, in = ql.in, ng = ql.groups();
  const uint32_t mask = (1u << ql.bits) - 1;
  PackedLinear r;
  r.qweight.assign(size_t(in / p * out), 0);
  r.qzeros.assign(size_t(ng * (out / p)), 0);
  r.scales = ql.scales;
  r.g_idx = ql.g_idx;
  auto* qw = reinterpret_cast<uint32_t*>(r.qweight.data());
  auto* qz = reinterpret_cast<uint32_t*>(r.qzeros.data());
  for (int64_t j = 0; j < out; ++j)
    for (int64_t i = 0; i < in; ++i)
      qw[size_t((i / p) * out + j)] |= uint32_t(ql.q[size_t(j * in + i)]) << (ql.bits * (i % p));
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t j = 0; j < out; ++j)
      qz[size_t(g * (out / p) + j / p)] |= (uint32_t(ql.zeros[size_t(g * out + j)] - 1) & mask) << (ql.bits * (j % p));
  return r;
}

QuantizedLinear quantize_rtn(const float* w, int64_t out, int64_t in, const QuantOptions& o, const std::string& name) {
  check_shape(out, in, o, name);
  const int64_t G = o.group_size < 0 ? in : o.group_size, ng = o.groups(in), maxq = (int64_t(1) << o.bits) - 1;
  QuantizedLinear r = empty_result(out, in, o);
  for (int64_t i = 0; i < in; ++i) r.g_idx[size_t(i)] = int32_t(i / G);
  for (int64_t j = 0; j < out; ++j) {
    const float* row = w + j * in;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t begin = g * G, end = std::min(in, begin + G);
      double lo = 0, hi = 0;  // GPTQ's range always holds 0
      for (int64_t i = begin; i < end; ++i) {
        const double v = row[i];
        if (!std::isfinite(v))
          throw Error("tensor " + name + " holds a non-finite value at [" + std::to_string(j) + ", " +
                      std::to_string(i) + "]");
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
      const size_t at = size_t(g * out + j);
      group_params(lo, hi, o, name, r.scales[at], r.zeros[at]);
      const double s = f16_to_f32(r.scales[at]);
      for (int64_t i = begin; i < end; ++i)
        r.q[size_t(j * in + i)] = uint8_t(quantize_value(row[i], s, r.zeros[at], maxq));
    }
  }
  return r;
}

GptqSolver::GptqSolver(const Hessian& hess, const QuantOptions& o, const std::string& name)
    : o_(o), n_(hess.columns()) {
  check_shape(1, n_, o, name);
  if (hess.samples() == 0) throw Error("tensor " + name + ": no calibration rows for its Hessian");
  if (!(o.damp >= 0)) throw Error("tensor " + name + ": dampening " + std::to_string(o.damp) + " is negative");
  const int64_t n = n_;
  std::vector<double> diag(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    diag[size_t(i)] = hess.at(i, i);
    if (!std::isfinite(diag[size_t(i)]))
      throw Error("tensor " + name + ": the calibration inputs overflow (H[" + std::to_string(i) + ", " +
                  std::to_string(i) + "] is not finite)");
  }

  // Columns no calibration row ever activated: H_ii = 1 and the weight zeroed, as AutoGPTQ does.
  dead_.assign(size_t(n), false);
  for (int64_t i = 0; i < n; ++i)
    if (diag[size_t(i)] == 0) dead_[size_t(i)] = true, diag[size_t(i)] = 1;

  // The column order; a stable sort, so equal H_ii keep their input order.
  perm_.resize(size_t(n));
  std::iota(perm_.begin(), perm_.end(), 0);
  if (o.desc_act)
    std::stable_sort(perm_.begin(), perm_.end(),
                     [&](int32_t a, int32_t b) { return diag[size_t(a)] > diag[size_t(b)]; });

  // A = J Hp J: the permuted H with its order reversed (J), so that its lower Cholesky factor M
  // gives H's upper one: Hp = R Rᵀ with R = J M J upper, hence Hp⁻¹ = R⁻ᵀ R⁻¹ and U = chol(Hp⁻¹)
  // (upper) = R⁻¹ = J M⁻¹ J. One factorisation and one triangular inverse, where AutoGPTQ's
  // chol, cholesky_inverse, chol takes three steps to the same U.
  std::vector<double> A(size_t(n * n));
  const auto at = [&](int64_t a) { return perm_[size_t(n - 1 - a)]; };
  double mean_diag = 0;
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < a; ++b) A[size_t(a * n + b)] = hess.at(at(a), at(b));
    mean_diag += A[size_t(a * n + a)] = diag[at(a)];
  }
  const double lambda = o.damp * mean_diag / double(n);
  for (int64_t a = 0; a < n; ++a) A[size_t(a * n + a)] += lambda;
  if (!cholesky_lower(A, n))
    throw Error("tensor " + name + ": the Hessian of its calibration inputs is not positive definite after " +
                "dampening " + std::to_string(o.damp) + " (raise --damp)");
  u_.assign(size_t(n * n), 0.0);
  for (int64_t a = 0; a < n; ++a) u_[size_t(a * n + a)] = 1;
  cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, int(n), int(n), 1.0, A.data(), int(n),
              u_.data(), int(n));
  // J M⁻¹ J: element [a, b] from [n-1-a, n-1-b], i.e. the row-major array reversed.
  std::reverse(u_.begin(), u_.end());
}

QuantizedLinear GptqSolver::quantize(const float* w, int64_t out, int64_t in, const std::string& name) const {
  check_shape(out, in, o_, name);
  if (in != n_)
    throw Error("tensor " + name + ": a Hessian of " + std::to_string(n_) + " columns for " + std::to_string(in) +
                " inputs");
  check_finite(w, out, in, name);
  const QuantOptions& o = o_;
  const int64_t n = in, G = o.group_size < 0 ? in : o.group_size, maxq = (int64_t(1) << o.bits) - 1;
  const std::vector<double>& U = u_;
  const std::vector<int32_t>& perm = perm_;

  // Wt [n, out]: row t is input column perm[t] of W, so a column's updates are contiguous.
  std::vector<double> Wt(size_t(n * out));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t i = perm[size_t(t)];
    if (dead_[size_t(i)]) continue;
    for (int64_t j = 0; j < out; ++j) Wt[size_t(t * out + j)] = w[j * in + i];
  }

  QuantizedLinear r = empty_result(out, in, o);
  std::vector<double> scale(static_cast<size_t>(out)), err;
  std::vector<int32_t> zero(static_cast<size_t>(out));
  const int64_t block = block_for(o.group_size, n);
  for (int64_t i1 = 0; i1 < n; i1 += block) {
    const int64_t i2 = std::min(n, i1 + block), count = i2 - i1;
    err.assign(size_t(count * out), 0.0);
    for (int64_t t = i1; t < i2; ++t) {
      const int64_t g = t / G;
      if (t % G == 0) {  // a group starts: its parameters from its columns as they are now
        const int64_t end = std::min(n, t + G);
        for (int64_t j = 0; j < out; ++j) {
          double lo = 0, hi = 0;
          for (int64_t u = t; u < end; ++u) {
            const double v = Wt[size_t(u * out + j)];
            lo = std::min(lo, v);
            hi = std::max(hi, v);
          }
          const size_t at = size_t(g * out + j);
          group_params(lo, hi, o, name, r.scales[at], r.zeros[at]);
          scale[size_t(j)] = f16_to_f32(r.scales[at]);
          zero[size_t(j)] = r.zeros[at];
        }
      }
      const int64_t col = perm[size_t(t)];
      r.g_idx[size_t(col)] = int32_t(g);
      const double d = U[size_t(t * n + t)];
      double* wrow = Wt.data() + t * out;
      double* e = err.data() + (t - i1) * out;
      for (int64_t j = 0; j < out; ++j) {
        const int q = quantize_value(wrow[j], scale[size_t(j)], zero[size_t(j)], maxq);
        r.q[size_t(j * in + col)] = uint8_t(q);
        e[j] = (wrow[j] - scale[size_t(j)] * double(q - zero[size_t(j)])) / d;
      }
      // Within the block, at once: the columns after t absorb its error.
      for (int64_t u = t + 1; u < i2; ++u) {
        const double c = U[size_t(t * n + u)];
        double* wu = Wt.data() + u * out;
        for (int64_t j = 0; j < out; ++j) wu[j] -= c * e[j];
      }
    }
    // After the block, lazily: Wt[i2:] -= U[i1:i2, i2:]ᵀ · Err.
    if (i2 < n)
      cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(n - i2), int(out), int(count), -1.0,
                  U.data() + i1 * n + i2, int(n), err.data(), int(out), 1.0, Wt.data() + i2 * out, int(out));
  }
  return r;
}

}  // namespace moemesh
