// The internal admin port every service opens: GET /metrics (Prometheus text format 0.0.4),
// GET /healthz (200 while the process runs: liveness never depends on peers) and GET /readyz
// (200 only when the readiness check says so, else 503 with its reason).
//
// Besides the service's own metrics it exports moemesh_build_info{version,commit} and the
// standard process_* metrics (CPU seconds, resident/virtual memory, threads, open fds, start
// time), read from /proc at scrape time.
#pragma once
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include <prometheus/registry.h>

#include "actors/http_server.h"

namespace moemesh::actors {

struct Readiness {
  bool ready = false;
  std::string reason;  // why not ready; shown in the 503 body
};
// Called on the HTTP thread at each /readyz: must be thread-safe and quick.
using ReadinessCheck = std::function<Readiness()>;

struct AdminOptions {
  std::string address = "0.0.0.0";
  uint16_t port = 0;
};

class AdminServer {
 public:
  AdminServer(AdminOptions opts, std::shared_ptr<prometheus::Registry> registry);

  // Thread-safe; before or after start(). Without one, /readyz answers 503 "starting".
  void set_readiness(ReadinessCheck check);
  // Extra routes (debug endpoints) may be added here before start().
  http::HttpServer& http() { return server_; }

  void start();  // throws moemesh::Error when the port is taken
  void stop() { server_.stop(); }
  uint16_t port() const { return server_.port(); }
  prometheus::Registry& registry() { return *registry_; }

  // The whole /metrics body (also handy for tests and `moemesh status`).
  std::string scrape() const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  http::HttpServer server_;
  std::mutex mu_;
  ReadinessCheck readiness_;
};

}  // namespace moemesh::actors
