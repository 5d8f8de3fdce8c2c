// The prefix cache: whole KV blocks out of and into the paged cache, a sequence restored from
// stored blocks decoding exactly as a full recomputation, the StepWorker skipping the restored
// prompt positions in every chunk the router sends, and the KV store client against the real
// block store actor on loopback (multi-round chains, partial prefixes, bad blocks, a dead store).
#include <gtest/gtest.h>

#include <chrono>
#include <atomic>
#include <cmath>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <unordered_map>
#include <vector>

#include <caf/all.hpp>
#include <zmq_addon.hpp>

#include "actors/block_store.h"
#include "actors/kv_client.h"
#include "actors/step_worker.h"
#include "actors/zmq_bridge.h"
#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/kv_cache.h"
#include "core/prefix_hash.h"
#include "core/wire.h"
#include "proto/dataplane.pb.h"
#include "tests/support/actor_config.h"
#include "tests/support/eventually.h"
#include "tests/support/numeric.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;
using namespace moemesh::actors;

namespace {

using moemesh::testing::random_tokens;
using moemesh::testing::rel_diff;
using moemesh::testing::TinyModel;
using moemesh::testing::two_thread_config;

// A KV store in a map: the longest stored prefix of a chain.
class MapStore : public PrefixStore {
 public:
  std::vector<std::vector<float>> fetch(std::span<const BlockKey> keys, size_t block_floats,
                                        const TraceRef& = {}) override {
    ++fetches;
    std::vector<std::vector<float>> out;
    for (const auto& k : keys) {
      auto it = blocks.find(k);
      if (it == blocks.end() || it->second.size() != block_floats) break;
      out.push_back(it->second);
    }
    return out;
  }
  std::vector<std::vector<std::vector<float>>> fetch_many(std::span<const PrefixQuery> queries, size_t block_floats,
                                                          WaitUntil give_up = kWaitForTheStore) override {
    ++batches;
    budgets.push_back(give_up == kWaitForTheStore
                          ? -1.0
                          : std::chrono::duration<double>(give_up - std::chrono::steady_clock::now()).count());
    if (delay.count() > 0) std::this_thread::sleep_for(delay);
    return PrefixStore::fetch_many(queries, block_floats);
  }
  void publish(std::span<const BlockKey> keys, std::vector<std::vector<float>> bs, const TraceRef& = {}) override {
    for (size_t i = 0; i < keys.size(); ++i) blocks[keys[i]] = std::move(bs[i]);
  }
  std::unordered_map<BlockKey, std::vector<float>> blocks;
  int fetches = 0, batches = 0;
  std::chrono::milliseconds delay{0};  // each batch waits this long, as a round trip would
  std::vector<double> budgets;         // per batch: seconds it was given to answer (-1: no budget)
};

class PrefixCache : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { model_ = std::make_unique<TinyModel>(Arch::Mixtral, /*seed=*/7, /*vocab=*/128); }
  static void TearDownTestSuite() { model_.reset(); }
  void SetUp() override { ckpt_ = Checkpoint::open(model_->path()); }
  std::shared_ptr<Engine> engine(int64_t blocks = 64) { return std::make_shared<Engine>(ckpt_, EngineOptions{blocks}); }
  int64_t vocab() const { return ckpt_->config().vocab_size; }

  static inline std::unique_ptr<TinyModel> model_;
  std::shared_ptr<Checkpoint> ckpt_;
};

// What the router sees of one request, run the way the scheduler runs it: the prompt in chunks
// (the first carries the whole prompt), then one decode token per step, then a free.
struct Generation {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;  // of each sampled position
  int32_t cached_tokens = -1;              // from the first chunk's result
  int unsampled_results = 0;               // chunk results without a token
};

