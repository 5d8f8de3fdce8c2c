// moemesh-expert: serves the FFN weights of a set of (layer, expert) pairs.
//
//   moemesh-expert --model DIR --experts "0:0-3,1:*" --listen tcp://127.0.0.1:5601
//
// Maps only its experts' tensors, answers DispatchRequests on a ROUTER socket (the batcher
// merges requests of one layer from several attention workers) and computes on a pool of
// --compute-threads threads.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <caf/all.hpp>
#include <prometheus/registry.h>
#include <spdlog/spdlog.h>

#include "actors/expert_batcher.h"
#include "actors/expert_compute.h"
#include "actors/zmq_bridge.h"
#include "core/checkpoint.h"
#include "core/error.h"
#include "core/expert_set.h"

namespace {

struct Flags {
  std::string model;
  std::optional<std::string> experts;
  std::string listen = "tcp://127.0.0.1:5601";
  std::string router;
  int admin_port = 0;
  int compute_threads = 2;
  int scheduler_threads = 2;
  int64_t batch_window_us = 200;
  int64_t max_batch_rows = 8192;
  std::string log_level = "info";
};

// Which experts to serve: --experts, or (without it) the coordinator's assignment.
moemesh::ExpertSet resolve_experts(const Flags& f, const moemesh::ModelConfig& cfg) {
  if (f.experts) return moemesh::parse_expert_spec(*f.experts, cfg);
  // TODO(control_client): register with --router and serve RegisterReply.assigned once
  // actors/control_client lands; until then the set must be given.
  if (f.router.empty()) throw moemesh::Error("--experts is required when no --router coordinator is given");
  throw moemesh::Error("--experts is required: assignment by the coordinator (--router " + f.router +
                       ") is not wired in this build yet");
}

// Blocks SIGTERM/SIGINT in every thread (call before any thread starts) and waits for one.
sigset_t block_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

int serve(const Flags& f) {
  using namespace moemesh;
  const sigset_t stop_signals = block_stop_signals();

  auto ckpt = Checkpoint::open(f.model);
  ExpertSet set = resolve_experts(f, ckpt->config());
  if (set.empty()) throw Error("--experts: the set is empty");
  actors::HostedExperts experts(ckpt, set);
  spdlog::info("expert host: model {} ({} layers, hidden {}), serving {} experts: {}", ckpt->name(),
               ckpt->config().num_hidden_layers, experts.hidden(), set.size(), format_expert_set(set));
  // Tests read this line: the host must map exactly its experts' tensors.
  spdlog::info("expert host: mapped_weight_bytes={} expected_bytes={}", experts.mapped_bytes(),
               experts.expected_bytes());

  auto registry = std::make_shared<prometheus::Registry>();
  actors::ExpertHostMetrics metrics(*registry);
  metrics.mapped_weight_bytes.Set(double(experts.mapped_bytes()));
  actors::ExpertLoad load;

  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", f.scheduler_threads);
  caf::actor_system sys{cfg};
  {
    actors::ComputePool pool(f.compute_threads);
    actors::ZmqBridge bridge(sys);
    const int data = bridge.add({.name = "dispatch", .type = zmq::socket_type::router, .endpoint = f.listen, .bind = true});
    actors::ExpertBatcherDeps deps{&experts, &pool, &metrics, &load, bridge.actor(), data,
                                   {std::chrono::microseconds(f.batch_window_us), f.max_batch_rows}};
    caf::actor batcher = actors::spawn_expert_batcher(sys, deps);
    bridge.route(data, batcher);
    bridge.start();
    spdlog::info("expert host: listening on {} ({} compute threads)", bridge.endpoint(data), f.compute_threads);
    // TODO(admin_server, control_client): /metrics + /healthz + /readyz on --admin-port, and
    // registration + heartbeats (with `load`) to --router, once those actors land.
    if (f.admin_port) spdlog::warn("--admin-port {}: the admin server is not wired in this build yet", f.admin_port);

    int sig = 0;
    sigwait(&stop_signals, &sig);
    spdlog::info("expert host: signal {}, shutting down", sig);
    bridge.stop();
    actors::stop_expert_batcher(sys, batcher);
  }  // the pool finishes queued batches before `experts` goes away
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  int64_t window_us = f.batch_window_us;
  CLI::App app{"moemesh-expert: serves the routed experts of a MoE model over ZeroMQ"};
  app.add_option("--model", f.model, "checkpoint folder (Hugging Face layout)")->required();
  app.add_option("--experts", f.experts,
                 "experts to serve: all | LAYER:EXPERT items, each part N, N-M or * (e.g. \"0:0-3,1:*\"); "
                 "absent: the coordinator assigns them");
  app.add_option("--listen", f.listen, "ROUTER endpoint to bind (tcp://127.0.0.1:* picks a free port)")
      ->capture_default_str();
  app.add_option("--router", f.router, "coordinator control endpoint (tcp://host:port)");
  app.add_option("--admin-port", f.admin_port, "port of /metrics, /healthz, /readyz (0: none)");
  app.add_option("--compute-threads", f.compute_threads, "expert compute threads")->capture_default_str();
  app.add_option("--scheduler-threads", f.scheduler_threads, "CAF scheduler threads")->capture_default_str();
  app.add_option("--batch-window-us", window_us, "how long a layer's batch waits for more requests")
      ->capture_default_str();
  app.add_option("--max-batch-rows", f.max_batch_rows, "a batch with this many rows runs at once")->capture_default_str();
  app.add_option("--log-level", f.log_level, "trace|debug|info|warn|error")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  f.batch_window_us = window_us;
  spdlog::set_level(spdlog::level::from_str(f.log_level));
  try {
    if (f.compute_threads < 1) throw moemesh::Error("--compute-threads must be at least 1");
    if (f.batch_window_us < 0) throw moemesh::Error("--batch-window-us must not be negative");
    if (f.max_batch_rows < 1) throw moemesh::Error("--max-batch-rows must be at least 1");
    return serve(f);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moemesh-expert: %s\n", e.what());
    return 1;
  }
}
