// Long contexts (issue #15): the CPU attention's split-K decode and key-tiled prefill against a
// naive double-precision loop and against each other, and sliding windows that bound a
// sequence's KV memory (blocks released as the window moves on, the router's count of them, the
// logits unchanged by the release).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <vector>

#include "core/engine.h"
#include "core/error.h"
#include "core/kv_cache.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/kv_int8.h"
#include "kernels/cpu/thread_pool.h"
#include "tests/support/naive_attention.h"
#include "tests/support/numeric.h"
#include "tests/support/temp_dir.h"

using namespace moemesh;
using moemesh::testing::naive_attention;
using moemesh::testing::normals;

namespace {

// Keys and values of one sequence in a paged pool (blocks in a shuffled order), as f32 or INT8.
struct Pool {
  int64_t kv_heads, hd, n, bs = 16;
  std::vector<float> k, v, kpool, vpool, kscale, vscale;
  std::vector<int8_t> kq, vq;
  std::vector<const float*> kp, vp, ksp, vsp;
  std::vector<const int8_t*> kqp, vqp;

  Pool(int64_t kv_heads_, int64_t hd_, int64_t n_, uint64_t seed) : kv_heads(kv_heads_), hd(hd_), n(n_) {
    const int64_t kv_dim = kv_heads * hd, blocks = (n + bs - 1) / bs;
    k = normals(size_t(n * kv_dim), seed);
    v = normals(size_t(n * kv_dim), seed + 1);
    kpool.assign(size_t(blocks * bs * kv_dim), 0.0f);
    vpool = kpool;
    kq.assign(kpool.size(), 0);
    vq = kq;
    kscale.assign(size_t(blocks * bs * kv_heads), 0.0f);
    vscale = kscale;
    std::vector<int64_t> order(static_cast<size_t>(blocks));
    std::iota(order.begin(), order.end(), 0);
    std::reverse(order.begin(), order.end());
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = order[size_t(j / bs)] * bs + j % bs;
      std::copy_n(k.begin() + j * kv_dim, kv_dim, kpool.begin() + row * kv_dim);
      std::copy_n(v.begin() + j * kv_dim, kv_dim, vpool.begin() + row * kv_dim);
    }
    cpu::quantize_kv_int8(kpool.data(), blocks * bs, kv_heads, hd, kq.data(), kscale.data());
    cpu::quantize_kv_int8(vpool.data(), blocks * bs, kv_heads, hd, vq.data(), vscale.data());
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t o = order[size_t(b)];
      kp.push_back(kpool.data() + o * bs * kv_dim);
      vp.push_back(vpool.data() + o * bs * kv_dim);
      kqp.push_back(kq.data() + o * bs * kv_dim);
      vqp.push_back(vq.data() + o * bs * kv_dim);
      ksp.push_back(kscale.data() + o * bs * kv_heads);
      vsp.push_back(vscale.data() + o * bs * kv_heads);
    }
  }
  cpu::PagedKV f32() const { return {kp.data(), vp.data(), bs}; }
  cpu::PagedKV int8() const { return {nullptr, nullptr, bs, kqp.data(), vqp.data(), ksp.data(), vsp.data()}; }
  // The values attention reads: f32, or dequantised.
  std::vector<float> keys(bool q8) const { return q8 ? dequant(true) : k; }
  std::vector<float> values(bool q8) const { return q8 ? dequant(false) : v; }
  std::vector<float> dequant(bool key) const {
    const int64_t kv_dim = kv_heads * hd;
    std::vector<float> out(size_t(n * kv_dim));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t b = j / bs, t = j % bs;
      const int8_t* qr = (key ? kqp : vqp)[size_t(b)] + t * kv_dim;
      const float* sc = (key ? ksp : vsp)[size_t(b)] + t * kv_heads;
      for (int64_t d = 0; d < kv_dim; ++d) out[size_t(j * kv_dim + d)] = sc[d / hd] * float(qr[d]);
    }
    return out;
  }
};

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  return moemesh::testing::max_rel_err(a, b);
}

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  return rel_err(a, std::vector<double>(b.begin(), b.end()));
}

}  // namespace

