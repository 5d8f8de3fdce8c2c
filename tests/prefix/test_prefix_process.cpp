// The prefix cache and the micro-batches in a real cluster on loopback: moemesh-router,
// two moemesh-expert hosts, one moemesh-attention worker and one moemesh-kvstore.
//
//   - A 100-token prompt sent twice (the second after the first finished and its blocks reached
//     the store): the second restores 96 tokens from the store, computes under 16 prompt tokens,
//     and gives the same greedy tokens and logits (1e-5). The router cuts the prompt into chunks,
//     so whole chunks are skipped too.
//   - Several requests at once (steps of several sequences, run as two micro-batches) give what
//     each gave alone.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/support/http_client.h"
#include "tests/support/temp_dir.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;
namespace fs = std::filesystem;
namespace bhttp = boost::beast::http;
using json = nlohmann::json;

namespace {

using moemesh::testing::free_port;
using moemesh::testing::http_get;  // status 0 when nothing answers (yet)

// The value of an unlabelled sample in a /metrics dump (-1 when absent).
double metric(const std::string& dump, const std::string& name) {
  std::smatch m;
  if (std::regex_search(dump, m, std::regex("(^|\\n)" + name + " ([0-9.eE+-]+)"))) return std::stod(m[2].str());
  return -1;
}

// A child process; its output goes to a file, shown when a test fails.
class Proc {
 public:
  Proc(std::string name, std::vector<std::string> args, const fs::path& log) : name_(std::move(name)), log_(log) {
    pid_ = ::fork();
    if (pid_ == 0) {
      FILE* f = std::fopen(log.c_str(), "w");
      if (f) {
        ::dup2(fileno(f), 1);
        ::dup2(fileno(f), 2);
      }
      // Start with SIGTERM/SIGINT blocked, so that every thread of the child (also OpenBLAS's,
      // started before main) leaves them to ServiceRuntime's signalfd. With them unblocked,
      // wait_for_shutdown can lose a SIGTERM: poll() sees it pending on the signalfd, a pool
      // thread's handler takes it, and the blocking read() of the signalfd never returns.
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGTERM);
      sigaddset(&set, SIGINT);
      sigprocmask(SIG_BLOCK, &set, nullptr);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ~Proc() {
    if (pid_ > 0 && running()) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  bool running() {
    if (exited_) return false;
    if (::waitpid(pid_, &status_, WNOHANG) == pid_) exited_ = true;
    return !exited_;
  }
  // SIGTERM and the exit code (128 + signal when killed; -1 when it ignored SIGTERM).
  int stop(int wait_ms = 10000) {
    if (!running()) return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < wait_ms / 10 && running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (running()) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status_, 0);
      exited_ = true;
      return -1;
    }
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
  }
  std::string output() const {
    std::ifstream in(log_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  fs::path log_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int status_ = 0;
};

struct Completion {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;
  int64_t cached_tokens = -1;
};

double rel_diff(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    err += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    norm += double(want[i]) * want[i];
  }
  return got.size() == want.size() ? std::sqrt(err / std::max(norm, 1e-30)) : 1e9;
}

void expect_same(const Completion& got, const Completion& want, const std::string& what) {
  EXPECT_EQ(got.tokens, want.tokens) << what;
  ASSERT_EQ(got.logits.size(), want.logits.size()) << what;
  for (size_t i = 0; i < got.logits.size(); ++i) EXPECT_LE(rel_diff(got.logits[i], want.logits[i]), 1e-5) << what << ", token " << i;
}

class PrefixCluster : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string model = (dir_ / "tiny-moe").string();
    moemesh::testing::write_tiny_model(model, Arch::Mixtral, /*seed=*/5, /*vocab=*/128);

    // A port picked here can be taken by someone else before the child binds it: then the
    // child exits, and the cluster is started again on other ports.
    std::string why;
    for (int attempt = 0; attempt < 3; ++attempt) {
      if (start_cluster(model, why)) return;
      stop_all(/*check=*/false);
    }
    FAIL() << "cluster never became ready: " << why;
  }

