// The expert host's side of live re-placement (EPLB): applies the coordinator's AssignExperts to
// the HostedExperts on a thread of its own — mapping an expert's weights takes a while and must
// hold up neither the control client nor the batcher — and answers each with ExpertsLoaded.
#pragma once
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "actors/expert_compute.h"
#include "proto/control.pb.h"

namespace moemesh::actors {

class ExpertAssigner {
 public:
  using Send = std::function<void(const pb::ControlMessage&)>;
  using Applied = std::function<void(const ExpertSet& held)>;  // after a change (metrics, logs)

  ExpertAssigner(std::string instance, HostedExperts& experts, Send send, Applied applied = {});
  ~ExpertAssigner();  // finishes the assignment in progress; drops a queued one
  ExpertAssigner(const ExpertAssigner&) = delete;
  ExpertAssigner& operator=(const ExpertAssigner&) = delete;

  // From any thread. A newer assignment replaces one still queued (it names the whole set).
  void post(const pb::AssignExperts& a);

 private:
  void run();

  std::string instance_;
  HostedExperts& experts_;
  Send send_;
  Applied applied_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<pb::AssignExperts> next_;
  bool stop_ = false;
  std::thread thread_;
};

// The answer of a host that cannot take assignments (yet): holds nothing new, says why.
pb::ControlMessage experts_loaded_refusal(const std::string& instance, const pb::AssignExperts& a,
                                          const std::string& why);

}  // namespace moemesh::actors
