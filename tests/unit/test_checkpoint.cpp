// Checkpoint: opening single-file and sharded HF folders, the one-line errors for each kind of
// damage, per-tensor mapping (an expert-only selection maps only those experts), and the model
// writer behind `moemesh mkmodel` (deterministic, seeded per tensor, valid presets).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>

#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/error.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "core/safetensors.h"
#include "tests/support/temp_dir.h"

namespace fs = std::filesystem;
namespace st = moemesh::safetensors;
using namespace moemesh;
using nlohmann::json;

namespace {

// A very small config (vocab 100) so each test writes its model in milliseconds.
ModelConfig small_config(Arch arch) {
  ModelConfig c = model_preset(arch, "tiny");
  c.vocab_size = 100;
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  if (arch == Arch::Mixtral) {
    c.intermediate_size = c.moe_intermediate_size = 32;
  } else {
    c.num_hidden_layers = 3;  // dense, MoE, MoE
    c.intermediate_size = 48;
    c.moe_intermediate_size = 8;
  }
  return c;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

class CheckpointTest : public ::testing::Test {
 protected:
  fs::path make(const std::string& name, Arch arch, WriteOptions o = {}) {
    fs::path d = root_ / name;
    write_model(small_config(arch), d, o);
    return d;
  }
  // Expects open(dir) to fail with exactly `message`.
  void expect_open_error(const fs::path& dir, const std::string& message) {
    try {
      Checkpoint::open(dir);
      ADD_FAILURE() << "opened " << dir;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()), message);
    }
  }
  void edit_json(const fs::path& p, const std::function<void(json&)>& f) {
    json j = json::parse(read_text(p));
    f(j);
    std::ofstream(p, std::ios::trunc) << j.dump(2);
  }

  const moemesh::testing::TempDir root_{"moemesh-ck"};
};

}  // namespace

