#include "actors/local_cluster.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "actors/cluster_status.h"
#include "core/error.h"

extern char** environ;

namespace moemesh::actors {
namespace fs = std::filesystem;

int pick_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    if (fd >= 0) ::close(fd);
    throw Error("cannot find a free TCP port");
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

LocalCluster::LocalCluster(LocalClusterOptions opts) : opts_(std::move(opts)) {
  if (opts_.attention < 1) throw Error("--attention must be at least 1");
  if (opts_.experts < 1) throw Error("--experts must be at least 1");
  if (opts_.replicas < 1 || opts_.replicas > opts_.experts)
    throw Error("--replicas must be between 1 and the number of expert hosts (" + std::to_string(opts_.experts) + ")");
  if (opts_.cores <= 0) opts_.cores = int(std::max(1u, std::thread::hardware_concurrency()));
  if (opts_.bin_dir.empty()) opts_.bin_dir = fs::read_symlink("/proc/self/exe").parent_path();
  if (opts_.log_dir.empty()) {
    std::string tmpl = (fs::temp_directory_path() / "moemesh-up-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw Error("cannot create a log folder in " + fs::temp_directory_path().string());
    opts_.log_dir = tmpl;
  }
  fs::create_directories(opts_.log_dir);
}

LocalCluster::~LocalCluster() { stop(); }

std::string service_binary(const fs::path& bin_dir, const std::string& service) {
  const std::string name = "moemesh-" + service;
  for (const fs::path& p : {bin_dir / name, bin_dir / ".." / service / name})  // installed / build tree
    if (fs::exists(p)) return fs::canonical(p).string();
  throw Error("cannot find " + name + " next to " + bin_dir.string() + " (build it, or pass --bin-dir)");
}

std::string LocalCluster::binary(const std::string& service) const { return service_binary(opts_.bin_dir, service); }

std::string LocalCluster::api_url() const { return fmt::format("http://{}:{}/v1", opts_.host, opts_.port); }
std::string LocalCluster::control_endpoint() const {
  return fmt::format("tcp://{}:{}", opts_.host, opts_.control_port);
}

void LocalCluster::spawn(const std::string& name, const std::string& bin, std::vector<std::string> args,
                         int admin_port) {
  Proc p;
  p.name = name;
  p.log = opts_.log_dir / (name + ".log");
  p.admin = fmt::format("{}:{}", opts_.host, admin_port);
  args.insert(args.begin(), bin);
  for (const std::string& a : {std::string("--instance"), name, std::string("--admin-port"), std::to_string(admin_port),
                               std::string("--log-level"), opts_.log_level})
    args.push_back(a);
  p.argv = std::move(args);
  launch(p, /*append_log=*/false);
  procs_.push_back(std::move(p));
}

pid_t spawn_service(std::vector<std::string> args, const fs::path& log, bool append_log,
                    const std::vector<std::string>& env) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_store;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "MOEMESH_RESTART_COUNT=", 22) != 0 && std::strncmp(*e, "MOEMESH_PARENT_PID=", 19) != 0)
      env_store.emplace_back(*e);
  env_store.insert(env_store.end(), env.begin(), env.end());
  // The child stops when we die, even by SIGKILL (actors/service_runtime.cpp).
  env_store.push_back("MOEMESH_PARENT_PID=" + std::to_string(::getpid()));
  std::vector<char*> envp;
  for (auto& e : env_store) envp.push_back(e.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log.c_str(),
                                   O_WRONLY | O_CREAT | (append_log ? O_APPEND : O_TRUNC), 0644);
  posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);  // `moemesh up` blocks SIGINT/SIGTERM; the children must not
  posix_spawnattr_setpgroup(&attr, 0);       // Ctrl-C reaches the parent only; it stops them in order
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0].c_str(), &fa, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) throw Error("cannot start " + args[0] + ": " + std::strerror(rc));
  return pid;
}

void LocalCluster::launch(Proc& p, bool append_log) {
  p.pid = -1;
  // How often this instance was restarted, told to the coordinator.
  p.pid = spawn_service(p.argv, p.log, append_log, {"MOEMESH_RESTART_COUNT=" + std::to_string(p.restarts)});
  p.started = std::chrono::steady_clock::now();
  spdlog::debug("up: started {} (pid {}), log {}", p.name, p.pid, p.log.string());
}

