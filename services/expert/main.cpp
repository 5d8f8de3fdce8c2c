// moemesh-expert: serves the FFN weights of a set of (layer, expert) pairs.
//
//   moemesh-expert --model DIR --experts "0:0-3,1:*" --listen tcp://127.0.0.1:5601
//   moemesh-expert --model DIR --router tcp://router:5550 --listen tcp://0.0.0.0:5601 --advertise tcp://host-3:5601
//
// Maps only its experts' tensors, answers DispatchRequests on a ROUTER socket (the batcher
// merges requests of one layer from several attention workers) and computes on a pool of
// --compute-threads threads. With --router it registers with the coordinator and sends
// heartbeats (with per-expert load); without --experts it serves what the coordinator assigns.
#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include <spdlog/spdlog.h>

#include "actors/control_client.h"
#include "actors/expert_assigner.h"
#include "actors/expert_batcher.h"
#include "actors/nccl_pairs.h"
#include "actors/expert_compute.h"
#include "actors/service_runtime.h"
#include "actors/zmq_bridge.h"
#include "core/backend_factory.h"
#include "core/checkpoint.h"
#include "core/error.h"
#include "core/expert_set.h"
#include "kernels/cpu/thread_pool.h"
#ifdef MOEMESH_HAVE_NCCL
#include "actors/nccl_transport.h"
constexpr bool kBuiltWithNccl = true;
#else
constexpr bool kBuiltWithNccl = false;
#endif

using namespace moemesh;
using namespace moemesh::actors;

