#include "actors/expert_compute.h"

#include <algorithm>
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

ComputePool::~ComputePool() { close(); }

void ComputePool::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  std::lock_guard<std::mutex> lk(join_mu_);
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

bool ComputePool::submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) return false;
    tasks_.push_back(std::move(task));
  }
  cv_.notify_one();
  return true;
}

HostedExperts::HostedExperts(std::shared_ptr<Checkpoint> ckpt, ExpertSet experts,
                             std::shared_ptr<ComputeBackend> backend, uint64_t lora_cache_bytes)
    : ckpt_(std::move(ckpt)),
      backend_(std::move(backend)),
      lora_(std::make_unique<LoraCache>(ckpt_->config(), lora_cache_bytes, lora_dtype_for(*ckpt_))) {
  if (!backend_) throw Error("expert host: no compute backend");
  experts_ = load(experts);
}

HostedExperts::~HostedExperts() {
  std::map<ExpertKey, std::shared_ptr<const MlpWeights>> gone;
  {
    std::lock_guard<std::mutex> lk(mu_);
    gone.swap(experts_);
  }
}

ExpertSet HostedExperts::experts() const {
  std::lock_guard<std::mutex> lk(mu_);
  ExpertSet out;
  for (const auto& [key, w] : experts_) out.insert(key);
  return out;
}

bool HostedExperts::holds(int32_t layer, int32_t expert) const {
  std::lock_guard<std::mutex> lk(mu_);
  return experts_.count({layer, expert}) > 0;
}

std::shared_ptr<const LoraAdapter> HostedExperts::adapter(const LoraRef& ref) const {
  const ExpertSet held = experts();
  return lora_->get(ref, WeightSelection::only_experts({held.begin(), held.end()}));
}

std::shared_ptr<const MlpWeights> HostedExperts::mlp(int32_t layer, int32_t expert) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = experts_.find({layer, expert});
  return it == experts_.end() ? nullptr : it->second;
}

uint64_t HostedExperts::expected_bytes() const {
  uint64_t n = 0;
  for (const auto& [l, e] : experts())
    for (const char* which : {"gate", "up", "down"})
      n += ckpt_->linear_bytes(Checkpoint::expert_tensor(config(), l, e, which));
  return n;
}

std::map<ExpertKey, std::shared_ptr<const MlpWeights>> HostedExperts::load(const ExpertSet& keys) {
  std::set<std::pair<int64_t, int64_t>> sel(keys.begin(), keys.end());
  ModelWeights w = ckpt_->load(WeightSelection::only_experts(std::move(sel)));
  std::map<ExpertKey, std::shared_ptr<const MlpWeights>> out;
  for (const ExpertKey& key : keys) {
    auto& slot = w.layers.at(size_t(key.first)).experts.at(size_t(key.second));
    // The deleter runs when neither the set nor a running batch holds the expert any more.
    out[key] = std::shared_ptr<const MlpWeights>(new MlpWeights(std::move(*slot)), [this, key](const MlpWeights* p) {
      release(key, *p);
      delete p;
    });
  }
  return out;
}

void HostedExperts::release(ExpertKey key, const MlpWeights& w) {
  std::lock_guard<std::mutex> load_lk(load_mu_);
  {
    // Assigned again meanwhile: the new weights share the checkpoint's mapping, keep it.
    std::lock_guard<std::mutex> lk(mu_);
    if (experts_.count(key)) return;
  }
  for (const Weight* part : {&w.gate, &w.up, &w.down}) backend_->release(*part);
  for (const char* which : {"gate", "up", "down"})
    ckpt_->release_linear(Checkpoint::expert_tensor(config(), key.first, key.second, which));
}

void HostedExperts::assign(const ExpertSet& want) {
  std::map<ExpertKey, std::shared_ptr<const MlpWeights>> dropped;
  {
    std::unique_lock<std::mutex> load_lk(load_mu_);
    ExpertSet missing;
    for (const ExpertKey& key : want)
      if (!holds(key.first, key.second)) missing.insert(key);
    auto added = load(missing);  // throws before anything changed
    std::lock_guard<std::mutex> lk(mu_);
    experts_.merge(added);
    for (auto it = experts_.begin(); it != experts_.end();)
      if (!want.count(it->first)) {
        dropped.insert(*it);
        it = experts_.erase(it);
      } else {
        ++it;
      }
  }
  // `dropped` goes here, outside the locks: experts no batch uses any more are released now.
}

