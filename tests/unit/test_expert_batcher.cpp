// The expert host's batching: the BatchQueue policy (driven by explicit times), and batched
// compute (rows of several requests concatenated per expert) against each row computed alone, on
// the host's compute backend.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <future>
#include <limits>
#include <mutex>
#include <span>
#include <random>
#include <thread>

#include "actors/expert_batcher.h"
#include "actors/expert_compute.h"
#include "core/moe.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;
using namespace moemesh::actors;
using Clock = BatchQueue::Clock;
using std::chrono::microseconds;

namespace {

PendingRequest req(const std::string& peer, uint64_t id, std::vector<dispatch::Group> groups, int64_t hidden = 1) {
  PendingRequest r;
  r.peer = peer;
  r.request_id = id;
  int64_t rows = 0;
  for (auto g : groups) rows += g.rows;
  r.groups = std::move(groups);
  r.rows.assign(size_t(rows * hidden), 0.0f);
  return r;
}

BatcherOptions opts(int64_t max_rows = 1000) {
  BatcherOptions o;
  o.window = microseconds(200);
  o.max_batch_rows = max_rows;
  o.peer_memory = std::chrono::milliseconds(1000);
  return o;
}

}  // namespace

TEST(BatchQueue, OnePeerRunsAtOnce) {
  BatchQueue q(opts());
  const auto t = Clock::now();
  auto job = q.add(0, req("A", 1, {{0, 2}}), t);
  ASSERT_TRUE(job);
  EXPECT_EQ(job->requests.size(), 1u);
  EXPECT_EQ(q.open_batches(), 0u);
}

TEST(BatchQueue, WaitsForEveryRecentPeerThenMerges) {
  BatchQueue q(opts());
  auto t = Clock::now();
  ASSERT_TRUE(q.add(0, req("A", 1, {{0, 1}}), t));   // learns A
  ASSERT_FALSE(q.add(0, req("B", 2, {{0, 1}}), t));  // learns B: A may still send
  auto job = q.add(0, req("A", 3, {{1, 2}}), t + microseconds(10));
  ASSERT_TRUE(job) << "A and B are both in: nobody else to wait for";
  ASSERT_EQ(job->requests.size(), 2u);
  EXPECT_EQ(job->requests[0].request_id, 2u);  // arrival order kept
  EXPECT_EQ(job->requests[1].request_id, 3u);
  EXPECT_EQ(job->layer, 0);
}

TEST(BatchQueue, LayersBatchSeparatelyAndTheWindowFlushes) {
  BatchQueue q(opts());
  auto t = Clock::now();
  q.add(0, req("A", 1, {{0, 1}}), t);
  q.add(0, req("B", 2, {{0, 1}}), t);  // A and B known now; B's batch of layer 0 waits
  EXPECT_FALSE(q.add(1, req("B", 3, {{0, 1}}), t));
  EXPECT_EQ(q.open_batches(), 2u);
  EXPECT_EQ(q.queued_requests(), 2u);
  EXPECT_TRUE(q.take_due(t + microseconds(100)).empty());
  auto due = q.take_due(t + microseconds(200));
  ASSERT_EQ(due.size(), 2u);
  EXPECT_EQ(q.open_batches(), 0u);
}

TEST(BatchQueue, BoundedBatchesRunAtOnce) {
  BatchQueue q(opts(/*max_rows=*/4));
  auto t = Clock::now();
  q.add(0, req("A", 1, {{0, 1}}), t);
  EXPECT_FALSE(q.add(0, req("B", 2, {{0, 3}}), t));  // 3 rows < 4
  q.take_due(t + microseconds(500));
  EXPECT_TRUE(q.add(0, req("B", 3, {{0, 2}, {1, 2}}), t + microseconds(600)));  // 4 rows
}

TEST(BatchQueue, SilentPeersAreForgotten) {
  BatchQueue q(opts());
  auto t = Clock::now();
  q.add(0, req("A", 1, {{0, 1}}), t);
  EXPECT_FALSE(q.add(0, req("B", 2, {{0, 1}}), t));
  q.take_due(t + std::chrono::milliseconds(1));
  // A has been quiet for longer than peer_memory: B alone does not wait for it.
  EXPECT_TRUE(q.add(0, req("B", 3, {{0, 1}}), t + std::chrono::milliseconds(1500)));
}

// ---- batched compute ----

