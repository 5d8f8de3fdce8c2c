// ServiceRuntime and AdminServer: common flags from the command line and a config file, the
// admin endpoints (/metrics, /healthz, /readyz) over real HTTP, and SIGTERM handling.
#include <gtest/gtest.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <fstream>
#include <future>
#include <thread>

#include <prometheus/counter.h>

#include "actors/service_runtime.h"
#include "tests/support/http_client.h"

using namespace moemesh::actors;
namespace bhttp = boost::beast::http;

namespace {

bhttp::response<bhttp::string_body> get(uint16_t port, const std::string& target) {
  return moemesh::testing::http_request(port, bhttp::verb::get, target);
}

std::optional<int> start(ServiceRuntime& rt, std::vector<std::string> args) {
  args.insert(args.begin(), "moemesh-test");
  std::vector<const char*> argv;
  for (auto& a : args) argv.push_back(a.c_str());
  return rt.start(int(argv.size()), argv.data());
}

}  // namespace

TEST(ServiceRuntime, FlagsFromConfigFileAndCommandLine) {
  std::string path = ::testing::TempDir() + "/moemesh_runtime_test.toml";
  {
    std::ofstream f(path);
    f << "threads = 3\nlog-level = \"debug\"\ninstance = \"from-file\"\nlisten = \"tcp://127.0.0.1:7000\"\n";
  }
  ServiceRuntime rt("test", 0);
  std::string listen = "tcp://127.0.0.1:1";
  rt.cli().add_option("--listen", listen);
  auto rc = start(rt, {"--config", path, "--instance", "from-flag", "--admin-address", "127.0.0.1"});
  ASSERT_FALSE(rc.has_value());
  EXPECT_EQ(rt.flags().threads, 3);
  EXPECT_EQ(rt.flags().log_level, "debug");
  EXPECT_EQ(rt.instance(), "from-flag");  // the command line wins over the file
  EXPECT_EQ(listen, "tcp://127.0.0.1:7000");  // service flags come from the file too
  EXPECT_NE(rt.admin().port(), 0);
  std::remove(path.c_str());
}

TEST(ServiceRuntime, DefaultsAreSmallAndNamed) {
  ServiceRuntime rt("test", 0);
  ASSERT_FALSE(start(rt, {"--admin-address", "127.0.0.1"}).has_value());
  EXPECT_GE(rt.flags().threads, 1);
  EXPECT_LE(rt.flags().threads, 4);
  EXPECT_EQ(rt.instance().rfind("test-", 0), 0u) << rt.instance();
}

TEST(ServiceRuntime, BadFlagsGiveAnExitCode) {
  {
    ServiceRuntime rt("test", 0);
    auto rc = start(rt, {"--threads", "0"});
    ASSERT_TRUE(rc.has_value());
    EXPECT_NE(*rc, 0);
  }
  {
    ServiceRuntime rt("test", 0);
    auto rc = start(rt, {"--log-level", "loud"});
    ASSERT_TRUE(rc.has_value());
    EXPECT_NE(*rc, 0);
  }
  {
    ServiceRuntime rt("test", 0);
    auto rc = start(rt, {"--cpu-wake-latency-us", "-5"});
    ASSERT_TRUE(rc.has_value());
    EXPECT_NE(*rc, 0);
  }
  {
    ServiceRuntime rt("test", 0);
    auto rc = start(rt, {"--config", "/nonexistent/moemesh.toml"});
    ASSERT_TRUE(rc.has_value());
    EXPECT_NE(*rc, 0);
  }
}

// With the permission (root, as CI runs) the service holds the limit and says so in /metrics;
// without it, it runs all the same and shows no limit.
TEST(ServiceRuntime, HoldsTheCpuWakeLatencyWhenItMayAndRunsEitherWay) {
  const bool may = ::access("/dev/cpu_dma_latency", W_OK) == 0;
  ServiceRuntime rt("test", 0);
  ASSERT_FALSE(start(rt, {"--admin-address", "127.0.0.1", "--cpu-wake-latency-us", "0"}).has_value());
  EXPECT_EQ(rt.flags().cpu_wake_latency_us, 0);
  const std::string body = get(rt.admin().port(), "/metrics").body();
  EXPECT_EQ(body.find("moemesh_cpu_wake_latency_limit_microseconds 0\n") != std::string::npos, may)
      << (may ? "the device is writable but no limit is shown" : "a limit is shown that could not be held") << body;
}

