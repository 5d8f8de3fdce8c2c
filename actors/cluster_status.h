// Asking the coordinator for the cluster's state, for `moemesh status` and `moemesh up`.
// A plain synchronous DEALER round trip: these are command-line tools, not actors.
#pragma once
#include <chrono>
#include <optional>
#include <string>

#include "proto/control.pb.h"

namespace moemesh::actors {

// The coordinator's ClusterStatus, or nullopt when it did not answer within timeout.
std::optional<pb::ClusterStatus> query_cluster_status(const std::string& control_endpoint,
                                                      std::chrono::milliseconds timeout);

// A human-readable table: services, health, which host holds which experts, load.
std::string format_cluster_status(const pb::ClusterStatus& s);

// "attention", "expert", "kvstore" or "unknown": the role in status text and metric labels.
const char* role_name(pb::Role r);

}  // namespace moemesh::actors
