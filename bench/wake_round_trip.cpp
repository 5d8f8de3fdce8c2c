// How fast this machine wakes a blocked process: two processes pass one byte back and forth over
// pipes for a while, each blocked in read() until the other writes, and the round trip's p10 /
// p50 / p90 / mean are printed as one JSON line. On the shared 2-core machine of
// docs/planner.md it moves between regimes (about 15, 21 and 23-26 µs, each lasting seconds)
// while pure compute holds within 2-3%, and the cluster's inter-token latency, which wakes threads
// at every hand-off of a step, moves with it. bench/planner_validate.py runs it around each
// benchmark run to record which regime the run met.
//
//   bench_wake_round_trip [--seconds S]
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  double seconds = 0.3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "bench_wake_round_trip: unknown argument %s (usage: [--seconds S])\n", a.c_str());
      return 2;
    }
  }
  if (!(seconds > 0)) {
    std::fprintf(stderr, "bench_wake_round_trip: --seconds must be positive\n");
    return 2;
  }
  int ping[2], pong[2];
  if (::pipe(ping) != 0 || ::pipe(pong) != 0) return 1;
  const pid_t child = ::fork();
  if (child < 0) return 1;
  if (child == 0) {  // echo each byte back; 'q' ends
    char c = 0;
    while (::read(ping[0], &c, 1) == 1 && c != 'q')
      if (::write(pong[1], &c, 1) != 1) break;
    std::_Exit(0);
  }
  using Clock = std::chrono::steady_clock;
  std::vector<double> us;
  const auto start = Clock::now();
  char c = 'p';
  while (std::chrono::duration<double>(Clock::now() - start).count() < seconds) {
    const auto t0 = Clock::now();
    if (::write(ping[1], &c, 1) != 1 || ::read(pong[0], &c, 1) != 1) return 1;
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  c = 'q';
  if (::write(ping[1], &c, 1) != 1) return 1;
  ::waitpid(child, nullptr, 0);
  if (us.empty()) return 1;
  const double mean = std::accumulate(us.begin(), us.end(), 0.0) / double(us.size());
  std::sort(us.begin(), us.end());
  std::printf("{\"round_trips\": %zu, \"p10_us\": %.2f, \"p50_us\": %.2f, \"p90_us\": %.2f, \"mean_us\": %.2f}\n",
              us.size(), us[us.size() / 10], us[us.size() / 2], us[us.size() * 9 / 10], mean);
  return 0;
}
