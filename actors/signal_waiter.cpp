#include "actors/signal_waiter.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "core/error.h"

namespace moemesh::actors {
namespace {

int g_pipe[2] = {-1, -1};

void forward_signal(int sig) {
  const int saved = errno;
  const auto b = static_cast<unsigned char>(sig);
  [[maybe_unused]] auto n = ::write(g_pipe[1], &b, 1);
  errno = saved;
}

}  // namespace

SignalWaiter::SignalWaiter(std::initializer_list<int> signals) {
  sigset_t set;
  sigemptyset(&set);
  for (int s : signals) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  fd_ = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (fd_ < 0) throw Error(std::string("signalfd: ") + std::strerror(errno));
  if (g_pipe[0] < 0 && pipe2(g_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
    throw Error(std::string("pipe for signals: ") + std::strerror(errno));
  struct sigaction sa {};
  sa.sa_handler = forward_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int s : signals) sigaction(s, &sa, nullptr);
}

SignalWaiter::~SignalWaiter() {
  if (fd_ >= 0) ::close(fd_);
}

int SignalWaiter::wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int ms = -1;
    if (timeout.count() >= 0) {
      const auto left = deadline - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero()) return 0;
      ms = int(std::chrono::ceil<std::chrono::milliseconds>(left).count());
    }
    pollfd fds[2] = {{fd_, POLLIN, 0}, {g_pipe[0], POLLIN, 0}};
    const int n = poll(fds, 2, ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(std::string("waiting for signals failed: ") + std::strerror(errno));
    }
    if (n == 0) continue;  // the deadline decides (poll may wake a little early)
    // Non-blocking reads: a signal seen pending here may still be taken by a thread that never
    // blocked it, and then arrive through the pipe instead.
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo info{};
      if (::read(fd_, &info, sizeof info) == sizeof info) return int(info.ssi_signo);
    }
    if (fds[1].revents & POLLIN) {
      unsigned char b = 0;
      if (::read(g_pipe[0], &b, 1) == 1) return b;
    }
  }
}

}  // namespace moemesh::actors