// Decode rows over 5000 keys: split into 1, 3, 7 parts (and the pool's own choice) the output is
// the naive softmax's, f32 and INT8 (against the dequantised cache), with and without a window.
TEST(LongContextAttention, SplitKDecodeMatchesNaiveAndUnsplit) {
  const int64_t heads = 4, kv_heads = 2, hd = 16, n = 5000;
  const Pool pool(kv_heads, hd, n, 21);
  // Three decode rows of one sequence (a speculative-style batch) and a lone one.
  for (const std::vector<int32_t>& pos : {std::vector<int32_t>{4999}, std::vector<int32_t>{4990, 4995, 4999}}) {
    const auto q = normals(pos.size() * size_t(heads * hd), 22, 2.0f);
    for (bool q8 : {false, true})
      for (int64_t window : {int64_t(0), int64_t(1500)}) {
        const auto ref = naive_attention(q, pos, heads, kv_heads, hd, window, pool.keys(q8), pool.values(q8));
        std::vector<float> unsplit;
        for (int64_t splits : {int64_t(1), int64_t(3), int64_t(7), int64_t(0)}) {
          cpu::AttentionShape shape{heads, kv_heads, hd, window};
          shape.kv_splits = splits;
          std::vector<float> out(q.size());
          cpu::paged_attention(q.data(), int64_t(pos.size()), pos.data(), shape, q8 ? pool.int8() : pool.f32(),
                               out.data());
          EXPECT_LT(rel_err(out, ref), 2e-6) << "splits " << splits << " int8 " << q8 << " window " << window;
          if (splits == 1)
            unsplit = out;
          else
            EXPECT_LT(rel_err(out, unsplit), 2e-6) << "split " << splits << " vs unsplit";
        }
      }
  }
}

