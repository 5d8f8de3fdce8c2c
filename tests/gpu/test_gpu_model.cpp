// The whole tiny model on the CUDA backend against the CPU engine (f32 weights, so cuBLAS and the
// CPU sgemm differ only by summation order): logits within 1e-4 relative (INT8 KV: 5e-3) and the
// same greedy tokens wherever the winner is clear, with an f32 and an INT8 KV cache, plus the
// prefix-cache frames of a device cache, and with two micro-batches running side by side on two
// lanes of the backend. The backend's logits summaries (lm_head and the summary on the device)
// against the host summary of the same backend's logits. Skips with "no CUDA device: ..." where
// there is none.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <span>
#include <filesystem>
#include <string>
#include <vector>

#include "core/backend_factory.h"
#include "core/engine.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "kernels/cuda/api.cuh"
#include "tests/support/numeric.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;

namespace {

// Relative logits bound: f32 KV differs only by summation order; with INT8 KV an element of K/V
// whose x/scale sits within cuBLAS's rounding of a .5 boundary quantises one step apart on the
// two backends (~0.8% of that head's largest value), so the bound is looser.
double logits_bound(KvDType kv) { return kv == KvDType::F32 ? 1e-4 : 5e-3; }

int32_t argmax(std::span<const float> l) { return int32_t(std::max_element(l.begin(), l.end()) - l.begin()); }

// Whether the best logit leads the second by more than `bound` times the row's largest magnitude.
bool clear_winner(std::span<const float> l, double bound) {
  std::vector<float> v(l.begin(), l.end());
  std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<float>());
  float scale = 0;
  for (float x : l) scale = std::max(scale, std::fabs(x));
  return double(v[0] - v[1]) > 2 * bound * double(scale);
}

class GpuModel : public ::testing::TestWithParam<std::tuple<Arch, KvDType>> {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda::device_error();
    dir_ = std::filesystem::temp_directory_path() / ("moemesh-gpu-model-" + std::to_string(::getpid()));
    ModelConfig cfg = model_preset(std::get<0>(GetParam()), "tiny");
    cfg.vocab_size = 256;
    WriteOptions o;
    o.dtype = DType::F32;
    write_model(cfg, dir_, o);
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::filesystem::path dir_;
};

TEST_P(GpuModel, MatchesCpuEngine) {
  const KvDType kv = std::get<1>(GetParam());
  auto ckpt = Checkpoint::open(dir_);
  Engine cpu(ckpt, EngineOptions{16, kv});
  Engine gpu(ckpt, EngineOptions{16, kv, make_compute_backend(parse_device("cuda:0"))});
  const SeqId a = cpu.create_sequence(), b = gpu.create_sequence();
  std::vector<int32_t> next = moemesh::testing::random_tokens(21, 3, 256);
  double worst = 0;
  for (int step = 0; step < 16; ++step) {
    StepInput ia{a, next, true}, ib{b, next, true};
    const auto x = cpu.step(std::span<const StepInput>(&ia, 1)).front();
    const auto y = gpu.step(std::span<const StepInput>(&ib, 1)).front();
    worst = std::max(worst, moemesh::testing::rel_diff(y.logits, x.logits));
    const std::span<const float> cpu_last(x.logits.end() - 256, x.logits.end()), gpu_last(y.logits.end() - 256, y.logits.end());
    // The greedy tokens must agree unless the CPU's best two are closer than the logits may differ.
    if (clear_winner(cpu_last, logits_bound(kv))) {
      ASSERT_EQ(argmax(gpu_last), argmax(cpu_last)) << "greedy token of step " << step;
    }
    next = {argmax(cpu_last)};
  }
  std::printf("%s: worst relative logits difference %.3g\n", gpu.backend().name().c_str(), worst);
  EXPECT_LT(worst, logits_bound(kv));

  // The prefix cache's f32 frames read from the device equal the CPU cache's (INT8: both
  // dequantise the same bytes up to the kernels' rounding).
  std::vector<float> fa(size_t(cpu.kv_cache().block_floats())), fb(fa.size());
  cpu.kv_cache().read_block(a, 0, fa.data());
  gpu.kv_cache().read_block(b, 0, fb.data());
  EXPECT_LT(moemesh::testing::rel_diff(fb, fa), kv == KvDType::F32 ? 1e-5 : 2e-2);
}

