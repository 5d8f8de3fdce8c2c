// The CUDA kernels (kernels/cuda/api.cuh) against the CPU reference (kernels/cpu), llama.cpp's
// test-backend-ops idea: random inputs, every output buffer poisoned with NaN before the run, and
// an error bound per dtype.
//
// Error metric, elementwise: |gpu - cpu| <= rtol * (|cpu| + rms(cpu)); the rms term keeps values
// near zero from demanding more than the row's scale allows. Bounds (rtol):
//   rmsnorm, add_rmsnorm, rope, silu_mul, gating weights, attention: 1e-5 (f32 math; sums differ
//     only in order, expf/sincos within a few ulp)
//   embedding: exact (a widening copy); gating ids: exact, ties to the lower id included
//   matmul: F32 1e-4 (cuBLAS sums in another order, in <= 4096); F16 W 4e-3 and BF16 W 3e-2
//     (cuBLAS needs x in W's type, so x is rounded to f16 / bf16 first: unit roundoff 2^-11 / 2^-8,
//     random-walk accumulated over `in` terms, several sigma of headroom); normwise
//     ||gpu - cpu|| / ||cpu||: F32 1e-5, F16 1e-3, BF16 8e-3.
// Tests that need a device skip with "no CUDA device: <reason>"; the argument checks and the
// device probe run everywhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "core/dtype.h"
#include "core/logits_summary.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/kv_int8.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant_matrix.h"
#include "kernels/cuda/api.cuh"
#include "tests/support/random_quant.h"

namespace mc = moemesh::cuda;
namespace cpu = moemesh::cpu;
using moemesh::DType;

namespace {

#define STATUS_OK(expr)                                      \
  do {                                                       \
    const mc::Status st_ = (expr);                           \
    ASSERT_TRUE(st_.ok()) << #expr << ": " << st_.message(); \
  } while (0)
#define CUDA_OK(expr)                                                          \
  do {                                                                         \
    const cudaError_t err_ = (expr);                                           \
    ASSERT_EQ(cudaSuccess, err_) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

// A device buffer of T, poisoned (all bits set: NaN for floats, -1 for ints) until written.
template <typename T>
class DeviceVec {
 public:
  explicit DeviceVec(size_t n) : n_(n) {
    if (cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) p_ = nullptr;
    poison();
  }
  explicit DeviceVec(const std::vector<T>& host) : DeviceVec(host.size()) { upload(host); }
  ~DeviceVec() { cudaFree(p_); }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void poison() {
    if (p_) cudaMemset(p_, 0xff, n_ * sizeof(T));
  }
  void upload(const std::vector<T>& host) {
    if (p_) cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (p_) cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return host;
  }

 private:
  T* p_ = nullptr;
  size_t n_;
};

std::vector<float> random_floats(std::mt19937& rng, size_t n, float stddev = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// f32 values stored as `t` (bytes, as a checkpoint would hold them).
std::vector<uint8_t> encode(DType t, const std::vector<float>& v) {
  std::vector<uint8_t> bytes(v.size() * moemesh::dtype_size(t));
  moemesh::from_f32(t, v.data(), bytes.data(), v.size());
  return bytes;
}

void expect_close(const std::vector<float>& gpu, const std::vector<float>& ref, double rtol, const std::string& what,
                  double normwise = -1) {
  ASSERT_EQ(gpu.size(), ref.size()) << what;
  double ss = 0, diff_ss = 0;
  for (float r : ref) ss += double(r) * r;
  const double rms = std::sqrt(ss / double(std::max<size_t>(ref.size(), 1)));
  size_t bad = 0, first_bad = 0;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::fabs(double(gpu[i]) - double(ref[i]));
    diff_ss += d * d;
    const double bound = rtol * (std::fabs(double(ref[i])) + rms);
    if (!(d <= bound)) {  // also catches NaN (a poisoned element never written)
      if (bad++ == 0) first_bad = i;
    }
    if (bound > 0) worst = std::max(worst, d / bound);
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements out of bound (rtol " << rtol
                     << "); first at " << first_bad << ": gpu " << gpu[first_bad] << " vs cpu " << ref[first_bad]
                     << "; worst |d|/bound " << worst;
  if (normwise > 0 && ss > 0) {
    EXPECT_LE(std::sqrt(diff_ss / ss), normwise) << what << ": normwise relative error";
  }
}

const char* dtype_str(DType t) { return t == DType::F32 ? "F32" : t == DType::F16 ? "F16" : "BF16"; }

// Skips when there is no device; otherwise gives each test a stream and a cuBLAS handle.
class Gpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (mc::device_count() == 0) GTEST_SKIP() << "no CUDA device: " << mc::device_error();
    CUDA_OK(cudaSetDevice(0));
    CUDA_OK(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_) {
      EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream_));
      cudaStreamDestroy(stream_);
    }
  }
  void sync() {
    ASSERT_EQ(cudaSuccess, cudaStreamSynchronize(stream_));
    const mc::Status st = mc::check_last_error();
    ASSERT_TRUE(st.ok()) << st.message();
  }

  cudaStream_t stream_ = nullptr;
  std::mt19937 rng_{1234};
};

// ---------------------------------------------------------------------------------------------
// Run everywhere: the probe and the argument checks (they return before touching the device).

TEST(GpuProbe, DeviceCountNeverCrashes) {
  const int n = mc::device_count();
  EXPECT_GE(n, 0);
  if (n == 0) {
    EXPECT_STRNE(mc::device_error(), "") << "a zero count must say why";
    std::printf("no CUDA device: %s\n", mc::device_error());
  } else {
    EXPECT_STREQ(mc::device_error(), "");
  }
  EXPECT_EQ(n, mc::device_count()) << "probed once, stable";
}

// Every error is one line that starts with the kernel source's file:line.
void expect_error(const mc::Status& st, const std::string& needle) {
  ASSERT_FALSE(st.ok()) << "expected an error mentioning \"" << needle << "\"";
  EXPECT_NE(st.message().find(needle), std::string::npos) << st.message();
  EXPECT_NE(st.message().find(".cu:"), std::string::npos) << "no file:line in: " << st.message();
  EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
}

