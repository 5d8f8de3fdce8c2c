// The CAF actor system config the tests share.
#pragma once
#include <caf/all.hpp>

namespace moemesh::testing {

// Two scheduler threads: enough for the actors under test, and small on a shared machine.
inline caf::actor_system_config& two_thread_config() {
  static caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  return cfg;
}

}  // namespace moemesh::testing