// Two micro-batches on two threads take two lanes of the backend (streams, cuBLAS handles and
// scratch of their own) and run side by side: the logits equal the CPU engine's, step after step.
TEST_P(GpuModel, TwoMicroBatchesOnTwoLanes) {
  const KvDType kv = std::get<1>(GetParam());
  auto ckpt = Checkpoint::open(dir_);
  Engine cpu(ckpt, EngineOptions{32, kv});
  Engine gpu(ckpt, EngineOptions{32, kv, make_compute_backend(parse_device("cuda:0"))});
  std::vector<SeqId> sc, sg;
  std::vector<std::vector<int32_t>> next;
  for (int i = 0; i < 4; ++i) {
    sc.push_back(cpu.create_sequence());
    sg.push_back(gpu.create_sequence());
    next.push_back(moemesh::testing::random_tokens(size_t(5 + 7 * i), uint64_t(40 + i), 256));
  }
  double worst = 0;
  for (int step = 0; step < 6; ++step) {
    std::vector<StepInput> ic, ig;
    for (size_t i = 0; i < 4; ++i) {
      ic.push_back({sc[i], next[i], false});
      ig.push_back({sg[i], next[i], false});
    }
    const auto x = cpu.step(ic, {1});
    const auto y = gpu.step(ig, {2});
    ASSERT_EQ(gpu.last_timing().micro_batches, 2);
    for (size_t i = 0; i < 4; ++i) {
      worst = std::max(worst, moemesh::testing::rel_diff(y[i].logits, x[i].logits));
      next[i] = {int32_t(std::max_element(x[i].logits.begin(), x[i].logits.end()) - x[i].logits.begin())};
    }
  }
  std::printf("%s, two micro-batches: worst relative logits difference %.3g\n", gpu.backend().name().c_str(), worst);
  EXPECT_LT(worst, logits_bound(kv));
}

INSTANTIATE_TEST_SUITE_P(TinyModels, GpuModel,
                         ::testing::Combine(::testing::Values(Arch::Mixtral, Arch::DeepSeek),
                                            ::testing::Values(KvDType::F32, KvDType::Int8)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) == Arch::Mixtral ? "mixtral" : "deepseek") +
                                  "_" + std::string(kv_dtype_name(std::get<1>(info.param)));
                         });

}  // namespace

// logits_summaries on the device against summarise_logits of the logits the same backend's matmul
// gives (the same GEMM, so the comparison is exact but for the normalisers' f32 sums): per-row k,
// temperatures and watch lists, as the step worker asks for them.
TEST(GpuLogitsSummaries, MatchTheHostSummaryOfTheSameLogits) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda::device_error();
  const moemesh::testing::TinyModel model(Arch::Mixtral, /*seed=*/4, /*vocab=*/3000, DType::BF16);
  auto ckpt = Checkpoint::open(model.path());
  const ModelConfig& cfg = ckpt->config();
  const ModelWeights w = ckpt->load(WeightSelection{});
  auto gpu = make_compute_backend(parse_device("cuda:0"));
  const int64_t rows = 3, hidden = cfg.hidden_size, vocab = cfg.vocab_size;
  const std::vector<float> x = moemesh::testing::normals(size_t(rows * hidden), 9);
  std::vector<LogitsRequest> req(3);
  req[0].k = 64;
  req[1] = {5, 0.0, {7, 2999, 7}};
  req[2] = {200, 0.6, {0, 1, 2, 3}};
  const auto got = gpu->logits_summaries(x.data(), rows, w.lm_head, req);
  std::vector<float> logits(size_t(rows * vocab));
  gpu->matmul(x.data(), rows, w.lm_head, logits.data());
  ASSERT_EQ(got.size(), size_t(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const auto want = summarise_logits(std::span<const float>(logits).subspan(size_t(r * vocab), size_t(vocab)),
                                       req[size_t(r)]);
    EXPECT_EQ(got[size_t(r)].vocab, vocab);
    EXPECT_EQ(got[size_t(r)].top_ids, want.top_ids) << "row " << r;
    EXPECT_EQ(got[size_t(r)].top_values, want.top_values) << "row " << r;
    EXPECT_NEAR(got[size_t(r)].lse, want.lse, 1e-5 * std::max(1.0, std::fabs(want.lse)));
    EXPECT_NEAR(got[size_t(r)].lse_scaled, want.lse_scaled, 1e-5 * std::max(1.0, std::fabs(want.lse_scaled)));
    EXPECT_EQ(got[size_t(r)].watch_values, want.watch_values) << "row " << r;
  }
}
