#include "actors/service_runtime.h"

#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cstdlib>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <thread>

#include <prometheus/gauge.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "core/allocator_tuning.h"
#include "core/error.h"

namespace moemesh::actors {
namespace {

std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "localhost";
  return buf;
}

}  // namespace

int default_threads() {
  int hw = int(std::thread::hardware_concurrency());
  return std::clamp(hw, 1, 4);
}

ServiceRuntime::ServiceRuntime(std::string service, int default_admin_port)
    : service_(std::move(service)), app_("moemesh-" + service_), registry_(std::make_shared<prometheus::Registry>()) {
  keep_freed_memory();
  // SIGTERM/SIGINT shut down, SIGHUP reloads (on_reload): blocked before any thread of ours starts.
  signals_ = std::make_unique<SignalWaiter>(std::initializer_list<int>{SIGTERM, SIGINT, SIGHUP});
  // Started by `moemesh up` (actors/local_cluster.cpp): shut down when it dies, however it dies,
  // rather than live on as an orphan holding its ports. SIGTERM arrives through signals_.
  if (const char* parent = std::getenv("MOEMESH_PARENT_PID")) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (std::to_string(getppid()) != parent) kill(getpid(), SIGTERM);  // it died before the prctl
  }
  signal(SIGPIPE, SIG_IGN);  // a peer that hangs up must not kill the process

  flags_.admin_port = default_admin_port;
  app_.set_config("--config", "", "TOML or INI file setting any of these options by long name");
  app_.add_option("--log-level", flags_.log_level, "trace, debug, info, warn or error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->envname("MOEMESH_LOG_LEVEL")
      ->capture_default_str();
  app_.add_option("--threads", flags_.threads, "actor scheduler threads (default: min(4, cores))")
      ->check(CLI::Range(1, 1024))
      ->envname("MOEMESH_THREADS");
  app_.add_option("--admin-address", flags_.admin_address, "address of /metrics, /healthz, /readyz")
      ->capture_default_str();
  app_.add_option("--admin-port", flags_.admin_port, "port of /metrics, /healthz, /readyz (0: any free port)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  app_.add_option("--instance", flags_.instance, "this process's unique name (default: <service>-<host>-<pid>)")
      ->envname("MOEMESH_INSTANCE");
  app_.add_option("--cpu-wake-latency-us", flags_.cpu_wake_latency_us,
                  "hold this machine's idle CPUs to wake within this many µs while running (Linux PM QoS, "
                  "/dev/cpu_dma_latency; needs root; 0: idle cores poll, the lowest latency)")
      ->check(CLI::Range(0, 100000000))
      ->envname("MOEMESH_CPU_WAKE_LATENCY_US");
}

ServiceRuntime::~ServiceRuntime() {
  shutdown();
  // The admin server's readiness check may hold actor handles: drop them first, or a detached
  // actor they point to could never be destroyed and the actor system would wait for it forever.
  admin_.reset();
  if (!system_) return;
  // Give the actors time to finish what they hold; but an actor nobody told to stop (an early
  // error exit) must not keep the process alive forever.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (system_->registry().running() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (system_->registry().running() > 0) {
    spdlog::warn("{} actors still running at exit; not waiting for them", system_->registry().running());
    system_->await_actors_before_shutdown(false);
  }
  system_.reset();
}

std::optional<int> ServiceRuntime::start(int argc, const char* const* argv) {
  try {
    app_.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app_.exit(e);
  }
  if (flags_.threads == 0) flags_.threads = default_threads();
  if (flags_.instance.empty()) flags_.instance = service_ + "-" + hostname() + "-" + std::to_string(getpid());

  // Not registered by name: a second runtime in one process (tests) must not clash.
  auto logger = std::make_shared<spdlog::logger>(service_, std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%-5l%$ [" + service_ + " " + flags_.instance + "] %v");
  logger->set_level(spdlog::level::from_str(flags_.log_level));
  spdlog::set_default_logger(logger);

  cfg_ = std::make_unique<caf::actor_system_config>();
  cfg_->set("scheduler.max-threads", flags_.threads);
  // An idle actor thread polls briefly, then sleeps on its condition variable until a message
  // comes. CAF's default moderate phase wakes it every 50 us for 25 ms: in a local cluster those
  // wake-ups (a context switch each) land on the cores the neighbour processes compute on.
  cfg_->set("work-stealing.moderate-poll-attempts", 0);
  system_ = std::make_unique<caf::actor_system>(*cfg_);

  try {
    admin_ = std::make_unique<AdminServer>(AdminOptions{flags_.admin_address, uint16_t(flags_.admin_port)}, registry_);
    admin_->start();
  } catch (const std::exception& e) {
    std::cerr << "moemesh-" << service_ << ": " << e.what() << "\n";
    return 1;
  }
  if (flags_.cpu_wake_latency_us >= 0) hold_cpu_wake_latency();
  spdlog::info("started: {} scheduler threads, admin on {}:{}", flags_.threads, flags_.admin_address, admin_->port());
  return std::nullopt;
}

// A tuning, not a requirement: without the permission the service runs, and says why it could not.
void ServiceRuntime::hold_cpu_wake_latency() {
  auto& gauge = prometheus::BuildGauge()
                    .Name("moemesh_cpu_wake_latency_limit_microseconds")
                    .Help(
                        "The limit on idle CPUs' wake-up latency this process holds (--cpu-wake-latency-us); "
                        "absent when it holds none")
                    .Register(*registry_);
  try {
    wake_latency_hold_ = std::make_unique<CpuWakeLatencyHold>(flags_.cpu_wake_latency_us);
    gauge.Add({}).Set(flags_.cpu_wake_latency_us);
    spdlog::info("holding idle CPUs to wake within {} us", flags_.cpu_wake_latency_us);
  } catch (const Error& e) {
    spdlog::warn("--cpu-wake-latency-us {}: {}; running with the machine's idle states as they are",
                 flags_.cpu_wake_latency_us, e.what());
  }
}

int ServiceRuntime::wait_for_shutdown() {
  int sig = 0;
  while (sig == 0 || sig == SIGHUP) {
    if (sig == SIGHUP) {
      if (on_reload_) {
        spdlog::info("SIGHUP received, reloading");
        try {
          on_reload_();
        } catch (const std::exception& e) {  // a bad file keeps the old configuration
          spdlog::error("reload failed, keeping the previous configuration: {}", e.what());
        }
      } else {
        spdlog::info("SIGHUP received; nothing to reload");
      }
      sig = 0;
    }
    sig = signals_->wait();
  }
  spdlog::info("{} received, shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  return sig;
}

void ServiceRuntime::request_shutdown() { kill(getpid(), SIGTERM); }

void ServiceRuntime::shutdown() {
  if (admin_) {
    admin_->stop();
    admin_->set_readiness(nullptr);
  }
  for (auto it = owned_.rbegin(); it != owned_.rend(); ++it) caf::anon_send_exit(*it, caf::exit_reason::user_shutdown);
  owned_.clear();
}

}  // namespace moemesh::actors
