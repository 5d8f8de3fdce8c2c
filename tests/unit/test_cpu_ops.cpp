// Every CPU row and element-wise kernel against a naive loop (double accumulation) on small random inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/ops.h"
#include "tests/support/naive_attention.h"
#include "tests/support/numeric.h"

using namespace moemesh;

namespace {

using moemesh::testing::naive_attention;
using moemesh::testing::narrow;
using moemesh::testing::normals;

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  return moemesh::testing::max_rel_err(a, b);
}

}  // namespace

TEST(CpuOps, RmsNorm) {
  const int64_t rows = 4, dim = 24;
  auto x = normals(size_t(rows * dim), 5), w = normals(size_t(dim), 6);
  std::vector<float> rounded;
  auto wb = narrow(w, DType::BF16, rounded);
  std::vector<float> y(x.size()), yb(x.size());
  cpu::rmsnorm(x.data(), w.data(), DType::F32, rows, dim, 1e-5, y.data());
  cpu::rmsnorm(x.data(), wb.data(), DType::BF16, rows, dim, 1e-5, yb.data());
  std::vector<double> ref(x.size()), refb(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[size_t(r * dim + i)]) * x[size_t(r * dim + i)];
    const double inv = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int64_t i = 0; i < dim; ++i) {
      ref[size_t(r * dim + i)] = x[size_t(r * dim + i)] * inv * w[size_t(i)];
      refb[size_t(r * dim + i)] = x[size_t(r * dim + i)] * inv * rounded[size_t(i)];
    }
  }
  EXPECT_LT(rel_err(y, ref), 1e-6);
  EXPECT_LT(rel_err(yb, refb), 1e-6);
}

// HF: q * cos + rotate_half(q) * sin with cos/sin = cat(freqs, freqs), rotate_half = cat(-x2, x1).
TEST(CpuOps, RopeRotateHalf) {
  const int64_t rows = 3, heads = 2, hd = 8;
  const double theta = 10000.0;
  auto x = normals(size_t(rows * heads * hd), 7);
  const std::vector<int32_t> pos = {0, 5, 123};
  std::vector<float> y = x;
  cpu::rope(y.data(), rows, heads, hd, pos.data(), theta);
  std::vector<double> ref(x.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      const float* v = x.data() + (r * heads + h) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        const int64_t f = i % (hd / 2);
        const double ang = pos[size_t(r)] / std::pow(theta, 2.0 * double(f) / double(hd));
        const double rot = i < hd / 2 ? -double(v[i + hd / 2]) : double(v[i - hd / 2]);
        ref[size_t((r * heads + h) * hd + i)] = v[i] * std::cos(ang) + rot * std::sin(ang);
      }
    }
  EXPECT_LT(rel_err(y, ref), 1e-6);
  // Position 0 is the identity.
  for (int64_t i = 0; i < heads * hd; ++i) EXPECT_EQ(y[size_t(i)], x[size_t(i)]);
}

TEST(CpuOps, SiluMulAndSoftmax) {
  auto g = normals(40, 8), u = normals(40, 9);
  std::vector<float> out(40);
  cpu::silu_mul(g.data(), u.data(), 4, 10, out.data());
  std::vector<double> ref(40);
  for (size_t i = 0; i < 40; ++i) ref[i] = g[i] / (1.0 + std::exp(-double(g[i]))) * u[i];
  EXPECT_LT(rel_err(out, ref), 1e-6);

  auto s = normals(20, 10, 3.0f);
  std::vector<float> p = s;
  cpu::softmax(p.data(), 2, 10, 0.5f);
  std::vector<double> pref(20);
  for (int r = 0; r < 2; ++r) {
    double sum = 0;
    for (int i = 0; i < 10; ++i) sum += std::exp(s[size_t(r * 10 + i)] / 0.5);
    for (int i = 0; i < 10; ++i) pref[size_t(r * 10 + i)] = std::exp(s[size_t(r * 10 + i)] / 0.5) / sum;
  }
  EXPECT_LT(rel_err(p, pref), 1e-6);
}

