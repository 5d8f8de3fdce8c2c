#include "actors/admin_server.h"

#include <dirent.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <prometheus/gauge.h>
#include <prometheus/text_serializer.h>

#ifndef MOEMESH_VERSION
#define MOEMESH_VERSION "unknown"
#endif
#ifndef MOEMESH_GIT_COMMIT
#define MOEMESH_GIT_COMMIT "unknown"
#endif

namespace moemesh::actors {
namespace {

prometheus::MetricFamily one_value(std::string name, std::string help, prometheus::MetricType type, double v) {
  prometheus::ClientMetric m;
  if (type == prometheus::MetricType::Counter)
    m.counter.value = v;
  else
    m.gauge.value = v;
  return {std::move(name), std::move(help), type, {m}};
}

// Seconds since the epoch at which the machine booted (the "btime" line of /proc/stat).
double boot_time() {
  std::ifstream in("/proc/stat");
  std::string key;
  double v = 0;
  while (in >> key) {
    if (key == "btime") {
      in >> v;
      return v;
    }
    std::getline(in, key);
  }
  return 0;
}

size_t open_fds() {
  size_t n = 0;
  if (DIR* d = opendir("/proc/self/fd")) {
    while (readdir(d)) ++n;
    closedir(d);
    n = n >= 3 ? n - 3 : 0;  // ".", ".." and the directory's own fd
  }
  return n;
}

// The process_* metrics every Prometheus client library exports, read now.
std::vector<prometheus::MetricFamily> process_metrics() {
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> out;
  const double tick = double(sysconf(_SC_CLK_TCK));
  const double page = double(sysconf(_SC_PAGESIZE));

  std::ifstream stat("/proc/self/stat");
  std::string line;
  if (std::getline(stat, line)) {
    // The command name (field 2) may hold spaces: fields resume after its closing ')'.
    auto close = line.rfind(')');
    std::istringstream rest(close == std::string::npos ? "" : line.substr(close + 2));
    std::vector<std::string> t;  // t[0] is field 3 of proc(5)
    std::string tok;
    while (rest >> tok) t.push_back(tok);
    auto num = [&](size_t field) { return field - 3 < t.size() ? std::strtod(t[field - 3].c_str(), nullptr) : 0.0; };
    if (t.size() >= 20) {
      out.push_back(one_value("process_cpu_seconds_total", "User and system CPU time spent, in seconds.",
                              MetricType::Counter, (num(14) + num(15)) / tick));
      out.push_back(one_value("process_threads", "Number of OS threads.", MetricType::Gauge, num(20)));
      out.push_back(one_value("process_start_time_seconds", "Start time of the process since the epoch, in seconds.",
                              MetricType::Gauge, boot_time() + num(22) / tick));
    }
  }
  std::ifstream statm("/proc/self/statm");
  double size = 0, resident = 0;
  if (statm >> size >> resident) {
    out.push_back(one_value("process_virtual_memory_bytes", "Virtual memory size in bytes.", MetricType::Gauge,
                            size * page));
    out.push_back(one_value("process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::Gauge,
                            resident * page));
  }
  out.push_back(one_value("process_open_fds", "Number of open file descriptors.", MetricType::Gauge,
                          double(open_fds())));
  return out;
}

}  // namespace

AdminServer::AdminServer(AdminOptions opts, std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)),
      server_([&] {
        http::ServerOptions o;
        o.address = opts.address;
        o.port = opts.port;
        o.threads = 1;
        o.max_body_bytes = 64 << 10;
        o.name = "admin";
        return o;
      }()) {
  prometheus::BuildGauge()
      .Name("moemesh_build_info")
      .Help("Always 1; the labels say which build is running.")
      .Register(*registry_)
      .Add({{"version", MOEMESH_VERSION}, {"commit", MOEMESH_GIT_COMMIT}})
      .Set(1);

  server_.route("GET", "/metrics", [this](const http::Request&, http::Responder r) {
    r.send(200, "text/plain; version=0.0.4; charset=utf-8", scrape());
  });
  server_.route("GET", "/healthz", [](const http::Request&, http::Responder r) { r.send(200, "text/plain", "ok\n"); });
  server_.route("GET", "/readyz", [this](const http::Request&, http::Responder r) {
    ReadinessCheck check;
    {
      std::lock_guard<std::mutex> lk(mu_);
      check = readiness_;
    }
    Readiness state = check ? check() : Readiness{false, "starting"};
    if (state.ready)
      r.send(200, "text/plain", "ready\n");
    else
      r.send(503, "text/plain", "not ready: " + (state.reason.empty() ? std::string("unknown") : state.reason) + "\n");
  });
}

void AdminServer::set_readiness(ReadinessCheck check) {
  std::lock_guard<std::mutex> lk(mu_);
  readiness_ = std::move(check);
}

void AdminServer::start() { server_.start(); }

std::string AdminServer::scrape() const {
  auto families = registry_->Collect();
  for (auto& f : process_metrics()) families.push_back(std::move(f));
  std::ostringstream os;
  prometheus::TextSerializer().Serialize(os, families);
  return os.str();
}

}  // namespace moemesh::actors