std::string LocalCluster::log_tail(const Proc& p) const {
  std::ifstream in(p.log);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  std::string out;
  for (size_t i = lines.size() > 5 ? lines.size() - 5 : 0; i < lines.size(); ++i) out += "\n    " + lines[i];
  return out;
}

void LocalCluster::check_alive() {
  for (auto& p : procs_) {
    if (p.pid < 0) continue;
    int status = 0;
    if (::waitpid(p.pid, &status, WNOHANG) == p.pid) {
      p.pid = -1;
      throw Error(fmt::format("{} exited during start-up (status {}); its log {}:{}", p.name, status, p.log.string(),
                              log_tail(p)));
    }
  }
}

void LocalCluster::start() {
  const std::string model = fs::absolute(opts_.model).string();
  const std::string control = control_endpoint();
  const std::string placement = fmt::format("tcp://{}:{}", opts_.host, opts_.control_port + 1);
  // Cores: the compute goes to attention workers and expert hosts; router and KV store are light.
  // A token's attention and its experts take turns (the worker waits for the expert round trip)
  // and an idle kernel pool sleeps, so every compute process may use every core: measured
  // faster than splitting the cores, at batch 1 and under load (docs/performance.md).
  const int attention_threads = opts_.cores, expert_threads = opts_.cores;

  std::vector<std::string> kv_endpoint;
  if (opts_.kvstore) {
    const std::string ep = fmt::format("tcp://{}:{}", opts_.host, pick_free_port());
    spawn("kvstore-0", binary("kvstore"), {"--listen", ep, "--router", control, "--threads", "1"}, pick_free_port());
    kv_endpoint = {"--kvstore", ep};
  }
  std::vector<std::string> router{"--model",        model,
                                  "--port",         std::to_string(opts_.port),
                                  "--http-address", opts_.host,
                                  "--control",      control,
                                  "--placement",    placement,
                                  "--expert-hosts", std::to_string(opts_.experts),
                                  "--replicas",     std::to_string(opts_.replicas),
                                  "--threads",      "1"};
  router.insert(router.end(), opts_.router_args.begin(), opts_.router_args.end());
  spawn("router", binary("router"), router, opts_.admin_port);
  // The n-th compute process's --device: attention workers take the first GPUs.
  auto device = [this](int n) {
    return opts_.device == "cpu" ? std::string("cpu") : fmt::format("cuda:{}", n % opts_.gpus);
  };
  for (int i = 0; i < opts_.experts; ++i)
    spawn(fmt::format("expert-{}", i), binary("expert"),
          {"--model", model, "--listen", fmt::format("tcp://{}:{}", opts_.host, pick_free_port()), "--router", control,
           "--compute-threads", std::to_string(expert_threads), "--threads", "1", "--device",
           device(opts_.attention + i)},
          pick_free_port());
  for (int i = 0; i < opts_.attention; ++i) {
    std::vector<std::string> a{"--model",           model,
                               "--listen",          fmt::format("tcp://{}:{}", opts_.host, pick_free_port()),
                               "--router",          control,
                               "--placement",       placement,
                               "--threads",         "1",
                               "--device",          device(i),
                               "--compute-threads", std::to_string(attention_threads)};
    a.insert(a.end(), kv_endpoint.begin(), kv_endpoint.end());
    a.insert(a.end(), opts_.attention_args.begin(), opts_.attention_args.end());
    spawn(fmt::format("attention-{}", i), binary("attention"), a, pick_free_port());
  }

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(opts_.startup_timeout_s);
  std::string waiting_for = "the coordinator";
  while (std::chrono::steady_clock::now() < deadline) {
    check_alive();
    if (auto st = query_cluster_status(control, std::chrono::milliseconds(500))) {
      int ready_workers = 0, experts = 0;
      for (const auto& s : st->services()) {
        ready_workers += s.role() == pb::ATTENTION && s.ready();
        experts += s.role() == pb::EXPERT;
      }
      if (st->ready() && ready_workers == opts_.attention && experts == opts_.experts) return;
      waiting_for = fmt::format("{}/{} attention workers ready, {}/{} expert hosts registered", ready_workers,
                                opts_.attention, experts, opts_.experts);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  throw Error(fmt::format("the cluster was not ready after {} s (waiting for {}); logs in {}", opts_.startup_timeout_s,
                          waiting_for, opts_.log_dir.string()));
}

std::string LocalCluster::summary() const {
  std::string s = fmt::format("moemesh cluster ready: {} attention worker(s), {} expert host(s) x{} replica(s){}\n",
                              opts_.attention, opts_.experts, opts_.replicas, opts_.kvstore ? ", KV store" : "");
  s += fmt::format("  OpenAI API     {}   (curl {}/completions -d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}')\n",
                   api_url(), api_url());
  s += fmt::format("  coordinator    {}   (moemesh status --router {})\n", control_endpoint(), control_endpoint());
  for (const auto& p : procs_) s += fmt::format("  {:<14} pid {:<7} http://{}/metrics\n", p.name, p.pid, p.admin);
  s += fmt::format("  logs           {}\n", opts_.log_dir.string());
  return s;
}

int LocalCluster::run_until_signal(SignalWaiter& signals) {
  using Clock = std::chrono::steady_clock;
  constexpr auto kMaxBackoff = std::chrono::seconds(30), kHealthyRun = std::chrono::seconds(60);
  while (true) {
    if (signals.wait(std::chrono::milliseconds(100)) != 0) return 0;
    const auto now = Clock::now();
    for (auto& p : procs_) {
      if (p.pid < 0) {  // exited earlier: start it again when its backoff is over
        if (opts_.restart && p.restart_at != Clock::time_point{} && now >= p.restart_at) {
          ++p.restarts;
          p.restart_at = {};
          try {
            launch(p, /*append_log=*/true);
            spdlog::warn("up: restarted {} (pid {}, restart #{})", p.name, p.pid, p.restarts);
          } catch (const Error& e) {
            spdlog::error("up: {}; trying again in {} s", e.what(), p.backoff.count());
            p.restart_at = now + p.backoff;
          }
        }
        continue;
      }
      int status = 0;
      if (::waitpid(p.pid, &status, WNOHANG) != p.pid) continue;
      p.pid = -1;
      const std::string how = WIFSIGNALED(status) ? fmt::format("killed by signal {}", WTERMSIG(status))
                                                  : fmt::format("exit status {}", WEXITSTATUS(status));
      if (!opts_.restart) {
        spdlog::error("up: {} exited ({}); its log {}:{}", p.name, how, p.log.string(), log_tail(p));
        if (p.name == "router") return 1;
        continue;
      }
      // Kubernetes' CrashLoopBackOff: the wait doubles while it keeps dying, and starts over once
      // it has run for a while.
      if (now - p.started >= kHealthyRun) p.backoff = std::chrono::seconds(1);
      p.restart_at = now + p.backoff;
      spdlog::error("up: {} exited ({}); restarting it in {} s (restart #{}); its log {}:{}", p.name, how,
                    p.backoff.count(), p.restarts + 1, p.log.string(), log_tail(p));
      p.backoff = std::min<std::chrono::seconds>(p.backoff * 2, kMaxBackoff);
    }
  }
}

int LocalCluster::restarts() const {
  int n = 0;
  for (const auto& p : procs_) n += p.restarts;
  return n;
}

void LocalCluster::stop() {
  // The router first: it drains (accepted requests finish on the workers), then the rest.
  auto stop_all = [this](bool router, std::chrono::seconds grace) {
    std::vector<Proc*> group;
    for (auto& p : procs_)
      if (p.pid > 0 && (p.name == "router") == router) group.push_back(&p);
    for (Proc* p : group) ::kill(p->pid, SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + grace;
    for (Proc* p : group) {
      while (p->pid > 0) {
        int status = 0;
        pid_t r = ::waitpid(p->pid, &status, WNOHANG);
        if (r == p->pid || r < 0) {
          p->pid = -1;
          break;
        }
        if (std::chrono::steady_clock::now() > deadline) {
          spdlog::warn("up: {} did not stop in time, killing it", p->name);
          ::kill(p->pid, SIGKILL);
          ::waitpid(p->pid, &status, 0);
          p->pid = -1;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
  };
  stop_all(true, std::chrono::seconds(40));
  stop_all(false, std::chrono::seconds(10));
}

}  // namespace moemesh::actors