namespace {

// An expert dropped (live re-placement) between accepting a request and computing it: the
// request is answered unknown_expert, and the worker sends it to a replica.
struct ExpertDropped : Error {
  using Error::Error;
};

// Where one request's rows for an expert sit: rows [offset, offset + count) of request `req`.
struct Slice {
  size_t req;
  int64_t offset, count;
};
struct ExpertSlices {
  int32_t expert;
  std::vector<Slice> slices;
};

// The batch's rows, request after request, and where each request starts in them.
struct BatchRows {
  std::vector<float> x;
  std::vector<int64_t> first_row;  // per request
  int64_t rows = 0;
  // Per row: its LoRA adapter (null: none); empty when no row has one.
  std::vector<std::shared_ptr<const LoraAdapter>> adapter;
};

// One backend call for some experts of the batch: each expert over its rows of every request,
// results split back into the requests' outputs (experts write disjoint ranges of them).
void compute_experts(const HostedExperts& hosted, BatchJob& job, const BatchRows& batch,
                     const std::vector<ExpertSlices>& part) {
  const int64_t hidden = hosted.hidden();
  std::vector<std::vector<int32_t>> rows(part.size());
  std::vector<std::vector<float>> results(part.size());
  std::vector<std::vector<const MlpLora*>> lora(part.size());
  std::vector<ExpertRows> calls;
  std::vector<std::shared_ptr<const MlpWeights>> weights;  // held until the call is done
  for (size_t i = 0; i < part.size(); ++i) {
    for (const Slice& s : part[i].slices)
      for (int64_t j = 0; j < s.count; ++j) rows[i].push_back(int32_t(batch.first_row[s.req] + s.offset + j));
    results[i].resize(rows[i].size() * size_t(hidden));
    weights.push_back(hosted.mlp(job.layer, part[i].expert));
    if (!weights.back()) throw ExpertDropped("dropped by a re-placement since the request was accepted");
    if (!batch.adapter.empty())
      for (int32_t r : rows[i]) {
        const LoraAdapter* a = batch.adapter[size_t(r)].get();
        const MlpLora* m = a ? &a->layer(job.layer).experts.at(size_t(part[i].expert)) : nullptr;
        lora[i].push_back(m && !m->empty() ? m : nullptr);
      }
    calls.push_back({weights.back().get(), rows[i], results[i].data(), lora[i]});
  }
  hosted.backend().grouped_mlp(batch.x.data(), batch.rows, hidden, calls);
  for (size_t i = 0; i < part.size(); ++i) {
    int64_t at = 0;
    for (const Slice& s : part[i].slices) {
      std::copy_n(results[i].begin() + at * hidden, s.count * hidden, job.outputs[s.req].begin() + s.offset * hidden);
      at += s.count;
    }
  }
}

// Appends the adapters of req's rows to batch.adapter (resolved through the host's LoRA cache);
// keeps it empty while no row has one.
void add_adapters(const HostedExperts& hosted, const PendingRequest& req, BatchRows& batch) {
  bool any = false;
  for (const auto& g : req.groups)
    for (int32_t a : g.adapter) any = any || a > 0;
  if (!any && batch.adapter.empty()) return;
  batch.adapter.resize(size_t(batch.rows));  // the rows before this request: none
  std::vector<std::shared_ptr<const LoraAdapter>> resolved;
  for (const LoraRef& ref : req.adapters) resolved.push_back(any ? hosted.adapter(ref) : nullptr);
  for (const auto& g : req.groups)
    for (int32_t i = 0; i < g.rows; ++i) {
      const int32_t a = g.adapter.empty() ? 0 : g.adapter[size_t(i)];
      batch.adapter.push_back(a > 0 ? resolved[size_t(a - 1)] : nullptr);
    }
}

}  // namespace

void run_batch(const HostedExperts& experts, ComputePool& pool, BatchJobPtr job,
               std::function<void(BatchJobPtr)> done) {
  const int64_t hidden = experts.hidden();
  std::map<int32_t, std::vector<Slice>> per_expert;  // ordered by expert id
  auto batch = std::make_shared<BatchRows>();
  job->outputs.resize(job->requests.size());
  for (size_t r = 0; r < job->requests.size(); ++r) {
    const PendingRequest& req = job->requests[r];
    int64_t offset = 0;
    for (const auto& g : req.groups) {
      per_expert[g.expert].push_back({r, offset, g.rows});
      offset += g.rows;
    }
    job->outputs[r].assign(size_t(offset * hidden), 0.0f);
    try {
      add_adapters(experts, req, *batch);
    } catch (const std::exception& e) {  // an adapter that does not load fails the batch, not the host
      job->error = std::string("LoRA adapter: ") + e.what();
      job->error_code = std::string(dispatch::kInternal);
      job->started = job->finished = std::chrono::steady_clock::now();
      done(job);
      return;
    }
    batch->first_row.push_back(batch->rows);
    batch->rows += offset;
    batch->x.insert(batch->x.end(), req.rows.begin(), req.rows.begin() + offset * hidden);
  }
  job->experts = int(per_expert.size());
  job->started = std::chrono::steady_clock::now();
  if (per_expert.empty()) {
    job->finished = job->started;
    done(job);
    return;
  }
  // As many backend calls as the backend can use at once (the CPU and CUDA backends: one grouped
  // call for the whole layer), experts dealt round-robin.
  const size_t calls = size_t(std::min<int64_t>(int64_t(per_expert.size()), experts.backend().useful_concurrency()));
  std::vector<std::vector<ExpertSlices>> parts(calls);
  size_t i = 0;
  for (auto& [expert, slices] : per_expert) parts[i++ % calls].push_back({expert, std::move(slices)});
  job->remaining = int(calls);
  auto shared_done = std::make_shared<std::function<void(BatchJobPtr)>>(std::move(done));
  for (auto& part : parts)
    pool.submit([&experts, job, batch, part = std::move(part), shared_done] {
      try {
        compute_experts(experts, *job, *batch, part);
      } catch (const std::exception& e) {
        const bool dropped = dynamic_cast<const ExpertDropped*>(&e) != nullptr;
        std::string which;
        for (const auto& p : part) which += (which.empty() ? "" : ", ") + std::to_string(p.expert);
        std::lock_guard<std::mutex> lk(job->error_mu);
        job->error = (part.size() == 1 ? "expert " : "experts ") + which + " of layer " + std::to_string(job->layer) +
                     ": " + e.what();
        job->error_code = std::string(dropped ? dispatch::kUnknownExpert : dispatch::kInternal);
      }
      if (job->remaining.fetch_sub(1) == 1) {
        job->finished = std::chrono::steady_clock::now();
        (*shared_done)(job);
      }
    });
}

}  // namespace moemesh::actors