TEST(GpuArgs, RejectedBeforeLaunch) {
  float* fake = reinterpret_cast<float*>(uintptr_t(256));  // never dereferenced: checks fail first
  const int32_t* ifake = reinterpret_cast<const int32_t*>(uintptr_t(256));
  expect_error(mc::rmsnorm(nullptr, fake, DType::F32, 1, 8, 1e-6, fake, nullptr), "x is null");
  expect_error(mc::rmsnorm(fake, fake, DType::F32, 0, 8, 1e-6, fake, nullptr), "rows must be > 0");
  expect_error(mc::rmsnorm(fake, fake, DType::I32, 1, 8, 1e-6, fake, nullptr), "F32, F16 or BF16");
  expect_error(mc::add_rmsnorm(fake, fake, fake, DType::F32, 1, 8, 1e-6, fake, nullptr), "alias");
  expect_error(mc::rope(fake, 1, 2, 7, ifake, 10000.0, nullptr), "head_dim must be even");
  expect_error(mc::silu_mul(fake, fake, 1, -3, fake, nullptr), "n must be > 0");
  expect_error(mc::embedding(fake, DType::I8, 10, 4, ifake, 1, fake, nullptr), "F32, F16 or BF16");
  expect_error(mc::topk_gating(fake, 1, 8, 9, 1.0f, true, const_cast<int32_t*>(ifake), fake, nullptr),
               "k must be in [1, n_experts]");
  expect_error(mc::topk_gating(fake, 1, 8, 2, 0.0f, true, const_cast<int32_t*>(ifake), fake, nullptr), "temperature");
  expect_error(
      mc::topk_gating(fake, 1, mc::kMaxGatingExperts + 1, 2, 1.0f, true, const_cast<int32_t*>(ifake), fake, nullptr),
      "n_experts");
  expect_error(mc::matmul(nullptr, fake, 1, 8, fake, DType::F32, 8, fake, nullptr, 0, nullptr), "blas is null");
  auto* fake_blas = reinterpret_cast<cublasHandle_t>(uintptr_t(256));
  expect_error(mc::matmul(fake_blas, fake, 2, 8, fake, DType::BF16, 8, fake, nullptr, 0, nullptr),
               "matmul_workspace_bytes");
  mc::QuantWeight qw;
  qw.bits = 3, qw.out = 8, qw.in = 32, qw.padded_in = 32, qw.groups = 1;
  qw.q = reinterpret_cast<const uint8_t*>(fake), qw.scale = fake, qw.scaled_zero = fake;
  qw.group_of = ifake, qw.source = ifake;
  expect_error(mc::quant_matmul(fake_blas, fake, 1, qw, fake, nullptr, 0, nullptr), "3 bits");
  qw.bits = 4;
  expect_error(mc::quant_matmul(fake_blas, fake, 40, qw, fake, nullptr, 0, nullptr), "quant_matmul_workspace_bytes");
  qw.padded_in = 30;
  expect_error(mc::quant_matmul(fake_blas, fake, 1, qw, fake, nullptr, 0, nullptr), "padded_in 30");
  const int64_t rows2[] = {3, 0};
  const void* const ptrs[] = {fake, fake};
  void* const outs[] = {fake, fake};
  void** dptrs = reinterpret_cast<void**>(fake);
  expect_error(mc::grouped_matmul(fake_blas, 2, rows2, 8, 8, ptrs, ptrs, outs, DType::BF16, dptrs, nullptr),
               "group 1 has 0 rows");
  expect_error(mc::grouped_matmul(fake_blas, 2, rows2, 8, 8, ptrs, ptrs, outs, DType::I8, dptrs, nullptr),
               "F32, F16 or BF16");
  expect_error(mc::gather_rows(fake, 4, 8, ifake, 0, fake, DType::F32, nullptr), "n must be > 0");
  expect_error(mc::silu_mul_as(fake, fake, 1, 8, fake, DType::I32, nullptr), "F32, F16 or BF16");
  int32_t* ifake_out = reinterpret_cast<int32_t*>(uintptr_t(256));
  expect_error(mc::logits_summary(fake, 2, 10, 11, fake, ifake, ifake, ifake_out, fake, fake, fake, fake, nullptr),
               "k must be in [1, min(vocab");
  expect_error(mc::logits_summary(fake, 2, 5000, mc::kMaxSummaryTopK + 1, fake, ifake, ifake, ifake_out, fake, fake,
                                  fake, fake, nullptr),
               "k must be in");
  EXPECT_EQ(mc::matmul_workspace_bytes(2, 8, DType::BF16), 32u);
  EXPECT_EQ(mc::matmul_workspace_bytes(2, 8, DType::F32), 0u);

  mc::PagedAttentionConfig cfg{8, 2, 128, 64, 4, 0.088f, 0};
  EXPECT_TRUE(cfg.validate().ok()) << cfg.validate().message();
  auto bad = cfg;
  bad.n_kv_heads = 3;
  expect_error(bad.validate(), "multiple of n_kv_heads");
  bad = cfg;
  bad.head_dim = 258;
  expect_error(bad.validate(), "head_dim");
  bad = cfg;
  bad.scale = 0;
  expect_error(bad.validate(), "scale");
  bad = cfg;
  bad.sliding_window = -1;
  expect_error(bad.validate(), "sliding_window");
  expect_error(mc::paged_attention(bad, fake, 1, ifake, ifake, ifake, 1, fake, fake, fake, nullptr), "sliding_window");
  expect_error(mc::paged_attention(cfg, fake, 1, ifake, ifake, nullptr, 1, fake, fake, fake, nullptr),
               "block_tables is null");
  EXPECT_EQ(cfg.block_floats(), 16 * 2 * 128);
  EXPECT_EQ(cfg.cache_bytes(), size_t(64) * 16 * 2 * 128 * 4);
}

