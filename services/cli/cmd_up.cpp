// `moemesh up`: the whole cluster on this machine (see actors/local_cluster.h).
#include <signal.h>

#include <filesystem>
#include <iostream>

#include "actors/local_cluster.h"
#include "core/lora_cache.h"
#include "core/error.h"
#include "core/model_config.h"
#include "core/model_writer.h"
#include "services/cli/commands.h"

namespace moemesh::cli {
namespace fs = std::filesystem;

namespace {

// The default model: a small random-weight Mixtral with the real Mixtral tokenizer, made once
// in bootstrap's cache folder.
fs::path default_model() {
  const fs::path cache = default_tokenizer_dir(Arch::Mixtral).parent_path().parent_path();
  const fs::path dir = cache / "models" / "default-mixtral-small";
  if (fs::exists(dir / "config.json")) return dir;
  std::cout << "moemesh up: generating the default model in " << dir.string() << std::endl;
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  const std::string cmd = "'" + self + "' mkmodel --arch mixtral --preset small --seed 1 --out '" + dir.string() + "'";
  if (std::system(cmd.c_str()) != 0) throw Error("generating the default model failed (" + cmd + ")");
  return dir;
}

}  // namespace

void add_up(CLI::App& app) {
  auto opts = std::make_shared<actors::LocalClusterOptions>();
  auto model = std::make_shared<std::string>();
  CLI::App* up = app.add_subcommand(
      "up", "Start a whole cluster (router, attention workers, expert hosts, KV store) on this machine");
  up->add_option("--model", *model, "checkpoint folder (default: generate the default model)");
  up->add_option("--attention", opts->attention, "attention workers")->capture_default_str();
  up->add_option("--experts", opts->experts, "expert hosts")->capture_default_str();
  up->add_option("--replicas", opts->replicas, "copies of every expert")->capture_default_str();
  up->add_option("--port", opts->port, "OpenAI API port")->capture_default_str();
  up->add_option("--control-port", opts->control_port, "coordinator port (placement on the next one)")
      ->capture_default_str();
  up->add_option("--admin-port", opts->admin_port, "router /metrics port")->capture_default_str();
  up->add_option("--host", opts->host, "address every process binds")->capture_default_str();
  up->add_option("--bin-dir", opts->bin_dir, "where the moemesh-<service> binaries are");
  up->add_option("--log-dir", opts->log_dir, "one log file per process (default: a temp folder)");
  up->add_option("--cores", opts->cores,
                 "compute threads of each attention worker and expert host (default: this machine's cores)");
  up->add_option("--log-level", opts->log_level, "services' log level")->capture_default_str();
  up->add_option("--startup-timeout", opts->startup_timeout_s, "seconds to wait for readiness")->capture_default_str();
  up->add_flag("!--no-kvstore", opts->kvstore, "run without the KV store (no prefix cache)");
  up->add_flag("!--no-restart", opts->restart,
               "do not restart a process that exits (default: restart it after a backoff of 1 s doubling to 30 s)");
  up->add_option("--device", opts->device,
                 "where attention workers and expert hosts compute: cpu, or cuda (spread over --gpus devices, "
                 "attention workers first)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  up->add_option("--gpus", opts->gpus, "CUDA devices to spread the processes over with --device cuda")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  // Long contexts (docs/operations.md): the attention workers' KV cache size and storage.
  auto kv_cache_mb = std::make_shared<int64_t>(0);
  auto kv_dtype = std::make_shared<std::string>();
  auto step_budget = std::make_shared<int64_t>(0);
  auto micro_batches = std::make_shared<int>(0);
  up->add_option("--micro-batches", *micro_batches, "attention workers: 1, or 2 halves of a step that overlap")
      ->check(CLI::IsMember({1, 2}));
  up->add_option("--kv-cache-mb", *kv_cache_mb, "KV cache of each attention worker in MiB (default: its --kv-blocks)")
      ->check(CLI::PositiveNumber);
  up->add_option("--kv-dtype", *kv_dtype, "KV cache storage of the attention workers: f32 or int8")
      ->check(CLI::IsMember({"f32", "int8"}));
  up->add_option("--step-token-budget", *step_budget, "router: prefill + decode tokens per worker step")
      ->check(CLI::PositiveNumber);
  auto trace_ratio = std::make_shared<double>(-1);
  up->add_option("--trace-sample-ratio", *trace_ratio,
                 "router: share of requests without a traceparent header whose spans are logged (default 1)")
      ->check(CLI::Range(0.0, 1.0));
  auto rebalance_s = std::make_shared<double>(0);
  up->add_option("--rebalance-interval-s", *rebalance_s,
                 "router: live load-driven expert re-placement every this many seconds (0: off)")
      ->check(CLI::NonNegativeNumber);
  auto router_bias = std::make_shared<std::string>();
  up->add_option("--router-bias", *router_bias,
                 "attention workers, for benchmarks: EXPERT=BIAS,... skews the expert load on purpose");
  auto wait_budget = std::make_shared<bool>(true);
  up->add_flag("--kvstore-wait-budget,!--no-kvstore-wait-budget", *wait_budget,
               "attention workers wait for the KV store at most as long as computing the looked-up prompt "
               "positions takes, the default; off: up to the store's deadline");
  auto tenants = std::make_shared<std::string>();
  up->add_option("--tenants", *tenants, "router tenants file (API keys and limits); none: open API")
      ->check(CLI::ExistingFile);
  auto lora_modules = std::make_shared<std::vector<std::string>>();
  up->add_option("--lora-modules", *lora_modules, "LoRA adapters to serve, as name=path (PEFT folders)");
  auto runtime_lora = std::make_shared<bool>(false);
  up->add_flag("--allow-runtime-lora", *runtime_lora,
               "router: allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter");
  // One holder is enough for the whole machine: the router, which lives as long as the cluster.
  auto wake_latency_us = std::make_shared<int>(-1);
  up->add_option("--cpu-wake-latency-us", *wake_latency_us,
                 "hold this machine's idle CPUs to wake within this many µs while the cluster runs (Linux PM QoS; "
                 "needs root; 0: idle cores poll, the lowest latency; docs/operations.md)")
      ->check(CLI::Range(0, 100000000));
  up->callback([opts, model, tenants, kv_cache_mb, kv_dtype, step_budget, trace_ratio, rebalance_s, router_bias,
                micro_batches, lora_modules, runtime_lora, wait_budget, wake_latency_us] {
    if (*wake_latency_us >= 0)
      opts->router_args.insert(opts->router_args.end(), {"--cpu-wake-latency-us", std::to_string(*wake_latency_us)});
    for (const std::string& spec : *lora_modules) {  // the children run elsewhere: absolute paths
      const auto [name, path] = parse_lora_module(spec);
      opts->router_args.insert(opts->router_args.end(), {"--lora-modules", name + "=" + fs::absolute(path).string()});
    }
    if (*runtime_lora) opts->router_args.push_back("--allow-runtime-lora");
    if (!router_bias->empty()) opts->attention_args.insert(opts->attention_args.end(), {"--router-bias", *router_bias});
    if (*rebalance_s > 0)
      opts->router_args.insert(opts->router_args.end(), {"--rebalance-interval-s", std::to_string(*rebalance_s)});
    if (*micro_batches > 0)
      opts->attention_args.insert(opts->attention_args.end(), {"--micro-batches", std::to_string(*micro_batches)});
    if (*kv_cache_mb > 0)
      opts->attention_args.insert(opts->attention_args.end(), {"--kv-cache-mb", std::to_string(*kv_cache_mb)});
    if (!kv_dtype->empty()) opts->attention_args.insert(opts->attention_args.end(), {"--kv-dtype", *kv_dtype});
    if (!*wait_budget) opts->attention_args.push_back("--no-kvstore-wait-budget");
    if (*step_budget > 0)
      opts->router_args.insert(opts->router_args.end(), {"--step-token-budget", std::to_string(*step_budget)});
    if (*trace_ratio >= 0)
      opts->router_args.insert(opts->router_args.end(), {"--trace-sample-ratio", std::to_string(*trace_ratio)});
    if (!tenants->empty()) {
      opts->router_args.push_back("--tenants");
      opts->router_args.push_back(fs::absolute(*tenants).string());
    }
    opts->model = model->empty() ? default_model() : fs::path(*model);
    if (!fs::exists(opts->model / "config.json"))
      throw Error(opts->model.string() + ": no config.json (not a checkpoint folder)");
    // Taken before starting children: run_until_signal() waits for them.
    actors::SignalWaiter signals({SIGINT, SIGTERM});
    actors::LocalCluster cluster(*opts);
    cluster.start();
    std::cout << cluster.summary() << std::flush;
    const int rc = cluster.run_until_signal(signals);
    std::cout << "moemesh up: stopping the cluster" << std::endl;
    cluster.stop();
    if (rc != 0) throw Error("the router exited; cluster stopped");
    if (cluster.restarts() > 0)
      std::cout << "moemesh up: " << cluster.restarts() << " process restart(s) during the run" << std::endl;
  });
}

}  // namespace moemesh::cli
