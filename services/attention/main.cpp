// moemesh-attention: an attention worker. It holds embeddings, attention, routers, shared and
// dense MLPs, lm_head and the paged KV cache of its sequences; routed experts are computed on
// expert hosts found through the coordinator's placement table.
#include <spdlog/spdlog.h>

#include <filesystem>

#include "actors/control_client.h"
#include "actors/expert_compute.h"
#include "actors/kv_client.h"
#include "actors/nccl_pairs.h"
#include "actors/remote_experts.h"
#include "actors/service_runtime.h"
#include "actors/step_server.h"
#include "actors/step_worker.h"
#include "actors/tiered_prefix_store.h"
#include "actors/zmq_bridge.h"
#include "core/lora_cache.h"
#include "core/tokenizer.h"
#include "core/backend_factory.h"
#include "core/checkpoint.h"
#include "core/moe.h"
#include "core/engine.h"
#include "kernels/cpu/thread_pool.h"
#ifdef MOEMESH_HAVE_NCCL
#include "actors/nccl_transport.h"
constexpr bool kBuiltWithNccl = true;
#else
constexpr bool kBuiltWithNccl = false;
#endif

using namespace moemesh;
using namespace moemesh::actors;

int main(int argc, char** argv) {
  ServiceRuntime rt("attention", 9200);
  std::string model_dir, listen = "tcp://127.0.0.1:*", advertise, control = "tcp://127.0.0.1:5550",
                         placement = "tcp://127.0.0.1:5551";
  int64_t kv_blocks = 1024;
  int dispatch_timeout_ms = 10000, dispatch_min_timeout_ms = 250, uncovered_wait_ms = 20000;
  double dispatch_p99_multiple = 8.0;
  double gating_temperature = 1.0;
  std::string kvstore, model_id;
  int kvstore_timeout_ms = 500, micro_batches = 2, compute_threads = 0;
  int64_t local_prefix_mb = 64;
  std::string kv_dtype = "f32", device = "cpu", summaries = "auto";
  auto& cli = rt.cli();
  cli.add_option("--model", model_dir, "checkpoint folder")->required();
  cli.add_option("--listen", listen, "step endpoint to bind (ROUTER)");
  cli.add_option("--advertise", advertise, "endpoint peers use to reach --listen (default: the bound one)");
  cli.add_option("--router", control, "coordinator control endpoint");
  cli.add_option("--placement", placement, "coordinator placement publisher endpoint");
  auto* kv_blocks_opt =
      cli.add_option("--kv-blocks", kv_blocks, "KV cache size in blocks of 16 tokens")->check(CLI::PositiveNumber);
  int64_t kv_cache_mb = 0;
  cli.add_option("--kv-cache-mb", kv_cache_mb,
                 "KV cache size as a memory budget in MiB (f32 or int8 blocks, every layer, scales included), "
                 "instead of --kv-blocks; e.g. 160 holds a 131072-token context of the small preset in int8 (144 MiB)")
      ->check(CLI::PositiveNumber)
      ->excludes(kv_blocks_opt);
  cli.add_option("--kv-dtype", kv_dtype,
                 "KV cache storage: f32, or int8 (~1/4 of the memory, one scale per token and kv head)")
      ->check(CLI::IsMember({"f32", "int8"}))
      ->capture_default_str();
  cli.add_option("--device", device, "compute backend: cpu, cuda (= cuda:0) or cuda:N")->capture_default_str();
  cli.add_option("--logits-summaries", summaries,
                 "sample from top-k + normaliser summaries of the logits, fetching a full row only when a summary "
                 "cannot decide: on, off, or auto (on with a CUDA device, where the logits then stay on it)")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  std::string transport = "auto";
  cli.add_option("--transport", transport,
                 "dispatch payloads: auto (NCCL with expert hosts that also compute on a GPU with NCCL, "
                 "else ZeroMQ) or zmq (always ZeroMQ)")
      ->check(CLI::IsMember({"auto", "zmq"}))
      ->capture_default_str();
  cli.add_option("--dispatch-timeout-ms", dispatch_timeout_ms,
                 "longest deadline of one expert dispatch round (the deadline adapts to the measured round trips "
                 "below it; a dropped connection fails over at once)")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  double hedge_multiple = 0;
  cli.add_option("--dispatch-hedge-p99-multiple", hedge_multiple,
                 "hedged requests: a host that has not answered after this multiple of the recent p99 round trip "
                 "gets a duplicate sent to another replica, the first good reply wins (0: off; e.g. 3)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--dispatch-min-timeout-ms", dispatch_min_timeout_ms, "shortest adaptive dispatch deadline")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  cli.add_option("--dispatch-timeout-p99-multiple", dispatch_p99_multiple,
                 "adaptive dispatch deadline: this multiple of the p99 of recent round trips")
      ->check(CLI::Range(1.0, 1000.0))
      ->capture_default_str();
  cli.add_option("--uncovered-wait-ms", uncovered_wait_ms,
                 "how long a step waits for an expert with no usable host (its host died and no replica is "
                 "left) before it fails")
      ->check(CLI::Range(0, 3600000))
      ->capture_default_str();
  cli.add_option("--gating-temperature", gating_temperature, "gate logits are divided by it before softmax");
  int64_t lora_cache_mb = 256;
  cli.add_option("--lora-cache-mb", lora_cache_mb,
                 "memory for LoRA adapters' attention-side modules (least recently used out)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  std::string router_bias;
  cli.add_option("--router-bias", router_bias,
                 "for tests and benchmarks: EXPERT=BIAS,... added to those experts' gate logits in every MoE "
                 "layer, to skew the expert load on purpose (changes the output)");
  cli.add_option("--kvstore", kvstore,
                 "KV store endpoint (tcp://HOST:PORT) for the prefix cache; none: no prefix cache");
  cli.add_option("--local-prefix-cache-mb", local_prefix_mb,
                 "prefix-cache blocks kept in this process's memory, in front of the KV store (0: none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cli.add_option("--kvstore-timeout-ms", kvstore_timeout_ms, "deadline of one KV store fetch")
      ->check(CLI::Range(1, 60000));
  bool wait_budget = true;
  cli.add_flag("--kvstore-wait-budget,!--no-kvstore-wait-budget", wait_budget,
               "a step waits for the KV store at most as long as computing the looked-up prompt positions takes "
               "(measured here), the default; off: up to --kvstore-timeout-ms");
  cli.add_option("--model-id", model_id,
                 "names the model's KV blocks in the store (default: the checkpoint folder's name)");
  cli.add_option("--compute-threads", compute_threads,
                 "threads of the CPU kernels' pool (default: the CPUs this process may use)")
      ->check(CLI::PositiveNumber);
  cli.add_option("--micro-batches", micro_batches,
                 "2: a step's sequences run as two halves whose attention and expert round trips overlap")
      ->check(CLI::IsMember({1, 2}))
      ->capture_default_str();
  if (auto rc = rt.start(argc, argv)) return *rc;

  try {
    if (compute_threads > 0) cpu::set_compute_threads(compute_threads);
    // First, so a missing device fails at once ("no CUDA device: ...") before weights load.
    const DeviceSpec dev = parse_device(device);
    auto backend = make_compute_backend(dev);
    const TransportCaps caps =
        service_caps(dev.kind == DeviceSpec::Kind::Cuda, kBuiltWithNccl, transport, backend->device_id());
    auto ckpt = Checkpoint::open(model_dir);
    ckpt->mutable_config().gating_temperature = gating_temperature;
    if (!router_bias.empty())
      ckpt->mutable_config().router_bias = parse_router_bias(router_bias, ckpt->config().num_experts);
    const ModelConfig& mc = ckpt->config();

    RemoteExpertsOptions ro;
    if (dispatch_min_timeout_ms > dispatch_timeout_ms)
      throw Error("--dispatch-min-timeout-ms (" + std::to_string(dispatch_min_timeout_ms) +
                  ") must not be above --dispatch-timeout-ms (" + std::to_string(dispatch_timeout_ms) + ")");
    ro.deadline = std::chrono::milliseconds(dispatch_timeout_ms);
    ro.min_deadline = std::chrono::milliseconds(dispatch_min_timeout_ms);
    ro.deadline_p99_multiple = dispatch_p99_multiple;
    ro.hedge_p99_multiple = hedge_multiple;
    ro.uncovered_wait = std::chrono::milliseconds(uncovered_wait_ms);
    ro.identity = rt.instance();
    ro.salt = std::hash<std::string>{}(rt.instance());
    ro.metrics = rt.metrics_ptr();
    auto expert_waits = std::make_shared<ExpertWaitLog>();  // the steps' expert_wait phase
    ro.waits = expert_waits;
    ro.transports = std::make_shared<PeerTransports>();
    // NCCL pairs with the expert hosts (joins on threads of their own), or none: all ZeroMQ.
    auto link = std::make_shared<CoordinatorLink>();
    std::shared_ptr<NcclPairs> pairs;
    if (caps.nccl) {
      NcclPairOptions no;
      no.instance = rt.instance();
      no.role = pb::ATTENTION;
      no.caps = caps;
#ifdef MOEMESH_HAVE_NCCL
      no.make_id = nccl_unique_id;
      no.join = nccl_join_on(dev.index);
#endif
      no.send = [link](const pb::ControlMessage& m) { link->send(m); };
      no.transports = ro.transports;
      pairs = std::make_shared<NcclPairs>(std::move(no));
    }
    auto remote = std::make_shared<RemoteExpertExecutor>(rt.system(), ro);
    if (kv_cache_mb > 0) {
      // Blocks of this model in this dtype that fit the budget (KvCache::bytes_per_block's formula).
      const KvCache probe(mc.num_hidden_layers, mc.num_key_value_heads * mc.head_dim, 1,
                          {parse_kv_dtype(kv_dtype), mc.num_key_value_heads});
      kv_blocks = (kv_cache_mb << 20) / probe.bytes_per_block();
      if (kv_blocks < 1)
        throw Error("--kv-cache-mb " + std::to_string(kv_cache_mb) + " holds no KV block of this model (one takes " +
                    std::to_string(probe.bytes_per_block()) + " bytes)");
      spdlog::info("attention: --kv-cache-mb {}: {} blocks of {} bytes ({} tokens, {})", kv_cache_mb, kv_blocks,
                   probe.bytes_per_block(), kv_blocks * KvCache::kBlockSize, kv_dtype);
    }
    auto engine = std::make_shared<Engine>(ckpt, EngineOptions{kv_blocks, parse_kv_dtype(kv_dtype), backend}, remote);
    std::vector<int32_t> eos;
    for (int64_t id : mc.eos_token_ids) eos.push_back(int32_t(id));
    StepWorkerOptions wo;
    wo.micro_batches = micro_batches;
    wo.expert_waits = expert_waits;
    wo.lora_cache = std::make_shared<LoraCache>(mc, uint64_t(lora_cache_mb) << 20, lora_dtype_for(*ckpt));
    wo.sample_from_summaries =
        summaries == "on" || (summaries == "auto" && parse_device(device).kind == DeviceSpec::Kind::Cuda);
    // Constrained decoding walks the tokenizer's tokens as bytes; a checkpoint without a
    // tokenizer serves unconstrained requests only.
    if (std::filesystem::is_regular_file(std::filesystem::path(model_dir) / "tokenizer.json"))
      wo.vocabulary = TokenVocabulary::from_tokenizer(*Tokenizer::from_dir(model_dir), eos, mc.vocab_size);
    std::shared_ptr<KvClient> kv;
    if (model_id.empty()) {
      const auto dir = std::filesystem::absolute(model_dir).lexically_normal();
      model_id = (dir.filename().empty() ? dir.parent_path() : dir).filename().string();
    }
    if (!kvstore.empty()) {
      KvClientOptions ko;
      ko.endpoint = kvstore;
      ko.model_id = model_id;
      ko.deadline = std::chrono::milliseconds(kvstore_timeout_ms);
      ko.identity = rt.instance();  // the store's spans name this worker as their peer
      ko.block_shape = {mc.num_hidden_layers, 2, KvCache::kBlockSize, mc.num_key_value_heads * mc.head_dim};
      kv = std::make_shared<KvClient>(rt.system(), ko);
    }
    std::shared_ptr<TieredPrefixStore> tier;
    if (kv || local_prefix_mb > 0) {
      tier = std::make_shared<TieredPrefixStore>(kv, uint64_t(local_prefix_mb) << 20);
      wo.prefix_store = tier;
      wo.model_id = model_id;
    }
    wo.prefix_wait_budget = wait_budget;
    auto worker = std::make_shared<StepWorker>(engine, eos, wo);
    auto metrics = std::make_shared<StepServerMetrics>(rt.metrics(), kv, tier);
    auto pool = std::make_shared<ComputePool>(1);  // one step at a time: the worker owns the KV cache
    auto stats = std::make_shared<StepServerStats>();
    stats->kv_free_blocks = worker->free_blocks();
    spdlog::info(
        "attention: {} mapped {:.1f} MiB (no routed experts), KV cache {} blocks ({}, {:.1f} MiB), compute on {}{}, {} "
        "micro-batch(es), {}",
        model_dir, double(ckpt->mapped_bytes()) / (1 << 20), kv_blocks, kv_dtype,
        double(engine->kv_cache().bytes_per_block() * kv_blocks) / (1 << 20), backend->name(),
        wo.sample_from_summaries ? " (sampling from logits summaries)" : "", micro_batches,
        !wo.prefix_store ? std::string("no prefix cache")
                         : fmt::format("prefix cache: {} MiB in memory{}", local_prefix_mb,
                                       kv ? ", then the KV store " + kvstore + " as " + model_id : ""));

    ZmqBridge bridge(rt.system());
    const int step_sock = bridge.add({.name = "steps",
                                      .type = zmq::socket_type::router,
                                      .endpoint = listen,
                                      .bind = true,
                                      .heartbeats = kDataPlaneHeartbeats});
    if (advertise.empty()) advertise = bridge.endpoint(step_sock);

    // Ready once every routed expert has a live host in the newest placement table.
    auto covered = std::make_shared<std::atomic<bool>>(false);
    auto all_covered = [&mc](const PlacementTable& t) {
      for (int64_t l = 0; l < mc.num_hidden_layers; ++l)
        if (mc.is_moe_layer(l))
          for (int64_t e = 0; e < mc.num_experts; ++e)
            if (t.hosts_for(int32_t(l), int32_t(e)).empty()) return false;
      return true;
    };

    ControlClientOptions co;
    co.control_endpoint = control;
    co.placement_endpoint = placement;
    co.registration.set_instance(rt.instance());
    co.registration.set_role(pb::ATTENTION);
    co.registration.set_data_endpoint(advertise);
    co.registration.set_admin_endpoint(std::to_string(rt.admin().port()));
    co.registration.set_kv_blocks(kv_blocks);
    co.registration.set_pid(uint32_t(getpid()));
    co.registration.set_gpu(caps.gpu);  // for the pair rule
    co.registration.set_nccl(caps.nccl);
    co.registration.set_gpu_id(caps.gpu_id);
    ControlCallbacks cb;
    cb.fill_heartbeat = [covered, stats, remote](pb::Heartbeat& hb) {
      hb.set_ready(covered->load());
      hb.set_kv_free_blocks(stats->kv_free_blocks.load());
      hb.set_waiting_dispatches(remote->stats().waiting.load());
    };
    cb.on_placement = [remote, covered, all_covered, pairs](const pb::PlacementTable& t) {
      if (pairs) pairs->on_placement(t);
      PlacementTable table = placement_from_proto(t);
      const bool ok = all_covered(table);
      remote->set_placement(std::move(table));
      // Ready from the first table that covers every expert on: when a host dies later, steps
      // that need its experts wait for a replacement (--uncovered-wait-ms) on a worker that stays
      // ready, so the router keeps its sequences here instead of moving them.
      if (ok && !covered->exchange(true))
        spdlog::info("attention: placement v{}: every expert has a host", t.version());
      if (!ok)
        spdlog::warn("attention: placement v{}: experts missing; steps that need them wait for a host", t.version());
    };
    if (pairs) cb.on_nccl_pair = [pairs](const pb::NcclPairId& m) { pairs->on_message(m); };
    caf::actor client = spawn_control_client(rt.system(), bridge, co, cb);
    link->attach(client);
    bridge.start();
    serve_steps(bridge, step_sock, worker, pool, stats, metrics);
    rt.stop_on_shutdown(client);
    rt.admin().set_readiness([covered]() -> Readiness {
      return covered->load() ? Readiness{true, ""}
                             : Readiness{false, "waiting for a placement that covers every expert"};
    });
    spdlog::info("attention: steps on {}, coordinator {}", advertise, control);
    rt.wait_for_shutdown();
    spdlog::info("attention: shutting down");
    rt.shutdown();
    // No new steps; the step in flight finishes here, off the actor threads and the bridge's.
    stop_serving_steps(bridge, step_sock);
    pool->close();
    pool.reset();
    bridge.stop();
    kv.reset();
  } catch (const std::exception& e) {
    spdlog::error("attention: {}", e.what());
    return 1;
  }
  return 0;
}