TEST_F(CheckpointTest, OpensWhatTheWriterWrites) {
  for (Arch arch : {Arch::Mixtral, Arch::DeepSeek}) {
    fs::path d = make(arch == Arch::Mixtral ? "mx" : "ds", arch);
    auto ck = Checkpoint::open(d);
    const ModelConfig& c = ck->config();
    EXPECT_EQ(c.arch, arch);
    EXPECT_EQ(c.torch_dtype, "bfloat16");
    EXPECT_EQ(ck->tensors().size(), Checkpoint::expected_tensors(c).size());
    EXPECT_EQ(ck->mapped_bytes(), 0u);  // opening maps nothing
    ModelWeights w = ck->load();
    EXPECT_EQ(w.embed.shape, (std::vector<int64_t>{100, 16}));
    EXPECT_EQ(w.lm_head.shape, (std::vector<int64_t>{100, 16}));
    EXPECT_NE(w.lm_head.data, w.embed.data);
    ASSERT_EQ(w.layers.size(), size_t(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const LayerWeights& L = w.layers[size_t(l)];
      EXPECT_EQ(L.q.shape, (std::vector<int64_t>{16, 16}));
      EXPECT_EQ(L.k.shape, (std::vector<int64_t>{8, 16}));
      EXPECT_EQ(L.o.shape, (std::vector<int64_t>{16, 16}));
      EXPECT_EQ(L.input_norm.dtype, DType::BF16);
      EXPECT_EQ(L.moe, c.is_moe_layer(l));
      if (L.moe) {
        EXPECT_EQ(L.router.shape, (std::vector<int64_t>{8, 16}));
        ASSERT_EQ(L.experts.size(), 8u);
        for (const auto& e : L.experts) {
          ASSERT_TRUE(e.has_value());
          EXPECT_EQ(e->gate.shape, (std::vector<int64_t>{c.moe_intermediate_size, 16}));
          EXPECT_EQ(e->down.shape, (std::vector<int64_t>{16, c.moe_intermediate_size}));
        }
        EXPECT_EQ(L.shared.has_value(), arch == Arch::DeepSeek);
        if (L.shared) {
          EXPECT_EQ(L.shared->up.shape, (std::vector<int64_t>{2 * 8, 16}));
        }
        EXPECT_FALSE(L.dense.has_value());
      } else {
        ASSERT_TRUE(L.dense.has_value());
        EXPECT_EQ(L.dense->gate.shape, (std::vector<int64_t>{48, 16}));
        EXPECT_TRUE(L.experts.empty());
      }
    }
    if (arch == Arch::DeepSeek) {
      EXPECT_FALSE(c.is_moe_layer(0));
      EXPECT_TRUE(ck->has("model.layers.0.mlp.gate_proj.weight"));
      EXPECT_TRUE(ck->has("model.layers.2.mlp.experts.7.down_proj.weight"));
      EXPECT_TRUE(ck->has("model.layers.1.mlp.shared_experts.up_proj.weight"));
    } else {
      EXPECT_TRUE(ck->has("model.layers.1.block_sparse_moe.experts.7.w2.weight"));
    }
    uint64_t all = 0;
    for (const auto& [n, t] : ck->tensors()) all += t.nbytes;
    EXPECT_EQ(ck->mapped_bytes(), all) << "everything is mapped after load()";
  }
}

TEST_F(CheckpointTest, MappedValuesAreTheSeededValues) {
  WriteOptions o;
  o.dtype = DType::F32;
  o.seed = 42;
  auto ck = Checkpoint::open(make("f32", Arch::Mixtral, o));
  const std::string name = Checkpoint::expert_tensor(ck->config(), 1, 5, "down");
  EXPECT_EQ(name, "model.layers.1.block_sparse_moe.experts.5.w2.weight");
  Weight w = ck->map(name);
  ASSERT_EQ(w.shape, (std::vector<int64_t>{16, 32}));
  std::vector<float> expect(size_t(w.numel()));
  TensorInit(42, name, w.shape).fill(expect.data(), expect.size());
  EXPECT_EQ(0, std::memcmp(w.data, expect.data(), expect.size() * 4));
  // Linear init: std 1/sqrt(fan_in); norms near 1.
  double s2 = 0;
  for (float v : expect) s2 += double(v) * v;
  EXPECT_NEAR(std::sqrt(s2 / double(expect.size())), 1.0 / std::sqrt(32.0), 0.03);
  Weight norm = ck->map("model.norm.weight");
  for (int64_t i = 0; i < norm.numel(); ++i) EXPECT_NEAR(static_cast<const float*>(norm.data)[i], 1.0f, 0.3f);
  // Mapping twice returns the same view; mapped_bytes counts it once.
  EXPECT_EQ(ck->map(name).data, w.data);
  EXPECT_EQ(ck->mapped_bytes(), 16u * 32 * 4 + 16 * 4);
  EXPECT_EQ(ck->mapped_tensors().size(), 2u);
  EXPECT_EQ(Checkpoint::expert_tensor(small_config(Arch::DeepSeek), 2, 3, "up"),
            "model.layers.2.mlp.experts.3.up_proj.weight");
}

// A tensor of 2 MiB or more is mapped from the 2 MiB-aligned range of the file around it, at a
// 2 MiB-aligned address, so that the page cache's huge folios can map as huge pages; mapped
// exactly, its first and last partial 2 MiB could only map as 4 KiB pages.
TEST_F(CheckpointTest, LargeTensorsMapWholeHugePageRanges) {
  constexpr uint64_t kHuge = uint64_t(2) << 20;
  ModelConfig c = small_config(Arch::Mixtral);
  c.vocab_size = 40000;  // embed and lm_head: 40000 x 16 f32 = 2.56 MB each
  WriteOptions o;
  o.dtype = DType::F32;
  o.seed = 7;
  write_model(c, root_ / "huge", o);
  auto ck = Checkpoint::open(root_ / "huge");
  for (const char* name : {"lm_head.weight", "model.embed_tokens.weight"}) {
    SCOPED_TRACE(name);
    const TensorInfo& t = ck->info(name);
    ASSERT_GE(t.nbytes, kHuge);
    ASSERT_NE(t.offset % kHuge, 0u) << "the test needs a tensor that does not start on a huge page";
    Weight w = ck->map(name);
    std::vector<float> expect(size_t(w.numel()));
    TensorInit(7, name, w.shape).fill(expect.data(), expect.size());
    EXPECT_EQ(0, std::memcmp(w.data, expect.data(), expect.size() * 4));
    // The mapping holding the tensor, as the kernel lists it: start-end perms offset dev inode path.
    std::ifstream maps("/proc/self/maps");
    bool found = false;
    for (std::string line; std::getline(maps, line);) {
      uintptr_t lo = 0, hi = 0;
      unsigned long long off = 0;
      if (std::sscanf(line.c_str(), "%lx-%lx %*s %llx", &lo, &hi, &off) != 3) continue;
      const auto at = reinterpret_cast<uintptr_t>(w.data);
      if (at < lo || at >= hi) continue;
      found = true;
      EXPECT_EQ(lo % kHuge, 0u) << line;
      EXPECT_EQ(off, t.offset / kHuge * kHuge) << line;
      EXPECT_GE(hi, at + t.nbytes) << line;
      EXPECT_EQ(at - lo, t.offset - off) << line;
    }
    EXPECT_TRUE(found);
  }
  EXPECT_EQ(ck->mapped_bytes(), ck->info("lm_head.weight").nbytes + ck->info("model.embed_tokens.weight").nbytes);
}

TEST_F(CheckpointTest, ExpertSelectionMapsOnlyThoseExperts) {
  auto ck = Checkpoint::open(make("sel", Arch::DeepSeek));
  const ModelConfig& c = ck->config();
  ModelWeights w = ck->load(WeightSelection::only_experts({{1, 3}, {2, 0}}));
  std::set<std::string> expect;
  uint64_t bytes = 0;
  for (auto [l, e] : std::vector<std::pair<int, int>>{{1, 3}, {2, 0}})
    for (const char* which : {"gate", "up", "down"}) {
      expect.insert(Checkpoint::expert_tensor(c, l, e, which));
      bytes += ck->info(Checkpoint::expert_tensor(c, l, e, which)).nbytes;
    }
  auto mapped = ck->mapped_tensors();
  EXPECT_EQ(std::set<std::string>(mapped.begin(), mapped.end()), expect);
  EXPECT_EQ(ck->mapped_bytes(), bytes);
  EXPECT_TRUE(w.embed.empty());
  EXPECT_TRUE(w.layers[1].router.empty());
  EXPECT_TRUE(w.layers[1].q.empty());
  EXPECT_FALSE(w.layers[1].shared.has_value());
  ASSERT_TRUE(w.layers[1].experts[3].has_value());
  EXPECT_FALSE(w.layers[1].experts[2].has_value());
  EXPECT_FALSE(w.layers[2].experts[3].has_value());
  EXPECT_TRUE(w.layers[2].experts[0].has_value());
  // Layer 0 is dense: asking for its experts is an error, as is an expert id out of range.
  EXPECT_THROW(ck->load(WeightSelection::only_experts({{0, 1}})), Error);
  EXPECT_THROW(ck->load(WeightSelection::only_experts({{1, 8}})), Error);
}

TEST_F(CheckpointTest, AttentionSideMapsNoExperts) {
  auto ck = Checkpoint::open(make("att", Arch::Mixtral));
  ModelWeights w = ck->load(WeightSelection::attention_side());
  for (const auto& n : ck->mapped_tensors()) EXPECT_EQ(n.find(".experts."), std::string::npos) << n;
  EXPECT_FALSE(w.embed.empty());
  EXPECT_FALSE(w.layers[0].router.empty());
  EXPECT_EQ(w.layers[0].experts.size(), 8u);
  for (const auto& e : w.layers[0].experts) EXPECT_FALSE(e.has_value());
}

TEST_F(CheckpointTest, TiedEmbeddings) {
  ModelConfig c = small_config(Arch::Mixtral);
  c.tie_word_embeddings = true;
  write_model(c, root_ / "tied", {});
  auto ck = Checkpoint::open(root_ / "tied");
  EXPECT_FALSE(ck->has("lm_head.weight"));
  ModelWeights w = ck->load();
  EXPECT_EQ(w.lm_head.data, w.embed.data);
  // Untie in config.json: now lm_head is required and missing.
  edit_json(root_ / "tied" / "config.json", [](json& j) { j["tie_word_embeddings"] = false; });
  expect_open_error(root_ / "tied", "model.safetensors: tensor lm_head.weight is missing");
}

TEST_F(CheckpointTest, ShapeMismatchNamesFileAndTensor) {
  fs::path d = make("shape", Arch::Mixtral);
  edit_json(d / "config.json", [](json& j) { j["intermediate_size"] = 64; });
  expect_open_error(d,
                    "model.safetensors: tensor model.layers.0.block_sparse_moe.experts.0.w1.weight has shape "
                    "[32,16], expected [64,16] (from config.json)");
  fs::path d2 = make("shape2", Arch::Mixtral);
  edit_json(d2 / "config.json", [](json& j) { j["vocab_size"] = 101; });
  expect_open_error(d2,
                    "model.safetensors: tensor model.embed_tokens.weight has shape [100,16], expected [101,16] "
                    "(from config.json)");
}

TEST_F(CheckpointTest, WrongDtypeIsRejected) {
  ModelConfig c = small_config(Arch::Mixtral);
  std::vector<st::TensorSpec> specs;
  std::vector<std::vector<char>> data;
  for (const auto& t : Checkpoint::expected_tensors(c)) {
    DType dt = t.name == "model.norm.weight" ? DType::I32 : DType::F16;
    specs.push_back({t.name, dt, t.shape});
    data.emplace_back(specs.back().nbytes(), 0);
  }
  fs::path d = root_ / "dtype";
  fs::create_directories(d);
  st::write_file(d / "model.safetensors", specs, data);
  std::ofstream(d / "config.json") << c.to_json().dump();
  expect_open_error(d, "model.safetensors: tensor model.norm.weight has dtype I32, expected F32, F16 or BF16");
}

TEST_F(CheckpointTest, ShardedCheckpoints) {
  WriteOptions o;
  o.shard_bytes = 8000;  // many shards
  fs::path d = make("sharded", Arch::DeepSeek, o);
  ASSERT_TRUE(fs::exists(d / "model.safetensors.index.json"));
  ASSERT_FALSE(fs::exists(d / "model.safetensors"));
  json idx = json::parse(read_text(d / "model.safetensors.index.json"));
  std::set<std::string> files;
  uint64_t total = 0;
  auto ck = Checkpoint::open(d);
  for (auto& [name, file] : idx["weight_map"].items()) {
    files.insert(file.get<std::string>());
    EXPECT_EQ(ck->info(name).file.filename(), file.get<std::string>());
    total += ck->info(name).nbytes;
  }
  EXPECT_GT(files.size(), 2u);
  EXPECT_EQ(idx["metadata"]["total_size"], total);
  for (const auto& f : files) EXPECT_LE(fs::file_size(d / f), 8000u + 4096) << f;

  // Same seed, one file: the same values (each tensor is seeded by its name only).
  fs::path one = make("one", Arch::DeepSeek);
  auto ck1 = Checkpoint::open(one);
  for (const auto& name : {"model.layers.2.mlp.experts.5.gate_proj.weight", "lm_head.weight"}) {
    Weight a = ck->map(name), b = ck1->map(name);
    EXPECT_EQ(0, std::memcmp(a.data, b.data, ck->info(name).nbytes)) << name;
  }

  // Both layouts present: the single file wins, as in transformers.
  fs::path both = root_ / "both";
  fs::copy(d, both);
  fs::copy_file(one / "model.safetensors", both / "model.safetensors");
  EXPECT_EQ(Checkpoint::open(both)->info("lm_head.weight").file.filename(), "model.safetensors");

  // Damage: a shard gone.
  fs::path gone = root_ / "gone";
  fs::copy(d, gone);
  std::string victim = idx["weight_map"]["model.layers.1.mlp.experts.3.down_proj.weight"];
  fs::remove(gone / victim);
  expect_open_error(gone, victim + ": not found (listed in model.safetensors.index.json)");

  // A required tensor missing from the weight map.
  fs::path unlisted = root_ / "unlisted";
  fs::copy(d, unlisted);
  edit_json(unlisted / "model.safetensors.index.json",
            [](json& j) { j["weight_map"].erase("model.layers.1.mlp.experts.3.down_proj.weight"); });
  expect_open_error(unlisted,
                    "model.safetensors.index.json: tensor model.layers.1.mlp.experts.3.down_proj.weight is missing "
                    "from weight_map");

  // The index points at the wrong shard.
  fs::path wrong = root_ / "wrong";
  fs::copy(d, wrong);
  std::string other = *files.begin() == victim ? *files.rbegin() : *files.begin();
  edit_json(wrong / "model.safetensors.index.json",
            [&](json& j) { j["weight_map"]["model.layers.1.mlp.experts.3.down_proj.weight"] = other; });
  expect_open_error(wrong, other +
                               ": tensor model.layers.1.mlp.experts.3.down_proj.weight is missing "
                               "(model.safetensors.index.json places it here)");

  // A path that escapes the folder.
  edit_json(wrong / "model.safetensors.index.json", [&](json& j) { j["weight_map"]["x"] = "../x.safetensors"; });
  EXPECT_THROW(Checkpoint::open(wrong), Error);
}

TEST_F(CheckpointTest, MissingFilesAndFolders) {
  expect_open_error(root_ / "nothing", (root_ / "nothing").string() + ": no such checkpoint folder");
  fs::path d = make("nofiles", Arch::Mixtral);
  fs::remove(d / "model.safetensors");
  expect_open_error(d, d.string() + ": no model.safetensors or model.safetensors.index.json");
  fs::remove(d / "config.json");
  expect_open_error(d, d.string() + ": no config.json (not a Hugging Face checkpoint)");
  fs::path bad = make("badcfg", Arch::Mixtral);
  edit_json(bad / "config.json", [](json& j) { j["num_experts_per_tok"] = 9; });
  try {
    Checkpoint::open(bad);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("config.json: field \"num_experts_per_tok\"", 0), 0u) << e.what();
  }
}

