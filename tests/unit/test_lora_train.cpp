// LoRA training (core/lora_train_ops.h, core/lora_train.h): every op's backward pass and the whole
// model's adapter gradients against central finite differences in double; the training forward's
// logits against the inference Engine's; the PEFT files written and read back; bad input refused.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>

#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/lora_train.h"
#include "core/lora_train_ops.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "core/safetensors.h"

using namespace moemesh;
namespace ops = moemesh::lora_ops;
namespace fs = std::filesystem;

namespace {

std::vector<double> randn(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Central differences of f with respect to every element of x, against `analytic`.
void expect_grad(std::vector<double>& x, const std::function<double()>& f, const std::vector<double>& analytic,
                 const char* what, double tol = 1e-7) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  const double eps = 1e-6;
  for (size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + eps;
    const double up = f();
    x[i] = keep - eps;
    const double down = f();
    x[i] = keep;
    const double fd = (up - down) / (2 * eps);
    EXPECT_NEAR(analytic[i], fd, tol + 1e-6 * std::abs(fd)) << what << " element " << i;
  }
}

}  // namespace

TEST(LoraOps, LinearWithAdapter) {
  const int64_t n = 3, in = 5, out = 4, r = 2;
  auto x = randn(n * in, 1), w = randn(out * in, 2), a = randn(r * in, 3), b = randn(out * r, 4), R = randn(n * out, 5);
  ops::Linear<double> l{w.data(), out, in, a.data(), b.data(), r, 1.5};
  auto f = [&] {
    std::vector<double> y(n * out), u;
    ops::linear_forward(l, x.data(), n, y.data(), u);
    return dot(y, R);
  };
  std::vector<double> y(n * out), u, dx(n * in, 0.0), da(r * in, 0.0), db(out * r, 0.0);
  ops::linear_forward(l, x.data(), n, y.data(), u);
  ops::linear_backward(l, x.data(), u.data(), R.data(), n, dx.data(), da.data(), db.data());
  expect_grad(x, f, dx, "dx");
  expect_grad(a, f, da, "dA");
  expect_grad(b, f, db, "dB");
}

TEST(LoraOps, RmsNorm) {
  const int64_t n = 3, d = 6;
  auto x = randn(n * d, 1), w = randn(d, 2), R = randn(n * d, 3);
  auto f = [&] {
    std::vector<double> y(n * d), inv(n);
    ops::rmsnorm_forward(x.data(), w.data(), n, d, 1e-5, y.data(), inv.data());
    return dot(y, R);
  };
  std::vector<double> y(n * d), inv(n), dx(n * d, 0.0);
  ops::rmsnorm_forward(x.data(), w.data(), n, d, 1e-5, y.data(), inv.data());
  ops::rmsnorm_backward(x.data(), w.data(), inv.data(), R.data(), n, d, dx.data());
  expect_grad(x, f, dx, "dx");
}

TEST(LoraOps, RopeInverseIsTranspose) {
  const int64_t n = 5, heads = 3, hd = 8;
  ModelConfig c;
  c.head_dim = hd;
  c.rope_theta = 100.0;
  std::vector<double> inv_freq;
  for (int64_t i = 0; i < hd / 2; ++i) inv_freq.push_back(1.0 / std::pow(100.0, double(2 * i) / double(hd)));
  auto x = randn(n * heads * hd, 1), y = randn(n * heads * hd, 2);
  auto rx = x, ry = y;
  ops::rope(rx.data(), n, heads, hd, inv_freq.data(), 1.3, false);
  ops::rope(ry.data(), n, heads, hd, inv_freq.data(), 1.3, true);
  EXPECT_NEAR(dot(rx, y), dot(x, ry), 1e-10);
}

TEST(LoraOps, CausalGqaAttention) {
  for (int64_t window : {int64_t(0), int64_t(3)}) {
    const ops::AttentionDims s{4, 2, 4, window, 0.7};
    const int64_t n = 6, qd = 16, kd = 8;
    auto q = randn(n * qd, 1), k = randn(n * kd, 2), v = randn(n * kd, 3), R = randn(n * qd, 4);
    auto f = [&] {
      std::vector<double> o(n * qd), p;
      ops::attention_forward(s, q.data(), k.data(), v.data(), n, o.data(), p);
      return dot(o, R);
    };
    std::vector<double> o(n * qd), p, dq(n * qd), dk(n * kd), dv(n * kd);
    ops::attention_forward(s, q.data(), k.data(), v.data(), n, o.data(), p);
    ops::attention_backward(s, q.data(), k.data(), v.data(), p.data(), R.data(), n, dq.data(), dk.data(), dv.data());
    expect_grad(q, f, dq, "dq");
    expect_grad(k, f, dk, "dk");
    expect_grad(v, f, dv, "dv");
  }
}

