// LoRA adapters (core/lora): PEFT files read and checked, and the segmented products that let
// one step mix rows of several adapters and the base model. (The logits against an independent
// NumPy merge are tests/reference/lora_reference.py.)
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <memory>
#include <vector>

#include "core/engine.h"
#include "core/error.h"
#include "core/lora.h"
#include "core/lora_cache.h"
#include "tests/support/numeric.h"
#include "tests/support/tiny_model.h"

namespace moemesh {
namespace {

using testing::TempDir;
using testing::TinyModel;

constexpr int64_t kVocab = 97;

std::vector<std::string> all_targets(Arch arch) {
  if (arch == Arch::Mixtral) return {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "block_sparse_moe.gate"};
  return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
}

std::filesystem::path write_random_adapter(const TempDir& dir, const std::string& name, const ModelConfig& cfg,
                                           std::vector<std::string> targets, uint64_t seed, int64_t rank = 4) {
  LoraConfig c;
  c.r = rank;
  c.lora_alpha = 2.0 * double(rank);
  c.target_modules = std::move(targets);
  const auto path = dir / name;
  write_lora_adapter(path, c, random_lora_modules(cfg, c, seed, 0.5));
  return path;
}

// Logits of every position of `tokens` run through a fresh sequence alone.
std::vector<float> alone(Engine& e, const std::vector<int32_t>& tokens, std::shared_ptr<const LoraAdapter> a) {
  const SeqId s = e.create_sequence();
  StepInput in{s, tokens, true};
  in.adapter = std::move(a);
  auto out = e.step(std::span<const StepInput>(&in, 1));
  e.free_sequence(s);
  return out.front().logits;
}

class LoraMixedBatch : public ::testing::TestWithParam<Arch> {};

// One step with rows of 4 adapters (attention-only, expert-only, all targets twice) and the base
// model gives each row exactly the logits it gets alone; and the adapters do change them.
TEST_P(LoraMixedBatch, EachRowGetsWhatItGetsAlone) {
  const Arch arch = GetParam();
  TinyModel model(arch, 7, kVocab);
  TempDir dir("moemesh-lora");
  auto ckpt = Checkpoint::open(model.path());
  const ModelConfig& cfg = ckpt->config();
  const std::vector<std::string> experts = arch == Arch::Mixtral
                                               ? std::vector<std::string>{"w1", "w2", "w3"}
                                               : std::vector<std::string>{"gate_proj", "up_proj", "down_proj"};
  std::vector<std::shared_ptr<const LoraAdapter>> adapters = {
      nullptr,
      LoraAdapter::load(write_random_adapter(dir, "attn", cfg, {"q_proj", "k_proj", "v_proj", "o_proj"}, 1), cfg),
      LoraAdapter::load(write_random_adapter(dir, "experts", cfg, experts, 2), cfg),
      LoraAdapter::load(write_random_adapter(dir, "all1", cfg, all_targets(arch), 3, 8), cfg),
      LoraAdapter::load(write_random_adapter(dir, "all2", cfg, all_targets(arch), 4), cfg),
  };
  EngineOptions opts;
  opts.kv_blocks = 64;
  Engine engine(ckpt, opts);

  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<float>> want;
  for (size_t i = 0; i < adapters.size(); ++i) {
    prompts.push_back(testing::random_tokens(5 + i, 100 + i, kVocab));
    want.push_back(alone(engine, prompts[i], adapters[i]));
  }
  // Same prompt, base vs adapter: every adapter moves the logits.
  for (size_t i = 1; i < adapters.size(); ++i)
    EXPECT_GT(testing::rel_diff(alone(engine, prompts[i], nullptr), want[i]), 1e-3) << adapters[i]->name();

  // The mixed step: sequences interleaved so that an adapter's rows are not contiguous in the
  // experts' groups; the all1 adapter twice.
  std::vector<StepInput> batch;
  std::vector<size_t> which = {3, 0, 1, 3, 2, 4};
  for (size_t w : which) {
    StepInput in{engine.create_sequence(), prompts[w], true};
    in.adapter = adapters[w];
    batch.push_back(in);
  }
  for (int micro : {1, 2}) {
    std::vector<StepInput> b = batch;
    for (auto& in : b) in.seq = engine.create_sequence();
    const auto outs = engine.step(b, StepOptions{micro});
    for (size_t i = 0; i < b.size(); ++i)
      EXPECT_EQ(outs[i].logits, want[which[i]])
          << "row group " << i << " (adapter " << which[i] << "), micro-batches " << micro;
  }
}

INSTANTIATE_TEST_SUITE_P(Archs, LoraMixedBatch, ::testing::Values(Arch::Mixtral, Arch::DeepSeek));

TEST(LoraAdapter, LoadsOnlyTheSelectedShare) {
  TinyModel model(Arch::Mixtral, 7, kVocab);
  TempDir dir("moemesh-lora");
  const ModelConfig cfg = Checkpoint::open(model.path())->config();
  const auto path = write_random_adapter(dir, "all", cfg, all_targets(Arch::Mixtral), 5);
  const auto full = LoraAdapter::load(path, cfg);
  const auto attn = LoraAdapter::load(path, cfg, WeightSelection::attention_side());
  const auto one = LoraAdapter::load(path, cfg, WeightSelection::only_experts({{1, 3}}));
  EXPECT_TRUE(full->adapts_experts());
  EXPECT_FALSE(attn->layer(0).q.empty());
  EXPECT_FALSE(attn->layer(1).router.empty());
  EXPECT_TRUE(attn->layer(0).experts[0].empty());
  EXPECT_TRUE(one->layer(0).q.empty());
  EXPECT_FALSE(one->layer(1).experts[3].empty());
  EXPECT_TRUE(one->layer(1).experts[2].empty());
  EXPECT_LT(one->bytes(), attn->bytes());
  EXPECT_LT(attn->bytes(), full->bytes());
}

// The cache: a hit returns the same adapter, a wider selection reloads it, the least recently
// used goes first past the byte budget, and an evicted adapter in use stays valid.
TEST(LoraCache, HitsReloadsForMoreExpertsAndEvictsLeastRecentlyUsed) {
  TinyModel model(Arch::Mixtral, 7, kVocab);
  TempDir dir("moemesh-lora");
  const ModelConfig cfg = Checkpoint::open(model.path())->config();
  std::vector<LoraRef> refs;
  for (int i = 0; i < 3; ++i) {
    const auto p = write_random_adapter(dir, "a" + std::to_string(i), cfg, {"w1", "w2", "w3"}, uint64_t(i + 1));
    refs.push_back({"a" + std::to_string(i), p.string(), lora_content_key(p)});
  }
  EXPECT_NE(refs[0].key, refs[1].key);
  const auto one = WeightSelection::only_experts({{0, 1}}), two = WeightSelection::only_experts({{0, 1}, {1, 2}});
  const uint64_t size = LoraAdapter::load(refs[0].path, cfg, one)->bytes();
  LoraCache cache(cfg, 2 * size + size / 2);  // room for two
  auto a0 = cache.get(refs[0], one);
  EXPECT_EQ(cache.get(refs[0], one), a0);
  EXPECT_EQ(cache.stats().hits, 1u);
  cache.get(refs[1], one);
  cache.get(refs[0], one);  // a0 most recent
  cache.get(refs[2], one);  // evicts a1
  LoraCache::Stats s = cache.stats();
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_EQ(s.adapters, 2u);
  EXPECT_EQ(cache.get(refs[0], one), a0) << "the most recently used was evicted";
  EXPECT_EQ(cache.stats().misses, 3u);
  cache.get(refs[1], one);  // back: a miss
  EXPECT_EQ(cache.stats().misses, 4u);
  // A host that now holds expert (1, 2) too needs that expert's modules: loaded again.
  auto wider = cache.get(refs[0], two);
  EXPECT_NE(wider, a0);
  EXPECT_FALSE(wider->layer(1).experts[2].empty());
  EXPECT_TRUE(a0->layer(1).experts[2].empty());
  EXPECT_FALSE(a0->layer(0).experts[1].empty()) << "an adapter still in use changed under its user";
}

// A bf16 model keeps adapters in bf16 (half the bytes); rows still get what they get alone.
TEST(LoraAdapter, Bf16AdaptersOnABf16ModelMixExactly) {
  TinyModel model(Arch::Mixtral, 7, kVocab, DType::BF16);
  TempDir dir("moemesh-lora");
  auto ckpt = Checkpoint::open(model.path());
  const ModelConfig& cfg = ckpt->config();
  ASSERT_EQ(lora_dtype_for(*ckpt), DType::BF16);
  const auto path = write_random_adapter(dir, "all", cfg, all_targets(Arch::Mixtral), 3);
  const auto f32 = LoraAdapter::load(path, cfg);
  const auto b16 = LoraAdapter::load(path, cfg, WeightSelection::all(), {}, {}, DType::BF16);
  EXPECT_EQ(b16->layer(0).q.dtype, DType::BF16);
  EXPECT_EQ(2 * b16->bytes(), f32->bytes());
  EngineOptions opts;
  opts.kv_blocks = 32;
  Engine engine(ckpt, opts);
  const auto p0 = testing::random_tokens(6, 1, kVocab), p1 = testing::random_tokens(7, 2, kVocab);
  const auto want0 = alone(engine, p0, b16), want1 = alone(engine, p1, nullptr);
  EXPECT_LT(testing::rel_diff(want0, alone(engine, p0, f32)), 2e-2);
  std::vector<StepInput> batch{{engine.create_sequence(), p0, true}, {engine.create_sequence(), p1, true}};
  batch[0].adapter = b16;
  const auto outs = engine.step(batch);
  EXPECT_EQ(outs[0].logits, want0);
  EXPECT_EQ(outs[1].logits, want1);
}

TEST(LoraAdapter, ScaleFoldedIntoBWithRsLoraAndAlphaPattern) {
  LoraConfig c;
  c.lora_alpha = 16;
  EXPECT_DOUBLE_EQ(c.scale(8, "model.layers.0.self_attn.q_proj"), 2.0);
  c.use_rslora = true;
  EXPECT_DOUBLE_EQ(c.scale(16, "model.layers.0.self_attn.q_proj"), 4.0);
  c.use_rslora = false;
  c.alpha_pattern = {{"q_proj", 32.0}};
  EXPECT_DOUBLE_EQ(c.scale(8, "model.layers.0.self_attn.q_proj"), 4.0);
  EXPECT_DOUBLE_EQ(c.scale(8, "model.layers.0.self_attn.k_proj"), 2.0);
}

std::string load_error(const std::filesystem::path& dir, const ModelConfig& cfg) {
  try {
    LoraAdapter::load(dir, cfg);
  } catch (const Error& e) {
    return e.what();
  }
  return "(loaded)";
}

TEST(LoraAdapter, BadAdaptersGetOneClearError) {
  TinyModel model(Arch::DeepSeek, 7, kVocab);
  TempDir dir("moemesh-lora");
  const ModelConfig cfg = Checkpoint::open(model.path())->config();
  EXPECT_NE(load_error(dir / "nope", cfg).find("no such adapter folder"), std::string::npos);

  const auto good = write_random_adapter(dir, "good", cfg, {"q_proj"}, 1);
  auto rewrite_config = [&](const std::string& key, const nlohmann::json& value) {
    std::ifstream in(good / "adapter_config.json");
    nlohmann::json j = nlohmann::json::parse(in);
    j[key] = value;
    std::ofstream(good / "adapter_config.json") << j.dump();
  };
  rewrite_config("modules_to_save", {"lm_head"});
  EXPECT_NE(load_error(good, cfg).find("modules_to_save"), std::string::npos);
  rewrite_config("modules_to_save", nullptr);
  rewrite_config("use_dora", true);
  EXPECT_NE(load_error(good, cfg).find("DoRA"), std::string::npos);
  rewrite_config("use_dora", false);
  rewrite_config("r", 0);
  EXPECT_NE(load_error(good, cfg).find(": r "), std::string::npos);

  // A module the model does not have, and a shape that does not fit.
  LoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  std::vector<LoraModuleFile> m = {{"model.layers.9.self_attn.q_proj", 2, cfg.hidden_size, cfg.hidden_size, {}, {}}};
  m[0].a.assign(size_t(2 * cfg.hidden_size), 0.1f);
  m[0].b.assign(size_t(2 * cfg.hidden_size), 0.1f);
  write_lora_adapter(dir / "far", c, m);
  EXPECT_NE(load_error(dir / "far", cfg).find("base_model.model.model.layers.9.self_attn.q_proj.lora_"),
            std::string::npos);
  m[0].module = "model.layers.1.self_attn.k_proj";  // k is narrower than q (GQA)
  write_lora_adapter(dir / "shape", c, m);
  EXPECT_NE(load_error(dir / "shape", cfg).find("k_proj.lora_B.weight has shape"), std::string::npos);

  EXPECT_THROW(lora_target_sites(cfg, {"w1"}), Error);  // a Mixtral name on DeepSeek
}

}  // namespace
}  // namespace moemesh
