// moemesh-kvstore: content-addressed KV blocks (prefix cache, offloaded sequences) in memory,
// under a byte budget, optionally spilling to a disk tier (--disk-dir, --disk-budget-bytes),
// served over ZeroMQ (protocol in actors/block_store.h).
#include <unistd.h>

#include <cstdlib>

#include <spdlog/spdlog.h>

#include "actors/block_store.h"
#include "actors/control_client.h"
#include "actors/service_runtime.h"
#include "actors/zmq_bridge.h"

using namespace moemesh;
using namespace moemesh::actors;

int main(int argc, char** argv) {
  ServiceRuntime rt("kvstore", 9400);
  std::string listen = "tcp://127.0.0.1:5600", advertise, control;
  uint64_t budget = 1ull << 30, disk_budget = 0;
  std::string disk_dir;
  int heartbeat_ms = 500;
  auto& cli = rt.cli();
  cli.add_option("--listen", listen, "endpoint to bind (ROUTER); tcp://HOST:* picks a free port")
      ->capture_default_str();
  cli.add_option("--advertise", advertise, "endpoint peers use to reach --listen (default: the bound one)");
  cli.add_option("--budget-bytes", budget, "memory for KV blocks; least recently used go first")
      ->check([](const std::string& v) {
        return std::strtoull(v.c_str(), nullptr, 10) > 0 ? std::string() : std::string("must be at least 1 byte");
      })
      ->capture_default_str();
  cli.add_option("--disk-dir", disk_dir, "directory of the disk tier (one file per block; kept across restarts)");
  cli.add_option("--disk-budget-bytes", disk_budget,
                 "disk for KV blocks evicted from memory (whole files); 0: no disk tier")
      ->capture_default_str();
  cli.add_option("--router", control, "coordinator control endpoint; when set, register and send heartbeats");
  cli.add_option("--heartbeat-ms", heartbeat_ms, "heartbeat interval")->check(CLI::Range(10, 60000));
  if (auto rc = rt.start(argc, argv)) return *rc;

  try {
    ZmqBridge bridge(rt.system());
    const int sock = bridge.add({.name = "kv",
                                 .type = zmq::socket_type::router,
                                 .endpoint = listen,
                                 .bind = true,
                                 .heartbeats = kDataPlaneHeartbeats});
    const std::string bound = bridge.endpoint(sock);
    if (advertise.empty()) advertise = bound;

    auto gauges = std::make_shared<BlockStoreGauges>();
    caf::actor store =
        spawn_block_store(rt.system(), bridge, sock, {budget, disk_dir, disk_budget, rt.metrics_ptr(), gauges});
    caf::actor client;
    if (!control.empty()) {
      ControlClientOptions co;
      co.control_endpoint = control;
      co.registration.set_instance(rt.instance());
      co.registration.set_role(pb::KVSTORE);
      co.registration.set_data_endpoint(advertise);
      co.registration.set_admin_endpoint(rt.flags().admin_address + ":" + std::to_string(rt.admin().port()));
      co.registration.set_pid(uint32_t(getpid()));
      co.heartbeat_interval = std::chrono::milliseconds(heartbeat_ms);
      ControlCallbacks cb;
      cb.fill_heartbeat = [gauges](pb::Heartbeat& hb) { hb.set_resident_bytes(gauges->bytes.load()); };
      client = spawn_control_client(rt.system(), bridge, co, cb);
    }
    bridge.start();
    rt.stop_on_shutdown(store);
    if (client) rt.stop_on_shutdown(client);
    rt.admin().set_readiness([] { return Readiness{true, ""}; });  // bound above: serving
    spdlog::info("kvstore: serving on {} (budget {} MiB{}){}", bound, budget >> 20,
                 disk_budget ? fmt::format(", disk {} MiB in {}", disk_budget >> 20, disk_dir) : "",
                 control.empty() ? "" : ", coordinator " + control);

    rt.wait_for_shutdown();
    rt.shutdown();
    bridge.stop();
  } catch (const std::exception& e) {
    spdlog::error("kvstore: {}", e.what());
    return 1;
  }
  return 0;
}