Generation generate(StepWorker& w, uint64_t seq, const std::vector<int32_t>& prompt, const std::vector<size_t>& chunks,
                    int new_tokens) {
  Generation run;
  uint64_t step = 1;
  auto one = [&](pb::StepRequest& req) {
    req.set_step(step++);
    std::vector<std::vector<float>> logits;
    pb::StepResponse resp = w.run(req, logits);
    EXPECT_EQ(resp.results_size(), req.work_size());
    for (const auto& r : resp.results()) {
      EXPECT_TRUE(r.error().empty()) << r.error();
      if (req.work(0).is_first()) run.cached_tokens = r.cached_tokens();
      if (r.token() < 0) {
        ++run.unsampled_results;
        continue;
      }
      run.tokens.push_back(r.token());
      EXPECT_GE(r.logits_tensor(), 0);
      if (r.logits_tensor() >= 0) run.logits.push_back(logits.at(size_t(r.logits_tensor())));
    }
  };
  size_t at = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    pb::StepRequest req;
    auto* wk = req.add_work();
    wk->set_seq(seq);
    for (size_t i = 0; i < chunks[c]; ++i) wk->add_tokens(prompt[at + i]);
    if (c == 0) {
      wk->set_is_first(true);
      wk->mutable_sampling()->set_ignore_eos(true);  // temperature 0: greedy
      for (int32_t t : prompt) wk->add_prompt(t);
    }
    at += chunks[c];
    wk->set_sample(at == prompt.size());
    wk->set_return_logits(wk->sample());
    one(req);
  }
  EXPECT_EQ(at, prompt.size());
  while (int(run.tokens.size()) < new_tokens) {
    pb::StepRequest req;
    auto* wk = req.add_work();
    wk->set_seq(seq);
    wk->add_tokens(run.tokens.back());
    wk->set_sample(true);
    wk->set_return_logits(true);
    one(req);
  }
  pb::StepRequest free;
  free.set_step(step++);
  free.add_free(seq);
  std::vector<std::vector<float>> none;
  w.run(free, none);
  w.publish_freed();  // as the step server does once the step's answer is sent
  return run;
}

void expect_same_run(const Generation& got, const Generation& want) {
  EXPECT_EQ(got.tokens, want.tokens);
  ASSERT_EQ(got.logits.size(), want.logits.size());
  for (size_t i = 0; i < got.logits.size(); ++i)
    EXPECT_LE(rel_diff(got.logits[i], want.logits[i]), 1e-5) << "token " << i;
}

}  // namespace

// Options for a worker with one micro-batch and the given prefix store.
StepWorkerOptions one_batch(std::shared_ptr<PrefixStore> store, std::string model_id) {
  StepWorkerOptions o;
  o.prefix_store = std::move(store);
  o.model_id = std::move(model_id);
  o.micro_batches = 1;
  return o;
}

TEST(KvCacheBlocks, ReadAndWriteWholeBlocksAcrossLayers) {
  const int64_t layers = 3, kv_dim = 4, bs = KvCache::kBlockSize;
  KvCache kv(layers, kv_dim, 8);
  EXPECT_EQ(kv.block_floats(), layers * 2 * bs * kv_dim);
  SeqId a = kv.create_sequence();
  kv.reserve(a, 2 * bs + 3);
  auto value = [](int64_t l, int64_t kvsel, int64_t pos, int64_t d) {
    return float(l * 10000 + kvsel * 1000 + pos * 10 + d);
  };
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t p = 0; p < 2 * bs + 3; ++p)
      for (int64_t d = 0; d < kv_dim; ++d) {
        kv.k_row(l, a, p)[d] = value(l, 0, p, d);
        kv.v_row(l, a, p)[d] = value(l, 1, p, d);
      }
  // Block 1 holds positions 16..31 as [layer][K|V][16][kv_dim].
  std::vector<float> block(size_t(kv.block_floats()));
  kv.read_block(a, 1, block.data());
  size_t i = 0;
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t s = 0; s < 2; ++s)
      for (int64_t p = bs; p < 2 * bs; ++p)
        for (int64_t d = 0; d < kv_dim; ++d) ASSERT_EQ(block[i++], value(l, s, p, d)) << l << " " << s << " " << p;

  SeqId b = kv.create_sequence();
  kv.reserve(b, bs);
  kv.write_block(b, 0, block.data());
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t p = 0; p < bs; ++p) {
      EXPECT_EQ(kv.k_row(l, b, p)[1], value(l, 0, bs + p, 1));
      EXPECT_EQ(kv.v_row(l, b, p)[3], value(l, 1, bs + p, 3));
    }
  EXPECT_THROW(kv.read_block(a, 3, block.data()), Error);  // 35 tokens: blocks 0..2 reserved
  EXPECT_THROW(kv.write_block(b, 1, block.data()), Error);
  EXPECT_THROW(kv.read_block(a, -1, block.data()), Error);
}

