// An expert host's batch on the CUDA backend (`moemesh-expert --device cuda`) against the same
// batch on the CPU backend: every expert of a layer, requests of uneven sizes, f32 weights (so
// cuBLAS and the CPU sgemm differ only by summation order); and the backend's grouped MLP (one
// grouped GEMM per projection over a layer's experts) with F32 and BF16 weights. Skips with
// "no CUDA device: ..."; and INT4 experts.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <future>
#include <random>
#include <string>

#include "actors/expert_compute.h"
#include "core/backend_factory.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "kernels/cuda/api.cuh"
#include "tests/support/numeric.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;
using namespace moemesh::actors;

TEST(GpuExperts, BatchOnCudaMatchesCpu) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda::device_error();
  const auto dir = std::filesystem::temp_directory_path() / ("moemesh-gpu-experts-" + std::to_string(::getpid()));
  ModelConfig cfg = model_preset(Arch::Mixtral, "tiny");
  cfg.vocab_size = 256;
  WriteOptions o;
  o.dtype = DType::F32;
  write_model(cfg, dir, o);
  auto ckpt = Checkpoint::open(dir);
  const int64_t hidden = ckpt->config().hidden_size;
  HostedExperts gpu(ckpt, all_experts(ckpt->config()), make_compute_backend(parse_device("cuda:0")));
  HostedExperts cpu(ckpt, all_experts(ckpt->config()));
  ComputePool pool(2);  // two threads into one backend: its mutex serialises them

  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto job_of = [&](const HostedExperts& h, const std::vector<std::vector<dispatch::Group>>& shapes,
                    const std::vector<std::vector<float>>& rows) {
    auto job = std::make_shared<BatchJob>();
    job->layer = 1;
    for (size_t i = 0; i < shapes.size(); ++i) {
      PendingRequest r;
      r.peer = "p" + std::to_string(i);
      r.request_id = i + 1;
      r.groups = shapes[i];
      r.rows = rows[i];
      job->requests.push_back(std::move(r));
    }
    std::promise<BatchJobPtr> done;
    run_batch(h, pool, job, [&](BatchJobPtr j) { done.set_value(std::move(j)); });
    return done.get_future().get();
  };
  const std::vector<std::vector<dispatch::Group>> shapes{{{0, 3}, {4, 1}}, {{4, 7}, {2, 2}}, {{1, 64}, {7, 16}}};
  std::vector<std::vector<float>> rows;
  for (const auto& s : shapes) {
    int64_t n = 0;
    for (const auto& g : s) n += g.rows;
    auto& r = rows.emplace_back(size_t(n * hidden));
    for (float& x : r) x = nd(rng);
  }
  const BatchJobPtr a = job_of(gpu, shapes, rows), b = job_of(cpu, shapes, rows);
  ASSERT_TRUE(a->error.empty()) << a->error;
  ASSERT_TRUE(b->error.empty()) << b->error;
  double worst = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    ASSERT_EQ(a->outputs[i].size(), b->outputs[i].size());
    worst = std::max(worst, moemesh::testing::rel_diff(a->outputs[i], b->outputs[i]));
  }
  std::printf("%s: expert batch worst relative difference %.3g\n", gpu.backend().name().c_str(), worst);
  EXPECT_LT(worst, 1e-5);
  std::filesystem::remove_all(dir);
}

