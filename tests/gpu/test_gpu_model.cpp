// The whole tiny model on the CUDA backend against the CPU engine (f32 weights, so cuBLAS and the
// CPU sgemm differ only by summation order): logits within 1e-4 relative and identical greedy
// paths, with an f32 and an INT8 KV cache, plus the prefix-cache frames of a device cache.
// Skips with "no CUDA device: ..." where there is none.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "core/backend_factory.h"
#include "core/engine.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "kernels/cuda/api.cuh"
#include "tests/support/numeric.h"

using namespace moemesh;

namespace {

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
    const auto last = [](const std::vector<float>& l) {
      return int32_t(std::max_element(l.end() - 256, l.end()) - (l.end() - 256));
    };
    ASSERT_EQ(last(y.logits), last(x.logits)) << "greedy token of step " << step;
    next = {last(x.logits)};
  }
  std::printf("%s: worst relative logits difference %.3g\n", gpu.backend().name().c_str(), worst);
  EXPECT_LT(worst, 1e-4);

  // The prefix cache's f32 frames read from the device equal the CPU cache's (INT8: both
  // dequantise the same bytes up to the kernels' rounding).
  std::vector<float> fa(size_t(cpu.kv_cache().block_floats())), fb(fa.size());
  cpu.kv_cache().read_block(a, 0, fa.data());
  gpu.kv_cache().read_block(b, 0, fb.data());
  EXPECT_LT(moemesh::testing::rel_diff(fb, fa), kv == KvDType::F32 ? 1e-5 : 2e-2);
}

INSTANTIATE_TEST_SUITE_P(TinyModels, GpuModel,
                         ::testing::Combine(::testing::Values(Arch::Mixtral, Arch::DeepSeek),
                                            ::testing::Values(KvDType::F32, KvDType::Int8)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) == Arch::Mixtral ? "mixtral" : "deepseek") +
                                  "_" + std::string(kv_dtype_name(std::get<1>(info.param)));
                         });

}  // namespace