TEST_F(PrefixCache, RestoredBlocksThenDecodeEqualFullRecomputation) {
  const auto prompt = random_tokens(100, 11, vocab());
  auto full = engine(), restored = engine();
  const int64_t V = vocab();

  // Reference: the whole prompt at once (logits of every position), then greedy decode.
  SeqId a = full->create_sequence();
  std::vector<StepInput> in{{a, prompt, true}};
  auto ref = full->step(in);
  ASSERT_EQ(ref[0].n, 100);
  std::vector<std::vector<float>> blocks;
  for (int64_t b = 0; b < 6; ++b)
    full->kv_cache().read_block(a, b, blocks.emplace_back(size_t(full->kv_cache().block_floats())).data());

  // The same sequence from 6 restored blocks (96 tokens): compute the last 4 positions only.
  SeqId s = restored->create_sequence();
  KvCache& kv = restored->kv_cache();
  kv.reserve(s, 96);
  for (int64_t b = 0; b < 6; ++b) kv.write_block(s, b, blocks[size_t(b)].data());
  kv.set_length(s, 96);
  std::vector<StepInput> rest{{s, std::vector<int32_t>(prompt.begin() + 96, prompt.end()), true}};
  auto got = restored->step(rest);
  ASSERT_EQ(got[0].n, 4);
  EXPECT_EQ(got[0].first_position, 96);
  for (int64_t r = 0; r < 4; ++r)
    EXPECT_LE(rel_diff(std::span(got[0].logits).subspan(size_t(r * V), size_t(V)),
                       std::span(ref[0].logits).subspan(size_t((96 + r) * V), size_t(V))),
              1e-5)
        << "position " << 96 + r;

  // Incremental decode on both agrees token by token.
  auto argmax = [&](std::span<const float> row) {
    return int32_t(std::max_element(row.begin(), row.end()) - row.begin());
  };
  int32_t ta = argmax(std::span(ref[0].logits).subspan(size_t(99 * V)));
  int32_t tb = argmax(std::span(got[0].logits).subspan(size_t(3 * V)));
  for (int i = 0; i < 8; ++i) {
    ASSERT_EQ(ta, tb) << "decode step " << i;
    std::vector<StepInput> da{{a, {ta}, false}}, db{{s, {tb}, false}};
    auto oa = full->step(da), ob = restored->step(db);
    EXPECT_LE(rel_diff(ob[0].logits, oa[0].logits), 1e-5) << "decode step " << i;
    ta = argmax(oa[0].logits);
    tb = argmax(ob[0].logits);
  }
  EXPECT_EQ(kv.length(s), full->kv_cache().length(a));
}

TEST_F(PrefixCache, WorkerSkipsRestoredPromptPositionsInEveryChunk) {
  auto store = std::make_shared<MapStore>();
  StepWorker w(engine(), {2}, one_batch(store, "tiny"));
  const auto prompt = random_tokens(100, 21, vocab());

  Generation first = generate(w, 1, prompt, {40, 40, 20}, 6);
  EXPECT_EQ(first.cached_tokens, 0);
  EXPECT_EQ(w.counts().prefix_query_tokens, 100u);
  EXPECT_EQ(w.counts().prefix_hit_tokens, 0u);
  EXPECT_EQ(w.prompt_tokens_computed(), 100u);
  EXPECT_EQ(w.prompt_tokens_skipped(), 0u);
  // Freed with 105 positions cached (the last sampled token was never fed): 6 full blocks.
  EXPECT_EQ(w.counts().published_blocks, 6u);
  EXPECT_EQ(store->blocks.size(), 6u);
  EXPECT_EQ(w.sequences(), 0u);
  EXPECT_EQ(w.free_blocks(), w.num_blocks());

  // Again on the same worker: 96 positions come from the store, the chunks that cover them are
  // skipped, only 4 prompt positions are computed, and the output is the same.
  Generation second = generate(w, 2, prompt, {40, 40, 20}, 6);
  EXPECT_EQ(second.cached_tokens, 96);
  EXPECT_EQ(second.unsampled_results, 2);
  EXPECT_EQ(w.counts().prefix_hit_tokens, 96u);
  EXPECT_EQ(w.prompt_tokens_computed(), 104u);
  EXPECT_EQ(w.prompt_tokens_skipped(), 96u);
  expect_same_run(second, first);
  EXPECT_EQ(w.counts().published_blocks, 6u);  // nothing new: blocks 0-5 came from the store

  // On a fresh worker (another process in the cluster), with chunks cut elsewhere.
  StepWorker other(engine(), {2}, one_batch(store, "tiny"));
  Generation third = generate(other, 7, prompt, {16, 50, 30, 4}, 6);
  EXPECT_EQ(third.cached_tokens, 96);
  EXPECT_EQ(other.prompt_tokens_computed(), 4u);
  EXPECT_EQ(other.prompt_tokens_skipped(), 96u);
  expect_same_run(third, first);

  // A prompt sharing 64 tokens restores 4 blocks and computes the rest.
  auto branch = prompt;
  branch.resize(70);
  branch[66] = (branch[66] + 1) % int32_t(vocab());
  branch[64] = (branch[64] + 1) % int32_t(vocab());
  StepWorker fresh(engine(), {2}, one_batch(nullptr, ""));
  Generation plain = generate(fresh, 1, branch, {70}, 3);
  Generation cached = generate(other, 8, branch, {70}, 3);
  EXPECT_EQ(cached.cached_tokens, 64);
  EXPECT_EQ(other.prompt_tokens_computed(), 4u + 6u);
  expect_same_run(cached, plain);

  // Another model id shares nothing.
  StepWorker stranger(engine(), {2}, one_batch(store, "another-model"));
  Generation own = generate(stranger, 1, prompt, {100}, 2);
  EXPECT_EQ(own.cached_tokens, 0);
  EXPECT_EQ(stranger.prompt_tokens_computed(), 100u);
}