// grouped_mlp on the device (rows gathered there, three grouped GEMMs) against the CPU backend's
// (one mlp_forward per expert), on rows given in any order with repeats and an expert with none.
// BF16: the grouped GEMM keeps every matrix in BF16 (x, gate/up, their SwiGLU, the output are
// each rounded once: unit roundoff 2^-8), so the normwise bound is 2e-2; F32 differs only by
// summation order.
TEST(GpuExperts, GroupedMlpMatchesCpu) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda::device_error();
  for (DType dtype : {DType::F32, DType::BF16}) {
    const moemesh::testing::TinyModel model(Arch::Mixtral, /*seed=*/5, /*vocab=*/256, dtype);
    auto ckpt = Checkpoint::open(model.path());
    const ModelConfig& cfg = ckpt->config();
    const ModelWeights weights = ckpt->load(WeightSelection{});
    const int64_t hidden = cfg.hidden_size, x_rows = 40;
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(size_t(x_rows * hidden));
    for (float& v : x) v = nd(rng);
    const std::vector<std::vector<int32_t>> rows{
        {39, 0, 5, 5, 17}, {}, {1}, {2, 3, 4, 6, 8, 9, 10, 11, 12, 13, 14, 20}};
    auto run = [&](ComputeBackend& backend) {
      std::vector<std::vector<float>> out(rows.size());
      std::vector<ExpertRows> experts;
      for (size_t e = 0; e < rows.size(); ++e) {
        out[e].assign(rows[e].size() * size_t(hidden), std::nanf(""));
        experts.push_back({&*weights.layers[1].experts[e], rows[e], out[e].data()});
      }
      backend.grouped_mlp(x.data(), x_rows, hidden, experts);
      return out;
    };
    const auto gpu = run(*make_compute_backend(parse_device("cuda:0")));
    const auto cpu = run(*cpu_backend());
    const double bound = dtype == DType::F32 ? 1e-5 : 2e-2;
    for (size_t e = 0; e < rows.size(); ++e) {
      if (rows[e].empty()) continue;
      const double d = moemesh::testing::rel_diff(gpu[e], cpu[e]);
      std::printf("grouped mlp %s expert %zu: relative difference %.3g\n", dtype_name(dtype).data(), e, d);
      EXPECT_LT(d, bound) << dtype_name(dtype) << " expert " << e;
    }
  }
}

// INT4 experts (the CPU kernels' QuantMatrix, as a GPTQ checkpoint loads them): the CUDA backend
// dequantizes exactly (kernels/cuda/gemm.cu: quant_matmul), so it equals the CPU backend up to
// summation order, for 1 row (the decode GEMV) and 12 rows (dequantize + cuBLAS).
TEST(GpuExperts, QuantizedMlpMatchesCpu) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda::device_error();
  const int64_t hidden = 64, inter = 96;
  std::mt19937 rng(13);
  auto quantized = [&](const std::string& name, int64_t out, int64_t in) {
    auto m = std::make_shared<cpu::QuantMatrix>();
    m->shape(4, out, in, std::vector<int64_t>(size_t(in / 32), 32));
    for (int64_t k = 0; k < in; ++k) m->source[size_t(k)] = int32_t(k);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < m->padded_in; ++k) m->set_quant(o, k, int(rng() % 16));
    for (size_t i = 0; i < m->scale.size(); ++i) m->scale[i] = 0.01f, m->scaled_zero[i] = 0.08f;
    Weight w;
    w.name = name, w.dtype = DType::I32, w.shape = {out, in}, w.data = m->q.data(), w.quant = m;
    return w;
  };
  MlpWeights mlp{quantized("gate", inter, hidden), quantized("up", inter, hidden), quantized("down", hidden, inter)};
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(size_t(12 * hidden));
  for (float& v : x) v = nd(rng);
  for (const std::vector<int32_t>& rows :
       {std::vector<int32_t>{5}, std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}}) {
    auto run = [&](ComputeBackend& backend) {
      std::vector<float> out(rows.size() * size_t(hidden), std::nanf(""));
      const ExpertRows e{&mlp, rows, out.data()};
      backend.grouped_mlp(x.data(), 12, hidden, std::span(&e, 1));
      return out;
    };
    const double d =
        moemesh::testing::rel_diff(run(*make_compute_backend(parse_device("cuda:0"))), run(*cpu_backend()));
    std::printf("quantized mlp, %zu rows: relative difference %.3g\n", rows.size(), d);
    EXPECT_LT(d, 1e-5) << rows.size() << " rows";
  }
}
