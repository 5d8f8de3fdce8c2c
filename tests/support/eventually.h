// Polling for what another thread or process does, in tests: a bound on a hang, not a timing
// assertion.
#pragma once
#include <chrono>
#include <thread>

namespace moemesh::testing {

// Polls `done` every 5 ms for up to `limit`; true as soon as it holds, false if it never did.
template <class F>
bool eventually(F done, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return done();
}

}  // namespace moemesh::testing