TEST_F(PrefixCache, AStepAsksTheStoreOnceForAllTheSequencesItStarts) {
  auto store = std::make_shared<MapStore>();
  StepWorker w(engine(), {2}, one_batch(store, "tiny"));
  const auto a = random_tokens(40, 31, vocab()), b = random_tokens(70, 32, vocab());
  const auto c = random_tokens(50, 33, vocab()), tiny = random_tokens(10, 34, vocab());
  generate(w, 1, a, {40}, 2);  // stores a's 2 blocks
  generate(w, 2, b, {70}, 2);  // and b's 4
  const int batches = store->batches, fetches = store->fetches;

  pb::StepRequest req;
  req.set_step(1);
  uint64_t seq = 10;
  for (const auto* prompt : {&a, &b, &c, &tiny}) {
    auto* wk = req.add_work();
    wk->set_seq(seq++);
    wk->set_is_first(true);
    wk->set_sample(true);
    for (int32_t t : *prompt) {
      wk->add_tokens(t);
      wk->add_prompt(t);
    }
  }
  std::vector<std::vector<float>> logits;
  const pb::StepResponse resp = w.run(req, logits);
  EXPECT_EQ(store->batches - batches, 1) << "one batch of lookups for the step";
  EXPECT_EQ(store->fetches - fetches, 3) << "the three prompts of a block or more; the 10-token one asks nothing";
  ASSERT_EQ(resp.results_size(), 4);
  std::map<uint64_t, int32_t> cached;
  for (const auto& r : resp.results()) {
    EXPECT_TRUE(r.error().empty()) << r.error();
    EXPECT_GE(r.token(), 0);
    cached[r.seq()] = r.cached_tokens();
  }
  EXPECT_EQ(cached, (std::map<uint64_t, int32_t>{{10, 32}, {11, 64}, {12, 0}, {13, 0}}));
  EXPECT_EQ(w.counts().prefix_hit_tokens, 96u);

  // The wait for the store is the step's prefix_lookup phase; a step that starts nothing has none.
  store->delay = std::chrono::milliseconds(20);
  pb::StepRequest next;
  next.set_step(2);
  auto* wk = next.add_work();
  wk->set_seq(20);
  wk->set_is_first(true);
  wk->set_sample(true);
  for (int32_t t : c) {
    wk->add_tokens(t);
    wk->add_prompt(t);
  }
  w.run(next, logits);
  EXPECT_GE(w.last_phases().prefix_lookup, 0.020);
  pb::StepRequest decode;
  decode.set_step(3);
  wk = decode.add_work();
  wk->set_seq(20);
  wk->add_tokens(1);
  wk->set_sample(true);
  w.run(decode, logits);
  EXPECT_EQ(w.last_phases().prefix_lookup, 0.0);
}

