// Safetensors: round trips in every float dtype, the exact on-disk layout, strict rejection of
// corrupt headers, HF sharding and the index file.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/safetensors.h"
#include "tests/support/temp_dir.h"

namespace fs = std::filesystem;
namespace st = moemesh::safetensors;
using moemesh::DType;
using moemesh::Error;
using nlohmann::json;

namespace {

class Safetensors : public ::testing::Test {
 protected:
  std::vector<char> read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
  }
  // A file with a hand-written header and `data_bytes` zero bytes of data.
  fs::path craft(const std::string& header, size_t data_bytes, const char* name = "crafted.safetensors") {
    fs::path p = dir_ / name;
    std::ofstream out(p, std::ios::binary);
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out.put(char(n >> (8 * i)));
    out << header << std::string(data_bytes, '\0');
    return p;
  }
  // Expects read_header to throw with every fragment in the message, on one line.
  void expect_rejected(const fs::path& p, std::vector<std::string> fragments) {
    try {
      st::read_header(p);
      ADD_FAILURE() << "accepted " << p;
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_EQ(msg.rfind(p.filename().string() + ": ", 0), 0u) << "does not start with the file name: " << msg;
      for (const auto& f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "missing \"" << f << "\" in: " << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }

  const moemesh::testing::TempDir dir_{"moemesh-st"};
};

std::vector<float> sample_values(size_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = float(int(g() % 200001) - 100000) / 64.0f;  // some need rounding in f16/bf16
  v[0] = 0.0f;
  v[1] = -1.5f;
  v[2] = 65504.0f;  // f16 max
  v[3] = 1e-3f;
  return v;
}

}  // namespace

TEST_F(Safetensors, RoundTripEveryFloatDtype) {
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {
    fs::path p = dir_ / ("rt-" + std::string(moemesh::dtype_name(t)) + ".safetensors");
    std::vector<float> a = sample_values(3 * 5, 1), b = sample_values(7, 2);
    {
      // Declared out of order: the writer lays tensors out sorted by name, as HF does.
      st::Writer w(p, {{"z.weight", t, {3, 5}}, {"a.bias", t, {7}}});
      ASSERT_EQ(w.order()[0].name, "a.bias");
      w.write_f32(b.data(), 3);  // chunked writes are fine
      w.write_f32(b.data() + 3, 4);
      w.write_f32(a.data(), a.size());
      w.finish();
    }
    st::Header h = st::read_header(p);
    ASSERT_EQ(h.tensors.size(), 2u);
    EXPECT_EQ(h.metadata.at("format"), "pt");
    const st::Entry* z = h.find("z.weight");
    ASSERT_NE(z, nullptr);
    EXPECT_EQ(z->dtype, t);
    EXPECT_EQ(z->shape, (std::vector<int64_t>{3, 5}));
    EXPECT_EQ(z->nbytes(), 15 * moemesh::dtype_size(t));
    EXPECT_EQ(h.tensors[0].name, "a.bias");  // data order
    EXPECT_EQ(h.data_offset % 8, 0u);        // header padded so data is aligned

    std::vector<char> bytes = read_all(p);
    std::vector<float> got(15);
    moemesh::to_f32(t, bytes.data() + h.data_offset + z->begin, got.data(), 15);
    for (size_t i = 0; i < 15; ++i) {
      // Exactly the value after one conversion to t (round to nearest even).
      float expect = a[i];
      if (t == DType::F16) expect = moemesh::f16_to_f32(moemesh::f32_to_f16(a[i]));
      if (t == DType::BF16) expect = moemesh::bf16_to_f32(moemesh::f32_to_bf16(a[i]));
      EXPECT_EQ(got[i], expect) << "element " << i << " of " << moemesh::dtype_name(t);
    }
    // Values exactly representable survive unchanged.
    EXPECT_EQ(got[0], 0.0f);
    EXPECT_EQ(got[1], -1.5f);
    if (t != DType::BF16) {
      EXPECT_EQ(got[2], 65504.0f);
    }
  }
}

TEST_F(Safetensors, LayoutMatchesTheReferenceWriter) {
  fs::path p = dir_ / "layout.safetensors";
  st::write_file(p, {{"b", DType::F32, {2}}, {"a", DType::F32, {1}}},
                 {std::vector<char>(8, 1), std::vector<char>(4, 2)});
  std::vector<char> bytes = read_all(p);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  std::string header(bytes.begin() + 8, bytes.begin() + 8 + long(n));
  // Compact JSON, __metadata__ first, tensors in data order, keys dtype/shape/data_offsets,
  // space padding to a multiple of 8: byte for byte what safetensors (Rust) writes.
  std::string expect =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  expect.append((8 - expect.size() % 8) % 8, ' ');
  EXPECT_EQ(header, expect);
  EXPECT_EQ(bytes.size(), 8 + n + 12);
  EXPECT_EQ(bytes[8 + n], 2);  // "a" first
  EXPECT_EQ(bytes[8 + n + 4], 1);
}

TEST_F(Safetensors, PythonReadsWhatWeWrite) {
  // An independent reader (numpy) agrees on names, shapes and values.
  fs::path p = dir_ / "py.safetensors";
  std::vector<float> v = {1.0f, -2.0f, 3.5f, 0.25f, 8.0f, -0.125f};
  {
    st::Writer w(p, {{"m", DType::BF16, {2, 3}}});
    w.write_f32(v.data(), v.size());
    w.finish();
  }
  std::string script =
      "import json,struct,sys,numpy as np\n"
      "b=open(sys.argv[1],'rb').read(); n=struct.unpack('<Q',b[:8])[0]; h=json.loads(b[8:8+n])\n"
      "s,e=h['m']['data_offsets']; u=np.frombuffer(b[8+n+s:8+n+e],dtype='<u2').astype(np.uint32)<<16\n"
      "print(h['m']['shape'], u.view(np.float32).reshape(h['m']['shape']).sum())\n";
  fs::path py = dir_ / "read.py";
  std::ofstream(py) << script;
  std::string cmd = std::string(MOEMESH_PYTHON) + " " + py.string() + " " + p.string() + " > " + (dir_ / "out").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::ifstream in(dir_ / "out");
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "[2, 3] 10.625");
}

