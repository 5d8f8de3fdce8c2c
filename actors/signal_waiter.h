// Signals taken by one thread, synchronously: a service's shutdown and reload, `moemesh up`'s
// Ctrl-C.
//
// The signals are blocked on the constructing thread (and so on every thread it starts after)
// and read through a signalfd. Threads started before main never blocked them (OpenBLAS starts
// its pool when the library loads), and the kernel may hand a process-directed signal to one of
// those: a handler passes it on through a pipe, where the default action would have killed the
// process, or an inherited "ignore" (a background job of a shell) would have dropped it.
#pragma once
#include <chrono>
#include <initializer_list>

#include <signal.h>

namespace moemesh::actors {

class SignalWaiter {
 public:
  // One waiter at a time in a process: the handler's pipe is the process's.
  explicit SignalWaiter(std::initializer_list<int> signals);
  ~SignalWaiter();
  SignalWaiter(const SignalWaiter&) = delete;
  SignalWaiter& operator=(const SignalWaiter&) = delete;

  // The next of the signals, or 0 when `timeout` passes first (negative: no timeout). Throws
  // moemesh::Error when waiting fails.
  int wait(std::chrono::milliseconds timeout = std::chrono::milliseconds(-1));

 private:
  int fd_ = -1;
};

}  // namespace moemesh::actors
