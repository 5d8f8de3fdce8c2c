// The transport's own floor for the expert dispatch: a DEALER in this process sends a payload to
// a ROUTER in a forked child, which sends it straight back, blocking receives on both sides and
// nothing else (no bridge thread, no actors, no compute pool). Prints p10/p50/p90 of the round
// trip per payload size, with and without one condition-variable hand-off on the sending side
// (what each extra thread in the path costs on this machine). docs/performance.md compares the
// cluster's measured dispatch round trip (moemesh_attention_dispatch_round_trip_seconds) with it.
//
//   bench_zmq_round_trip [--rounds N] [--sizes 4096,8192,...]
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <zmq.hpp>

namespace {

using Clock = std::chrono::steady_clock;

// The child: binds a loopback TCP port (the cluster's transport), tells the parent which.
void echo(int report_fd) {
  zmq::context_t ctx(1);
  zmq::socket_t s(ctx, zmq::socket_type::router);
  s.bind("tcp://127.0.0.1:*");
  const std::string ep = s.get(zmq::sockopt::last_endpoint);
  if (::write(report_fd, ep.data(), ep.size()) != ssize_t(ep.size())) return;
  ::close(report_fd);
  while (true) {
    zmq::message_t id, m;
    if (!s.recv(id) || !s.recv(m)) return;
    if (m.size() == 0) return;  // the parent's stop message
    s.send(id, zmq::send_flags::sndmore);
    s.send(m, zmq::send_flags::none);
  }
}

// One round trip; with `hop`, the send and receive run on another thread that the caller waits for.
void round_trip(zmq::socket_t& c, const std::vector<char>& buf, bool hop) {
  auto once = [&] {
    c.send(zmq::buffer(buf), zmq::send_flags::none);
    zmq::message_t r;
    if (!c.recv(r)) std::abort();
  };
  if (!hop) return once();
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread t([&] {
    once();
    std::lock_guard lock(mu);
    done = true;
    cv.notify_one();
  });
  std::unique_lock lock(mu);
  cv.wait(lock, [&] { return done; });
  lock.unlock();
  t.join();
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 2000;
  std::vector<size_t> sizes{4096, 8192, 65536};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--rounds") {
      rounds = std::max(10, std::atoi(argv[i + 1]));
    } else if (a == "--sizes") {
      sizes.clear();
      std::stringstream ss(argv[i + 1]);
      for (std::string v; std::getline(ss, v, ',');) sizes.push_back(size_t(std::stoul(v)));
    }
  }
  int fds[2];
  if (::pipe(fds) != 0) return 1;
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(fds[0]);
    echo(fds[1]);
    std::_Exit(0);
  }
  ::close(fds[1]);
  std::string endpoint;
  char chunk[256];
  for (ssize_t n; (n = ::read(fds[0], chunk, sizeof chunk)) > 0;) endpoint.append(chunk, size_t(n));
  ::close(fds[0]);
  if (endpoint.empty()) return 1;
  {
    zmq::context_t ctx(1);
    zmq::socket_t c(ctx, zmq::socket_type::dealer);
    c.connect(endpoint);
    std::printf(
        "| payload (bytes) | extra hand-off | p10 (µs) | p50 (µs) | p90 (µs) |\n| ---: | --- | ---: | ---: | ---: |\n");
    for (size_t bytes : sizes)
      for (bool hop : {false, true}) {
        std::vector<char> buf(bytes, 1);
        std::vector<double> us;
        for (int i = 0; i < rounds + 100; ++i) {
          const auto t0 = Clock::now();
          round_trip(c, buf, hop);
          if (i >= 100) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        }
        std::sort(us.begin(), us.end());
        std::printf("| %zu | %s | %.0f | %.0f | %.0f |\n", bytes, hop ? "one" : "none", us[us.size() / 10],
                    us[us.size() / 2], us[us.size() * 9 / 10]);
      }
    c.send(zmq::message_t(), zmq::send_flags::none);  // stop the child
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return 0;
}