// The vectorised log-normaliser against log Σ exp in double: lengths around its 2048-value chunks
// and a vocabulary's, a temperature, masked (-inf) logits, and a row that is all -inf.
TEST(CpuOps, LogSumExpMatchesDouble) {
  for (int64_t n : {1, 7, 2047, 2048, 2049, 32000, 152064})
    for (float scale : {1.0f, 1.0f / 0.7f}) {
      auto x = normals(size_t(n), uint32_t(n), 4.0f);
      for (int64_t i = 3; i < n; i += 5) x[size_t(i)] = -INFINITY;
      if (n > 4000) x[size_t(n - 1)] = 30.0f;  // the maximum in the last chunk: earlier sums rescale
      double mx = -INFINITY, sum = 0;
      for (float v : x) mx = std::max(mx, double(v) * scale);
      for (float v : x) sum += std::exp(double(v) * scale - mx);
      const double want = mx + std::log(sum), got = cpu::log_sum_exp(x.data(), n, scale);
      EXPECT_NEAR(got, want, 2e-6 * std::max(1.0, std::abs(want))) << "n " << n << " scale " << scale;
    }
  const std::vector<float> masked(100, -INFINITY);
  EXPECT_EQ(cpu::log_sum_exp(masked.data(), 100, 1.0f), -INFINITY);
}

TEST(CpuOps, TopkGating) {
  // Row 0 has a tie between experts 1 and 3: the lower id comes first.
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f,  0.5f,  //
                                     3.0f, 0.0f, 1.0f,  -2.0f, 2.5f};
  std::vector<int32_t> ids(4);
  std::vector<float> w(4), wn(4);
  cpu::topk_gating(logits.data(), 2, 5, 2, 1.0f, false, ids.data(), w.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 3, 0, 4}));
  double z0 = 0;
  for (int i = 0; i < 5; ++i) z0 += std::exp(double(logits[size_t(i)]));
  EXPECT_NEAR(w[0], std::exp(2.0) / z0, 1e-6);
  EXPECT_EQ(w[0], w[1]);
  cpu::topk_gating(logits.data(), 2, 5, 2, 1.0f, true, ids.data(), wn.data());
  EXPECT_NEAR(wn[0] + wn[1], 1.0, 1e-6);
  EXPECT_NEAR(wn[2], std::exp(3.0) / (std::exp(3.0) + std::exp(2.5)), 1e-6);
  // Temperature 2 flattens the distribution: the top weight shrinks.
  std::vector<float> wt(4);
  cpu::topk_gating(logits.data(), 2, 5, 2, 2.0f, false, ids.data(), wt.data());
  EXPECT_LT(wt[2], w[2]);
}

TEST(CpuOps, EmbeddingAllTypes) {
  const int64_t vocab = 10, dim = 6;
  auto table = normals(size_t(vocab * dim), 11);
  const std::vector<int32_t> ids = {3, 0, 9, 3};
  std::vector<float> out(ids.size() * size_t(dim));
  cpu::embedding(table.data(), DType::F32, dim, ids.data(), int64_t(ids.size()), out.data());
  for (size_t i = 0; i < ids.size(); ++i)
    for (int64_t d = 0; d < dim; ++d) EXPECT_EQ(out[i * size_t(dim) + size_t(d)], table[size_t(ids[i] * dim + d)]);
  for (DType t : {DType::F16, DType::BF16}) {
    std::vector<float> rounded;
    auto bytes = narrow(table, t, rounded);
    cpu::embedding(bytes.data(), t, dim, ids.data(), int64_t(ids.size()), out.data());
    for (size_t i = 0; i < ids.size(); ++i)
      for (int64_t d = 0; d < dim; ++d) EXPECT_EQ(out[i * size_t(dim) + size_t(d)], rounded[size_t(ids[i] * dim + d)]);
  }
}