TEST_F(PrefixCache, AStepWaitsForTheStoreNoLongerThanComputingThePositionsWouldTake) {
  // Until the worker has run a prefill, it has no price for a position and waits for the store;
  // after one, each lookup gets a budget (what the positions asked for cost to compute here),
  // and a worker told not to budget never sets one.
  auto store = std::make_shared<MapStore>();
  StepWorker w(engine(), {2}, one_batch(store, "tiny"));
  generate(w, 1, random_tokens(64, 41, vocab()), {64}, 2);
  ASSERT_EQ(store->budgets.size(), 1u);
  EXPECT_EQ(store->budgets[0], -1.0) << "nothing measured yet: no budget";
  generate(w, 2, random_tokens(64, 42, vocab()), {64}, 2);
  generate(w, 3, random_tokens(20, 43, vocab()), {20}, 2);
  ASSERT_EQ(store->budgets.size(), 3u);
  EXPECT_GT(store->budgets[1], 0.0) << "48 positions (3 blocks) priced";
  EXPECT_GT(store->budgets[2], 0.0) << "16 positions (1 block) priced";
  EXPECT_LT(store->budgets[1], 10.0);

  auto unbudgeted = std::make_shared<MapStore>();
  StepWorkerOptions o = one_batch(unbudgeted, "tiny");
  o.prefix_wait_budget = false;
  StepWorker plain(engine(), {2}, o);
  generate(plain, 1, random_tokens(64, 44, vocab()), {64}, 2);
  generate(plain, 2, random_tokens(64, 45, vocab()), {64}, 2);
  EXPECT_EQ(unbudgeted->budgets, (std::vector<double>{-1.0, -1.0}));
}

TEST_F(PrefixCache, APromptOfWholeBlocksKeepsItsLastTokenToCompute) {
  auto store = std::make_shared<MapStore>();
  StepWorker w(engine(), {2}, one_batch(store, "tiny"));
  const auto prompt = random_tokens(32, 5, vocab());
  Generation first = generate(w, 1, prompt, {32}, 2);  // 33 positions at free: 2 blocks published
  EXPECT_EQ(store->blocks.size(), 2u);
  Generation second = generate(w, 2, prompt, {32}, 2);
  EXPECT_EQ(second.cached_tokens, 16);  // not 32: the 32nd token's logits are needed
  expect_same_run(second, first);

  // Prompts under one block are never looked up in vain... and still counted as queried.
  const uint64_t fetches = uint64_t(store->fetches);
  generate(w, 3, random_tokens(16, 6, vocab()), {16}, 1);
  EXPECT_EQ(uint64_t(store->fetches), fetches);
}

TEST_F(PrefixCache, AFreedSequencesBlocksAreOfferedAfterItsStepNotWithinIt) {
  // The step that frees a sequence copies its blocks out; they reach the store when the server
  // calls publish_freed() after sending the step's answer, or else at the next step's start.
  auto store = std::make_shared<MapStore>();
  StepWorker w(engine(), {2}, one_batch(store, "tiny"));
  auto start_and_free = [&](uint64_t seq, int32_t seed) {
    const auto prompt = random_tokens(40, seed, vocab());
    pb::StepRequest req;
    auto* wk = req.add_work();
    wk->set_seq(seq);
    wk->set_is_first(true);
    wk->set_sample(true);
    for (int32_t t : prompt) {
      wk->add_tokens(t);
      wk->add_prompt(t);
    }
    std::vector<std::vector<float>> logits;
    w.run(req, logits);
    pb::StepRequest free;
    free.add_free(seq);
    w.run(free, logits);
  };
  start_and_free(1, 7);
  EXPECT_EQ(store->blocks.size(), 0u);
  EXPECT_EQ(w.counts().published_blocks, 0u);
  w.publish_freed();
  EXPECT_EQ(store->blocks.size(), 2u);  // 40 positions: two full blocks
  EXPECT_EQ(w.counts().published_blocks, 2u);
  w.publish_freed();  // nothing twice
  EXPECT_EQ(w.counts().published_blocks, 2u);

  start_and_free(2, 8);  // its blocks are left gathered...
  EXPECT_EQ(store->blocks.size(), 2u);
  pb::StepRequest empty;
  std::vector<std::vector<float>> logits;
  w.run(empty, logits);  // ...and offered before the next step
  EXPECT_EQ(store->blocks.size(), 4u);
}

// ---- KvClient against the real block store actor ----------------------------------------------