TEST_F(CheckpointTest, FileShrinkingAfterOpenIsAnErrorNotACrash) {
  WriteOptions o;
  o.dtype = DType::F32;
  fs::path d = make("shrink", Arch::Mixtral, o);
  auto ck = Checkpoint::open(d);
  // lm_head sorts first in the file; the last tensor in data order is cut off.
  std::string last;
  uint64_t end = 0;
  for (const auto& [n, t] : ck->tensors())
    if (t.offset + t.nbytes > end) end = t.offset + t.nbytes, last = n;
  fs::resize_file(d / "model.safetensors", end - 1);
  EXPECT_THROW(ck->map(last), Error);
  EXPECT_NO_THROW(ck->map("lm_head.weight"));
}

TEST_F(CheckpointTest, NameIsTheFolderName) {
  fs::path d = make("my-model", Arch::Mixtral);
  EXPECT_EQ(Checkpoint::open(d)->name(), "my-model");
  EXPECT_EQ(Checkpoint::open(d.string() + "/")->name(), "my-model");
}

TEST_F(CheckpointTest, WriterIsDeterministic) {
  WriteOptions o;
  o.seed = 7;
  fs::path a = make("a", Arch::Mixtral, o), b = make("b", Arch::Mixtral, o);
  EXPECT_EQ(read_text(a / "model.safetensors"), read_text(b / "model.safetensors"));
  EXPECT_EQ(read_text(a / "config.json"), read_text(b / "config.json"));
  o.seed = 8;
  fs::path c = make("c", Arch::Mixtral, o);
  EXPECT_NE(read_text(a / "model.safetensors"), read_text(c / "model.safetensors"));
  // The thread count does not change a byte (values are per (seed, name, block)).
  o.seed = 7;
  o.threads = 1;
  fs::path t1 = make("t1", Arch::DeepSeek, o);
  o.threads = 5;
  fs::path t5 = make("t5", Arch::DeepSeek, o);
  EXPECT_EQ(read_text(t1 / "model.safetensors"), read_text(t5 / "model.safetensors"));
  // Filling from an unaligned start gives the same values as filling from 0.
  std::vector<int64_t> shape{300000, 4};
  std::vector<float> all(200000), part(70000);
  TensorInit(3, "w", shape).fill(0, all.data(), all.size());
  TensorInit(3, "w", shape).fill(100000, part.data(), part.size());
  EXPECT_EQ(0, std::memcmp(all.data() + 100000, part.data(), part.size() * 4));
  TensorInit chunked(3, "w", shape);
  chunked.fill(part.data(), 12345);
  chunked.fill(part.data() + 12345, 50000);
  EXPECT_EQ(0, std::memcmp(all.data(), part.data(), 62345 * 4));
  o.seed = 8;
  o.threads = 0;
  // Known values pin the PRNG so a change to it is noticed (it defines every mkmodel model).
  TensorRng r(0, "x");
  uint64_t first = r.next_u64();
  EXPECT_EQ(first, 6867485715700156993ull);
  EXPECT_DOUBLE_EQ(r.next_normal(), -1.7353778428157129);
  float pinned[3];
  TensorInit(1, "model.layers.0.self_attn.q_proj.weight", {64, 64}).fill(70000, pinned, 3);
  EXPECT_FLOAT_EQ(pinned[0], -0.0626199841f);
  EXPECT_FLOAT_EQ(pinned[2], 0.214415818f);
  TensorRng r2(0, "x");
  EXPECT_EQ(r2.next_u64(), first);
  TensorRng r3(0, "y");
  EXPECT_NE(r3.next_u64(), first);
  double s = 0, s2 = 0;
  TensorRng g(1, "normal");
  for (int i = 0; i < 100000; ++i) {
    double v = g.next_normal();
    s += v;
    s2 += v * v;
  }
  EXPECT_NEAR(s / 1e5, 0.0, 0.02);
  EXPECT_NEAR(s2 / 1e5, 1.0, 0.02);
  // Rewriting with other sharding replaces the old files instead of leaving a stale index.
  o.shard_bytes = 4000;
  write_model(small_config(Arch::Mixtral), a, o);
  EXPECT_FALSE(fs::exists(a / "model.safetensors"));
  o.shard_bytes = kDefaultShardBytes;
  write_model(small_config(Arch::Mixtral), a, o);
  EXPECT_FALSE(fs::exists(a / "model.safetensors.index.json"));
  for (const auto& e : fs::directory_iterator(a))
    EXPECT_EQ(e.path().filename().string().rfind("model-", 0), std::string::npos);
}

