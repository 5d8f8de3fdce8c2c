#include "actors/nccl_pairs.h"

#include <thread>

#include <spdlog/spdlog.h>

#include "actors/control_client.h"
#include "core/error.h"

namespace moemesh::actors {

void CoordinatorLink::attach(caf::actor client) {
  std::lock_guard<std::mutex> lk(mu_);
  client_ = std::move(client);
}

void CoordinatorLink::send(const pb::ControlMessage& m) {
  caf::actor client;
  {
    std::lock_guard<std::mutex> lk(mu_);
    client = client_;
  }
  if (client) send_to_coordinator(client, m);
}

TransportCaps service_caps(bool cuda, bool built_with_nccl, const std::string& transport_flag, std::string gpu_id) {
  if (transport_flag != "auto" && transport_flag != "zmq")
    throw Error("--transport: \"" + transport_flag + "\", expected auto or zmq");
  return {cuda, cuda && built_with_nccl && transport_flag == "auto", std::move(gpu_id)};
}

struct NcclPairs::Shared {
  std::mutex mu;
  std::map<std::string, std::string> state;                     // peer instance -> where it stands
  std::map<std::string, std::string> endpoints;                 // worker: host instance -> its data endpoint
  std::map<std::string, std::shared_ptr<Transport>> joined;     // worker: rank 0 joined, awaiting JOINED
  std::map<std::string, bool> host_joined;                      // worker: JOINED came before our join returned
};

NcclPairs::NcclPairs(NcclPairOptions opts) : opts_(std::move(opts)), shared_(std::make_shared<Shared>()) {
  if (!opts_.send || !opts_.transports) throw Error("nccl pairs: send and transports are required");
  if (opts_.role != pb::ATTENTION && opts_.role != pb::EXPERT)
    throw Error("nccl pairs: only attention workers and expert hosts form dispatch pairs");
}

std::string NcclPairs::state(const std::string& peer_instance) const {
  std::lock_guard<std::mutex> lk(shared_->mu);
  auto it = shared_->state.find(peer_instance);
  return it == shared_->state.end() ? std::string() : it->second;
}

void NcclPairs::join_async(const std::string& peer_instance, const std::string& id, int rank,
                           std::function<void(std::shared_ptr<Transport>, const std::string&)> then) {
  // Detached, holding only copies: the join may outlive this object (until its timeout).
  std::thread([join = opts_.join, timeout = opts_.join_timeout, id, rank, peer_instance, then = std::move(then)] {
    std::shared_ptr<Transport> t;
    std::string error;
    try {
      t = join(id, rank, timeout);
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!error.empty()) spdlog::warn("nccl pair with {}: join as rank {} failed: {}", peer_instance, rank, error);
    then(std::move(t), error);
  }).detach();
}

void NcclPairs::on_placement(const pb::PlacementTable& table) {
  if (opts_.role != pb::ATTENTION || !opts_.join || !opts_.make_id) return;
  for (const auto& h : table.hosts()) {
    if (!h.live() || choose_transport(opts_.caps, {h.gpu(), h.nccl(), h.gpu_id()}) != TransportKind::Nccl) continue;
    {
      std::lock_guard<std::mutex> lk(shared_->mu);
      if (shared_->state.count(h.instance())) continue;  // offered once; a rejection stays ZeroMQ
      shared_->state[h.instance()] = "offered";
      shared_->endpoints[h.instance()] = h.data_endpoint();
    }
    std::string id;
    try {
      id = opts_.make_id();
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lk(shared_->mu);
      shared_->state[h.instance()] = std::string("rejected: ") + e.what();
      continue;
    }
    pb::ControlMessage m;
    auto* p = m.mutable_nccl_pair_id();
    p->set_stage(pb::NcclPairId::OFFER);
    p->set_attention_instance(opts_.instance);
    p->set_expert_instance(h.instance());
    p->set_unique_id(id);
    opts_.send(m);
    spdlog::info("nccl pair with {}: offered, joining as rank 0", h.instance());
    join_async(h.instance(), id, 0,
               [shared = shared_, transports = opts_.transports, host = h.instance()](std::shared_ptr<Transport> t,
                                                                                      const std::string& error) {
                 std::lock_guard<std::mutex> lk(shared->mu);
                 if (!t) {
                   shared->state[host] = "rejected: " + error;
                   return;
                 }
                 if (shared->host_joined[host]) {  // JOINED arrived first
                   transports->set(shared->endpoints[host], std::move(t));
                   shared->state[host] = "joined";
                 } else {
                   shared->joined[host] = std::move(t);
                 }
               });
  }
}

void NcclPairs::on_message(const pb::NcclPairId& msg) {
  if (opts_.role == pb::ATTENTION) {  // the host's answer, or the coordinator's refusal
    if (msg.attention_instance() != opts_.instance) return;
    const std::string& host = msg.expert_instance();
    std::lock_guard<std::mutex> lk(shared_->mu);
    if (msg.stage() == pb::NcclPairId::REJECTED) {
      spdlog::warn("nccl pair with {}: rejected ({}), the pair stays on ZeroMQ", host, msg.error());
      shared_->state[host] = "rejected: " + msg.error();
      shared_->joined.erase(host);
      return;
    }
    if (auto it = shared_->state.find(host);
        msg.stage() != pb::NcclPairId::JOINED || it == shared_->state.end() || it->second != "offered")
      return;
    if (auto it = shared_->joined.find(host); it != shared_->joined.end()) {
      opts_.transports->set(shared_->endpoints[host], std::move(it->second));
      shared_->joined.erase(it);
      shared_->state[host] = "joined";
      spdlog::info("nccl pair with {}: joined, dispatch payloads go over NCCL", host);
    } else {
      shared_->host_joined[host] = true;  // our join is still returning
    }
    return;
  }
  // Expert host: an offer relayed by the coordinator.
  if (msg.stage() != pb::NcclPairId::OFFER || msg.expert_instance() != opts_.instance) return;
  const std::string worker = msg.attention_instance();
  auto answer = [send = opts_.send, msg](pb::NcclPairId::Stage stage, const std::string& error) {
    pb::ControlMessage m;
    auto* p = m.mutable_nccl_pair_id();
    *p = msg;
    p->clear_unique_id();
    p->set_stage(stage);
    p->set_error(error);
    send(m);
  };
  const std::string refusal = !opts_.join ? "this expert host was built without NCCL"
                              : choose_transport(opts_.caps, {true, true}) != TransportKind::Nccl
                                  ? "this expert host does not compute on a GPU"
                                  : "";
  if (!refusal.empty()) {
    {
      std::lock_guard<std::mutex> lk(shared_->mu);
      shared_->state[worker] = "rejected: " + refusal;
    }
    answer(pb::NcclPairId::REJECTED, refusal);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(shared_->mu);
    shared_->state[worker] = "offered";
  }
  join_async(worker, msg.unique_id(), 1,
             [shared = shared_, transports = opts_.transports, worker, answer](std::shared_ptr<Transport> t,
                                                                               const std::string& error) {
               const bool joined = t != nullptr;
               {
                 std::lock_guard<std::mutex> lk(shared->mu);
                 shared->state[worker] = joined ? "joined" : "rejected: " + error;
               }
               // Switch before answering: the worker sends NCCL payloads only after JOINED.
               if (joined) transports->set(worker, std::move(t));
               answer(joined ? pb::NcclPairId::JOINED : pb::NcclPairId::REJECTED, error);
             });
}

}  // namespace moemesh::actors
