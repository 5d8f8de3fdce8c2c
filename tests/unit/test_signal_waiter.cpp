// actors/signal_waiter.h: signals reach the waiting thread, whichever thread the kernel hands
// them to, even where the process was started with them ignored.
#include <gtest/gtest.h>

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "actors/signal_waiter.h"

using namespace moemesh::actors;
using namespace std::chrono_literals;

namespace {

// A thread like OpenBLAS's pool, started before the waiter: the signals are not blocked there.
class ThreadWithoutTheMask {
 public:
  ThreadWithoutTheMask() {
    std::promise<void> unblocked;
    thread_ = std::thread([&] {
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGINT);
      sigaddset(&set, SIGTERM);
      pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
      unblocked.set_value();
      while (!done_) std::this_thread::sleep_for(1ms);
    });
    unblocked.get_future().wait();
  }
  ~ThreadWithoutTheMask() {
    done_ = true;
    thread_.join();
  }
  pthread_t handle() { return thread_.native_handle(); }

 private:
  std::atomic<bool> done_{false};
  std::thread thread_;
};

}  // namespace

TEST(SignalWaiter, ATimeoutWithoutASignalReturnsZero) {
  SignalWaiter w({SIGINT, SIGTERM});
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(w.wait(20ms), 0);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 20ms);
}

TEST(SignalWaiter, ReturnsTheSignalSentToTheProcess) {
  SignalWaiter w({SIGINT, SIGTERM});
  kill(getpid(), SIGTERM);
  EXPECT_EQ(w.wait(), SIGTERM);
  raise(SIGINT);
  EXPECT_EQ(w.wait(), SIGINT);
}

TEST(SignalWaiter, ASignalHandedToAThreadWithoutTheMaskStillArrives) {
  // Started as a shell's background job: SIGINT ignored. The kernel hands a signal to any thread
  // that has it unblocked; there an ignored one would be dropped, SIGTERM would kill the process.
  signal(SIGINT, SIG_IGN);
  ThreadWithoutTheMask old;
  SignalWaiter w({SIGINT, SIGTERM});
  pthread_kill(old.handle(), SIGINT);
  EXPECT_EQ(w.wait(5s), SIGINT);
  pthread_kill(old.handle(), SIGTERM);
  EXPECT_EQ(w.wait(5s), SIGTERM);
}