TEST(ServiceRuntime, AdminPortTakenIsAnExitCodeNotACrash) {
  ServiceRuntime a("test", 0);
  ASSERT_FALSE(start(a, {"--admin-address", "127.0.0.1"}).has_value());
  ServiceRuntime b("test", 0);
  auto rc = start(b, {"--admin-address", "127.0.0.1", "--admin-port", std::to_string(a.admin().port())});
  ASSERT_TRUE(rc.has_value());
  EXPECT_EQ(*rc, 1);
}

TEST(ServiceRuntime, AdminEndpoints) {
  ServiceRuntime rt("test", 0);
  ASSERT_FALSE(start(rt, {"--admin-address", "127.0.0.1"}).has_value());
  auto& requests = prometheus::BuildCounter().Name("moemesh_test_requests_total").Help("test").Register(rt.metrics());
  requests.Add({{"status", "ok"}}).Increment(7);
  uint16_t port = rt.admin().port();

  auto health = get(port, "/healthz");
  EXPECT_EQ(health.result_int(), 200u);

  auto not_ready = get(port, "/readyz");
  EXPECT_EQ(not_ready.result_int(), 503u);
  EXPECT_NE(not_ready.body().find("starting"), std::string::npos);
  std::atomic<bool> ready{false};
  rt.admin().set_readiness([&] { return Readiness{ready.load(), "weights not loaded"}; });
  auto still = get(port, "/readyz");
  EXPECT_EQ(still.result_int(), 503u);
  EXPECT_NE(still.body().find("weights not loaded"), std::string::npos);
  ready = true;
  EXPECT_EQ(get(port, "/readyz").result_int(), 200u);

  auto metrics = get(port, "/metrics");
  EXPECT_EQ(metrics.result_int(), 200u);
  EXPECT_EQ(metrics[bhttp::field::content_type].substr(0, 30), "text/plain; version=0.0.4; cha");
  const std::string& body = metrics.body();
  EXPECT_NE(body.find("moemesh_test_requests_total{status=\"ok\"} 7"), std::string::npos) << body;
  EXPECT_NE(body.find("moemesh_build_info{commit=\""), std::string::npos) << body;
  EXPECT_NE(body.find("# TYPE process_cpu_seconds_total counter"), std::string::npos) << body;
  EXPECT_NE(body.find("process_resident_memory_bytes "), std::string::npos) << body;
  EXPECT_NE(body.find("process_start_time_seconds "), std::string::npos) << body;
  EXPECT_EQ(body.find("process_resident_memory_bytes 0\n"), std::string::npos) << body;
}

TEST(ServiceRuntime, WaitsForSigterm) {
  ServiceRuntime rt("test", 0);
  ASSERT_FALSE(start(rt, {"--admin-address", "127.0.0.1"}).has_value());
  // Blocked by the runtime, the signal waits for wait_for_shutdown instead of killing us.
  ServiceRuntime::request_shutdown();
  EXPECT_EQ(rt.wait_for_shutdown(), SIGTERM);
  std::raise(SIGINT);
  EXPECT_EQ(rt.wait_for_shutdown(), SIGINT);
}

TEST(ServiceRuntime, SigtermDeliveredToAThreadWithoutTheMask) {
  // Like OpenBLAS's pool, started before main: SIGTERM is not blocked there, so the kernel
  // delivers it to that thread; it must still reach wait_for_shutdown, not kill the process.
  ServiceRuntime rt("test", 0);
  ASSERT_FALSE(start(rt, {"--admin-address", "127.0.0.1"}).has_value());
  std::promise<void> unblocked;
  std::atomic<bool> done{false};
  std::thread old([&] {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    unblocked.set_value();
    while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  unblocked.get_future().wait();
  ServiceRuntime::request_shutdown();
  EXPECT_EQ(rt.wait_for_shutdown(), SIGTERM);
  done = true;
  old.join();
}