// ---------------------------------------------------------------------------------------------
// Kernels against the CPU reference (need a device).

class GpuNorm : public Gpu, public ::testing::WithParamInterface<std::tuple<DType, int>> {};

TEST_P(GpuNorm, RmsNormMatchesCpu) {
  const auto [wt, dim] = GetParam();
  const int rows = 37;
  const auto x = random_floats(rng_, size_t(rows) * dim, 2.0f);
  const auto w = encode(wt, random_floats(rng_, size_t(dim), 0.5f, 1.0f));
  std::vector<float> ref(x.size());
  cpu::rmsnorm(x.data(), w.data(), wt, rows, dim, 1e-6, ref.data());

  DeviceVec<float> dx(x), dy(x.size());
  DeviceVec<uint8_t> dw(w);
  STATUS_OK(mc::rmsnorm(dx.get(), dw.get(), wt, rows, dim, 1e-6, dy.get(), stream_));
  sync();
  expect_close(dy.download(), ref, 1e-5, std::string("rmsnorm ") + dtype_str(wt));
  expect_close(dx.download(), x, 0.0, "rmsnorm leaves x alone");
}

TEST_P(GpuNorm, AddRmsNormMatchesCpu) {
  const auto [wt, dim] = GetParam();
  const int rows = 19;
  const auto x = random_floats(rng_, size_t(rows) * dim);
  const auto r = random_floats(rng_, size_t(rows) * dim, 3.0f);
  const auto w = encode(wt, random_floats(rng_, size_t(dim), 0.5f, 1.0f));
  std::vector<float> sum(x.size()), ref(x.size());
  for (size_t i = 0; i < x.size(); ++i) sum[i] = x[i] + r[i];
  cpu::rmsnorm(sum.data(), w.data(), wt, rows, dim, 1e-5, ref.data());

  DeviceVec<float> dx(x), dr(r), dy(x.size());
  DeviceVec<uint8_t> dw(w);
  STATUS_OK(mc::add_rmsnorm(dx.get(), dr.get(), dw.get(), wt, rows, dim, 1e-5, dy.get(), stream_));
  sync();
  expect_close(dx.download(), sum, 0.0, "x += residual (exact)");
  expect_close(dy.download(), ref, 1e-5, std::string("add_rmsnorm ") + dtype_str(wt));
}

// dim 4096: the float4 path; 1000 and 7: the scalar path (and a block smaller than a warp's work).
INSTANTIATE_TEST_SUITE_P(Dtypes, GpuNorm,
                         ::testing::Combine(::testing::Values(DType::F32, DType::F16, DType::BF16),
                                            ::testing::Values(4096, 1000, 7)),
                         [](const auto& info) {
                           return std::string(dtype_str(std::get<0>(info.param))) + "_dim" +
                                  std::to_string(std::get<1>(info.param));
                         });

TEST_F(Gpu, RopeMatchesCpu) {
  for (int head_dim : {128, 64, 6}) {
    const int rows = 23, n_heads = 5;
    auto x = random_floats(rng_, size_t(rows) * n_heads * head_dim);
    std::vector<int32_t> pos(rows);
    std::uniform_int_distribution<int32_t> pd(0, 32767);
    for (auto& p : pos) p = pd(rng_);
    pos[0] = 0;
    DeviceVec<float> dx(x);
    DeviceVec<int32_t> dp(pos);
    cpu::rope(x.data(), rows, n_heads, head_dim, pos.data(), 1e6);
    STATUS_OK(mc::rope(dx.get(), rows, n_heads, head_dim, dp.get(), 1e6, stream_));
    sync();
    expect_close(dx.download(), x, 1e-5, "rope head_dim " + std::to_string(head_dim));
  }
}

// RoPE scaling: given frequencies (here interpolated by 4 on the low half, as yarn does) and an
// attention factor, at positions up to 128K.
TEST_F(Gpu, RopeWithGivenFrequenciesMatchesCpu) {
  const int rows = 17, n_heads = 3, head_dim = 64;
  mc::RopeFrequencies f;
  std::vector<double> inv(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    inv[size_t(i)] = 1.0 / std::pow(500000.0, 2.0 * i / head_dim) / (i >= head_dim / 4 ? 4.0 : 1.0);
    f.inv_freq[i] = inv[size_t(i)];
  }
  f.attention_factor = 1.1386;
  auto x = random_floats(rng_, size_t(rows) * n_heads * head_dim);
  std::vector<int32_t> pos(rows);
  std::uniform_int_distribution<int32_t> pd(0, 131071);
  for (auto& p : pos) p = pd(rng_);
  DeviceVec<float> dx(x);
  DeviceVec<int32_t> dp(pos);
  cpu::rope(x.data(), rows, n_heads, head_dim, pos.data(), inv.data(), f.attention_factor);
  STATUS_OK(mc::rope(dx.get(), rows, n_heads, head_dim, dp.get(), f, stream_));
  sync();
  expect_close(dx.download(), x, 1e-5, "rope with given frequencies");
  f.attention_factor = 0.0;
  expect_error(mc::rope(dx.get(), rows, n_heads, head_dim, dp.get(), f, stream_), "attention_factor");
}

TEST_F(Gpu, SiluMulMatchesCpu) {
  const int rows = 33, n = 1409;
  const auto g = random_floats(rng_, size_t(rows) * n, 4.0f);
  const auto u = random_floats(rng_, size_t(rows) * n);
  std::vector<float> ref(g.size());
  cpu::silu_mul(g.data(), u.data(), rows, n, ref.data());
  DeviceVec<float> dg(g), du(u), dout(g.size());
  STATUS_OK(mc::silu_mul(dg.get(), du.get(), rows, n, dout.get(), stream_));
  sync();
  expect_close(dout.download(), ref, 1e-5, "silu_mul");
  // In place over gate, as the expert FFN uses it.
  STATUS_OK(mc::silu_mul(dg.get(), du.get(), rows, n, dg.get(), stream_));
  sync();
  expect_close(dg.download(), ref, 1e-5, "silu_mul in place");
}