// A prefill of 1100 rows: row blocks of 16 and key tiles of 512 cross each other; with a window
// that starts inside tiles, and forced splits on top.
TEST(LongContextAttention, PrefillTilesMatchNaive) {
  const int64_t heads = 4, kv_heads = 1, hd = 8, n = 1100;
  const Pool pool(kv_heads, hd, n, 31);
  std::vector<int32_t> pos(static_cast<size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  const auto q = normals(size_t(n * heads * hd), 32, 2.0f);
  for (int64_t window : {int64_t(0), int64_t(600)})
    for (int64_t splits : {int64_t(0), int64_t(2)}) {
      cpu::AttentionShape shape{heads, kv_heads, hd, window};
      shape.kv_splits = splits;
      std::vector<float> out(q.size());
      cpu::paged_attention(q.data(), n, pos.data(), shape, pool.f32(), out.data());
      EXPECT_LT(rel_err(out, naive_attention(q, pos, heads, kv_heads, hd, window, pool.k, pool.v)), 2e-6)
          << "window " << window << " splits " << splits;
    }
}

// Under a window the blocks before it are released as the sequence grows, and the attention
// never reads them (their pointers are null in the view).
TEST(SlidingWindowKv, ReleasesBlocksTheWindowNoLongerSees) {
  const int64_t window = 40;
  KvCache kv(2, 8, 64, {KvDType::F32, 1, window});
  const SeqId s = kv.create_sequence();
  for (int64_t len = 1; len <= 500; ++len) {
    // What the router counts for the step that adds this token equals what the cache then holds.
    EXPECT_EQ(kv.held_blocks(s) + kv.blocks_needed(s, len), kv_blocks_held(len, 1, window)) << len;
    kv.reserve(s, len);
    kv.set_length(s, len);
    // The next query (at len) sees [len - window + 1, len]: its blocks and no more.
    const int64_t first = std::max<int64_t>(0, len - window + 1) / KvCache::kBlockSize;
    EXPECT_EQ(kv.first_held_block(s), first);
    EXPECT_LE(kv.held_blocks(s), (window - 1 + KvCache::kBlockSize - 1) / KvCache::kBlockSize + 1);
    EXPECT_EQ(kv.free_blocks() + kv.held_blocks(s), kv.num_blocks());
  }
  std::vector<float> block(size_t(kv.block_floats()));
  try {
    kv.read_block(s, 0, block.data());
    FAIL() << "a released block was readable";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sliding window of 40"), std::string::npos) << e.what();
  }
  KvViewScratch scratch;
  const cpu::PagedKV view = kv.view(0, s, scratch);
  EXPECT_EQ(view.k_blocks[0], nullptr);
  EXPECT_NE(view.k_blocks[kv.first_held_block(s)], nullptr);
  kv.free_sequence(s);
  EXPECT_EQ(kv.free_blocks(), kv.num_blocks());
  // A chunk of 100 new tokens: its first query needs keys back to (len - 100) - window + 1.
  EXPECT_EQ(kv_blocks_held(1000, 100, window), (1000 + 15) / 16 - (1000 - 100 - window + 1) / 16);
  EXPECT_EQ(kv_blocks_held(1000, 100, 0), (1000 + 15) / 16);
}

// A windowed model's engine: KV memory per sequence stays flat as the context grows to 2000
// tokens (a pool of 12 blocks = 192 tokens would not hold it otherwise; without the window it
// would take 125 blocks), and the logits of the run that releases blocks as it goes (chunks of
// 37, then decode) equal those of one prefill over the whole context, f32 and INT8.
TEST(SlidingWindowKv, MemoryPerSequenceStaysFlatAsContextGrows) {
  const int64_t window = 64, total = 2000;
  moemesh::testing::TempDir dir("moemesh-window");
  ModelConfig cfg = model_preset(Arch::Mixtral, "tiny");
  cfg.vocab_size = 64;
  cfg.bos_token_id = 1;
  cfg.eos_token_ids = {2};
  cfg.sliding_window = window;
  WriteOptions wo;
  wo.seed = 5;
  write_model(cfg, dir.path(), wo);
  auto ckpt = Checkpoint::open(dir.path());
  const auto tokens = moemesh::testing::random_tokens(size_t(total), 9, cfg.vocab_size);
  for (KvDType dt : {KvDType::F32, KvDType::Int8}) {
    Engine small(ckpt, EngineOptions{12, dt});  // 12 blocks: the window plus the chunk being written
    Engine big(ckpt, EngineOptions{int64_t(total / 16 + 4), dt});
    const SeqId a = small.create_sequence(), b = big.create_sequence();
    // The reference: one prefill of everything (nothing released until it is done).
    const StepInput whole{b, tokens, true};
    const std::vector<float> ref = big.step(std::span(&whole, 1)).front().logits;
    const int64_t bytes_per_block = small.kv_cache().bytes_per_block();
    std::vector<int64_t> bytes;
    double worst = 0;
    int64_t pos = 0;
    for (int64_t chunk : {int64_t(37), int64_t(1)}) {
      while (pos < (chunk == 1 ? total : total / 2)) {
        const int64_t n = std::min(chunk, total - pos);
        const StepInput in{a, std::vector<int32_t>(tokens.begin() + pos, tokens.begin() + pos + n), true};
        const std::vector<float> got = small.step(std::span(&in, 1)).front().logits;
        pos += n;
        const std::vector<float> want(ref.begin() + (pos - n) * cfg.vocab_size, ref.begin() + pos * cfg.vocab_size);
        worst = std::max(worst, rel_err(got, want));
        bytes.push_back(small.kv_cache().held_blocks(a) * bytes_per_block);
      }
    }
    EXPECT_LT(worst, 1e-5) << kv_dtype_name(dt);
    // Flat: from the first window on, the held bytes never exceed (window + chunk) worth of blocks.
    const int64_t cap = ((window - 1 + 37 + 15) / 16 + 1) * bytes_per_block;
    EXPECT_LE(*std::max_element(bytes.begin(), bytes.end()), cap) << kv_dtype_name(dt);
    EXPECT_EQ(bytes.back(), small.kv_cache().held_blocks(a) * bytes_per_block);
    EXPECT_LE(bytes.back(), ((window - 1 + 15) / 16 + 1) * bytes_per_block);
    EXPECT_LT(bytes.back() * 10, (total + 15) / 16 * bytes_per_block);
    small.free_sequence(a);
    EXPECT_EQ(small.kv_cache().free_blocks(), 12);
  }
}
