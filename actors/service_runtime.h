// What every service main needs, so that mains stay short wiring:
//   - the common flags (CLI11): --config FILE (TOML/INI with the same option names),
//     --log-level, --threads (CAF scheduler.max-threads), --admin-address, --admin-port,
//     --instance, --cpu-wake-latency-us; a service adds its own flags to cli() before start();
//   - spdlog configured (stderr, level, service/instance in each line);
//   - the caf::actor_system (caf::io is never loaded: ZeroMQ is the only wire);
//   - the admin server (/metrics, /healthz, /readyz) on its own port;
//   - SIGTERM/SIGINT taken by wait_for_shutdown() alone (actors/signal_waiter.h), so a main
//     finishes its in-flight work and returns 0.
//
//   int main(int argc, char** argv) {
//     moemesh::actors::ServiceRuntime rt("kvstore", 9400);
//     rt.cli().add_option("--listen", listen);
//     if (auto rc = rt.start(argc, argv)) return *rc;
//     ... spawn actors, rt.stop_on_shutdown(actor), rt.admin().set_readiness(...) ...
//     rt.wait_for_shutdown();
//     rt.shutdown();
//   }
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <caf/all.hpp>
#include <prometheus/registry.h>

#include "actors/admin_server.h"
#include "actors/signal_waiter.h"
#include "core/cpu_wake_latency.h"

namespace moemesh::actors {

struct CommonFlags {
  std::string config_file;
  std::string log_level = "info";
  int threads = 0;  // 0 until start(): then the flag, or default_threads()
  std::string admin_address = "0.0.0.0";
  int admin_port = 0;
  std::string instance;  // defaults to <service>-<hostname>-<pid>
  int cpu_wake_latency_us = -1;  // >= 0: hold the CPUs' wake-up latency at most this (CpuWakeLatencyHold)
};

// Small on purpose: the node's cores belong to compute pools, not to the actor scheduler.
int default_threads();

class ServiceRuntime {
 public:
  // Blocks SIGTERM/SIGINT (and ignores SIGPIPE) for this thread and every thread started
  // after it, and forwards them from older threads: construct it first thing in main().
  ServiceRuntime(std::string service, int default_admin_port);
  ~ServiceRuntime();
  ServiceRuntime(const ServiceRuntime&) = delete;
  ServiceRuntime& operator=(const ServiceRuntime&) = delete;

  CLI::App& cli() { return app_; }

  // Parses the flags, sets up logging, the actor system and the admin server. Returns an exit
  // code when main should return now (--help: 0; bad flags or a taken port: non-zero, with one
  // readable line on stderr).
  std::optional<int> start(int argc, const char* const* argv);

  const std::string& service() const { return service_; }
  const CommonFlags& flags() const { return flags_; }
  const std::string& instance() const { return flags_.instance; }
  caf::actor_system& system() { return *system_; }
  AdminServer& admin() { return *admin_; }
  prometheus::Registry& metrics() { return *registry_; }
  std::shared_ptr<prometheus::Registry> metrics_ptr() { return registry_; }

  // Blocks until SIGTERM or SIGINT arrives; returns its number.
  int wait_for_shutdown();
  // Called on SIGHUP, from wait_for_shutdown()'s thread; an exception keeps the old state.
  void on_reload(std::function<void()> fn) { on_reload_ = std::move(fn); }
  // Asks this process to shut down (as if it got SIGTERM).
  static void request_shutdown();

  // Actors to stop (in reverse order of registration) in shutdown().
  void stop_on_shutdown(caf::actor a) { owned_.push_back(std::move(a)); }
  // Stops the admin server and the registered actors (idempotent). The destructor calls it,
  // then waits for every actor to terminate, up to 5 s (an error exit must not hang).
  void shutdown();

 private:
  std::string service_;
  CLI::App app_;
  CommonFlags flags_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<caf::actor_system_config> cfg_;
  std::unique_ptr<caf::actor_system> system_;
  std::unique_ptr<AdminServer> admin_;
  std::unique_ptr<CpuWakeLatencyHold> wake_latency_hold_;
  std::vector<caf::actor> owned_;
  std::function<void()> on_reload_;
  std::unique_ptr<SignalWaiter> signals_;

  void hold_cpu_wake_latency();
};

}  // namespace moemesh::actors