namespace {

struct Flags {
  std::string model;
  std::optional<std::string> experts;
  std::string listen = "tcp://127.0.0.1:5601";
  std::string advertise;  // what peers connect to; default: the bound endpoint
  std::string router;
  std::string served_name;
  std::string device = "cpu";
  std::string transport = "auto";
  int compute_threads = 0;  // 0: the CPUs this process may use
  int64_t batch_window_us = 200;
  int64_t max_batch_rows = 8192;
  int64_t register_timeout_s = 300;
  bool expert_metrics = true;
  int64_t lora_cache_mb = 256;
};

pb::Register registration(const ServiceRuntime& rt, const std::string& endpoint, const std::string& model_id,
                          const ExpertSet* pinned, TransportCaps caps) {
  pb::Register r;
  r.set_instance(rt.instance());
  r.set_role(pb::EXPERT);
  r.set_data_endpoint(endpoint);
  r.set_model_id(model_id);
  r.set_pid(uint32_t(::getpid()));
  r.set_gpu(caps.gpu);  // for the pair rule
  r.set_nccl(caps.nccl);
  r.set_gpu_id(caps.gpu_id);
  if (pinned)
    for (const auto& [l, e] : *pinned) {
      auto* id = r.add_experts();
      id->set_layer(l);
      id->set_expert(e);
    }
  return r;
}

int serve(ServiceRuntime& rt, const Flags& f) {
  if (f.compute_threads < 0) throw Error("--compute-threads must be at least 1 (or 0: every CPU)");
  if (f.batch_window_us < 0) throw Error("--batch-window-us must not be negative");
  if (f.max_batch_rows < 1) throw Error("--max-batch-rows must be at least 1");
  if (!f.experts && f.router.empty()) throw Error("--experts is required when no --router coordinator is given");
  // First, so a missing device fails at once ("no CUDA device: ...") before weights load.
  const DeviceSpec dev = parse_device(f.device);
  const auto backend = make_compute_backend(dev);
  const TransportCaps caps =
      service_caps(dev.kind == DeviceSpec::Kind::Cuda, kBuiltWithNccl, f.transport, backend->device_id());
  // NCCL pairs with the attention workers (joins on threads of their own), or none: all ZeroMQ.
  auto transports = std::make_shared<PeerTransports>();
  auto link = std::make_shared<CoordinatorLink>();
  std::shared_ptr<NcclPairs> pairs;
  if (caps.nccl && !f.router.empty()) {
    NcclPairOptions no;
    no.instance = rt.instance();
    no.role = pb::EXPERT;
    no.caps = caps;
#ifdef MOEMESH_HAVE_NCCL
    no.join = nccl_join_on(dev.index);
#endif
    no.send = [link](const pb::ControlMessage& m) { link->send(m); };
    no.transports = transports;
    pairs = std::make_shared<NcclPairs>(std::move(no));
  }

  auto ckpt = Checkpoint::open(f.model);
  const std::string model_id = f.served_name.empty() ? ckpt->name() : f.served_name;
  std::optional<ExpertSet> pinned;
  if (f.experts) {
    pinned = parse_expert_spec(*f.experts, ckpt->config());
    if (pinned->empty()) throw Error("--experts: the set is empty");
  }

  ExpertHostMetrics metrics(rt.metrics());
  ExpertLoad load;
  std::atomic<bool> ready{false};
  std::atomic<uint64_t> mapped{0};
  rt.admin().set_readiness([&ready]() -> Readiness {
    return ready ? Readiness{true, ""} : Readiness{false, "loading expert weights"};
  });

  ZmqBridge bridge(rt.system());
  const int data = bridge.add({.name = "dispatch",
                               .type = zmq::socket_type::router,
                               .endpoint = f.listen,
                               .bind = true,
                               .heartbeats = kDataPlaneHeartbeats});
  // Until the experts are loaded, every request is answered not_ready at once.
  caf::actor not_ready = spawn_not_ready_replier(rt.system(), bridge.actor(), data);
  bridge.route(data, not_ready);
  const std::string endpoint = f.advertise.empty() ? bridge.endpoint(data) : f.advertise;

  // The coordinator: registration (its reply may assign our experts) and heartbeats.
  // Live re-placements, once the experts are loaded (the control client's callback posts to it).
  std::mutex assigner_mu;
  std::shared_ptr<ExpertAssigner> assigner;
  std::promise<pb::RegisterReply> registered;
  std::atomic<bool> got_reply{false};
  caf::actor control;
  if (!f.router.empty()) {
    ControlClientOptions co;
    co.control_endpoint = f.router;
    co.registration = registration(rt, endpoint, model_id, pinned ? &*pinned : nullptr, caps);
    ControlCallbacks cb;
    cb.on_registered = [&](const pb::RegisterReply& r) {
      if (!r.ok()) {  // the client registers again; say why meanwhile
        spdlog::error("expert host: the coordinator rejected the registration: {}", r.error());
        return;
      }
      if (!got_reply.exchange(true)) registered.set_value(r);
    };
    cb.fill_heartbeat = [&](pb::Heartbeat& hb) {
      hb.set_ready(ready);
      hb.set_mapped_weight_bytes(mapped);
      for (const auto& [key, rows] : load.drain()) {
        auto* l = hb.add_load();
        l->set_layer(key.first);
        l->set_expert(key.second);
        l->set_rows(rows);
      }
    };
    if (pairs) cb.on_nccl_pair = [pairs](const pb::NcclPairId& m) { pairs->on_message(m); };
    cb.on_assign_experts = [&assigner, &assigner_mu, link, instance = rt.instance()](const pb::AssignExperts& a) {
      std::shared_ptr<ExpertAssigner> as;
      {
        std::lock_guard<std::mutex> lk(assigner_mu);
        as = assigner;
      }
      if (as) return as->post(a);
      link->send(experts_loaded_refusal(instance, a, "the expert host is not serving (loading or stopping)"));
    };
    control = spawn_control_client(rt.system(), bridge, co, cb);
    link->attach(control);
  }
  bridge.start();

  ExpertSet set;
  if (pinned) {
    set = *pinned;
  } else {
    spdlog::info("expert host: asking the coordinator at {} which experts to serve", f.router);
    auto fut = registered.get_future();
    if (fut.wait_for(std::chrono::seconds(f.register_timeout_s)) != std::future_status::ready)
      throw Error("the coordinator at " + f.router + " did not accept the registration within " +
                  std::to_string(f.register_timeout_s) + " s");
    const pb::RegisterReply reply = fut.get();
    for (const auto& id : reply.assigned()) set.insert({id.layer(), id.expert()});
    if (set.empty()) throw Error("the coordinator assigned no experts to this host");
  }

  HostedExperts experts(ckpt, set, backend, uint64_t(f.lora_cache_mb) << 20);
  mapped = experts.mapped_bytes();
  metrics.mapped_weight_bytes.Set(double(experts.mapped_bytes()));
  spdlog::info("expert host: computing on {}", backend->name());
  // Tests read this line (and the next): keep its shape.
  spdlog::info("expert host: model {} ({} layers, hidden {}), serving {} experts: {}", model_id,
               ckpt->config().num_hidden_layers, experts.hidden(), set.size(), format_expert_set(set));
  // The host must map exactly its experts' tensors.
  spdlog::info("expert host: mapped_weight_bytes={} expected_bytes={}", experts.mapped_bytes(),
               experts.expected_bytes());

  {
    if (f.compute_threads > 0) cpu::set_compute_threads(f.compute_threads);  // one call uses them all
    ComputePool pool(cpu::compute_threads());
    BatcherOptions bo;
    bo.window = std::chrono::microseconds(f.batch_window_us);
    bo.max_batch_rows = f.max_batch_rows;
    // Without per-expert metrics: no rows_total{layer, expert} series and no load in heartbeats.
    caf::actor batcher =
        spawn_expert_batcher(rt.system(), {&experts, &pool, &metrics, f.expert_metrics ? &load : nullptr,
                                           bridge.actor(), data, bo, f.expert_metrics, transports.get()});
    bridge.route(data, batcher);
    caf::anon_send_exit(not_ready, caf::exit_reason::user_shutdown);
    {
      auto as = std::make_shared<ExpertAssigner>(
          rt.instance(), experts, [link](const pb::ControlMessage& m) { link->send(m); },
          [&](const ExpertSet&) {
            mapped = experts.mapped_bytes();
            metrics.mapped_weight_bytes.Set(double(mapped));
          });
      std::lock_guard<std::mutex> lk(assigner_mu);
      assigner = std::move(as);
    }
    ready = true;
    spdlog::info("expert host: listening on {} (advertised as {}, {} compute threads)", bridge.endpoint(data), endpoint,
                 cpu::compute_threads());

    const int sig = rt.wait_for_shutdown();
    spdlog::info("expert host: signal {}, shutting down", sig);
    ready = false;
    if (control) caf::anon_send_exit(control, caf::exit_reason::user_shutdown);
    {
      std::shared_ptr<ExpertAssigner> last;  // joined here, outside the lock
      std::lock_guard<std::mutex> lk(assigner_mu);
      last.swap(assigner);
    }
    bridge.stop();
    stop_expert_batcher(rt.system(), batcher);
  }  // the pool finishes queued batches here, before `experts` goes away
  rt.shutdown();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ServiceRuntime rt("expert", 9300);
  Flags f;
  auto& cli = rt.cli();
  cli.add_option("--model", f.model, "checkpoint folder (Hugging Face layout)")->required();
  cli.add_option("--experts", f.experts,
                 "experts to serve: all | LAYER:EXPERT items, each part N, N-M or * (e.g. \"0:0-3,1:*\"); "
                 "absent: the coordinator (--router) assigns them");
  cli.add_option("--listen", f.listen, "ROUTER endpoint to bind (tcp://127.0.0.1:* picks a free port)")
      ->capture_default_str();
  cli.add_option("--advertise", f.advertise, "endpoint peers connect to (default: the bound one)");
  cli.add_option("--router", f.router, "coordinator control endpoint (tcp://host:port)");
  cli.add_option("--served-model-name", f.served_name, "model id told to the coordinator (default: the folder's name)");
  cli.add_option("--device", f.device, "compute backend: cpu, cuda (= cuda:0) or cuda:N")->capture_default_str();
  cli.add_option("--transport", f.transport,
                 "dispatch payloads: auto (NCCL with attention workers that also compute on a GPU with NCCL, "
                 "else ZeroMQ) or zmq (always ZeroMQ)")
      ->check(CLI::IsMember({"auto", "zmq"}))
      ->capture_default_str();
  cli.add_option("--compute-threads", f.compute_threads,
                 "threads of the CPU kernels' pool and batches computed at once (0: the CPUs this process may use)")
      ->capture_default_str();
  cli.add_option("--lora-cache-mb", f.lora_cache_mb,
                 "memory for LoRA adapters' expert modules (least recently used out)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cli.add_option("--batch-window-us", f.batch_window_us, "how long a layer's batch waits for more requests")
      ->capture_default_str();
  cli.add_option("--max-batch-rows", f.max_batch_rows, "a batch with this many rows runs at once")
      ->capture_default_str();
  cli.add_option("--register-timeout-s", f.register_timeout_s, "how long to wait for the coordinator's assignment")
      ->capture_default_str();
  cli.add_flag("!--no-expert-metrics", f.expert_metrics,
               "no per-expert load metrics: moemesh_expert_rows_total{layer,expert} and the heartbeats' load "
               "(the coordinator's imbalance gauge) stay empty");
  if (auto rc = rt.start(argc, argv)) return *rc;
  try {
    return serve(rt, f);
  } catch (const std::exception& e) {
    spdlog::error("expert host: {}", e.what());
    std::fprintf(stderr, "moemesh-expert: %s\n", e.what());
    return 1;
  }
}
