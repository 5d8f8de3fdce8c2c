#include "actors/cluster_status.h"

#include <map>
#include <sstream>

#include <fmt/format.h>
#include <zmq.hpp>

namespace moemesh::actors {

std::optional<pb::ClusterStatus> query_cluster_status(const std::string& control_endpoint,
                                                      std::chrono::milliseconds timeout) {
  zmq::context_t ctx(1);
  zmq::socket_t s(ctx, zmq::socket_type::dealer);
  s.set(zmq::sockopt::linger, 0);
  s.connect(control_endpoint);
  pb::ControlMessage req;
  req.mutable_status_request();
  const std::string bytes = req.SerializeAsString();
  s.send(zmq::buffer(bytes), zmq::send_flags::dontwait);
  zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    zmq::poll(&item, 1, std::max(left, std::chrono::milliseconds(1)));
    if (!(item.revents & ZMQ_POLLIN)) continue;
    zmq::message_t m;
    if (!s.recv(m, zmq::recv_flags::dontwait)) continue;
    pb::ControlMessage reply;
    if (reply.ParseFromArray(m.data(), int(m.size())) && reply.has_status()) return reply.status();
  }
  return std::nullopt;
}

namespace {

// "0:0-3,5 1:0-7": experts grouped by layer, runs collapsed.
std::string experts_text(const google::protobuf::RepeatedPtrField<pb::ExpertId>& ids) {
  std::map<int, std::vector<int>> by_layer;
  for (const auto& e : ids) by_layer[e.layer()].push_back(e.expert());
  std::string out;
  for (auto& [layer, ex] : by_layer) {
    std::sort(ex.begin(), ex.end());
    if (!out.empty()) out += ' ';
    out += std::to_string(layer) + ':';
    for (size_t i = 0; i < ex.size();) {
      size_t j = i;
      while (j + 1 < ex.size() && ex[j + 1] == ex[j] + 1) ++j;
      if (i) out += ',';
      out += std::to_string(ex[i]);
      if (j > i) out += '-' + std::to_string(ex[j]);
      i = j + 1;
    }
  }
  return out.empty() ? "-" : out;
}

}  // namespace

const char* role_name(pb::Role r) {
  switch (r) {
    case pb::ATTENTION:
      return "attention";
    case pb::EXPERT:
      return "expert";
    case pb::KVSTORE:
      return "kvstore";
    default:
      return "unknown";
  }
}

std::string format_cluster_status(const pb::ClusterStatus& s) {
  std::ostringstream o;
  o << fmt::format("model {}  placement v{}  replicas {}  cluster {}\n", s.model_id(), s.placement_version(),
                   s.replicas(), s.ready() ? "READY" : "NOT READY");
  // Copies of each expert now (from the hosts' lists): min..max, and what is uncovered.
  std::map<std::pair<int, int>, int> copies;
  for (const auto& v : s.services())
    if (v.role() == pb::EXPERT)
      for (const auto& e : v.experts()) ++copies[{e.layer(), e.expert()}];
  int64_t waiting = 0;
  uint32_t restarts = 0;
  for (const auto& v : s.services()) waiting += v.waiting_dispatches(), restarts += v.restarts();
  int lo = 0, hi = 0;
  for (auto it = copies.begin(); it != copies.end(); ++it) {
    lo = it == copies.begin() ? it->second : std::min(lo, it->second);
    hi = std::max(hi, it->second);
  }
  o << fmt::format(
      "experts: {}..{} live copies each, {} uncovered{}; placement moves {}; re-placements {}{}; restarts {}; "
      "members expired {}; dispatches waiting for a host {}\n",
      lo, hi, s.uncovered_size(), s.uncovered_size() ? " (" + experts_text(s.uncovered()) + ")" : std::string(),
      s.placement_moves(), s.rebalances(), s.rebalancing() ? " (one in progress)" : "", restarts, s.expired_members(),
      waiting);
  o << fmt::format("{:<10} {:<28} {:<24} {:<6} {:>8} {:>8} {:>10} {:>10}  {}\n", "ROLE", "INSTANCE", "ENDPOINT",
                   "READY", "HB AGE", "RESTARTS", "ROWS", "RSS MiB", "EXPERTS / KV FREE");
  for (const auto& v : s.services()) {
    std::string extra = v.role() == pb::EXPERT ? experts_text(v.experts())
                        : v.role() == pb::ATTENTION
                            ? fmt::format("{} KV blocks free{}", v.kv_free_blocks(),
                                          v.waiting_dispatches() ? fmt::format(", {} dispatch(es) waiting for a host",
                                                                               v.waiting_dispatches())
                                                                 : std::string())
                            : "";
    o << fmt::format("{:<10} {:<28} {:<24} {:<6} {:>7.1f}s {:>8} {:>10} {:>10.1f}  {}\n", role_name(v.role()),
                     v.instance(), v.data_endpoint(), v.ready() ? "yes" : "no", v.last_heartbeat_age_s(), v.restarts(),
                     v.rows_total(), double(v.resident_bytes()) / (1 << 20), extra);
  }
  return o.str();
}

}  // namespace moemesh::actors
