// Suites are named gguf* so that `ctest -R gguf` selects them.
// The GGUF writer, checked by parsing its files back with an independent reader written here
// from the format's description (header, metadata, tensor infos, alignment, data); and
// `moemesh export-gguf` on a generated Mixtral, checked tensor by tensor against the checkpoint.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/gguf_writer.h"
#include "tests/support/temp_dir.h"

namespace moemesh {
namespace {

using nlohmann::json;
using testing::TempDir;

// ---- an independent GGUF reader ---------------------------------------------------------------

struct ParsedTensor {
  std::string name;
  std::vector<uint64_t> ne;  // ggml order: innermost first
  uint32_t type = 0;
  uint64_t offset = 0;
};

struct Parsed {
  uint32_t version = 0;
  std::vector<std::string> keys;  // in file order
  std::map<std::string, uint32_t> types;
  std::map<std::string, uint32_t> array_types;
  std::map<std::string, json> values;
  std::vector<ParsedTensor> tensors;
  uint64_t header_end = 0, data_start = 0;
  std::vector<char> bytes;  // the whole file

  const char* data(const ParsedTensor& t) const { return bytes.data() + data_start + t.offset; }
  const ParsedTensor& tensor(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t;
    throw std::runtime_error("no tensor " + name);
  }
};

class Cursor {
 public:
  explicit Cursor(const std::vector<char>& b) : b_(b) {}
  template <typename T>
  T get() {
    if (pos_ + sizeof(T) > b_.size()) throw std::runtime_error("truncated at " + std::to_string(pos_));
    T v;
    std::memcpy(&v, b_.data() + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  std::string str() {
    const auto n = get<uint64_t>();
    if (pos_ + n > b_.size()) throw std::runtime_error("string past the end");
    std::string s(b_.data() + pos_, n);
    pos_ += n;
    return s;
  }
  json scalar(uint32_t type) {
    switch (type) {
      case 0:
        return get<uint8_t>();
      case 1:
        return get<int8_t>();
      case 2:
        return get<uint16_t>();
      case 3:
        return get<int16_t>();
      case 4:
        return get<uint32_t>();
      case 5:
        return get<int32_t>();
      case 6:
        return get<float>();
      case 7:
        return get<uint8_t>() != 0;
      case 8:
        return str();
      case 10:
        return get<uint64_t>();
      case 11:
        return get<int64_t>();
      case 12:
        return get<double>();
    }
    throw std::runtime_error("bad value type " + std::to_string(type));
  }
  uint64_t pos() const { return pos_; }

 private:
  const std::vector<char>& b_;
  uint64_t pos_ = 0;
};

Parsed parse_gguf(const std::filesystem::path& file) {
  Parsed p;
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + file.string());
  p.bytes.assign(std::istreambuf_iterator<char>(in), {});
  Cursor c(p.bytes);
  if (c.get<uint32_t>() != 0x46554747u) throw std::runtime_error("bad magic");
  p.version = c.get<uint32_t>();
  const auto n_tensors = c.get<uint64_t>();
  const auto n_kv = c.get<uint64_t>();
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.str();
    const auto type = c.get<uint32_t>();
    p.keys.push_back(key);
    p.types[key] = type;
    if (type == 9) {
      const auto et = c.get<uint32_t>();
      const auto n = c.get<uint64_t>();
      json arr = json::array();
      for (uint64_t k = 0; k < n; ++k) arr.push_back(c.scalar(et));
      p.array_types[key] = et;
      p.values[key] = std::move(arr);
    } else {
      p.values[key] = c.scalar(type);
    }
  }
  for (uint64_t i = 0; i < n_tensors; ++i) {
    ParsedTensor t;
    t.name = c.str();
    const auto nd = c.get<uint32_t>();
    for (uint32_t d = 0; d < nd; ++d) t.ne.push_back(c.get<uint64_t>());
    t.type = c.get<uint32_t>();
    t.offset = c.get<uint64_t>();
    p.tensors.push_back(t);
  }
  uint64_t align = 32;
  if (p.values.count("general.alignment")) align = p.values["general.alignment"].get<uint64_t>();
  p.header_end = c.pos();
  p.data_start = (c.pos() + align - 1) / align * align;
  return p;
}

std::vector<char> bytes_of(const std::vector<float>& v) {
  std::vector<char> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// ---- the writer ----------------------------------------------------------------------------

TEST(ggufWriter, HeaderMetadataTensorInfosAndAlignedData) {
  TempDir tmp("gguf-writer");
  const auto file = tmp / "t.gguf";
  // Data: a 1-D f32, a 2x5 f16 (20 bytes: needs padding) and a 2x3x4 bf16.
  std::vector<float> a = {1.5f, -2.0f, 3.25f};
  std::vector<uint16_t> b(10), c(24);
  for (size_t i = 0; i < b.size(); ++i) b[i] = f32_to_f16(float(i) * 0.5f);
  for (size_t i = 0; i < c.size(); ++i) c[i] = f32_to_bf16(float(i) - 7.0f);
  {
    gguf::Writer w(file);
    w.set_string("general.architecture", "llama");
    w.set_u8("t.u8", 200);
    w.set_i32("t.i32", -5);
    w.set_u32("t.u32", 4000000000u);
    w.set_u64("t.u64", 1ull << 40);
    w.set_i64("t.i64", -(1ll << 40));
    w.set_f32("t.f32", 0.25f);
    w.set_f64("t.f64", 1e-300);
    w.set_bool("t.bool", true);
    w.set_strings("t.strs", {"<s>", "", "▁hi"});
    w.set_f32s("t.f32s", {0.0f, -1.0f});
    w.set_i32s("t.i32s", {1, 2, 6});
    EXPECT_EQ(w.add_tensor("a", gguf::TensorType::F32, {3}), 0u);
    EXPECT_EQ(w.add_tensor("b", gguf::TensorType::F16, {2, 5}), 32u);  // 12 bytes padded to 32
    EXPECT_EQ(w.add_tensor("c", gguf::TensorType::BF16, {2, 3, 4}), 64u);
    w.begin_data();
    // Odd chunks that straddle tensor boundaries.
    std::vector<char> all = bytes_of(a);
    all.insert(all.end(), reinterpret_cast<char*>(b.data()), reinterpret_cast<char*>(b.data() + b.size()));
    all.insert(all.end(), reinterpret_cast<char*>(c.data()), reinterpret_cast<char*>(c.data() + c.size()));
    for (size_t at = 0; at < all.size(); at += 7) w.write(all.data() + at, std::min<size_t>(7, all.size() - at));
    EXPECT_FALSE(std::filesystem::exists(file)) << "the file appears only when finished";
    w.finish();
  }
  ASSERT_TRUE(std::filesystem::exists(file));
  EXPECT_FALSE(std::filesystem::exists(tmp / "t.gguf.tmp"));
  const Parsed p = parse_gguf(file);
  EXPECT_EQ(p.version, 3u);
  EXPECT_EQ(p.keys, (std::vector<std::string>{"general.architecture", "t.u8", "t.i32", "t.u32", "t.u64", "t.i64",
                                              "t.f32", "t.f64", "t.bool", "t.strs", "t.f32s", "t.i32s"}));
  EXPECT_EQ(p.types.at("general.architecture"), 8u);
  EXPECT_EQ(p.values.at("general.architecture"), "llama");
  EXPECT_EQ(p.types.at("t.u8"), 0u);
  EXPECT_EQ(p.values.at("t.u8"), 200);
  EXPECT_EQ(p.types.at("t.i32"), 5u);
  EXPECT_EQ(p.values.at("t.i32"), -5);
  EXPECT_EQ(p.types.at("t.u32"), 4u);
  EXPECT_EQ(p.values.at("t.u32"), 4000000000u);
  EXPECT_EQ(p.types.at("t.u64"), 10u);
  EXPECT_EQ(p.values.at("t.u64"), 1ull << 40);
  EXPECT_EQ(p.types.at("t.i64"), 11u);
  EXPECT_EQ(p.values.at("t.i64"), -(1ll << 40));
  EXPECT_EQ(p.types.at("t.f32"), 6u);
  EXPECT_EQ(p.values.at("t.f32"), 0.25);
  EXPECT_EQ(p.types.at("t.f64"), 12u);
  EXPECT_EQ(p.values.at("t.f64"), 1e-300);
  EXPECT_EQ(p.types.at("t.bool"), 7u);
  EXPECT_EQ(p.values.at("t.bool"), true);
  EXPECT_EQ(p.types.at("t.strs"), 9u);
  EXPECT_EQ(p.array_types.at("t.strs"), 8u);
  EXPECT_EQ(p.values.at("t.strs"), json({"<s>", "", "▁hi"}));
  EXPECT_EQ(p.array_types.at("t.f32s"), 6u);
  EXPECT_EQ(p.values.at("t.f32s"), json({0.0, -1.0}));
  EXPECT_EQ(p.array_types.at("t.i32s"), 5u);
  EXPECT_EQ(p.values.at("t.i32s"), json({1, 2, 6}));

  ASSERT_EQ(p.tensors.size(), 3u);
  EXPECT_EQ(p.tensors[0].name, "a");
  EXPECT_EQ(p.tensors[0].ne, (std::vector<uint64_t>{3}));
  EXPECT_EQ(p.tensors[0].type, 0u);
  EXPECT_EQ(p.tensors[1].ne, (std::vector<uint64_t>{5, 2})) << "ggml lists dimensions innermost first";
  EXPECT_EQ(p.tensors[1].type, 1u);
  EXPECT_EQ(p.tensors[2].ne, (std::vector<uint64_t>{4, 3, 2}));
  EXPECT_EQ(p.tensors[2].type, 30u);
  EXPECT_EQ(p.data_start % 32, 0u);
  for (const auto& t : p.tensors) EXPECT_EQ(t.offset % 32, 0u) << t.name;
  // The padding between the header and the data is zeros.
  for (uint64_t i = p.header_end; i < p.data_start; ++i) ASSERT_EQ(p.bytes[i], 0) << i;
  EXPECT_EQ(std::memcmp(p.data(p.tensors[0]), a.data(), 12), 0);
  EXPECT_EQ(std::memcmp(p.data(p.tensors[1]), b.data(), 20), 0);
  EXPECT_EQ(std::memcmp(p.data(p.tensors[2]), c.data(), 48), 0);
  EXPECT_EQ(p.bytes.size(), p.data_start + 64 + 64) << "the last tensor is padded to the alignment too";
}

TEST(ggufWriter, OtherAlignmentIsRecordedInTheMetadata) {
  TempDir tmp("gguf-writer");
  const auto file = tmp / "t.gguf";
  {
    gguf::Writer w(file, 64);
    w.set_string("general.name", "x");
    w.add_tensor("a", gguf::TensorType::F32, {5});
    w.add_tensor("b", gguf::TensorType::F32, {1});
    w.begin_data();
    std::vector<float> v = {1, 2, 3, 4, 5, 6};
    w.write(v.data(), 24);
    w.finish();
  }
  const Parsed p = parse_gguf(file);
  EXPECT_EQ(p.types.at("general.alignment"), 4u);
  EXPECT_EQ(p.values.at("general.alignment"), 64);
  EXPECT_EQ(p.data_start % 64, 0u);
  EXPECT_EQ(p.tensors[1].offset, 64u);
  float six = 0;
  std::memcpy(&six, p.data(p.tensors[1]), 4);
  EXPECT_EQ(six, 6.0f);
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ggufWriter, RefusesBadInputWithAClearError) {
  TempDir tmp("gguf-writer");
  EXPECT_NE(error_of([&] { gguf::Writer w(tmp / "x.gguf", 48); }).find("power of two"), std::string::npos);
  gguf::Writer w(tmp / "x.gguf");
  w.set_u32("k", 1);
  EXPECT_NE(error_of([&] { w.set_string("k", "again"); }).find("\"k\" set twice"), std::string::npos);
  EXPECT_NE(error_of([&] { w.add_tensor(std::string(64, 'n'), gguf::TensorType::F32, {1}); }).find("1 to 63"),
            std::string::npos);
  EXPECT_NE(error_of([&] { w.add_tensor("z", gguf::TensorType::F32, {}); }).find("0 dimensions"), std::string::npos);
  EXPECT_NE(error_of([&] {
              w.add_tensor("z", gguf::TensorType::F32, {1, 1, 1, 1, 1});
            }).find("5 dimensions"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              w.add_tensor("z", gguf::TensorType::F32, {3, 0});
            }).find("dimension of 0"),
            std::string::npos);
  w.add_tensor("t", gguf::TensorType::F32, {2});
  EXPECT_NE(error_of([&] { w.add_tensor("t", gguf::TensorType::F32, {2}); }).find("added twice"), std::string::npos);
  EXPECT_NE(error_of([&] { w.write("x", 1); }).find("outside begin_data"), std::string::npos);
  w.begin_data();
  EXPECT_NE(error_of([&] { w.set_u32("late", 1); }).find("after begin_data"), std::string::npos);
  const float one = 1;
  w.write(&one, 4);
  EXPECT_NE(error_of([&] { w.finish(); }).find("t has 4 of its 8 bytes"), std::string::npos);
  const float three[3] = {1, 2, 3};
  EXPECT_NE(error_of([&] { w.write(three, 12); }).find("past the last tensor"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(tmp / "x.gguf"));
}

TEST(ggufWriter, AnAbandonedWriteLeavesNoFile) {
  TempDir tmp("gguf-writer");
  {
    gguf::Writer w(tmp / "x.gguf");
    w.add_tensor("t", gguf::TensorType::F32, {2});
    w.begin_data();
    EXPECT_TRUE(std::filesystem::exists(tmp / "x.gguf.tmp"));
  }
  EXPECT_FALSE(std::filesystem::exists(tmp / "x.gguf"));
  EXPECT_FALSE(std::filesystem::exists(tmp / "x.gguf.tmp"));
}

// ---- moemesh export-gguf ---------------------------------------------------------------------

std::string run(const std::string& cmd, int* status) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) throw std::runtime_error("popen failed: " + cmd);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  *status = ::pclose(p);
  return out;
}

std::string cli() { return std::string("'") + MOEMESH_CLI + "' "; }

// A tiny checkpoint of `arch` in `dtype`.
std::filesystem::path tiny_model(const TempDir& tmp, const std::string& dtype, const std::string& arch = "mixtral") {
  const auto dir = tmp / (arch + "-" + dtype);
  int status = 0;
  const std::string out = run("MOEMESH_CACHE='" MOEMESH_CACHE_DIR "' " + cli() + "mkmodel --arch " + arch +
                                  " --preset tiny --seed 5 --dtype " + dtype + " --out '" + dir.string() + "' 2>&1",
                              &status);
  if (status != 0) throw std::runtime_error("mkmodel failed (run scripts/bootstrap for the tokenizer?): " + out);
  return dir;
}

std::vector<float> floats(const char* p, uint32_t type, size_t n) {
  std::vector<float> out(n);
  to_f32(type == 0 ? DType::F32 : type == 1 ? DType::F16 : DType::BF16, p, out.data(), n);
  return out;
}

std::vector<float> floats(const Weight& w) {
  std::vector<float> out(size_t(w.numel()));
  to_f32(w.dtype, w.data, out.data(), out.size());
  return out;
}

TEST(ggufExport, MixtralLaidOutAsLlamaCppsConverterWritesIt) {
  TempDir tmp("gguf-export");
  const auto dir = tiny_model(tmp, "bf16");
  const auto file = tmp / "m.gguf";
  int status = 0;
  const std::string out =
      run(cli() + "export-gguf --model '" + dir.string() + "' --out '" + file.string() + "' 2>&1", &status);
  ASSERT_EQ(status, 0) << out;
  const Parsed p = parse_gguf(file);
  auto ck = Checkpoint::open(dir);
  const ModelConfig& c = ck->config();
  const ModelWeights w = ck->load();

  EXPECT_EQ(p.values.at("general.architecture"), "llama");
  EXPECT_EQ(p.values.at("general.file_type"), 32) << "MOSTLY_BF16";
  EXPECT_EQ(p.values.at("llama.block_count"), c.num_hidden_layers);
  EXPECT_EQ(p.values.at("llama.embedding_length"), c.hidden_size);
  EXPECT_EQ(p.values.at("llama.feed_forward_length"), c.moe_intermediate_size);
  EXPECT_EQ(p.values.at("llama.attention.head_count"), c.num_attention_heads);
  EXPECT_EQ(p.values.at("llama.attention.head_count_kv"), c.num_key_value_heads);
  EXPECT_EQ(p.values.at("llama.rope.freq_base"), c.rope_theta);
  EXPECT_EQ(p.values.at("llama.rope.dimension_count"), c.head_dim);
  EXPECT_FLOAT_EQ(p.values.at("llama.attention.layer_norm_rms_epsilon").get<float>(), float(c.rms_norm_eps));
  EXPECT_EQ(p.values.at("llama.expert_count"), c.num_experts);
  EXPECT_EQ(p.values.at("llama.expert_used_count"), c.num_experts_per_tok);
  EXPECT_EQ(p.values.at("llama.context_length"), c.max_position_embeddings);
  EXPECT_EQ(p.values.at("llama.vocab_size"), c.vocab_size);

  // The vocabulary: SentencePiece-style for the llama2 tokenizer, every id present, byte pieces typed.
  EXPECT_EQ(p.values.at("tokenizer.ggml.model"), "llama");
  const json& toks = p.values.at("tokenizer.ggml.tokens");
  const json& types = p.values.at("tokenizer.ggml.token_type");
  ASSERT_EQ(toks.size(), size_t(c.vocab_size));
  ASSERT_EQ(types.size(), size_t(c.vocab_size));
  ASSERT_EQ(p.values.at("tokenizer.ggml.scores").size(), size_t(c.vocab_size));
  EXPECT_EQ(toks[0], "<unk>");
  EXPECT_EQ(types[0], 2);
  EXPECT_EQ(toks[1], "<s>");
  EXPECT_EQ(types[1], 3);
  EXPECT_EQ(toks[3], "<0x00>");
  EXPECT_EQ(types[3], 6);
  EXPECT_EQ(p.values.at("tokenizer.ggml.bos_token_id"), *c.bos_token_id);
  EXPECT_EQ(p.values.at("tokenizer.ggml.eos_token_id"), c.eos_token_ids.at(0));
  // An earlier merge makes a higher-scoring piece: the llama2 tokenizer's merges begin "▁ t", "i n", "e r".
  const json& scores = p.values.at("tokenizer.ggml.scores");
  auto score_of = [&](const std::string& piece) {
    for (size_t i = 0; i < toks.size(); ++i)
      if (toks[i] == piece) return scores[i].get<float>();
    throw std::runtime_error("no token " + piece);
  };
  EXPECT_EQ(score_of("▁t"), 0.0f);
  EXPECT_EQ(score_of("in"), -1.0f);
  EXPECT_EQ(score_of("er"), -2.0f);
  // Tensors: the converter's names, order and types, ggml dimension order.
  const int64_t h = c.hidden_size, E = c.num_experts, ff = c.moe_intermediate_size, hd = c.head_dim;
  std::vector<std::string> names;
  for (const auto& t : p.tensors) names.push_back(t.name);
  std::vector<std::string> want = {"token_embd.weight"};
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (const char* n : {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
                          "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"})
      want.push_back("blk." + std::to_string(l) + "." + n + ".weight");
  want.push_back("output_norm.weight");
  want.push_back("output.weight");
  EXPECT_EQ(names, want);
  for (const auto& t : p.tensors) EXPECT_EQ(t.offset % 32, 0u) << t.name;
  EXPECT_EQ(p.tensor("token_embd.weight").ne, (std::vector<uint64_t>{uint64_t(h), uint64_t(c.vocab_size)}));
  EXPECT_EQ(p.tensor("token_embd.weight").type, 30u);
  EXPECT_EQ(p.tensor("blk.0.attn_norm.weight").type, 0u) << "norms stay f32";
  EXPECT_EQ(p.tensor("blk.0.ffn_gate_inp.weight").type, 0u) << "the router stays f32";
  EXPECT_EQ(p.tensor("blk.0.ffn_gate_exps.weight").ne, (std::vector<uint64_t>{uint64_t(h), uint64_t(ff), uint64_t(E)}));
  EXPECT_EQ(p.tensor("blk.0.ffn_down_exps.weight").ne, (std::vector<uint64_t>{uint64_t(ff), uint64_t(h), uint64_t(E)}));

  // Values: copied, stacked by expert id, Q/K rows permuted per head.
  auto same_bytes = [&](const std::string& name, const Weight& x, size_t at = 0) {
    const size_t n = size_t(x.numel()) * dtype_size(x.dtype);
    return std::memcmp(p.data(p.tensor(name)) + at, x.data, n) == 0;
  };
  EXPECT_TRUE(same_bytes("token_embd.weight", w.embed));
  EXPECT_TRUE(same_bytes("output.weight", w.lm_head));
  const int64_t last = c.num_hidden_layers - 1;
  const LayerWeights& L = w.layers[size_t(last)];
  const std::string b = "blk." + std::to_string(last) + ".";
  EXPECT_TRUE(same_bytes(b + "attn_v.weight", L.v));
  EXPECT_TRUE(same_bytes(b + "attn_output.weight", L.o));
  EXPECT_EQ(floats(p.data(p.tensor(b + "ffn_norm.weight")), 0, size_t(h)), floats(L.post_attention_norm));
  EXPECT_EQ(floats(p.data(p.tensor(b + "ffn_gate_inp.weight")), 0, size_t(E * h)), floats(L.router));
  const size_t expert_bytes = size_t(ff * h) * 2;
  for (int64_t e = 0; e < E; ++e) {
    EXPECT_TRUE(same_bytes(b + "ffn_gate_exps.weight", L.experts[size_t(e)]->gate, size_t(e) * expert_bytes)) << e;
    EXPECT_TRUE(same_bytes(b + "ffn_up_exps.weight", L.experts[size_t(e)]->up, size_t(e) * expert_bytes)) << e;
    EXPECT_TRUE(same_bytes(b + "ffn_down_exps.weight", L.experts[size_t(e)]->down, size_t(e) * expert_bytes)) << e;
  }
  // RoPE permutation: GGUF row h*hd + 2j + i is HF row h*hd + i*hd/2 + j (K over the kv heads).
  auto check_perm = [&](const std::string& name, const Weight& x, int64_t heads) {
    const char* g = p.data(p.tensor(name));
    const char* src = static_cast<const char*>(x.data);
    const size_t row = size_t(h) * 2;
    for (int64_t hh = 0; hh < heads; ++hh)
      for (int64_t j = 0; j < hd / 2; ++j)
        for (int64_t i = 0; i < 2; ++i) {
          const int64_t to = hh * hd + 2 * j + i, from = hh * hd + i * (hd / 2) + j;
          ASSERT_EQ(std::memcmp(g + size_t(to) * row, src + size_t(from) * row, row), 0) << name << " row " << to;
        }
    EXPECT_FALSE(std::memcmp(g, src, size_t(x.numel()) * 2) == 0) << name << " must not be a plain copy";
  };
  check_perm(b + "attn_q.weight", L.q, c.num_attention_heads);
  check_perm(b + "attn_k.weight", L.k, c.num_key_value_heads);
  EXPECT_EQ(p.bytes.size() % 32, 0u);
}

TEST(ggufExport, ConvertsToTheAskedDtype) {
  TempDir tmp("gguf-export");
  const auto dir = tiny_model(tmp, "f32");
  const auto file = tmp / "m.gguf";
  int status = 0;
  std::string out =
      run(cli() + "export-gguf --model '" + dir.string() + "' --out '" + file.string() + "' --dtype f16 2>&1", &status);
  ASSERT_EQ(status, 0) << out;
  const Parsed p = parse_gguf(file);
  auto ck = Checkpoint::open(dir);
  const ModelWeights w = ck->load();
  EXPECT_EQ(p.values.at("general.file_type"), 1) << "MOSTLY_F16";
  EXPECT_EQ(p.tensor("output.weight").type, 1u);
  EXPECT_EQ(p.tensor("output_norm.weight").type, 0u);
  const auto want = floats(w.lm_head);
  std::vector<uint16_t> got(want.size());
  std::memcpy(got.data(), p.data(p.tensor("output.weight")), got.size() * 2);
  for (size_t i = 0; i < want.size(); i += 97) ASSERT_EQ(got[i], f32_to_f16(want[i])) << i;

  // Bad input: one readable line, non-zero exit, no file.
  out = run(
      cli() + "export-gguf --model '" + (tmp / "nope").string() + "' --out '" + (tmp / "x.gguf").string() + "' 2>&1",
      &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("nope"), std::string::npos) << out;
  out = run(
      cli() + "export-gguf --model '" + dir.string() + "' --out '" + (tmp / "x.gguf").string() + "' --dtype int4 2>&1",
      &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("--dtype"), std::string::npos) << out;
  std::filesystem::remove(dir / "tokenizer.json");
  out =
      run(cli() + "export-gguf --model '" + dir.string() + "' --out '" + (tmp / "x.gguf").string() + "' 2>&1", &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("tokenizer.json: missing"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(tmp / "x.gguf"));
}

// --dtype q4_0: the layers' matrices as llama.cpp's Q4_0 blocks (read here by the format's
// definition: an f16 d, then byte j = value j | value j + 16 << 4, value = (nibble - 8)·d), the
// embedding and lm_head f16, the router and norms f32. Every weight comes back within half a step
// (plus d's f16 rounding; clamped past 7·d on the far side), and each block's largest magnitude
// at nibble 0 (-8·d), as ggml's quantize_row_q4_0 puts it.
TEST(ggufExport, Q4_0LayersInLlamaCppsBlocks) {
  TempDir tmp("gguf-export");
  const auto dir = tiny_model(tmp, "f32");
  const auto file = tmp / "m.gguf";
  int status = 0;
  const std::string out = run(
      cli() + "export-gguf --model '" + dir.string() + "' --out '" + file.string() + "' --dtype q4_0 2>&1", &status);
  ASSERT_EQ(status, 0) << out;
  const Parsed p = parse_gguf(file);
  EXPECT_EQ(p.values.at("general.file_type"), 2) << "MOSTLY_Q4_0";
  for (const char* name :
       {"blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"})
    EXPECT_EQ(p.tensor(name).type, 2u) << name;
  EXPECT_EQ(p.tensor("token_embd.weight").type, 1u);
  EXPECT_EQ(p.tensor("output.weight").type, 1u);
  EXPECT_EQ(p.tensor("blk.0.ffn_gate_inp.weight").type, 0u);
  EXPECT_EQ(p.tensor("blk.0.attn_norm.weight").type, 0u);

  auto ck = Checkpoint::open(dir);
  const ModelWeights w = ck->load();
  const auto want = floats(w.layers[0].v);  // attn_v: rows in checkpoint order
  const char* q = p.data(p.tensor("blk.0.attn_v.weight"));
  size_t extremes = 0;
  for (size_t b = 0; b < want.size() / 32; ++b, q += 18) {
    uint16_t dh;
    std::memcpy(&dh, q, 2);
    const float d = f16_to_f32(dh);
    float top = 0;
    for (size_t j = 0; j < 32; ++j) top = std::max(top, std::abs(want[b * 32 + j]));
    for (size_t j = 0; j < 32; ++j) {
      const uint8_t byte = uint8_t(q[2 + j % 16]);
      const int nibble = j < 16 ? (byte & 15) : (byte >> 4);
      const float got = float(nibble - 8) * d, x = want[b * 32 + j];
      // Nibbles reach -8·d on the largest value's side but only 7·d on the other: beyond it, clamped.
      const float step = std::abs(d), allowed = std::max(step / 2, std::abs(x) - 7 * step);
      ASSERT_LE(std::abs(got - x), allowed + top * 0x1p-10) << "block " << b << " value " << j;
      if (std::abs(x) == top && nibble == 0) ++extremes;
    }
  }
  EXPECT_EQ(extremes, want.size() / 32) << "the largest magnitude of each block maps to nibble 0 (-8·d)";

  // --lm-head: output.weight in Q4_0 too (the embedding stays f16); refused without q4_0.
  const auto file2 = tmp / "m-lm.gguf";
  const std::string out2 = run(
      cli() + "export-gguf --model '" + dir.string() + "' --out '" + file2.string() + "' --dtype q4_0 --lm-head 2>&1",
      &status);
  ASSERT_EQ(status, 0) << out2;
  const Parsed p2 = parse_gguf(file2);
  EXPECT_EQ(p2.tensor("output.weight").type, 2u);
  EXPECT_EQ(p2.tensor("token_embd.weight").type, 1u);
  const std::string out3 =
      run(cli() + "export-gguf --model '" + dir.string() + "' --out '" + (tmp / "x.gguf").string() + "' --lm-head 2>&1",
          &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out3.find("--lm-head quantizes lm_head with --dtype q4_0 only"), std::string::npos) << out3;
}

TEST(ggufExport, DeepSeekLaidOutAsLlamaCppsDeepseek) {
  TempDir tmp("gguf-export");
  const auto dir = tiny_model(tmp, "bf16", "deepseek");
  const auto file = tmp / "d.gguf";
  int status = 0;
  const std::string out =
      run(cli() + "export-gguf --model '" + dir.string() + "' --out '" + file.string() + "' 2>&1", &status);
  ASSERT_EQ(status, 0) << out;
  const Parsed p = parse_gguf(file);
  auto ck = Checkpoint::open(dir);
  const ModelConfig& c = ck->config();
  const ModelWeights w = ck->load();
  ASSERT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(p.values.at("general.architecture"), "deepseek");
  EXPECT_EQ(p.values.at("deepseek.leading_dense_block_count"), 1);
  EXPECT_EQ(p.values.at("deepseek.feed_forward_length"), c.intermediate_size);
  EXPECT_EQ(p.values.at("deepseek.expert_feed_forward_length"), c.moe_intermediate_size);
  EXPECT_EQ(p.values.at("deepseek.expert_shared_count"), c.n_shared_experts);
  EXPECT_EQ(p.values.at("deepseek.expert_weights_scale"), 1.0);
  EXPECT_EQ(p.values.at("tokenizer.ggml.model"), "gpt2") << "DeepSeek-V3's tokenizer is byte-level BPE";
  EXPECT_FALSE(p.values.at("tokenizer.ggml.merges").empty());
  EXPECT_EQ(p.values.count("tokenizer.ggml.scores"), 0u);
  // Layer 0 is dense, layer 1 MoE with shared experts.
  std::vector<std::string> names;
  for (const auto& t : p.tensors) names.push_back(t.name);
  auto has = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
  EXPECT_TRUE(has("blk.0.ffn_gate.weight"));
  EXPECT_FALSE(has("blk.0.ffn_gate_inp.weight"));
  EXPECT_TRUE(has("blk.1.ffn_gate_inp.weight"));
  EXPECT_TRUE(has("blk.1.ffn_down_exps.weight"));
  EXPECT_FALSE(has("blk.1.ffn_gate.weight"));
  const int64_t h = c.hidden_size, sw = c.shared_intermediate_size();
  EXPECT_EQ(p.tensor("blk.0.ffn_down.weight").ne, (std::vector<uint64_t>{uint64_t(c.intermediate_size), uint64_t(h)}));
  EXPECT_EQ(p.tensor("blk.1.ffn_up_shexp.weight").ne, (std::vector<uint64_t>{uint64_t(h), uint64_t(sw)}));
  const Weight& shared_down = w.layers[1].shared->down;
  EXPECT_EQ(std::memcmp(p.data(p.tensor("blk.1.ffn_down_shexp.weight")), shared_down.data, size_t(h * sw) * 2), 0);
  const Weight& dense_gate = w.layers[0].dense->gate;
  EXPECT_EQ(std::memcmp(p.data(p.tensor("blk.0.ffn_gate.weight")), dense_gate.data, size_t(dense_gate.numel()) * 2), 0);
}

}  // namespace
}  // namespace moemesh