// Paged attention (blocks scattered in a pool) against dense causal GQA attention, with and
// without a sliding window, on every ISA's tiles; 37 rows make several tasks of query rows.
// Every ISA against a double-precision loop: a prefill of every row and a chunk of the last 37
// (many query vectors per task: the keys of a tile as columns) and the last row alone (a decode:
// scores as dot products), over one key tile and over two (700 keys: the online softmax
// rescales), with and without a window.
TEST(CpuOps, PagedAttentionGqaWindow) {
  const int64_t heads = 4, kv_heads = 2, hd = 16, bs = 16, kv_dim = kv_heads * hd;
  const cpu::Isa isa0 = cpu::active_isa();
  for (int64_t n : {int64_t(37), int64_t(700)}) {
    auto q = normals(size_t(n * heads * hd), 12), k = normals(size_t(n * kv_dim), 13),
         v = normals(size_t(n * kv_dim), 14);
    // The blocks stored in reverse order in a pool with one spare.
    const int64_t blocks = (n + bs - 1) / bs;
    std::vector<float> kpool(size_t((blocks + 1) * bs * kv_dim)), vpool(kpool.size());
    std::vector<int> table;
    for (int64_t b = 0; b < blocks; ++b) table.push_back(int(blocks - b));
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < kv_dim; ++d) {
        kpool[size_t((table[size_t(j / bs)] * bs + j % bs) * kv_dim + d)] = k[size_t(j * kv_dim + d)];
        vpool[size_t((table[size_t(j / bs)] * bs + j % bs) * kv_dim + d)] = v[size_t(j * kv_dim + d)];
      }
    std::vector<const float*> kp, vp;
    for (int b : table) {
      kp.push_back(kpool.data() + b * bs * kv_dim);
      vp.push_back(vpool.data() + b * bs * kv_dim);
    }
    std::vector<int32_t> pos(static_cast<size_t>(n));
    std::iota(pos.begin(), pos.end(), 0);
    const int64_t last = (n - 1) * heads * hd;
    for (cpu::Isa isa : cpu::runnable_isas())
      for (int64_t window : {int64_t(0), int64_t(5), int64_t(64)}) {
        cpu::force_isa(isa);
        const std::vector<double> ref = naive_attention(q, pos, heads, kv_heads, hd, window, k, v);
        std::vector<float> out(q.size());
        cpu::paged_attention(q.data(), n, pos.data(), {heads, kv_heads, hd, window}, {kp.data(), vp.data(), bs},
                             out.data());
        EXPECT_LT(rel_err(out, ref), 1e-6) << cpu::isa_name(isa) << " n " << n << " window " << window;
        // The last 37 rows as a chunk continuing the sequence (a window's keys start mid-block).
        const int64_t tail = 37 * heads * hd;
        std::vector<float> chunk(static_cast<size_t>(tail));
        cpu::paged_attention(q.data() + q.size() - tail, 37, pos.data() + n - 37, {heads, kv_heads, hd, window},
                             {kp.data(), vp.data(), bs}, chunk.data());
        EXPECT_LT(rel_err(chunk, std::vector<double>(ref.end() - tail, ref.end())), 1e-6)
            << cpu::isa_name(isa) << " last chunk, n " << n << " window " << window;
        std::vector<float> one(size_t(heads * hd));
        cpu::paged_attention(q.data() + last, 1, pos.data() + n - 1, {heads, kv_heads, hd, window},
                             {kp.data(), vp.data(), bs}, one.data());
        EXPECT_LT(rel_err(one, std::vector<double>(ref.begin() + last, ref.end())), 1e-6)
            << cpu::isa_name(isa) << " decode, n " << n << " window " << window;
        // Without a window both see the same key tiles: the row's bits do not depend on whether
        // its scores came from the dot-product tiles (alone) or with the keys as columns (chunk).
        if (window == 0) {
          EXPECT_TRUE(std::equal(one.begin(), one.end(), chunk.end() - heads * hd)) << cpu::isa_name(isa) << " n " << n;
        }
      }
  }
  cpu::force_isa(isa0);
}