// Rows gathered by index (repeats, any order) in each dtype, then widened back: the round trip is
// the dtype's rounding of each value; a bad index gives a NaN row.
TEST_F(Gpu, GatherRowsAndWiden) {
  const int x_rows = 50, dim = 300;
  const auto x = random_floats(rng_, size_t(x_rows) * dim);
  const std::vector<int32_t> index{7, 0, 49, 7, 12, 3};
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {
    DeviceVec<float> dx(x), wide(index.size() * dim);
    DeviceVec<int32_t> didx(index);
    DeviceVec<uint8_t> narrow(index.size() * dim * moemesh::dtype_size(t));
    STATUS_OK(mc::gather_rows(dx.get(), x_rows, dim, didx.get(), int64_t(index.size()), narrow.get(), t, stream_));
    STATUS_OK(mc::widen_to_f32(narrow.get(), t, int64_t(index.size()) * dim, wide.get(), stream_));
    sync();
    std::vector<float> ref(index.size() * dim);
    for (size_t i = 0; i < index.size(); ++i) {
      std::vector<float> row(x.begin() + index[i] * dim, x.begin() + (index[i] + 1) * dim);
      const auto bytes = encode(t, row);
      moemesh::to_f32(t, bytes.data(), ref.data() + i * dim, size_t(dim));
    }
    EXPECT_EQ(wide.download(), ref) << dtype_str(t);
  }
  DeviceVec<float> dx(x), out(static_cast<size_t>(dim));
  DeviceVec<int32_t> bad(std::vector<int32_t>{x_rows});
  STATUS_OK(mc::gather_rows(dx.get(), x_rows, dim, bad.get(), 1, out.get(), DType::F32, stream_));
  sync();
  for (float v : out.download()) ASSERT_TRUE(std::isnan(v));
}

// The logits summary against core/logits_summary's host reference on the same logits: top ids and
// values exact (ties to the lowest id included: whole rows of equal values are planted), the
// normalisers within 1e-5 (f32 sums on the device, double on the host), watched values exact.
TEST_F(Gpu, LogitsSummaryMatchesCpu) {
  const int rows = 4, vocab = 32003, k = 70;
  auto logits = random_floats(rng_, size_t(rows) * vocab, 3.0f);
  for (int i = 0; i < 100; ++i) logits[size_t(vocab) + size_t(i * 7)] = 9.5f;  // row 1: a 100-way tie at the top
  for (int i = 0; i < vocab; ++i) logits[size_t(3) * vocab + i] = 0.25f;       // row 3: all equal
  const std::vector<float> temps{1.0f, 0.7f, 0.0f, 1.6f};
  const std::vector<std::vector<int32_t>> watch{{5, 5, 31999}, {}, {-1, 32003, 0}, {17}};
  std::vector<int32_t> watch_flat{0};
  for (const auto& w : watch) watch_flat.push_back(watch_flat.back() + int32_t(w.size()));
  for (const auto& w : watch) watch_flat.insert(watch_flat.end(), w.begin(), w.end());
  const int watched = watch_flat.back();
  DeviceVec<float> dl(logits), dt(temps), top_values(size_t(rows) * k), lse(rows), lse_t(rows),
      wv(static_cast<size_t>(watched));
  DeviceVec<int32_t> dw(watch_flat), top_ids(size_t(rows) * k);
  STATUS_OK(mc::logits_summary(dl.get(), rows, vocab, k, dt.get(), dw.get() + rows + 1, dw.get(), top_ids.get(),
                               top_values.get(), lse.get(), lse_t.get(), wv.get(), stream_));
  sync();
  const std::vector<int32_t> ids = top_ids.download();
  const std::vector<float> values = top_values.download(), l = lse.download(), lt = lse_t.download(), w = wv.download();
  for (int r = 0; r < rows; ++r) {
    moemesh::LogitsRequest req;
    req.k = k;
    req.temperature = temps[size_t(r)];
    req.watch = watch[size_t(r)];
    const auto want =
        moemesh::summarise_logits(std::span<const float>(logits.data() + size_t(r) * vocab, size_t(vocab)), req);
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + r * k, ids.begin() + (r + 1) * k), want.top_ids) << "row " << r;
    EXPECT_EQ(std::vector<float>(values.begin() + r * k, values.begin() + (r + 1) * k), want.top_values);
    EXPECT_NEAR(l[size_t(r)], want.lse, 1e-5 * std::max(1.0, std::fabs(want.lse))) << "row " << r;
    if (temps[size_t(r)] > 0) {
      EXPECT_NEAR(lt[size_t(r)], want.lse_scaled, 1e-5 * std::max(1.0, std::fabs(want.lse_scaled)));
    }
    EXPECT_EQ(std::vector<float>(w.begin() + watch_flat[size_t(r)], w.begin() + watch_flat[size_t(r) + 1]),
              want.watch_values)
        << "row " << r;
  }
}

TEST_F(Gpu, EmbeddingMatchesCpu) {
  const int vocab = 1000, dim = 300, n = 64;
  std::vector<int32_t> ids(n);
  std::uniform_int_distribution<int32_t> idd(0, vocab - 1);
  for (auto& i : ids) i = idd(rng_);
  ids[1] = 0, ids[2] = vocab - 1;
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {
    const auto table = encode(t, random_floats(rng_, size_t(vocab) * dim));
    std::vector<float> ref(size_t(n) * dim);
    cpu::embedding(table.data(), t, dim, ids.data(), n, ref.data());
    DeviceVec<uint8_t> dt(table);
    DeviceVec<int32_t> di(ids);
    DeviceVec<float> dout(ref.size());
    STATUS_OK(mc::embedding(dt.get(), t, vocab, dim, di.get(), n, dout.get(), stream_));
    sync();
    EXPECT_EQ(0, std::memcmp(dout.download().data(), ref.data(), ref.size() * 4))
        << "embedding " << dtype_str(t) << " must be an exact widening copy";
  }
  // An id outside the table gives a NaN row, never a stray read.
  const auto table = encode(DType::F32, random_floats(rng_, size_t(vocab) * dim));
  DeviceVec<uint8_t> dt(table);
  DeviceVec<int32_t> di(std::vector<int32_t>{5, vocab, -1});
  DeviceVec<float> dout(size_t(3) * dim);
  cudaMemset(dout.get(), 0, dout.size() * 4);
  STATUS_OK(mc::embedding(dt.get(), DType::F32, vocab, dim, di.get(), 3, dout.get(), stream_));
  sync();
  const auto out = dout.download();
  EXPECT_FALSE(std::isnan(out[0]));
  EXPECT_TRUE(std::isnan(out[size_t(dim)]) && std::isnan(out[size_t(2 * dim) + dim - 1]));
}

