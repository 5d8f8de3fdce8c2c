// The attention worker's step logic: one StepRequest in, one StepResponse out.
//
// It owns the Engine (attention side; routed experts go through whatever ExpertExecutor the
// engine was built with) and each sequence's sampler. Problems of one sequence (unknown id,
// bad token, no KV room) fail that sequence only — it is freed and its result carries the
// error — and the rest of the step goes on. Not thread-safe: one compute thread calls it.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "core/engine.h"
#include "core/sampler.h"
#include "proto/dataplane.pb.h"

namespace moemesh::actors {

SamplingParams sampling_from_proto(const pb::SamplingParams& p);
void sampling_to_proto(const SamplingParams& s, pb::SamplingParams* p);

class StepWorker {
 public:
  StepWorker(std::shared_ptr<Engine> engine, std::vector<int32_t> eos_ids);

  // logits: receives the logits rows asked for (SeqResult.logits_tensor indexes it).
  pb::StepResponse run(const pb::StepRequest& req, std::vector<std::vector<float>>& logits);

  int64_t free_blocks() const { return engine_->kv_cache().free_blocks(); }
  int64_t num_blocks() const { return engine_->kv_cache().num_blocks(); }
  size_t sequences() const { return seqs_.size(); }
  uint64_t prompt_tokens_computed() const { return prompt_tokens_computed_; }

 private:
  struct Seq {
    SeqId id = 0;
    Sampler sampler;
  };
  void release(uint64_t seq);

  std::shared_ptr<Engine> engine_;
  std::vector<int32_t> eos_ids_;
  std::map<uint64_t, Seq> seqs_;  // by the router's sequence id
  uint64_t prompt_tokens_computed_ = 0;
};

}  // namespace moemesh::actors