class BatchedCompute : public ::testing::Test {
 protected:
  const moemesh::testing::TinyModel model_{Arch::Mixtral, /*seed=*/1, /*vocab=*/64};  // written for each test
};

TEST_F(BatchedCompute, MapsOnlyItsExperts) {
  auto ckpt = Checkpoint::open(model_.path());
  HostedExperts hosted(ckpt, parse_expert_spec("0:1-2,1:5", ckpt->config()));
  EXPECT_EQ(ckpt->mapped_tensors().size(), 9u);  // 3 experts x gate/up/down
  EXPECT_EQ(hosted.mapped_bytes(), hosted.expected_bytes());
  const auto& c = ckpt->config();
  EXPECT_EQ(hosted.expected_bytes(), uint64_t(3 * 3 * c.hidden_size * c.moe_intermediate_size * 4));
  EXPECT_TRUE(hosted.holds(0, 2));
  EXPECT_FALSE(hosted.holds(0, 3));
}

TEST_F(BatchedCompute, MergedRowsGiveTheSameOutputsAsEachRowAlone) {
  auto ckpt = Checkpoint::open(model_.path());
  const int64_t hidden = ckpt->config().hidden_size;
  HostedExperts hosted(ckpt, all_experts(ckpt->config()));
  ComputePool pool(3);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);

  // Three requests of layer 1 with overlapping experts and uneven row counts.
  auto job = std::make_shared<BatchJob>();
  job->layer = 1;
  const std::vector<std::vector<dispatch::Group>> shapes{{{0, 3}, {4, 1}}, {{4, 7}, {2, 2}}, {{0, 1}, {2, 5}, {7, 16}}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    PendingRequest r = req("p" + std::to_string(i), i + 1, shapes[i], hidden);
    for (float& x : r.rows) x = nd(rng);
    job->requests.push_back(std::move(r));
  }
  std::promise<BatchJobPtr> done;
  run_batch(hosted, pool, job, [&](BatchJobPtr j) { done.set_value(std::move(j)); });
  BatchJobPtr out = done.get_future().get();
  ASSERT_TRUE(out->error.empty()) << out->error;
  EXPECT_EQ(out->experts, 4);  // experts 0, 2, 4, 7: one mlp_forward each

  size_t exact = 0, total = 0;
  double worst = 0;
  for (size_t i = 0; i < out->requests.size(); ++i) {
    const PendingRequest& r = out->requests[i];
    int64_t offset = 0;
    for (const auto& g : r.groups) {
      for (int64_t row = offset; row < offset + g.rows; ++row) {
        std::vector<float> alone(static_cast<size_t>(hidden));
        mlp_forward(*hosted.mlp(1, g.expert), r.rows.data() + row * hidden, 1, hidden, alone.data());
        // Relative error of the row as a vector: near-zero elements only carry rounding.
        double err = 0, norm = 0;
        for (int64_t d = 0; d < hidden; ++d) {
          const float a = out->outputs[i][size_t(row * hidden + d)], b = alone[size_t(d)];
          err += (double(a) - double(b)) * (double(a) - double(b));
          norm += double(b) * double(b);
          exact += a == b;
          ++total;
        }
        const double rel = std::sqrt(err / norm);
        worst = std::max(worst, rel);
        EXPECT_LE(rel, 1e-6) << "request " << i << " expert " << g.expert << " row " << row;
      }
      offset += g.rows;
    }
  }
  // Recorded, not asserted: OpenBLAS sgemm picks kernels (and FMA order) by the row count and a
  // row's position in its tile, so a row computed in a batch is not always bit-identical to the
  // same row alone; the difference is float rounding (checked above to 1e-6 of the row's scale).
  RecordProperty("bitwise_identical_values", std::to_string(exact) + "/" + std::to_string(total));
  std::printf("batched vs alone: %zu/%zu values bit-identical, worst relative difference %.3g\n", exact, total, worst);
}

TEST_F(BatchedCompute, AFailingExpertFailsTheBatchNotTheProcess) {
  auto ckpt = Checkpoint::open(model_.path());
  HostedExperts hosted(ckpt, parse_expert_spec("0:0", ckpt->config()));
  ComputePool pool(1);
  auto job = std::make_shared<BatchJob>();
  job->layer = 0;
  job->requests.push_back(req("p", 1, {{3, 1}}, hosted.hidden()));  // not held (the batcher checks first)
  std::promise<BatchJobPtr> done;
  run_batch(hosted, pool, job, [&](BatchJobPtr j) { done.set_value(std::move(j)); });
  EXPECT_NE(done.get_future().get()->error.find("expert 3 of layer 0"), std::string::npos);
}