struct GatingCase {
  int n_experts, k;
  float temperature;
  bool renormalize;
};

class GpuGating : public Gpu, public ::testing::WithParamInterface<GatingCase> {};

TEST_P(GpuGating, TopkMatchesCpu) {
  const auto c = GetParam();
  const int rows = 203;
  auto logits = random_floats(rng_, size_t(rows) * c.n_experts, 2.0f);
  // Exact ties: the lower expert id must come first, on both backends.
  for (int r = 0; r < rows; r += 3) {
    float* l = logits.data() + size_t(r) * c.n_experts;
    l[c.n_experts - 1] = l[0] = 9.0f;
    if (c.n_experts > 4) l[3] = l[1] = 8.5f;
  }
  std::vector<int32_t> ref_ids(size_t(rows) * c.k);
  std::vector<float> ref_w(ref_ids.size());
  cpu::topk_gating(logits.data(), rows, c.n_experts, c.k, c.temperature, c.renormalize, ref_ids.data(), ref_w.data());
  DeviceVec<float> dl(logits), dw(ref_w.size());
  DeviceVec<int32_t> di(ref_ids.size());
  STATUS_OK(
      mc::topk_gating(dl.get(), rows, c.n_experts, c.k, c.temperature, c.renormalize, di.get(), dw.get(), stream_));
  sync();
  // Ids must match, except where two different logits are so close (1e-6 relative) that the
  // backends' differently rounded probabilities may order them either way; exact ties must
  // match (lower id first).
  const auto ids = di.download();
  int unexplained = 0, near_ties = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] == ref_ids[i]) continue;
    const float* l = logits.data() + (i / size_t(c.k)) * size_t(c.n_experts);
    const float a = l[ids[i]], b = l[ref_ids[i]];
    if (a != b && std::fabs(a - b) <= 1e-6f * std::max(1.0f, std::fabs(b)))
      ++near_ties;
    else
      ++unexplained;
  }
  EXPECT_EQ(unexplained, 0) << "expert ids (n_experts " << c.n_experts << ", k " << c.k << ") differ " << unexplained
                            << " times beyond near-ties";
  if (near_ties == 0) expect_close(dw.download(), ref_w, 1e-5, "gating weights");
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuGating,
                         ::testing::Values(GatingCase{8, 2, 1.0f, true},    // Mixtral
                                           GatingCase{64, 6, 1.0f, false},  // DeepSeek-MoE
                                           GatingCase{60, 4, 1.0f, false},  // Qwen1.5-MoE
                                           GatingCase{160, 6, 0.7f, true},
                                           GatingCase{2048, 40, 1.3f, true},  // largest allowed
                                           GatingCase{5, 5, 1.0f, true}),     // k == n_experts
                         [](const auto& info) {
                           const GatingCase& c = info.param;
                           return "e" + std::to_string(c.n_experts) + "_k" + std::to_string(c.k) + "_t" +
                                  std::to_string(int(c.temperature * 100)) + (c.renormalize ? "_renorm" : "");
                         });

struct MatmulCase {
  DType wdtype;
  int rows, in, out;
};

class GpuMatmul : public Gpu, public ::testing::WithParamInterface<MatmulCase> {};

TEST_P(GpuMatmul, MatchesCpu) {
  const auto c = GetParam();
  const auto x = random_floats(rng_, size_t(c.rows) * c.in);
  const auto w = encode(c.wdtype, random_floats(rng_, size_t(c.out) * c.in, 0.05f));
  std::vector<float> ref(size_t(c.rows) * c.out);
  cpu::matmul(x.data(), c.rows, c.in, w.data(), c.wdtype, c.out, ref.data());

  mc::Blas blas;
  STATUS_OK(blas.init());
  const size_t ws_bytes = mc::matmul_workspace_bytes(c.rows, c.in, c.wdtype);
  DeviceVec<float> dx(x), dy(ref.size());
  DeviceVec<uint8_t> dw(w), ws(ws_bytes);
  STATUS_OK(mc::matmul(blas.get(), dx.get(), c.rows, c.in, dw.get(), c.wdtype, c.out, dy.get(),
                       ws_bytes ? ws.get() : nullptr, ws_bytes, stream_));
  sync();
  const double rtol = c.wdtype == DType::F32 ? 1e-4 : c.wdtype == DType::F16 ? 4e-3 : 3e-2;
  const double normwise = c.wdtype == DType::F32 ? 1e-5 : c.wdtype == DType::F16 ? 1e-3 : 8e-3;
  expect_close(dy.download(), ref, rtol,
               std::string("matmul ") + dtype_str(c.wdtype) + " " + std::to_string(c.rows) + "x" +
                   std::to_string(c.in) + "x" + std::to_string(c.out),
               normwise);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuMatmul,
                         ::testing::Values(MatmulCase{DType::F32, 1, 1024, 512}, MatmulCase{DType::F32, 37, 768, 1000},
                                           MatmulCase{DType::F16, 1, 1024, 512}, MatmulCase{DType::F16, 37, 768, 1000},
                                           MatmulCase{DType::BF16, 5, 4096, 256},
                                           MatmulCase{DType::BF16, 130, 512, 1536}),
                         [](const auto& info) {
                           const MatmulCase& c = info.param;
                           return std::string(dtype_str(c.wdtype)) + "_" + std::to_string(c.rows) + "x" +
                                  std::to_string(c.in) + "x" + std::to_string(c.out);
                         });