TEST_F(Safetensors, RejectsCorruptHeaders) {
  // Too small to hold the length.
  fs::path small = dir_ / "small.safetensors";
  std::ofstream(small) << "abc";
  expect_rejected(small, {"not a safetensors file"});

  // Length pointing past the end of the file.
  fs::path good = dir_ / "good.safetensors";
  st::write_file(good, {{"t", DType::F32, {4}}}, {std::vector<char>(16, 0)});
  std::vector<char> bytes = read_all(good);
  {
    auto b = bytes;
    b[5] = 0x7f;  // header length ~ 2^47
    std::ofstream(dir_ / "len.safetensors", std::ios::binary).write(b.data(), long(b.size()));
    expect_rejected(dir_ / "len.safetensors", {"bad header length"});
  }
  {
    auto b = bytes;
    b[8] = 'X';  // header no longer JSON
    std::ofstream(dir_ / "json.safetensors", std::ios::binary).write(b.data(), long(b.size()));
    expect_rejected(dir_ / "json.safetensors", {"header"});
  }
  expect_rejected(craft(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})", 16, "bad-json.safetensors"),
                  {"not valid JSON"});
  expect_rejected(craft(R"({"t":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}})", 16), {"tensor t", "unknown dtype \"Q4\""});
  expect_rejected(craft(R"({"t":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}})", 16), {"tensor t", "[5]", "16"});
  expect_rejected(craft(R"({"t":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", 16), {"tensor t", "shape"});
  expect_rejected(craft(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}})", 16), {"tensor t", "data_offsets"});
  expect_rejected(craft(R"({"t":{"dtype":"F32","shape":[4]}})", 16), {"tensor t", "data_offsets"});
  expect_rejected(craft(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})", 16),
                  {"tensor t", "beyond the end of the file"});
  expect_rejected(craft(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})", 16),
                  {"tensor t", "too large"});
  expect_rejected(craft(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                        16),
                  {"overlaps"});
  expect_rejected(craft(R"({"__metadata__":{"format":1}})", 0), {"__metadata__"});
  expect_rejected(craft(R"([1,2,3])", 0), {"not a JSON object"});

  // Truncated: header intact, data cut short.
  fs::path trunc = dir_ / "trunc.safetensors";
  fs::copy_file(good, trunc);
  fs::resize_file(trunc, fs::file_size(trunc) - 4);
  expect_rejected(trunc, {"tensor t", "truncated"});
  // Truncated inside the header.
  fs::resize_file(trunc, 20);
  expect_rejected(trunc, {"bad header length"});

  expect_rejected(dir_ / "absent.safetensors", {"cannot open"});
  EXPECT_NO_THROW(st::read_header(good));
}