TEST(LoraOps, SwiGlu) {
  const int64_t n = 10;
  auto g = randn(n, 1, 2.0), u = randn(n, 2), R = randn(n, 3);
  auto f = [&] {
    std::vector<double> a(n);
    ops::swiglu_forward(g.data(), u.data(), n, a.data());
    return dot(a, R);
  };
  std::vector<double> dg(n), du(n);
  ops::swiglu_backward(g.data(), u.data(), R.data(), n, dg.data(), du.data());
  expect_grad(g, f, dg, "dg");
  expect_grad(u, f, du, "du");
}

TEST(LoraOps, TopKGating) {
  struct Case {
    Arch arch;
    int64_t k;
    bool norm;
    double rsf, temp;
  };
  for (const Case& cs : {Case{Arch::Mixtral, 2, true, 1.0, 1.0}, Case{Arch::Mixtral, 1, true, 1.0, 0.7},
                         Case{Arch::DeepSeek, 3, false, 1.5, 1.0}, Case{Arch::DeepSeek, 2, true, 2.5, 0.8}}) {
    ModelConfig c;
    c.arch = cs.arch;
    c.num_experts = 6;
    c.num_experts_per_tok = cs.k;
    c.norm_topk_prob = cs.norm;
    c.routed_scaling_factor = cs.rsf;
    c.gating_temperature = cs.temp;
    const int64_t n = 4;
    auto z = randn(n * 6, 7), R = randn(n * cs.k, 8);
    auto f = [&] {
      ops::Gating<double> g;
      ops::gating_forward(c, z.data(), n, g);
      return dot(g.w, R);
    };
    ops::Gating<double> g;
    ops::gating_forward(c, z.data(), n, g);
    std::vector<double> dz(n * 6);
    ops::gating_backward(c, g, R.data(), dz.data());
    expect_grad(z, f, dz, "dlogits");
  }
}

TEST(LoraOps, CrossEntropy) {
  const int64_t n = 3, V = 7;
  auto z = randn(n * V, 1);
  const int32_t t[] = {2, 0, 6};
  auto f = [&] { return ops::cross_entropy(z.data(), t, n, V, 1.0, static_cast<double*>(nullptr)); };
  std::vector<double> dz(n * V);
  ops::cross_entropy(z.data(), t, n, V, 1.0, dz.data());
  expect_grad(z, f, dz, "dlogits");
}