// ---- INT4/INT8 weights (QuantWeight): the decode GEMV and the dequantize + cuBLAS path against
// the CPU kernels (kernels/cpu/gemm.h with MatmulJob::wq), padded groups and shuffled channels
// (GPTQ's desc_act) included.

struct QuantCase {
  int bits, rows;
};

class GpuQuantMatmul : public Gpu, public ::testing::WithParamInterface<QuantCase> {};

TEST_P(GpuQuantMatmul, MatchesCpu) {
  const auto c = GetParam();
  const std::vector<int64_t> group_sizes{128, 100, 60};  // 288 inputs, groups padded to whole blocks
  const int64_t out = 96, in = 288;
  const cpu::QuantMatrix m = moemesh::testing::random_quant(c.bits, out, group_sizes, uint64_t(c.bits * 100 + c.rows));
  const auto x = random_floats(rng_, size_t(c.rows) * in);
  std::vector<float> ref(size_t(c.rows) * out);
  cpu::MatmulJob j{.x = x.data(), .rows = c.rows, .in = in, .out = out, .y = ref.data()};
  j.wq = &m;
  cpu::matmul(std::span(&j, 1));

  std::vector<int32_t> group_of(size_t(m.padded_in));
  for (int64_t g = 0; g < m.groups(); ++g)
    for (int64_t k = m.group_start[size_t(g)]; k < m.group_start[size_t(g + 1)]; ++k) group_of[size_t(k)] = int32_t(g);
  DeviceVec<uint8_t> dq(m.q);
  DeviceVec<float> ds(m.scale), dz(m.scaled_zero), dx(x), dy(ref.size());
  DeviceVec<int32_t> dg(group_of), dsrc(m.source);
  mc::QuantWeight qw;
  qw.bits = c.bits, qw.out = out, qw.in = in, qw.padded_in = m.padded_in, qw.groups = m.groups();
  qw.q = dq.get(), qw.scale = ds.get(), qw.scaled_zero = dz.get(), qw.group_of = dg.get(), qw.source = dsrc.get();
  mc::Blas blas;
  STATUS_OK(blas.init());
  const size_t ws_bytes = mc::quant_matmul_workspace_bytes(c.rows, qw);
  DeviceVec<uint8_t> ws(std::max<size_t>(ws_bytes, 1));
  STATUS_OK(mc::quant_matmul(blas.get(), dx.get(), c.rows, qw, dy.get(), ws.get(), ws_bytes, stream_));
  sync();
  expect_close(dy.download(), ref, 1e-4,
               "quant_matmul INT" + std::to_string(c.bits) + " rows " + std::to_string(c.rows), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuQuantMatmul,
                         ::testing::Values(QuantCase{4, 1}, QuantCase{4, 5}, QuantCase{4, 40}, QuantCase{8, 1},
                                           QuantCase{8, 40}),
                         [](const auto& info) {
                           return "int" + std::to_string(info.param.bits) + "_rows" + std::to_string(info.param.rows);
                         });

// ---- paged attention

struct AttnCase {
  int n_heads, n_kv_heads, head_dim, window;
};

class GpuAttention : public Gpu, public ::testing::WithParamInterface<AttnCase> {};

TEST_P(GpuAttention, MatchesCpu) {
  const auto c = GetParam();
  constexpr int kB = int(mc::kKvBlockTokens);
  const std::vector<int> seq_lens = {1, 16, 17, 300, 1200};  // within / at / across block edges
  const int n_seqs = int(seq_lens.size()), max_blocks = 80;
  int num_blocks = 0;
  for (int len : seq_lens) num_blocks += (len + kB - 1) / kB;
  num_blocks += 7;  // spare blocks that no sequence uses

  mc::PagedAttentionConfig cfg;
  cfg.n_heads = c.n_heads, cfg.n_kv_heads = c.n_kv_heads, cfg.head_dim = c.head_dim;
  cfg.num_blocks = num_blocks, cfg.max_blocks_per_seq = max_blocks;
  cfg.scale = float(1.0 / std::sqrt(double(c.head_dim)));  // what the CPU reference uses
  cfg.sliding_window = c.window;
  STATUS_OK(cfg.validate());

  // Blocks handed out in a shuffled order, so tables are not contiguous.
  std::vector<int32_t> free_blocks(static_cast<size_t>(num_blocks));
  std::iota(free_blocks.begin(), free_blocks.end(), 0);
  std::shuffle(free_blocks.begin(), free_blocks.end(), rng_);
  std::vector<int32_t> tables(size_t(n_seqs) * max_blocks, -1);
  size_t next = 0;
  for (int s = 0; s < n_seqs; ++s)
    for (int b = 0; b < (seq_lens[size_t(s)] + kB - 1) / kB; ++b)
      tables[size_t(s) * max_blocks + size_t(b)] = free_blocks[next++];

  // Fill the cache through paged_kv_write: every token of every sequence, one row each.
  const int64_t row_floats = cfg.kv_row_floats();
  std::vector<int32_t> slots;
  for (int s = 0; s < n_seqs; ++s)
    for (int t = 0; t < seq_lens[size_t(s)]; ++t)
      slots.push_back(tables[size_t(s) * max_blocks + size_t(t / kB)] * kB + t % kB);
  slots.push_back(-1);  // a padding row: skipped
  const auto k_rows = random_floats(rng_, slots.size() * size_t(row_floats));
  const auto v_rows = random_floats(rng_, slots.size() * size_t(row_floats));
  const size_t cache_floats = cfg.cache_bytes() / sizeof(float);
  DeviceVec<float> dk(cache_floats), dv(cache_floats), dkr(k_rows), dvr(v_rows);
  DeviceVec<int32_t> dslots(slots);
  STATUS_OK(
      mc::paged_kv_write(cfg, dkr.get(), dvr.get(), int64_t(slots.size()), dslots.get(), dk.get(), dv.get(), stream_));
  sync();
  const auto k_cache = dk.download(), v_cache = dv.download();
  for (size_t i = 0; i + 1 < slots.size(); ++i)
    ASSERT_EQ(0, std::memcmp(&k_cache[size_t(slots[i]) * row_floats], &k_rows[i * row_floats], row_floats * 4))
        << "paged_kv_write row " << i;

  // Queries: the decode token of every sequence, plus a prefill chunk of the longest one.
  std::vector<int32_t> row_seq, row_pos;
  for (int s = 0; s < n_seqs; ++s) row_seq.push_back(s), row_pos.push_back(seq_lens[size_t(s)] - 1);
  for (int p : {0, 5, 15, 16, 600, 1100}) row_seq.push_back(n_seqs - 1), row_pos.push_back(p);
  const int rows = int(row_seq.size());
  const auto q = random_floats(rng_, size_t(rows) * c.n_heads * c.head_dim);

  // CPU reference, one row at a time through the sequence's block pointers.
  std::vector<float> ref(q.size());
  const cpu::AttentionShape shape{c.n_heads, c.n_kv_heads, c.head_dim, c.window};
  const size_t q_row = size_t(c.n_heads) * c.head_dim;
  for (int r = 0; r < rows; ++r) {
    std::vector<const float*> kb, vb;
    const int s = row_seq[size_t(r)];
    for (int b = 0; b < max_blocks && tables[size_t(s) * max_blocks + size_t(b)] >= 0; ++b) {
      const size_t off = size_t(tables[size_t(s) * max_blocks + size_t(b)]) * cfg.block_floats();
      kb.push_back(&k_cache[off]);
      vb.push_back(&v_cache[off]);
    }
    const cpu::PagedKV kv{kb.data(), vb.data(), kB};
    cpu::paged_attention(q.data() + r * q_row, 1, &row_pos[size_t(r)], shape, kv, ref.data() + r * q_row);
  }

  DeviceVec<float> dq(q), dout(q.size());
  DeviceVec<int32_t> dseq(row_seq), dpos(row_pos), dtables(tables);
  STATUS_OK(mc::paged_attention(cfg, dq.get(), rows, dseq.get(), dpos.get(), dtables.get(), n_seqs, dk.get(), dv.get(),
                                dout.get(), stream_));
  sync();
  expect_close(dout.download(), ref, 1e-5,
               "paged_attention heads " + std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) +
                   " head_dim " + std::to_string(c.head_dim) + " window " + std::to_string(c.window));

  // Split-K (flash-decoding across blocks): the same rows cut into 2, 5 and 64 splits, merged by
  // log-sum-exp, match the CPU too (64 splits leave most splits of the short rows empty).
  for (int64_t splits : {int64_t(2), int64_t(5), mc::kMaxKvSplits}) {
    mc::PagedAttentionConfig sc = cfg;
    sc.kv_splits = splits;
    DeviceVec<float> dsplit_out(q.size()), dwork(sc.split_workspace_bytes(rows) / sizeof(float));
    STATUS_OK(mc::paged_attention(sc, dq.get(), rows, dseq.get(), dpos.get(), dtables.get(), n_seqs, dk.get(), dv.get(),
                                  dsplit_out.get(), stream_, dwork.get()));
    sync();
    expect_close(dsplit_out.download(), ref, 1e-5, "paged_attention kv_splits " + std::to_string(splits));
  }
  {
    mc::PagedAttentionConfig sc = cfg;
    sc.kv_splits = 3;
    expect_error(mc::paged_attention(sc, dq.get(), rows, dseq.get(), dpos.get(), dtables.get(), n_seqs, dk.get(),
                                     dv.get(), dout.get(), stream_),
                 "workspace");
  }

  // Rows the device cannot trust come back NaN: a sequence index out of range, a position past
  // the block table, a block id outside the cache.
  std::vector<int32_t> bad_tables = tables;
  bad_tables[0] = num_blocks;  // sequence 0's first block
  DeviceVec<int32_t> dbad_tables(bad_tables), dbad_seq(std::vector<int32_t>{n_seqs, 1, 0}),
      dbad_pos(std::vector<int32_t>{0, max_blocks * kB, 0});
  DeviceVec<float> dbad_out(size_t(3) * q_row);
  STATUS_OK(mc::paged_attention(cfg, dq.get(), 3, dbad_seq.get(), dbad_pos.get(), dbad_tables.get(), n_seqs, dk.get(),
                                dv.get(), dbad_out.get(), stream_));
  sync();
  const auto bad_out = dbad_out.download();
  for (int r = 0; r < 3; ++r) {
    const float* o = &bad_out[size_t(r) * q_row];
    EXPECT_TRUE(std::all_of(o, o + q_row, [](float v) { return std::isnan(v); })) << "bad row " << r;
  }
}

