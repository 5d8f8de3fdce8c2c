#include "actors/expert_compute.h"

#include <map>

#include "core/error.h"

namespace moemesh::actors {

ComputePool::ComputePool(int threads) {
  if (threads < 1) throw Error("--compute-threads must be at least 1");
  for (int i = 0; i < threads; ++i)
    threads_.emplace_back([this] {
      for (;;) {
        std::function<void()> task;
        {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [this] { return stop_ || !tasks_.empty(); });
          if (tasks_.empty()) return;  // stop_ and nothing left
          task = std::move(tasks_.front());
          tasks_.pop_front();
        }
        task();
      }
    });
}

ComputePool::~ComputePool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ComputePool::submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    tasks_.push_back(std::move(task));
  }
  cv_.notify_one();
}

HostedExperts::HostedExperts(std::shared_ptr<Checkpoint> ckpt, ExpertSet experts,
                             std::shared_ptr<ComputeBackend> backend)
    : ckpt_(std::move(ckpt)), experts_(std::move(experts)), backend_(std::move(backend)) {
  if (!backend_) throw Error("expert host: no compute backend");
  std::set<std::pair<int64_t, int64_t>> sel(experts_.begin(), experts_.end());
  weights_ = ckpt_->load(WeightSelection::only_experts(std::move(sel)));
}

const MlpWeights& HostedExperts::mlp(int32_t layer, int32_t expert) const {
  const auto& e = weights_.layers.at(size_t(layer)).experts.at(size_t(expert));
  if (!e) throw Error("expert " + std::to_string(expert) + " of layer " + std::to_string(layer) + " is not held here");
  return *e;
}

uint64_t HostedExperts::expected_bytes() const {
  uint64_t n = 0;
  for (const auto& [l, e] : experts_)
    for (const char* which : {"gate", "up", "down"}) n += ckpt_->info(Checkpoint::expert_tensor(config(), l, e, which)).nbytes;
  return n;
}

namespace {

// Where one request's rows for an expert sit: rows [offset, offset + count) of request `req`.
struct Slice {
  size_t req;
  int64_t offset, count;
};

void compute_expert(const HostedExperts& experts, BatchJob& job, int32_t expert, const std::vector<Slice>& slices) {
  const int64_t hidden = experts.hidden();
  int64_t total = 0;
  for (const Slice& s : slices) total += s.count;
  std::vector<float> x(size_t(total * hidden)), y(size_t(total * hidden));
  int64_t at = 0;
  for (const Slice& s : slices) {
    const auto& rows = job.requests[s.req].rows;
    std::copy_n(rows.begin() + s.offset * hidden, s.count * hidden, x.begin() + at * hidden);
    at += s.count;
  }
  experts.backend().mlp(experts.mlp(job.layer, expert), x.data(), total, hidden, y.data());
  at = 0;
  for (const Slice& s : slices) {  // experts write disjoint ranges of the outputs
    std::copy_n(y.begin() + at * hidden, s.count * hidden, job.outputs[s.req].begin() + s.offset * hidden);
    at += s.count;
  }
}

}  // namespace

void run_batch(const HostedExperts& experts, ComputePool& pool, BatchJobPtr job, std::function<void(BatchJobPtr)> done) {
  const int64_t hidden = experts.hidden();
  std::map<int32_t, std::vector<Slice>> per_expert;  // ordered by expert id
  job->outputs.resize(job->requests.size());
  for (size_t r = 0; r < job->requests.size(); ++r) {
    const PendingRequest& req = job->requests[r];
    int64_t offset = 0;
    for (const auto& g : req.groups) {
      per_expert[g.expert].push_back({r, offset, g.rows});
      offset += g.rows;
    }
    job->outputs[r].assign(size_t(offset * hidden), 0.0f);
  }
  job->experts = int(per_expert.size());
  job->started = std::chrono::steady_clock::now();
  if (per_expert.empty()) {
    job->finished = job->started;
    done(job);
    return;
  }
  job->remaining = int(per_expert.size());
  auto shared_done = std::make_shared<std::function<void(BatchJobPtr)>>(std::move(done));
  for (auto& [expert, slices] : per_expert)
    pool.submit([&experts, job, expert = expert, slices = std::move(slices), shared_done] {
      try {
        compute_expert(experts, *job, expert, slices);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(job->error_mu);
        job->error = "expert " + std::to_string(expert) + " of layer " + std::to_string(job->layer) + ": " + e.what();
      }
      if (job->remaining.fetch_sub(1) == 1) {
        job->finished = std::chrono::steady_clock::now();
        (*shared_done)(job);
      }
    });
}

}  // namespace moemesh::actors
