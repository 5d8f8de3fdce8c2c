#include "actors/expert_assigner.h"

#include <spdlog/spdlog.h>

#include "core/expert_set.h"

namespace moemesh::actors {

ExpertAssigner::ExpertAssigner(std::string instance, HostedExperts& experts, Send send, Applied applied)
    : instance_(std::move(instance)),
      experts_(experts),
      send_(std::move(send)),
      applied_(std::move(applied)),
      thread_([this] { run(); }) {}

ExpertAssigner::~ExpertAssigner() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

void ExpertAssigner::post(const pb::AssignExperts& a) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    next_ = a;
  }
  cv_.notify_one();
}

void ExpertAssigner::run() {
  for (;;) {
    pb::AssignExperts a;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stop_ || next_; });
      if (stop_) return;
      a = std::move(*next_);
      next_.reset();
    }
    ExpertSet want;
    for (const auto& id : a.experts()) want.insert({id.layer(), id.expert()});
    pb::ControlMessage m;
    auto* out = m.mutable_experts_loaded();
    out->set_instance(instance_);
    out->set_version(a.version());
    const ExpertSet before = experts_.experts();
    try {
      if (want.empty()) throw Error("an assignment of no experts");
      experts_.assign(want);
    } catch (const std::exception& e) {
      out->set_error(e.what());
      spdlog::error("expert host: re-placement {} refused: {}", a.version(), e.what());
    }
    const ExpertSet held = experts_.experts();
    for (const auto& [l, e] : held) {
      auto* id = out->add_experts();
      id->set_layer(l);
      id->set_expert(e);
    }
    if (held != before) {
      spdlog::info("expert host: re-placement {}: now serving {} experts: {}", a.version(), held.size(),
                   format_expert_set(held));
      if (applied_) applied_(held);
    }
    send_(m);
  }
}

pb::ControlMessage experts_loaded_refusal(const std::string& instance, const pb::AssignExperts& a,
                                          const std::string& why) {
  pb::ControlMessage m;
  auto* out = m.mutable_experts_loaded();
  out->set_instance(instance);
  out->set_version(a.version());
  out->set_error(why);
  return m;
}

}  // namespace moemesh::actors