namespace {

std::vector<BlockKey> chain(size_t n, int32_t salt) {
  std::vector<int32_t> t(n * kBlockTokens);
  for (size_t i = 0; i < t.size(); ++i) t[i] = int32_t(i) * 7 + salt;
  return prefix_block_keys("m", t);
}

std::vector<float> block_of(size_t i, size_t floats) {
  std::vector<float> b(floats);
  for (size_t j = 0; j < floats; ++j) b[j] = float(i * 1000 + j);
  return b;
}

// Up to 10 s for what another thread does.
bool wait_for(const std::function<bool()>& ok) { return moemesh::testing::eventually(ok, std::chrono::seconds(10)); }

constexpr size_t kFloats = 2 * 2 * 16 * 4;  // a block of 2 layers, kv_dim 4

// The real block store actor behind a ROUTER on loopback, and a client of it.
struct StoreOnLoopback {
  caf::actor_system sys{two_thread_config()};
  ZmqBridge bridge{sys};
  int sock =
      bridge.add({.name = "kv", .type = zmq::socket_type::router, .endpoint = "tcp://127.0.0.1:*", .bind = true});
  caf::actor store = spawn_block_store(sys, bridge, sock, options());
  KvClient client{sys,
                  {bridge.endpoint(sock),
                   "m",
                   std::chrono::milliseconds(5000),
                   std::chrono::milliseconds(5000),
                   "",
                   {2, 2, 16, 4}}};
  StoreOnLoopback() { bridge.start(); }
  static BlockStoreOptions options() {
    BlockStoreOptions o;
    o.budget_bytes = 1 << 20;
    return o;
  }
  ~StoreOnLoopback() {
    bridge.stop();
    caf::anon_send_exit(store, caf::exit_reason::user_shutdown);
  }
};

}  // namespace

TEST(KvClientTest, PublishesAndFetchesChainsThroughTheBlockStore) {
  StoreOnLoopback kv;
  KvClient& client = kv.client;
  const auto keys = chain(40, 1);                    // more than one KvGet round
  EXPECT_TRUE(client.fetch(keys, kFloats).empty());  // nothing stored yet: a clean miss
  EXPECT_EQ(client.stats().fetch_failures.load(), 0u);

  std::vector<std::vector<float>> blocks;
  for (size_t i = 0; i < keys.size(); ++i) blocks.push_back(block_of(i, kFloats));
  client.publish(keys, blocks);
  EXPECT_EQ(client.stats().published_blocks.load(), 40u);
  ASSERT_TRUE(wait_for([&] { return client.stats().acked_blocks.load() == 40; }));

  auto got = client.fetch(keys, kFloats);
  ASSERT_EQ(got.size(), 40u);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], blocks[i]) << "block " << i;

  // A chain that leaves the stored one after 20 blocks gets those 20.
  auto mixed = keys;
  mixed.resize(20);
  for (const auto& k : chain(5, 2)) mixed.push_back(k);
  EXPECT_EQ(client.fetch(mixed, kFloats).size(), 20u);
  EXPECT_EQ(client.stats().fetch_failures.load(), 0u);

  // Blocks of another size are unusable: counted as a failure, nothing returned, and the client
  // backs off instead of asking again.
  EXPECT_TRUE(client.fetch(keys, kFloats / 2).empty());
  EXPECT_EQ(client.stats().fetch_failures.load(), 1u);
  EXPECT_TRUE(client.fetch(keys, kFloats).empty());
  EXPECT_EQ(client.stats().skipped_fetches.load(), 1u);
}

TEST(KvClientTest, ManyChainsAreFetchedTogetherThroughTheBlockStore) {
  StoreOnLoopback kv;
  KvClient& client = kv.client;
  const auto stored = chain(40, 1), other = chain(25, 3);
  std::vector<std::vector<float>> blocks;
  for (size_t i = 0; i < stored.size(); ++i) blocks.push_back(block_of(i, kFloats));
  client.publish(stored, blocks);
  client.publish(std::span(other).first(18), std::vector(blocks.begin(), blocks.begin() + 18));
  ASSERT_TRUE(wait_for([&] { return client.stats().acked_blocks.load() == 58; }));

  auto mixed = stored;  // leaves the stored chain after 20 blocks
  mixed.resize(20);
  for (const auto& k : chain(5, 2)) mixed.push_back(k);
  const std::vector<PrefixQuery> queries{{stored, {}}, {mixed, {}}, {chain(3, 9), {}}, {{}, {}}, {other, {}}};
  const auto got = client.fetch_many(queries, kFloats);
  ASSERT_EQ(got.size(), 5u);
  EXPECT_EQ(got[0], blocks) << "a chain of three rounds, whole";
  EXPECT_EQ(got[1], std::vector(blocks.begin(), blocks.begin() + 20));
  EXPECT_TRUE(got[2].empty()) << "a clean miss";
  EXPECT_TRUE(got[3].empty()) << "an empty chain";
  EXPECT_EQ(got[4], std::vector(blocks.begin(), blocks.begin() + 18)) << "a second round that comes back short";
  EXPECT_EQ(client.stats().fetches.load(), 4u);
  EXPECT_EQ(client.stats().fetched_blocks.load(), 78u);
  EXPECT_EQ(client.stats().fetch_failures.load(), 0u);
}