TEST_F(CheckpointTest, PresetsAreValidAndSized) {
  for (Arch arch : {Arch::Mixtral, Arch::DeepSeek})
    for (const auto& p : preset_names()) {
      ModelConfig c = model_preset(arch, p);
      c.vocab_size = arch == Arch::Mixtral ? 32000 : 128815;
      ASSERT_NO_THROW(ModelConfig::from_json(c.to_json())) << p;
      uint64_t params = 0;
      for (const auto& t : Checkpoint::expected_tensors(c)) {
        uint64_t n = 1;
        for (int64_t d : t.shape) n *= uint64_t(d);
        params += n;
      }
      if (p == "medium") {
        EXPECT_GE(params * 2, 1'000'000'000u) << arch_name(arch);  // 1-2 GB in bf16
        EXPECT_LE(params * 2, 2'000'000'000u) << arch_name(arch);
      }
      if (p == "tiny") {
        EXPECT_LE(params, 20'000'000u);
      }
      if (arch == Arch::DeepSeek) {
        EXPECT_FALSE(c.is_moe_layer(0));
        EXPECT_TRUE(c.is_moe_layer(1));
        EXPECT_GT(c.n_shared_experts, 0);
        EXPECT_FALSE(c.norm_topk_prob);
      }
    }
  EXPECT_THROW(model_preset(Arch::Mixtral, "huge"), Error);
  EXPECT_THROW(parse_arch("llama"), Error);
}

TEST_F(CheckpointTest, TokenizerFilesFromBootstrap) {
  fs::path cache = MOEMESH_CACHE_DIR;
  if (!fs::exists(cache / "tokenizer-llama2/models/tokenizer.json")) GTEST_SKIP() << "run scripts/bootstrap";
  TokenizerFiles l = read_tokenizer_files(cache / "tokenizer-llama2/models");
  EXPECT_EQ(l.vocab_size, 32000);
  EXPECT_EQ(l.bos_id, 1);
  EXPECT_EQ(l.eos_id, 2);
  EXPECT_FALSE(l.has_chat_template);
  TokenizerFiles d = read_tokenizer_files(cache / "tokenizer-deepseek_v3/models/tokenizer.json");
  EXPECT_EQ(d.vocab_size, 128815);  // highest added-token id 128814 + 1
  EXPECT_EQ(d.bos_id, 0);
  EXPECT_EQ(d.eos_id, 1);
  EXPECT_TRUE(d.has_chat_template);

  // Mixtral gets Mixtral-Instruct's chat template added to the llama2 tokenizer config.
  ModelConfig c = small_config(Arch::Mixtral);
  c.vocab_size = l.vocab_size;
  write_model(c, root_ / "withtok", {}, &l);
  json cfg = json::parse(read_text(root_ / "withtok" / "tokenizer_config.json"));
  EXPECT_NE(cfg.value("chat_template", "").find("[INST]"), std::string::npos);
  EXPECT_EQ(cfg["bos_token"], "<s>");
  EXPECT_EQ(read_text(root_ / "withtok" / "tokenizer.json"), read_text(l.tokenizer_json));
  EXPECT_THROW(read_tokenizer_files(root_ / "nope"), Error);
}