TEST_F(Safetensors, ZeroSizedAndEmpty) {
  fs::path p = dir_ / "zero.safetensors";
  st::write_file(p, {{"empty", DType::F16, {0, 4}}, {"x", DType::I32, {1}}}, {{}, std::vector<char>(4, 0)});
  st::Header h = st::read_header(p);
  ASSERT_NE(h.find("empty"), nullptr);
  EXPECT_EQ(h.find("empty")->nbytes(), 0u);
  EXPECT_EQ(h.find("x")->dtype, DType::I32);
}

TEST_F(Safetensors, UnfinishedWriteLeavesNoFile) {
  fs::path p = dir_ / "partial.safetensors";
  {
    st::Writer w(p, {{"t", DType::F32, {4}}});
    float x[2] = {1, 2};
    w.write_f32(x, 2);
    EXPECT_THROW(w.finish(), Error);
  }
  EXPECT_FALSE(fs::exists(p));
  EXPECT_FALSE(fs::exists(p.string() + ".tmp"));
  // Too much data is refused too.
  st::Writer w(p, {{"t", DType::F32, {1}}});
  float x[2] = {1, 2};
  EXPECT_THROW(w.write_f32(x, 2), Error);
}

TEST_F(Safetensors, ShardPlanFollowsHuggingFace) {
  auto spec = [](const char* n, int64_t elems) { return st::TensorSpec{n, DType::F32, {elems}}; };
  // 100-byte shards: a (40) + b (40) fit, c (40) starts a new one, d (400) is alone, e follows c.
  auto shards = st::plan_shards({spec("a", 10), spec("b", 10), spec("c", 10), spec("d", 100), spec("e", 5)}, 100);
  ASSERT_EQ(shards.size(), 3u);
  EXPECT_EQ(shards[0].size(), 2u);
  EXPECT_EQ(shards[1][0].name, "d");
  EXPECT_EQ(shards[2].size(), 2u);
  EXPECT_EQ(shards[2][1].name, "e");
  EXPECT_EQ(st::plan_shards({spec("a", 10)}, 1000).size(), 1u);
  EXPECT_EQ(st::shard_file_name(1, 3), "model-00002-of-00003.safetensors");
  EXPECT_EQ(st::shard_file_name(0, 12), "model-00001-of-00012.safetensors");

  st::write_index(dir_.path(), shards);
  std::ifstream in(dir_ / st::kIndexFile);
  json idx = json::parse(in);
  EXPECT_EQ(idx["metadata"]["total_size"], 40 * 3 + 400 + 20);
  EXPECT_EQ(idx["weight_map"]["a"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(idx["weight_map"]["d"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(idx["weight_map"]["e"], "model-00003-of-00003.safetensors");
}