// INT8 cache: paged_kv_write_int8 stores exactly the CPU format's bytes and scales
// (kernels/cpu/kv_int8.h), and paged_attention_int8 matches the CPU INT8 path within 1e-5.
TEST_P(GpuAttention, Int8MatchesCpuInt8) {
  const auto c = GetParam();
  constexpr int kB = int(mc::kKvBlockTokens);
  const std::vector<int> seq_lens = {1, 17, 300};
  const int n_seqs = int(seq_lens.size()), max_blocks = 19;
  int num_blocks = 3;  // spares
  for (int len : seq_lens) num_blocks += (len + kB - 1) / kB;
  mc::PagedAttentionConfig cfg;
  cfg.n_heads = c.n_heads, cfg.n_kv_heads = c.n_kv_heads, cfg.head_dim = c.head_dim;
  cfg.num_blocks = num_blocks, cfg.max_blocks_per_seq = max_blocks;
  cfg.scale = float(1.0 / std::sqrt(double(c.head_dim)));
  cfg.sliding_window = c.window;

  // Blocks handed out from the top down, so tables are not the identity.
  std::vector<int32_t> tables(size_t(n_seqs) * max_blocks, -1), slots;
  int next = num_blocks - 1;
  for (int s = 0; s < n_seqs; ++s) {
    for (int b = 0; b < (seq_lens[size_t(s)] + kB - 1) / kB; ++b) tables[size_t(s) * max_blocks + size_t(b)] = next--;
    for (int t = 0; t < seq_lens[size_t(s)]; ++t)
      slots.push_back(tables[size_t(s) * max_blocks + size_t(t / kB)] * kB + t % kB);
  }
  const int64_t row = cfg.kv_row_floats(), n_tok = int64_t(slots.size());
  const auto k_rows = random_floats(rng_, size_t(n_tok * row)), v_rows = random_floats(rng_, size_t(n_tok * row));

  // CPU: quantise each token and place it at its slot.
  const size_t values = size_t(num_blocks) * kB * size_t(row), scales = size_t(num_blocks) * kB * size_t(c.n_kv_heads);
  std::vector<int8_t> kq(values), vq(values), tq(static_cast<size_t>(row));
  std::vector<float> ks(scales), vs(scales), ts(static_cast<size_t>(c.n_kv_heads));
  for (int64_t i = 0; i < n_tok; ++i)
    for (int which = 0; which < 2; ++which) {
      cpu::quantize_kv_int8((which ? v_rows : k_rows).data() + i * row, 1, c.n_kv_heads, c.head_dim, tq.data(),
                            ts.data());
      std::copy(tq.begin(), tq.end(), (which ? vq : kq).begin() + ptrdiff_t(slots[size_t(i)] * row));
      std::copy(ts.begin(), ts.end(), (which ? vs : ks).begin() + ptrdiff_t(slots[size_t(i)] * c.n_kv_heads));
    }

  DeviceVec<int8_t> dkq(values), dvq(values);
  DeviceVec<float> dks(scales), dvs(scales), dkr(k_rows), dvr(v_rows);
  CUDA_OK(cudaMemset(dkq.get(), 0, values));
  CUDA_OK(cudaMemset(dvq.get(), 0, values));
  CUDA_OK(cudaMemset(dks.get(), 0, scales * 4));
  CUDA_OK(cudaMemset(dvs.get(), 0, scales * 4));
  DeviceVec<int32_t> dslots(slots);
  const mc::Int8KvCache cache{dkq.get(), dvq.get(), dks.get(), dvs.get()};
  STATUS_OK(mc::paged_kv_write_int8(cfg, dkr.get(), dvr.get(), n_tok, dslots.get(), cache, stream_));
  sync();
  EXPECT_TRUE(dkq.download() == kq && dvq.download() == vq) << "int8 values differ from the CPU quantisation";
  EXPECT_TRUE(dks.download() == ks && dvs.download() == vs) << "scales differ from the CPU quantisation";

  // Decode rows of every sequence plus prefill positions of the longest.
  std::vector<int32_t> row_seq, row_pos;
  for (int s = 0; s < n_seqs; ++s) row_seq.push_back(s), row_pos.push_back(seq_lens[size_t(s)] - 1);
  for (int p : {0, 15, 16, 200}) row_seq.push_back(n_seqs - 1), row_pos.push_back(p);
  const int rows = int(row_seq.size());
  const auto q = random_floats(rng_, size_t(rows) * c.n_heads * c.head_dim);
  const size_t q_row = size_t(c.n_heads) * c.head_dim;
  std::vector<float> ref(q.size());
  const cpu::AttentionShape shape{c.n_heads, c.n_kv_heads, c.head_dim, c.window};
  for (int r = 0; r < rows; ++r) {
    std::vector<const int8_t*> kb, vb;
    std::vector<const float*> ksb, vsb;
    const int s = row_seq[size_t(r)];
    for (int b = 0; b < max_blocks && tables[size_t(s) * max_blocks + size_t(b)] >= 0; ++b) {
      const size_t blk = size_t(tables[size_t(s) * max_blocks + size_t(b)]);
      kb.push_back(&kq[blk * kB * size_t(row)]);
      vb.push_back(&vq[blk * kB * size_t(row)]);
      ksb.push_back(&ks[blk * kB * size_t(c.n_kv_heads)]);
      vsb.push_back(&vs[blk * kB * size_t(c.n_kv_heads)]);
    }
    cpu::PagedKV kv;
    kv.block_size = kB;
    kv.k_q = kb.data(), kv.v_q = vb.data(), kv.k_scale = ksb.data(), kv.v_scale = vsb.data();
    cpu::paged_attention(q.data() + r * q_row, 1, &row_pos[size_t(r)], shape, kv, ref.data() + r * q_row);
  }
  DeviceVec<float> dq(q), dout(q.size());
  DeviceVec<int32_t> dseq(row_seq), dpos(row_pos), dtables(tables);
  STATUS_OK(mc::paged_attention_int8(cfg, dq.get(), rows, dseq.get(), dpos.get(), dtables.get(), n_seqs, cache,
                                     dout.get(), stream_));
  sync();
  expect_close(dout.download(), ref, 1e-5, "paged_attention_int8 head_dim " + std::to_string(c.head_dim));
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuAttention,
                         ::testing::Values(AttnCase{8, 8, 128, 0},     // MHA
                                           AttnCase{32, 8, 128, 0},    // GQA 4 (Mixtral)
                                           AttnCase{16, 2, 64, 0},     // GQA 8, small heads
                                           AttnCase{8, 1, 256, 0},     // MQA, largest head_dim
                                           AttnCase{12, 4, 96, 0},     // head_dim not a power of 2
                                           AttnCase{32, 8, 128, 100},  // sliding window
                                           AttnCase{4, 2, 32, 17}),    // window across a block edge
                         [](const auto& info) {
                           const AttnCase& c = info.param;
                           return "h" + std::to_string(c.n_heads) + "_kv" + std::to_string(c.n_kv_heads) + "_d" +
                                  std::to_string(c.head_dim) + "_w" + std::to_string(c.window);
                         });

}  // namespace