namespace {

// A tiny generated checkpoint in f32 (vocab 200, no tokenizer).
fs::path tiny_model(Arch arch, const std::string& tag, std::optional<int64_t> window = std::nullopt) {
  const fs::path dir = fs::temp_directory_path() / ("moemesh-test-lora-" + std::to_string(::getpid()) + "-" + tag);
  ModelConfig cfg = model_preset(arch, "tiny");
  cfg.vocab_size = 200;
  cfg.sliding_window = window;
  cfg.torch_dtype = "float32";
  WriteOptions o;
  o.dtype = DType::F32;
  o.seed = 3;
  write_model(cfg, dir, o);
  return dir;
}

LoraTrainConfig all_modules(Arch arch) {
  LoraTrainConfig lc;
  lc.rank = 3;
  lc.alpha = 5;
  lc.train_router = true;
  lc.target_modules = arch == Arch::Mixtral ? parse_target_modules(arch, "q_proj,k_proj,v_proj,o_proj,w1,w2,w3")
                                            : parse_target_modules(arch,
                                                                   "q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                                                   "up_proj,down_proj");
  return lc;
}

void check_model_gradients(Arch arch, std::optional<int64_t> window) {
  auto ckpt = Checkpoint::open(tiny_model(arch, "grad", window));
  const LoraTrainConfig lc = all_modules(arch);
  LoraTrainModel<double> m(ckpt->config(), ckpt->load(), lc);
  // B non-zero, so that every A gets a gradient too.
  std::mt19937_64 rng(11);
  std::normal_distribution<double> d(0.0, 0.05);
  for (const LoraTrainModule& mod : m.modules())
    for (int64_t i = 0; i < lc.rank * mod.out; ++i) m.params()[mod.b + size_t(i)] = d(rng);
  const std::vector<int32_t> tokens = {1, 17, 42, 99, 3, 150, 7, 64, 2};
  const std::vector<int32_t> targets = {-1, -1, -1, 3, 150, 7, 64, 2, -1};
  std::vector<double> grad(m.params().size(), 0.0);
  m.loss(tokens, targets, 1.0, &grad);
  // Two elements of each module's A and of its B (routed, shared, dense, router, attention).
  const double eps = 1e-6;
  int checked = 0;
  double worst = 0, largest = 0;
  for (const LoraTrainModule& mod : m.modules()) {
    for (size_t at : {mod.a + 1, mod.a + size_t(lc.rank * mod.in) - 2, mod.b, mod.b + size_t(lc.rank * mod.out) - 1}) {
      double& p = m.params()[at];
      const double keep = p;
      p = keep + eps;
      const double up = m.loss(tokens, targets, 1.0, nullptr);
      p = keep - eps;
      const double down = m.loss(tokens, targets, 1.0, nullptr);
      p = keep;
      const double fd = (up - down) / (2 * eps);
      EXPECT_NEAR(grad[at], fd, 1e-7 + 1e-5 * std::abs(fd)) << mod.module << " param " << at;
      worst = std::max(worst, std::abs(grad[at] - fd));
      largest = std::max(largest, std::abs(fd));
      ++checked;
    }
  }
  EXPECT_GT(checked, 100);
  EXPECT_GT(largest, 1e-3);  // the tolerance is small against the gradients checked
  std::cout << "checked " << checked << " parameters, largest |fd| " << largest << ", worst |analytic - fd| " << worst
            << "\n";
  fs::remove_all(ckpt->dir());
}

}  // namespace

TEST(LoraModel, MixtralGradientsMatchFiniteDifferences) { check_model_gradients(Arch::Mixtral, 4); }

TEST(LoraModel, DeepSeekGradientsMatchFiniteDifferences) { check_model_gradients(Arch::DeepSeek, std::nullopt); }

TEST(LoraModel, BaseLogitsEqualTheEngine) {
  for (Arch arch : {Arch::Mixtral, Arch::DeepSeek}) {
    auto ckpt =
        Checkpoint::open(tiny_model(arch, "engine", arch == Arch::Mixtral ? std::optional<int64_t>(5) : std::nullopt));
    LoraTrainModel<float> m(ckpt->config(), ckpt->load(), all_modules(arch));  // B = 0: the base model
    std::vector<int32_t> tokens;
    for (int i = 0; i < 23; ++i) tokens.push_back(int32_t((i * 37 + 5) % 200));
    const std::vector<float> ours = m.logits(tokens);
    Engine eng(ckpt);
    StepInput in;
    in.seq = eng.create_sequence();
    in.tokens = tokens;
    in.all_logits = true;
    const auto out = eng.step(std::span(&in, 1));
    ASSERT_EQ(out[0].logits.size(), ours.size());
    double diff = 0, scale = 0;
    for (size_t i = 0; i < ours.size(); ++i) {
      diff = std::max(diff, double(std::abs(ours[i] - out[0].logits[i])));
      scale = std::max(scale, double(std::abs(out[0].logits[i])));
    }
    EXPECT_LT(diff / scale, 1e-4) << (arch == Arch::Mixtral ? "mixtral" : "deepseek");
    fs::remove_all(ckpt->dir());
  }
}

TEST(LoraModel, SavesPeftFilesAndReadsThemBack) {
  auto ckpt = Checkpoint::open(tiny_model(Arch::DeepSeek, "save"));
  const LoraTrainConfig lc = all_modules(Arch::DeepSeek);
  LoraTrainModel<float> m(ckpt->config(), ckpt->load(), lc);
  for (size_t i = 0; i < m.params().size(); ++i) m.params()[i] = float(i % 97) * 0.01f;
  const fs::path out = fs::temp_directory_path() / ("moemesh-test-lora-out-" + std::to_string(::getpid()));
  m.save(out, "base");
  const auto cfg = nlohmann::json::parse(std::ifstream(out / "adapter_config.json"));
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["r"], 3);
  EXPECT_EQ(cfg["target_modules"].back(), "gate");
  const auto h = safetensors::read_header(out / "adapter_model.safetensors");
  for (const char* name : {"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight",
                           "base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_B.weight",
                           "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_A.weight",
                           "base_model.model.model.layers.1.mlp.gate.lora_A.weight",
                           "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"})
    EXPECT_NE(h.find(name), nullptr) << name;
  const auto* b = h.find("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->shape, (std::vector<int64_t>{ckpt->config().num_attention_heads * ckpt->config().head_dim, 3}));
  LoraTrainModel<float> back(ckpt->config(), ckpt->load(), lc);
  back.load_adapter(out);
  EXPECT_EQ(back.params(), m.params());
  fs::remove_all(out);
  fs::remove_all(ckpt->dir());
}

TEST(LoraModel, TargetModulesAreChecked) {
  EXPECT_THROW(parse_target_modules(Arch::Mixtral, "q_proj,gate_proj"), Error);
  EXPECT_THROW(parse_target_modules(Arch::DeepSeek, "w1"), Error);
  EXPECT_THROW(parse_target_modules(Arch::Mixtral, "gate"), Error);
  EXPECT_THROW(parse_target_modules(Arch::Mixtral, ""), Error);
  EXPECT_EQ(parse_target_modules(Arch::Mixtral, "q_proj, w2,q_proj").size(), 2u);
}
