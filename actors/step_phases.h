// The attention step's wall time split into phases (moemesh_attention_step_phase_seconds):
//   expert_wait  wall time during which the step was blocked on expert hosts: no lane (forward
//                pass; two with micro-batches) was computing, each was waiting on its
//                DispatchRequests' replies or had already finished;
//   sampling     the sampler (penalties, softmax, top-k/p, the draw) after the forward passes;
//   prefix_lookup  waiting on the KV store for the stored prefixes of the sequences the step
//                starts (one round trip for all of them);
//   attention    everything else in the step (embeddings, attention, routers, shared/dense MLPs,
//                lm_head, prefix-cache restore and publish, frees).
// The four add up to the step's wall time. The waits are recorded where the remote expert
// executor blocks (actors/remote_experts.cpp), per thread, and matched to the engine's lanes.
#pragma once
#include <chrono>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "core/engine.h"

namespace moemesh::actors {

struct ExpertWait {
  std::thread::id thread;
  std::chrono::steady_clock::time_point begin, end;
};

// Waits recorded by the expert executor's threads, taken once per step. Thread-safe.
class ExpertWaitLog {
 public:
  void record(std::chrono::steady_clock::time_point begin, std::chrono::steady_clock::time_point end);
  std::vector<ExpertWait> take();

 private:
  std::mutex mu_;
  std::vector<ExpertWait> waits_;
};

// Seconds of the step, until its last lane ended, during which no lane computed: every lane was
// inside one of its own waits or past its end. Waits of threads that are not lanes are ignored.
double blocked_seconds(const StepLanes& lanes, std::span<const ExpertWait> waits);

struct StepPhases {
  double attention = 0, expert_wait = 0, sampling = 0, prefix_lookup = 0;
};

// Times one step: on destruction `phases.attention` becomes the wall time since construction
// minus the other phases (which the step fills in meanwhile).
class StepPhaseTimer {
 public:
  explicit StepPhaseTimer(StepPhases& phases) : phases_(phases), t0_(std::chrono::steady_clock::now()) { phases_ = {}; }
  ~StepPhaseTimer();
  StepPhaseTimer(const StepPhaseTimer&) = delete;
  StepPhaseTimer& operator=(const StepPhaseTimer&) = delete;

 private:
  StepPhases& phases_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace moemesh::actors
