// `moemesh up`: a whole cluster as separate processes on this machine.
//
// It starts the KV store, the router (coordinator), the expert hosts and the attention
// workers with free loopback ports, lets each attention worker and expert host compute on all
// the cores (`--cores`; they take turns on a token and their kernel pools sleep when idle), waits until the coordinator
// reports every expert served and every attention worker ready, and stops everything on SIGINT/SIGTERM (SIGTERM first,
// SIGKILL after a grace period).
//
// A process that exits while the cluster runs is started again, as Kubernetes restarts a pod:
// after a backoff (1 s, doubling to 30 s; back to 1 s once it ran 60 s), with the same flags and
// ports, its log appended, and MOEMESH_RESTART_COUNT in its environment (the coordinator shows
// it: `moemesh status`, moemesh_coordinator_member_restarts).
#pragma once
#include <chrono>
#include <filesystem>
#include <string>
#include <sys/types.h>
#include <vector>

#include "actors/signal_waiter.h"

namespace moemesh::actors {

struct LocalClusterOptions {
  std::filesystem::path model;
  std::filesystem::path bin_dir;  // where moemesh-<service> binaries are; empty: next to this one
  std::filesystem::path log_dir;  // one log file per process; empty: a fresh temp folder
  int attention = 2;
  int experts = 2;
  int replicas = 1;
  bool kvstore = true;
  std::string host = "127.0.0.1";
  int port = 8000;          // OpenAI API
  int control_port = 5550;  // coordinator; placement publisher on control_port + 1
  int admin_port = 9100;    // router admin; other processes get free ports
  int cores = 0;            // 0: this machine's
  int startup_timeout_s = 120;
  std::string log_level = "info";
  // "cpu", or "cuda": attention workers and expert hosts compute on cuda:0 .. cuda:gpus-1,
  // dealt round-robin (attention workers first).
  std::string device = "cpu";
  int gpus = 1;
  std::vector<std::string> router_args;     // extra flags passed through
  std::vector<std::string> attention_args;  // extra flags for every attention worker (--kv-cache-mb, --kv-dtype)
  bool restart = true;                      // restart processes that exit (with backoff)
};

class LocalCluster {
 public:
  explicit LocalCluster(LocalClusterOptions opts);
  ~LocalCluster();  // stops what is still running

  // Starts every process and waits until the cluster is ready; throws moemesh::Error naming
  // the process that failed (with the tail of its log).
  void start();
  // Blocks until one of `signals`' signals (returns 0). Restarts processes that exit (with
  // `restart`; else returns 1 when the router exits and reports the others).
  int run_until_signal(SignalWaiter& signals);
  void stop();

  std::string api_url() const;
  std::string control_endpoint() const;
  std::string summary() const;  // endpoints and log folder, for the user
  int restarts() const;         // processes restarted so far, all together

 private:
  struct Proc {
    std::string name;
    pid_t pid = -1;
    std::filesystem::path log;
    std::string admin;              // host:port
    std::vector<std::string> argv;  // binary first
    int restarts = 0;
    std::chrono::steady_clock::time_point started, restart_at;
    std::chrono::seconds backoff{1};
  };
  void spawn(const std::string& name, const std::string& binary, std::vector<std::string> args, int admin_port);
  void launch(Proc& p, bool append_log);
  std::string binary(const std::string& service) const;
  std::string log_tail(const Proc& p) const;
  void check_alive();

  LocalClusterOptions opts_;
  std::vector<Proc> procs_;
};

// A TCP port on 127.0.0.1 that was free a moment ago.
int pick_free_port();

// Starts `argv` (the binary first), stdout and stderr into `log`, stdin from /dev/null, in a
// process group of its own, with this process's environment plus `env`; it stops when this
// process dies, even by SIGKILL (MOEMESH_PARENT_PID). Throws moemesh::Error when it cannot start.
pid_t spawn_service(std::vector<std::string> argv, const std::filesystem::path& log, bool append_log,
                    const std::vector<std::string>& env = {});

// The moemesh-<service> binary in bin_dir (installed) or in its service folder beside it (the
// build tree); throws moemesh::Error when neither has it.
std::string service_binary(const std::filesystem::path& bin_dir, const std::string& service);

}  // namespace moemesh::actors