  bool start_cluster(const std::string& model, std::string& why) {
    const std::string control = "tcp://127.0.0.1:" + std::to_string(free_port());
    const std::string placement = "tcp://127.0.0.1:" + std::to_string(free_port());
    const std::string kv = "tcp://127.0.0.1:" + std::to_string(free_port());
    api_ = free_port();
    router_admin_ = free_port();
    attention_admin_ = free_port();
    kv_admin_ = free_port();
    auto common = [](const std::string& instance, uint16_t admin) {
      return std::vector<std::string>{"--instance", instance, "--admin-address", "127.0.0.1", "--admin-port",
                                      std::to_string(admin), "--log-level", "info", "--threads", "2"};
    };
    auto spawn = [&](const std::string& name, std::vector<std::string> args, uint16_t admin) {
      for (auto& a : common(name, admin)) args.push_back(a);
      procs_.push_back(std::make_unique<Proc>(name, args, dir_ / (name + ".log")));
    };
    spawn("kv", {MOEMESH_KVSTORE, "--listen", kv}, kv_admin_);
    // A step budget under the prompt length: the router sends the prompt in chunks.
    spawn("router",
          {MOEMESH_ROUTER, "--model", model, "--port", std::to_string(api_), "--http-address", "127.0.0.1", "--control",
           control, "--placement", placement, "--expert-hosts", "2", "--step-token-budget", "40"},
          router_admin_);
    spawn("attention",
          {MOEMESH_ATTENTION, "--model", model, "--router", control, "--placement", placement, "--kvstore", kv,
           "--kv-blocks", "256", "--micro-batches", "2"},
          attention_admin_);
    // Expert hosts last: their ports are the kernel's choice, which might fall on one picked above.
    for (const char* name : {"expert-a", "expert-b"})
      spawn(name, {MOEMESH_EXPERT, "--model", model, "--router", control, "--listen", "tcp://127.0.0.1:*",
                   "--compute-threads", "1"},
            0);

    for (int i = 0; i < 1200; ++i) {  // a limit for a slow machine, not a timing assertion
      if (http_get(router_admin_, "/readyz").first == 200 &&
          http_get(attention_admin_, "/readyz").first == 200 &&
          http_get(kv_admin_, "/readyz").first == 200)
        return true;
      for (auto& p : procs_)
        if (!p->running()) {
          why = p->name() + " exited during startup:\n" + p->output();
          return false;
        }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    why = "timeout\n" + logs();
    return false;
  }

  void stop_all(bool check) {
    // In reverse order of start: expert hosts, attention, router, KV store.
    // Only the services under test here must exit 0 on SIGTERM; the others' shutdown has tests
    // of its own (tests/integration/test_sigterm_exits_cleanly.py) and is only reported here.
    for (auto it = procs_.rbegin(); it != procs_.rend(); ++it) {
      const bool ours = (*it)->name() == "attention" || (*it)->name() == "kv";
      const int rc = (*it)->stop(ours ? 10000 : 3000);
      if (check && ours) {
        EXPECT_EQ(rc, 0) << (*it)->name() << " exit status " << rc << "\n" << (*it)->output();
      } else if (check && rc != 0) {
        std::cout << "[   note   ] " << (*it)->name() << ": SIGTERM -> exit status " << rc << "\n";
      }
    }
    if (check && HasFailure()) std::cerr << logs();
    procs_.clear();
  }

  void TearDown() override {
    stop_all(/*check=*/true);
  }

  std::string logs() {
    std::string s;
    for (auto& p : procs_) s += "---- " + p->name() + "\n" + p->output();
    return s;
  }

  Completion complete(const std::vector<int32_t>& prompt, int max_tokens) {
    json body{{"prompt", prompt},          {"max_tokens", max_tokens},  {"temperature", 0},
              {"ignore_eos", true},        {"return_logits", true},     {"return_token_ids", true}};
    auto [status, text] = moemesh::testing::http_status_body(api_, bhttp::verb::post, "/v1/completions", body.dump());
    Completion c;
    EXPECT_EQ(status, 200u) << text;
    if (status != 200) return c;
    json r = json::parse(text);
    c.tokens = r["choices"][0]["token_ids"].get<std::vector<int32_t>>();
    c.logits = r["choices"][0]["logits"].get<std::vector<std::vector<float>>>();
    c.cached_tokens = r["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>();
    return c;
  }

  std::string attention_metrics() { return http_get(attention_admin_, "/metrics").second; }
  std::string kv_metrics() { return http_get(kv_admin_, "/metrics").second; }

  const moemesh::testing::TempDir dir_{"moemesh-prefix-proc"};  // the model and the processes' logs
  uint16_t api_ = 0, router_admin_ = 0, attention_admin_ = 0, kv_admin_ = 0;
  std::vector<std::unique_ptr<Proc>> procs_;
};

std::vector<int32_t> random_prompt(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(3, 127);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

}  // namespace

TEST_F(PrefixCluster, ASecondRunOfALongPromptSkipsItsPrefill) {
  const auto prompt = random_prompt(100, 1);
  const Completion first = complete(prompt, 8);
  ASSERT_EQ(first.tokens.size(), 8u);
  ASSERT_EQ(first.logits.size(), 8u);
  const std::string m1 = attention_metrics();
  EXPECT_EQ(metric(m1, "moemesh_attention_prefix_cache_query_tokens_total"), 100);
  EXPECT_EQ(metric(m1, "moemesh_attention_prefix_cache_hit_tokens_total"), 0);
  const double computed1 = metric(m1, "moemesh_attention_prefill_tokens_computed_total");
  EXPECT_EQ(computed1, 100);

  // The router frees the sequence after answering; its 6 full blocks (107 positions) then reach
  // the store. Wait for them (bounded) before asking again.
  bool stored = false;
  for (int i = 0; i < 400 && !stored; ++i) {
    stored = metric(kv_metrics(), R"(moemesh_kvstore_blocks\{tier="memory"\})") >= 6;
    if (!stored) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_TRUE(stored) << kv_metrics();

  const Completion second = complete(prompt, 8);
  expect_same(second, first, "second run");
  const std::string m2 = attention_metrics();
  const double hits = metric(m2, "moemesh_attention_prefix_cache_hit_tokens_total");
  const double computed2 = metric(m2, "moemesh_attention_prefill_tokens_computed_total");
  EXPECT_GE(hits, 96);
  EXPECT_LT(computed2 - computed1, 16);
  EXPECT_EQ(metric(m2, "moemesh_attention_prefill_tokens_skipped_total"), 96);
  EXPECT_EQ(metric(m2, "moemesh_attention_prefix_cache_query_tokens_total"), 200);
  std::cout << "[ measured ] second run: prefix hit tokens " << hits << ", prefill computed " << computed2 - computed1
            << " (first run " << computed1 << "), usage.cached_tokens " << second.cached_tokens << "\n";
}

TEST_F(PrefixCluster, ConcurrentRequestsInTwoMicroBatchesMatchRequestsAlone) {
  // Prompts of at most one block are never looked up: this is about micro-batches alone.
  std::vector<std::vector<int32_t>> prompts;
  for (uint64_t i = 0; i < 4; ++i) prompts.push_back(random_prompt(6 + 3 * i, 10 + i));
  std::vector<Completion> alone;
  for (const auto& p : prompts) alone.push_back(complete(p, 16));
  const double steps_before = metric(attention_metrics(), "moemesh_attention_microbatch_step_seconds_total");

  std::vector<std::future<Completion>> together;
  for (const auto& p : prompts) together.push_back(std::async(std::launch::async, [&, p] { return complete(p, 16); }));
  for (size_t i = 0; i < prompts.size(); ++i) expect_same(together[i].get(), alone[i], "request " + std::to_string(i));

  const std::string m = attention_metrics();
  std::cout << "[ measured ] micro-batched step seconds " << metric(m, "moemesh_attention_microbatch_step_seconds_total") - steps_before
            << ", overlap seconds " << metric(m, "moemesh_attention_microbatch_overlap_seconds_total")
            << ", latest overlap ratio " << metric(m, "moemesh_attention_microbatch_overlap_ratio") << "\n";
  EXPECT_GE(metric(m, "moemesh_attention_microbatch_overlap_ratio"), 0);
  EXPECT_LE(metric(m, "moemesh_attention_microbatch_overlap_ratio"), 1);
}
