#include "kernels/cpu/thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEMESH_PAUSE() _mm_pause()
#else
#define MOEMESH_PAUSE() ((void)0)
#endif

namespace moemesh::cpu {
namespace {

// Idle workers poll this long before they sleep: longer than the gap between two kernels of a
// decode step, much shorter than the gap between steps.
constexpr auto kSpin = std::chrono::microseconds(50);

struct Section {
  void (*call)(void*, int64_t);
  void* ctx;
  int64_t n;
  std::atomic<int64_t> next{0};
  std::atomic<int> helpers{0};  // workers inside this section
};

// Claims and runs indices of s until none are left.
void work(Section& s) {
  for (int64_t i = s.next.fetch_add(1, std::memory_order_relaxed); i < s.n;
       i = s.next.fetch_add(1, std::memory_order_relaxed))
    s.call(s.ctx, i);
}

template <class Done>
void spin_then_wait(std::atomic<int>& word, int value, Done done) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (int k = 0;; ++k) {
    if (done()) return;
    MOEMESH_PAUSE();
    if ((k & 63) == 63 && std::chrono::steady_clock::now() > until) break;
  }
  while (!done()) {
    word.wait(value, std::memory_order_acquire);
    value = word.load(std::memory_order_acquire);
  }
}

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {}
  ~Pool() { stop(); }

  int threads() const { return threads_; }

  void run(int64_t n, void (*call)(void*, int64_t), void* ctx) {
    if (n <= 0) return;
    if (threads_ <= 1 || n == 1) {
      for (int64_t i = 0; i < n; ++i) call(ctx, i);
      return;
    }
    start_workers();
    Section s{call, ctx, n};
    {
      std::lock_guard lock(mu_);
      active_.push_back(&s);
    }
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) epoch_.notify_all();
    work(s);
    {
      std::lock_guard lock(mu_);
      active_.erase(std::find(active_.begin(), active_.end(), &s));
    }
    // Workers that joined may still be running the last indices.
    int h = s.helpers.load(std::memory_order_acquire);
    spin_then_wait(s.helpers, h, [&] { return s.helpers.load(std::memory_order_acquire) == 0; });
  }

 private:
  void start_workers() {
    std::call_once(started_, [this] {
      for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { loop(); });
    });
  }

  void stop() {
    stopping_.store(true);
    epoch_.fetch_add(1);
    epoch_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // A section with indices left, with this worker counted in it; null when there is none.
  Section* join_one() {
    std::lock_guard lock(mu_);
    for (Section* s : active_)
      if (s->next.load(std::memory_order_relaxed) < s->n) {
        s->helpers.fetch_add(1, std::memory_order_relaxed);
        return s;
      }
    return nullptr;
  }

  void loop() {
    int seen = epoch_.load(std::memory_order_acquire);
    while (!stopping_.load(std::memory_order_relaxed)) {
      if (Section* s = join_one()) {
        work(*s);
        if (s->helpers.fetch_sub(1, std::memory_order_acq_rel) == 1) s->helpers.notify_all();
        continue;
      }
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      spin_then_wait(epoch_, seen, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
      seen = epoch_.load(std::memory_order_acquire);
    }
  }

  const int threads_;
  std::once_flag started_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::vector<Section*> active_;
  std::atomic<int> epoch_{0};  // bumped when a section is posted
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stopping_{false};
};

int default_threads() {
  if (const char* env = std::getenv("MOEMESH_COMPUTE_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

std::mutex pool_mu;
std::shared_ptr<Pool>& pool_slot() {
  static std::shared_ptr<Pool> pool = std::make_shared<Pool>(default_threads());
  return pool;
}

std::shared_ptr<Pool> pool() {
  std::lock_guard lock(pool_mu);
  return pool_slot();
}

}  // namespace

int compute_threads() { return pool()->threads(); }

void set_compute_threads(int n) {
  if (n < 1) throw Error("compute threads must be at least 1 (got " + std::to_string(n) + ")");
  std::shared_ptr<Pool> old;
  {
    std::lock_guard lock(pool_mu);
    if (pool_slot()->threads() == n) return;
    old = std::exchange(pool_slot(), std::make_shared<Pool>(n));
  }
}  // the old pool's workers are joined here, once no section holds it

namespace detail {
void run_section(int64_t n, void (*call)(void*, int64_t), void* ctx) { pool()->run(n, call, ctx); }
}  // namespace detail

}  // namespace moemesh::cpu
