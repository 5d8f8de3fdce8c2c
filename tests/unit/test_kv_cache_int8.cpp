// The INT8 KV cache: quantisation error per element, memory per block, the f32 block frames of
// the prefix cache (dequantise on read, quantise on write), and a prefix restored into an int8
// engine giving the logits that engine computes itself.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/engine.h"
#include "core/error.h"
#include "core/kv_cache.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "kernels/cpu/kv_int8.h"
#include "tests/support/numeric.h"

using namespace moemesh;

using moemesh::testing::normals;

TEST(KvInt8, QuantisationErrorIsHalfAStepPerHead) {
  const int64_t rows = 5, heads = 3, hd = 16;
  auto x = normals(size_t(rows * heads * hd), 1);
  // Head 1 of row 2 all zero: scale 0, values 0 (no division by zero).
  std::fill_n(x.begin() + (2 * heads + 1) * hd, hd, 0.0f);
  std::vector<int8_t> q(x.size());
  std::vector<float> scales(size_t(rows * heads)), back(x.size());
  cpu::quantize_kv_int8(x.data(), rows, heads, hd, q.data(), scales.data());
  cpu::dequantize_kv_int8(q.data(), scales.data(), rows, heads, hd, back.data());
  EXPECT_EQ(scales[size_t(2 * heads + 1)], 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      const float s = scales[size_t(r * heads + h)];
      int max_q = 0;
      for (int64_t d = 0; d < hd; ++d) {
        const size_t i = size_t((r * heads + h) * hd + d);
        EXPECT_LE(std::fabs(back[i] - x[i]), 0.5f * s * (1 + 1e-5f) + 1e-30f) << r << "," << h << "," << d;
        max_q = std::max(max_q, std::abs(int(q[i])));
      }
      if (s > 0) {
        EXPECT_EQ(max_q, 127) << "the largest element maps to +-127";
      }
    }
}

TEST(KvInt8, MemoryPerBlockIsAQuarterPlusScales) {
  const int64_t layers = 4, kv_heads = 4, hd = 128, kv_dim = kv_heads * hd;
  KvCache f32(layers, kv_dim, 8), i8(layers, kv_dim, 8, {KvDType::Int8, kv_heads});
  EXPECT_EQ(f32.bytes_per_block(), layers * 2 * 16 * kv_dim * 4);
  // One byte per value plus one f32 scale per (token, head): 1/4 + 1/(hd) of f32.
  EXPECT_EQ(i8.bytes_per_block(), layers * 2 * 16 * (kv_dim + kv_heads * 4));
  const double ratio = double(i8.bytes_per_block()) / double(f32.bytes_per_block());
  EXPECT_NEAR(ratio, 0.25 + 1.0 / hd, 1e-12);
  // The tiny preset (head_dim 16) pays more for its scales: 0.3125.
  KvCache tf(2, 32, 4), ti(2, 32, 4, {KvDType::Int8, 2});
  EXPECT_DOUBLE_EQ(double(ti.bytes_per_block()) / double(tf.bytes_per_block()), 0.3125);
}

TEST(KvInt8, BadFormatsAndF32OnlyAccessAreErrors) {
  EXPECT_THROW(KvCache(2, 30, 4, {KvDType::Int8, 4}), Error);  // 30 not a multiple of 4 heads
  try {
    parse_kv_dtype("fp16");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected f32 or int8"), std::string::npos) << e.what();
  }
  EXPECT_EQ(parse_kv_dtype("int8"), KvDType::Int8);
  EXPECT_EQ(kv_dtype_name(parse_kv_dtype("f32")), "f32");
  KvCache kv(1, 8, 2, {KvDType::Int8, 2});
  const SeqId s = kv.create_sequence();
  kv.reserve(s, 3);
  EXPECT_THROW(kv.k_row(0, s, 0), Error);
  EXPECT_THROW(kv.write_row(0, s, 16, normals(8, 1).data(), normals(8, 2).data()), Error);  // not reserved
}

// write_block quantises, read_block dequantises: within half a step of the input, and a block
// read back and written again (what a restore of a published block does) reads back the same.
TEST(KvInt8, BlockFramesRoundTrip) {
  const int64_t layers = 2, heads = 2, hd = 8, kv_dim = heads * hd;
  KvCache kv(layers, kv_dim, 4, {KvDType::Int8, heads});
  const SeqId a = kv.create_sequence(), b = kv.create_sequence();
  kv.reserve(a, 16);
  kv.reserve(b, 16);
  const auto in = normals(size_t(kv.block_floats()), 3, 2.0f);
  kv.write_block(a, 0, in.data());
  std::vector<float> out(in.size()), again(in.size());
  kv.read_block(a, 0, out.data());
  for (size_t i = 0; i < in.size(); i += size_t(hd)) {
    float amax = 0;
    for (size_t d = 0; d < size_t(hd); ++d) amax = std::max(amax, std::fabs(in[i + d]));
    for (size_t d = 0; d < size_t(hd); ++d) EXPECT_LE(std::fabs(out[i + d] - in[i + d]), amax / 254 * 1.0001f);
  }
  kv.write_block(b, 0, out.data());
  kv.read_block(b, 0, again.data());
  for (size_t i = 0; i < in.size(); ++i) EXPECT_NEAR(again[i], out[i], 1e-6f * std::fabs(out[i]) + 1e-12f) << i;
}

// The prefix cache path: an int8 worker publishes f32 frames of its full blocks; a fresh int8
// engine restores them (write_block) and computes only the tail: logits equal computing it all.
TEST(KvInt8, PrefixRestoredIntoInt8CacheGivesTheSameLogits) {
  const auto dir = std::filesystem::temp_directory_path() / ("moemesh-test-kvint8-" + std::to_string(::getpid()));
  ModelConfig cfg = model_preset(Arch::Mixtral, "tiny");
  cfg.vocab_size = 256;
  write_model(cfg, dir, {});
  auto ckpt = Checkpoint::open(dir);
  const auto toks = moemesh::testing::random_tokens(37, 9, cfg.vocab_size);  // 2 full blocks + 5
  const StepInput whole{0, toks, false};

  Engine src(ckpt, EngineOptions{8, KvDType::Int8});
  StepInput in = whole;
  in.seq = src.create_sequence();
  const auto ref = src.step(std::span<const StepInput>(&in, 1)).front();
  std::vector<std::vector<float>> frames;
  for (int64_t b = 0; b < 2; ++b)
    src.kv_cache().read_block(in.seq, b, frames.emplace_back(size_t(src.kv_cache().block_floats())).data());

  Engine dst(ckpt, EngineOptions{8, KvDType::Int8});
  const SeqId s = dst.create_sequence();
  dst.kv_cache().reserve(s, 32);
  for (int64_t b = 0; b < 2; ++b) dst.kv_cache().write_block(s, b, frames[size_t(b)].data());
  dst.kv_cache().set_length(s, 32);
  const StepInput tail{s, std::vector<int32_t>(toks.begin() + 32, toks.end()), false};
  const auto got = dst.step(std::span<const StepInput>(&tail, 1)).front();
  EXPECT_LT(moemesh::testing::rel_diff(got.logits, ref.logits), 1e-5);
  std::filesystem::remove_all(dir);
}