// A scripted KV store: a ROUTER on loopback whose test thread receives KvGets and answers them
// as misses when the test says.
struct FakeStore {
  zmq::context_t ctx;
  zmq::socket_t router{ctx, zmq::socket_type::router};
  std::string endpoint;
  FakeStore() {
    router.set(zmq::sockopt::rcvtimeo, 10000);
    router.bind("tcp://127.0.0.1:*");
    endpoint = router.get(zmq::sockopt::last_endpoint);
  }
  // The next request's peer and id; false when none came within 10 s.
  bool receive(zmq::message_t& peer, uint64_t& id) {
    std::vector<zmq::message_t> parts;
    if (!zmq::recv_multipart(router, std::back_inserter(parts)) || parts.size() < 2) return false;
    id = wire::decode_header({static_cast<const uint8_t*>(parts[1].data()), parts[1].size()}).request_id;
    peer = std::move(parts[0]);
    return true;
  }
  void answer_miss(zmq::message_t& peer, uint64_t id) {
    wire::Header r;
    r.kind = wire::Kind::KvGetReply;
    r.request_id = id;
    pb::KvGetReply miss;
    miss.set_found(0);
    r.meta = miss.SerializeAsString();
    const auto bytes = wire::encode_header(r);
    router.send(peer, zmq::send_flags::sndmore);
    router.send(zmq::buffer(bytes), zmq::send_flags::none);
  }
};

TEST(KvClientTest, AStepsLookupsAreInFlightTogether) {
  // A store that answers nothing until it holds all three requests: a client that waited for
  // one reply before sending the next request would run into its deadline.
  FakeStore store;
  std::atomic<int> held_at_first_reply{0};
  std::thread fake([&] {
    std::vector<std::pair<zmq::message_t, uint64_t>> held;  // (peer, request id)
    while (held.size() < 3) {
      auto& [peer, id] = held.emplace_back();
      if (!store.receive(peer, id)) return;
    }
    held_at_first_reply = int(held.size());
    for (auto& [peer, id] : held) store.answer_miss(peer, id);
  });
  {
    caf::actor_system sys{two_thread_config()};
    KvClient client(sys,
                    {store.endpoint, "m", std::chrono::milliseconds(3000), std::chrono::milliseconds(60000), "", {}});
    const std::vector<PrefixQuery> queries{{chain(2, 1), {}}, {chain(3, 2), {}}, {chain(1, 3), {}}};
    const auto got = client.fetch_many(queries, 64);
    EXPECT_EQ(got.size(), 3u);
    EXPECT_EQ(client.stats().fetch_failures.load(), 0u) << "the lookups went out one after another";
  }
  fake.join();
  EXPECT_EQ(held_at_first_reply.load(), 3);
}

TEST(KvClientTest, AWaitBudgetGivesUpOnASlowStoreWithoutBackingOff) {
  // A store that holds its first reply until the client has stopped waiting for it: the budgeted
  // fetch returns without blocks, and nothing counts as a failure, so the next fetch is asked (and
  // answered) instead of skipped.
  FakeStore store;
  std::atomic<bool> gave_up{false};
  std::thread fake([&] {
    for (int request = 0; request < 2; ++request) {
      zmq::message_t peer;
      uint64_t id = 0;
      if (!store.receive(peer, id)) return;
      if (request == 0 && !wait_for([&] { return gave_up.load(); })) return;
      store.answer_miss(peer, id);
    }
  });
  {
    caf::actor_system sys{two_thread_config()};
    KvClient client(sys,
                    {store.endpoint, "m", std::chrono::milliseconds(20000), std::chrono::milliseconds(60000), "", {}});
    const std::vector<PrefixQuery> queries{{chain(2, 1), {}}};
    const auto got = client.fetch_many(queries, 64, std::chrono::steady_clock::now() + std::chrono::milliseconds(20));
    gave_up = true;
    ASSERT_EQ(got.size(), 1u);
    EXPECT_TRUE(got[0].empty());
    EXPECT_EQ(client.stats().cut_fetches.load(), 1u);
    EXPECT_EQ(client.stats().fetch_failures.load(), 0u) << "a budget running out is not the store failing";
    EXPECT_TRUE(wait_for([&] { return client.stats().late_replies.load() == 1; })) << "the held reply, counted";
    client.fetch_many(queries, 64);  // no budget: waits for the answer
    EXPECT_EQ(client.stats().fetches.load(), 2u);
    EXPECT_EQ(client.stats().skipped_fetches.load(), 0u) << "no back-off after a budget cut";
    EXPECT_EQ(client.stats().fetch_failures.load(), 0u);
  }
  fake.join();
}