namespace {

// The CPU backend, counting the MLP calls and the rows they carry (run_batch must go through the
// host's backend, which is how `--device cuda` reaches the experts).
class CountingBackend final : public ComputeBackend {
 public:
  std::string name() const override { return "counting cpu"; }
  std::unique_ptr<KvCache> make_kv_cache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks,
                                         KvCacheFormat format) override {
    return cpu_->make_kv_cache(n_layers, kv_dim, num_blocks, format);
  }
  void embedding(const Weight& table, const int32_t* ids, int64_t n, float* out) override {
    cpu_->embedding(table, ids, n, out);
  }
  void rmsnorm(const float* x, const Weight& w, int64_t rows, double eps, float* y) override {
    cpu_->rmsnorm(x, w, rows, eps, y);
  }
  void matmul(const float* x, int64_t rows, const Weight& w, float* y) override { cpu_->matmul(x, rows, w, y); }
  void attention_block(const ModelConfig& cfg, const LayerWeights& lw, int64_t layer, KvCache& kv,
                       const BatchLayout& layout, float* x) override {
    cpu_->attention_block(cfg, lw, layer, kv, layout, x);
  }
  void mlp(const MlpWeights& w, const float* x, int64_t rows, int64_t hidden, float* out) override {
    calls.fetch_add(1);
    rows_seen.fetch_add(rows);
    cpu_->mlp(w, x, rows, hidden, out);
  }
  void grouped_mlp(const float* x, int64_t x_rows, int64_t hidden, std::span<const ExpertRows> experts) override {
    grouped_calls.fetch_add(1);
    ComputeBackend::grouped_mlp(x, x_rows, hidden, experts);
  }
  int useful_concurrency() const override { return concurrency; }
  void release(const Weight& w) override {
    std::lock_guard<std::mutex> lk(mu);
    released.push_back(w.name);
  }
  std::atomic<int> calls{0}, grouped_calls{0};
  std::mutex mu;
  std::vector<std::string> released;
  std::atomic<int64_t> rows_seen{0};
  int concurrency = std::numeric_limits<int>::max();

 private:
  std::shared_ptr<ComputeBackend> cpu_ = cpu_backend();
};

}  // namespace

// Live re-placement: assign() maps what is new and drops the rest; a batch that still holds a
// dropped expert's weights keeps them mapped until it lets go, and only then does the backend
// forget its copy (so a later tensor at the same address is not taken for it).
TEST_F(BatchedCompute, AssignAddsAndDropsExpertsLive) {
  auto ckpt = Checkpoint::open(model_.path());
  auto backend = std::make_shared<CountingBackend>();
  HostedExperts hosted(ckpt, parse_expert_spec("0:1-2", ckpt->config()), backend);
  const uint64_t one_expert = hosted.mapped_bytes() / 2;
  std::shared_ptr<const MlpWeights> in_use = hosted.mlp(0, 1);  // as a running batch holds it
  ASSERT_NE(in_use, nullptr);
  std::vector<float> before(size_t(hosted.hidden())), after(size_t(hosted.hidden()));
  std::vector<float> x(size_t(hosted.hidden()), 0.5f);
  mlp_forward(*in_use, x.data(), 1, hosted.hidden(), before.data());

  hosted.assign(parse_expert_spec("0:2,1:0-1", ckpt->config()));
  EXPECT_FALSE(hosted.holds(0, 1));
  EXPECT_TRUE(hosted.holds(1, 1));
  EXPECT_EQ(hosted.mlp(0, 1), nullptr);
  EXPECT_EQ(hosted.experts(), parse_expert_spec("0:2,1:0-1", ckpt->config()));
  // 0:1 is still in use: four experts' tensors mapped, nothing released yet.
  EXPECT_EQ(hosted.mapped_bytes(), 4 * one_expert);
  EXPECT_TRUE(backend->released.empty());
  mlp_forward(*in_use, x.data(), 1, hosted.hidden(), after.data());
  EXPECT_EQ(before, after);
  in_use.reset();  // the batch finished
  EXPECT_EQ(hosted.mapped_bytes(), hosted.expected_bytes());
  EXPECT_EQ(hosted.mapped_bytes(), 3 * one_expert);
  EXPECT_EQ(backend->released.size(), 3u);  // gate, up and down of 0:1

  // A bad set changes nothing; an expert dropped and assigned again is mapped again.
  EXPECT_THROW(hosted.assign({{0, 99}}), Error);
  EXPECT_EQ(hosted.experts().size(), 3u);
  hosted.assign(parse_expert_spec("0:1", ckpt->config()));
  EXPECT_EQ(hosted.mapped_bytes(), one_expert);
  mlp_forward(*hosted.mlp(0, 1), x.data(), 1, hosted.hidden(), after.data());
  EXPECT_EQ(before, after);

  // A batch for an expert dropped after it was accepted fails as unknown_expert (a replica
  // answers it instead).
  ComputePool pool(1);
  auto job = std::make_shared<BatchJob>();
  job->layer = 1;
  job->requests.push_back(req("p", 1, {{0, 1}}, hosted.hidden()));
  std::promise<BatchJobPtr> done;
  run_batch(hosted, pool, job, [&](BatchJobPtr j) { done.set_value(std::move(j)); });
  EXPECT_EQ(done.get_future().get()->error_code, dispatch::kUnknownExpert);
}

