// moemesh-router: the OpenAI-compatible gateway, the scheduler and the cluster coordinator.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/coordinator.h"
#include "actors/openai_frontend.h"
#include "actors/scheduler.h"
#include "actors/service_runtime.h"
#include "actors/zmq_bridge.h"
#include "core/lora_cache.h"
#include "core/model_config.h"
#include "core/tenants.h"
#include "core/tokenizer.h"

using namespace moemesh;
using namespace moemesh::actors;

int main(int argc, char** argv) {
  ServiceRuntime rt("router", 9100);
  std::string model_dir, served_name, http_address = "0.0.0.0";
  std::string control = "tcp://0.0.0.0:5550", placement = "tcp://0.0.0.0:5551";
  int port = 8000, expert_hosts = 1, replicas = 1, heartbeat_timeout_ms = 2000, http_threads = 2;
  int64_t step_budget = 512;
  int64_t max_running = 64;
  size_t max_waiting = 4096;
  int drain_timeout_s = 30, load_window_s = 60, suspect_grace_ms = 1000;
  std::string tenants_file, responses_dir;
  int64_t responses_ttl_s = 30 * 24 * 3600;
  int keep_turns = 5;
  double trace_sample_ratio = 1.0;
  auto& cli = rt.cli();
  cli.add_option("--model", model_dir, "checkpoint folder (config.json, tokenizer)")->required();
  cli.add_option("--served-model-name", served_name, "model name in the API (default: the folder's name)");
  cli.add_option("--port", port, "OpenAI API port");
  cli.add_option("--http-address", http_address, "OpenAI API address");
  cli.add_option("--http-threads", http_threads, "API server threads");
  cli.add_option("--control", control, "coordinator endpoint (bound ROUTER)");
  cli.add_option("--placement", placement, "placement publisher endpoint (bound PUB)");
  cli.add_option("--expert-hosts", expert_hosts, "expert hosts the placement is cut for")->check(CLI::PositiveNumber);
  cli.add_option("--replicas", replicas, "copies of every expert")->check(CLI::PositiveNumber);
  cli.add_option("--heartbeat-timeout-ms", heartbeat_timeout_ms, "silence after which a member is dropped");
  cli.add_option("--suspect-grace-ms", suspect_grace_ms,
                 "after a control connection drops, members silent this long are dropped at once (0: wait for "
                 "--heartbeat-timeout-ms)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--step-token-budget", step_budget, "prefill + decode tokens per worker step");
  int step_timeout_ms = 30000;
  cli.add_option("--step-timeout-ms", step_timeout_ms,
                 "a worker step not answered within this is given up and its sequences resumed elsewhere "
                 "(raise it for long contexts on CPUs: a chunk attends over the whole context)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cli.add_option("--max-running-per-worker", max_running, "sequences one attention worker holds at once")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cli.add_option("--max-waiting", max_waiting, "queued requests past which new ones get 503")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cli.add_option("--tenants", tenants_file,
                 "tenants file (JSON: API key hashes and limits); reloaded on SIGHUP; none: open API");
  std::vector<std::string> lora_modules;
  bool allow_runtime_lora = false;
  cli.add_option("--lora-modules", lora_modules,
                 "LoRA adapters to serve, as name=path (PEFT folders every attention worker and expert host can "
                 "read); a request picks one with \"model\": \"name\"");
  cli.add_flag("--allow-runtime-lora", allow_runtime_lora,
               "allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (operators only: the API has no "
               "admin role)");
  cli.add_option("--responses-dir", responses_dir,
                 "where the Responses API keeps stored responses across restarts (none: in memory only)");
  cli.add_option("--responses-ttl-s", responses_ttl_s, "how long a stored response lives")->check(CLI::PositiveNumber);
  cli.add_option("--keep-turns", keep_turns, "turns of a conversation the model is given (0: all)")
      ->check(CLI::NonNegativeNumber);
  cli.add_option("--trace-sample-ratio", trace_sample_ratio,
                 "share of requests without a traceparent header whose spans every hop logs (a header's sampled "
                 "flag is kept)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  cli.add_option("--drain-timeout-s", drain_timeout_s, "on SIGTERM, how long requests in flight may finish");
  cli.add_option("--load-window-s", load_window_s,
                 "window of the measured expert load (imbalance gauge, placement by load)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  RebalanceOptions rebalance;
  double rebalance_interval_s = 0;
  cli.add_option("--rebalance-interval-s", rebalance_interval_s,
                 "live load-driven expert re-placement (EPLB): plan one every this many seconds from the load "
                 "window (0: off)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--rebalance-max-moves", rebalance.max_moves, "experts newly loaded per re-placement")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cli.add_option("--rebalance-min-gain", rebalance.min_gain,
                 "relative drop of the busiest expert host's load a re-placement must bring")
      ->check(CLI::Range(0.0, 0.99))
      ->capture_default_str();
  cli.add_option("--rebalance-headroom", rebalance.headroom,
                 "how many more experts than its first share an expert host may hold (0.25: 25% more)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--rebalance-min-rows", rebalance.min_rows,
                 "rows computed in the load window before a re-placement trusts the load")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  if (auto rc = rt.start(argc, argv)) return *rc;

  try {
    const std::filesystem::path dir = std::filesystem::absolute(model_dir).lexically_normal();
    ModelConfig mc = ModelConfig::load(dir / "config.json");
    std::shared_ptr<const Tokenizer> tok;
    if (std::filesystem::exists(dir / "tokenizer.json")) tok = Tokenizer::from_dir(dir);
    if (served_name.empty()) served_name = (dir.filename().empty() ? dir.parent_path() : dir).filename().string();

    ZmqBridge bridge(rt.system());
    const int control_sock = bridge.add({.name = "control",
                                         .type = zmq::socket_type::router,
                                         .endpoint = control,
                                         .bind = true,
                                         .heartbeats = kDataPlaneHeartbeats,
                                         .monitor = true});
    const int pub_sock =
        bridge.add({.name = "placement", .type = zmq::socket_type::pub, .endpoint = placement, .bind = true});
    bridge.start();

    SchedulerConfig sc;
    sc.instance = rt.instance();
    sc.step_token_budget = step_budget;
    sc.step_timeout = std::chrono::milliseconds(step_timeout_ms);
    sc.max_running_per_worker = max_running;
    sc.max_waiting = max_waiting;
    sc.sliding_window = mc.sliding_window.value_or(0);
    sc.metrics = rt.metrics_ptr();
    for (int64_t id : mc.eos_token_ids) sc.eos_ids.push_back(int32_t(id));
    caf::actor scheduler = spawn_scheduler(rt.system(), bridge, sc);

    CoordinatorConfig cc;
    cc.model_id = served_name;
    for (int64_t l = 0; l < mc.num_hidden_layers; ++l)
      if (mc.is_moe_layer(l)) cc.moe_layers.push_back(int32_t(l));
    cc.num_experts = int32_t(mc.num_experts);
    cc.expert_hosts = expert_hosts;
    cc.replicas = replicas;
    cc.heartbeat_timeout = std::chrono::milliseconds(heartbeat_timeout_ms);
    cc.suspect_grace = std::chrono::milliseconds(suspect_grace_ms);
    cc.metrics = rt.metrics_ptr();
    cc.load_window = std::chrono::seconds(load_window_s);
    rebalance.interval = std::chrono::milliseconds(int64_t(rebalance_interval_s * 1000));
    cc.rebalance = rebalance;
    caf::actor coordinator = spawn_coordinator(rt.system(), bridge, control_sock, pub_sock, cc, scheduler);
    rt.stop_on_shutdown(scheduler);
    rt.stop_on_shutdown(coordinator);

    rt.admin().set_readiness([&rt, coordinator]() -> Readiness {
      caf::scoped_actor self{rt.system()};
      Readiness r{false, "coordinator did not answer"};
      self->request(coordinator, std::chrono::milliseconds(500), ready_atom::value)
          .receive(
              [&](bool ok) {
                r = {ok, ok ? "" : "waiting for attention workers and expert hosts"};
              },
              [&](caf::error&) {});
      return r;
    });

    http::HttpServer api({.address = http_address, .port = uint16_t(port), .threads = http_threads, .name = "api"});
    FrontendConfig fc;
    fc.served_model = served_name;
    fc.responses = std::make_shared<ConversationStore>(responses_dir, std::chrono::seconds(responses_ttl_s));
    fc.keep_turns = keep_turns;
    fc.tokenizer = tok;
    fc.max_context = mc.max_context();
    fc.vocab_size = mc.vocab_size;
    if (!tenants_file.empty()) {
      fc.tenants = std::make_shared<TenantRegistry>(load_tenants(tenants_file));
      spdlog::info("router: {} tenants from {}", fc.tenants->size(), tenants_file);
      rt.on_reload([reg = fc.tenants, tenants_file] {
        reg->reload(load_tenants(tenants_file));
        spdlog::info("router: reloaded {} tenants from {}", reg->size(), tenants_file);
      });
    } else {
      spdlog::warn("router: no --tenants file: the API is open to anyone who can reach it (local mode)");
    }
    fc.loras = std::make_shared<LoraRegistry>(mc);
    fc.allow_runtime_lora = allow_runtime_lora;
    fc.trace_sample_ratio = trace_sample_ratio;
    for (const std::string& spec : lora_modules) {
      const auto [name, path] = parse_lora_module(spec);
      const LoraRef ref = fc.loras->add(name, path, served_name);
      spdlog::info("router: serving LoRA adapter '{}' from {} (key {})", name, ref.path, ref.key);
    }
    fc.scheduler = scheduler;
    fc.metrics = rt.metrics_ptr();
    auto draining = fc.draining;
    install_openai_routes(api, rt.system(), fc);
    api.start();
    spdlog::info("router: serving {} on http://{}:{} (control {}, placement {}, {} expert host slots x{} replicas)",
                 served_name, http_address, api.port(), bridge.endpoint(control_sock), bridge.endpoint(pub_sock),
                 expert_hosts, replicas);
    rt.wait_for_shutdown();
    // Drain: refuse new requests, let the accepted ones finish (nothing accepted is lost).
    draining->store(true);
    spdlog::info("router: draining (up to {} s)", drain_timeout_s);
    {
      caf::scoped_actor self{rt.system()};
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(drain_timeout_s);
      bool idle = false;
      while (!idle && std::chrono::steady_clock::now() < deadline) {
        self->request(scheduler, std::chrono::seconds(1), sched_stats_atom::value)
            .receive(
                [&](const std::string& js) {
                  auto j = nlohmann::json::parse(js);
                  idle = j["waiting"] == 0 && j["running"] == 0;
                },
                [&](caf::error&) { idle = true; });
        if (!idle) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      if (!idle) spdlog::warn("router: requests still in flight after {} s; stopping anyway", drain_timeout_s);
    }
    spdlog::info("router: shutting down");
    api.stop();
    rt.shutdown();
    bridge.stop();
  } catch (const std::exception& e) {
    spdlog::error("router: {}", e.what());
    return 1;
  }
  return 0;
}