// A port nobody listens on (bound and closed again by a throwaway socket).
std::string dead_endpoint() {
  zmq::context_t ctx;
  zmq::socket_t s(ctx, zmq::socket_type::router);
  s.bind("tcp://127.0.0.1:*");
  return s.get(zmq::sockopt::last_endpoint);
}

TEST(KvClientTest, ADeadStoreCostsOneDeadlineThenIsSkipped) {
  caf::actor_system sys{two_thread_config()};
  KvClient client(sys,
                  {dead_endpoint(), "m", std::chrono::milliseconds(100), std::chrono::milliseconds(60000), "", {}});
  const auto keys = chain(3, 1);
  EXPECT_TRUE(client.fetch(keys, 64).empty());
  EXPECT_EQ(client.stats().fetch_failures.load(), 1u);
  EXPECT_TRUE(client.fetch(keys, 64).empty());
  EXPECT_EQ(client.stats().fetches.load(), 1u);
  EXPECT_EQ(client.stats().skipped_fetches.load(), 1u);
  client.publish(keys, {block_of(0, 64), block_of(1, 64), block_of(2, 64)});  // dropped while backing off
  EXPECT_EQ(client.stats().published_blocks.load(), 0u);
}

TEST(KvClientTest, ADeadStoreBehindAWaitBudgetIsStillFoundOut) {
  // Budgeted lookups never wait long, but one the store has not answered by its own deadline
  // makes the store failed all the same: the client backs off as it does without a budget.
  caf::actor_system sys{two_thread_config()};
  KvClient client(sys,
                  {dead_endpoint(), "m", std::chrono::milliseconds(100), std::chrono::milliseconds(60000), "", {}});
  const std::vector<PrefixQuery> queries{{chain(3, 1), {}}};
  auto budgeted = [&] {
    return client.fetch_many(queries, 64, std::chrono::steady_clock::now() + std::chrono::milliseconds(2));
  };
  EXPECT_TRUE(budgeted()[0].empty());
  EXPECT_EQ(client.stats().cut_fetches.load(), 1u);
  EXPECT_EQ(client.stats().fetch_failures.load(), 0u) << "not yet: the store's deadline has not passed";
  ASSERT_TRUE(wait_for([&] {
    budgeted();
    return client.stats().fetch_failures.load() == 1;
  })) << "a cut lookup unanswered past the deadline fails the store";
  const uint64_t skipped = client.stats().skipped_fetches.load();
  EXPECT_TRUE(budgeted()[0].empty());
  EXPECT_EQ(client.stats().skipped_fetches.load(), skipped + 1) << "backing off";
  EXPECT_EQ(client.stats().fetch_failures.load(), 1u);
}

TEST(KvClientTest, CutLookupsOfOneOutageFailTheStoreOnce) {
  // Two budgeted lookups to a dead store, 60 ms apart: the first's deadline passing fails the
  // store; the second's, passing while the client backs off, is the same outage.
  caf::actor_system sys{two_thread_config()};
  KvClient client(sys,
                  {dead_endpoint(), "m", std::chrono::milliseconds(100), std::chrono::milliseconds(60000), "", {}});
  const std::vector<PrefixQuery> queries{{chain(3, 1), {}}};
  using Clock = std::chrono::steady_clock;
  auto budgeted = [&] { return client.fetch_many(queries, 64, Clock::now() + std::chrono::milliseconds(2)); };
  const auto first = Clock::now();
  budgeted();
  ASSERT_TRUE(wait_for([&] { return Clock::now() >= first + std::chrono::milliseconds(60); }));
  const auto second = Clock::now();
  budgeted();
  ASSERT_EQ(client.stats().cut_fetches.load(), 2u);
  ASSERT_TRUE(wait_for([&] { return Clock::now() >= first + std::chrono::milliseconds(110); }));
  budgeted();  // the first lookup's deadline has passed, the second's (most likely) not
  EXPECT_EQ(client.stats().fetch_failures.load(), 1u);
  ASSERT_TRUE(wait_for([&] { return Clock::now() >= second + std::chrono::milliseconds(110); }));
  budgeted();  // now the second's has passed too
  EXPECT_EQ(client.stats().fetch_failures.load(), 1u) << "one outage, one failure";
  EXPECT_GE(client.stats().skipped_fetches.load(), 2u) << "backing off";
}