// A backend that serialises its calls (CUDA) gets the whole batch in one grouped call; one that
// computes on the caller's thread (CPU) gets one call per expert, run in parallel on the pool.
TEST_F(BatchedCompute, ExpertsComputeOnTheHostsBackend) {
  for (const int concurrency : {std::numeric_limits<int>::max(), 1}) {
    auto ckpt = Checkpoint::open(model_.path());
    const int64_t hidden = ckpt->config().hidden_size;
    auto backend = std::make_shared<CountingBackend>();
    backend->concurrency = concurrency;
    HostedExperts hosted(ckpt, all_experts(ckpt->config()), backend);
    HostedExperts reference(ckpt, all_experts(ckpt->config()));  // the default: the CPU backend
    ComputePool pool(2);
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto make_job = [&] {
      auto job = std::make_shared<BatchJob>();
      job->layer = 0;
      job->requests.push_back(req("a", 1, {{1, 2}, {3, 1}}, hidden));
      job->requests.push_back(req("b", 2, {{3, 4}}, hidden));
      return job;
    };
    auto job = make_job(), ref_job = make_job();
    for (size_t i = 0; i < job->requests.size(); ++i) {
      for (float& x : job->requests[i].rows) x = nd(rng);
      ref_job->requests[i].rows = job->requests[i].rows;
    }
    auto run = [&](const HostedExperts& h, BatchJobPtr j) {
      std::promise<BatchJobPtr> done;
      run_batch(h, pool, std::move(j), [&](BatchJobPtr r) { done.set_value(std::move(r)); });
      return done.get_future().get();
    };
    BatchJobPtr out = run(hosted, job), ref = run(reference, ref_job);
    ASSERT_TRUE(out->error.empty()) << out->error;
    EXPECT_EQ(backend->calls.load(), 2) << "one backend MLP per distinct expert (1 and 3)";
    EXPECT_EQ(backend->rows_seen.load(), 7);
    EXPECT_EQ(out->outputs, ref->outputs) << "the CPU backend is the reference: the same numbers";
    EXPECT_EQ(backend->grouped_calls.load(), concurrency == 1 ? 1 : 2) << "concurrency " << concurrency;
    EXPECT_EQ(&reference.backend(), cpu_backend().get());
  }
}

// close() finishes what was queued before it (the step in flight at shutdown) and refuses what
// comes after; closing again, or destroying the closed pool, is harmless.
TEST(ComputePoolClose, RunsWhatIsQueuedThenRefuses) {
  ComputePool pool(1);
  std::promise<void> release;
  std::shared_future<void> go = release.get_future().share();
  std::atomic<int> ran{0};
  ASSERT_TRUE(pool.submit([go, &ran] {
    go.wait();  // holds the one thread, so the next tasks queue behind it
    ++ran;
  }));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(pool.submit([&ran] { ++ran; }));
  std::thread closer([&pool] { pool.close(); });
  release.set_value();
  closer.join();
  EXPECT_EQ(ran.load(), 4);
  EXPECT_FALSE(pool.submit([&ran] { ++ran; }));
  pool.close();
  EXPECT_EQ(ran.load(), 4);
}
