#include "actors/step_worker.h"

#include <spdlog/spdlog.h>

#include "core/error.h"

namespace moemesh::actors {

SamplingParams sampling_from_proto(const pb::SamplingParams& p) {
  SamplingParams s;
  s.temperature = p.temperature();
  s.top_k = p.top_k();
  s.top_p = p.top_p() > 0 ? p.top_p() : 1.0;
  s.min_p = p.min_p();
  s.repetition_penalty = p.repetition_penalty() > 0 ? p.repetition_penalty() : 1.0;
  s.presence_penalty = p.presence_penalty();
  s.frequency_penalty = p.frequency_penalty();
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  s.ignore_eos = p.ignore_eos();
  s.seed = p.seed();
  s.top_logprobs = p.top_logprobs();
  return s;
}

void sampling_to_proto(const SamplingParams& s, pb::SamplingParams* p) {
  p->set_temperature(float(s.temperature));
  p->set_top_k(int32_t(s.top_k));
  p->set_top_p(float(s.top_p));
  p->set_min_p(float(s.min_p));
  p->set_repetition_penalty(float(s.repetition_penalty));
  p->set_presence_penalty(float(s.presence_penalty));
  p->set_frequency_penalty(float(s.frequency_penalty));
  for (int32_t id : s.stop_token_ids) p->add_stop_token_ids(id);
  p->set_ignore_eos(s.ignore_eos);
  p->set_seed(s.seed.value_or(0));
  p->set_top_logprobs(int32_t(s.top_logprobs));
}

StepWorker::StepWorker(std::shared_ptr<Engine> engine, std::vector<int32_t> eos_ids)
    : engine_(std::move(engine)), eos_ids_(std::move(eos_ids)) {}

void StepWorker::release(uint64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  engine_->free_sequence(it->second.id);
  seqs_.erase(it);
}

pb::StepResponse StepWorker::run(const pb::StepRequest& req, std::vector<std::vector<float>>& logits) {
  pb::StepResponse resp;
  resp.set_step(req.step());
  for (uint64_t seq : req.free()) release(seq);

  const ModelConfig& cfg = engine_->config();
  KvCache& kv = engine_->kv_cache();
  std::vector<StepInput> inputs;
  std::vector<const pb::SeqWork*> admitted;
  int64_t blocks_left = kv.free_blocks();
  auto fail = [&](const pb::SeqWork& w, const std::string& why) {
    auto* r = resp.add_results();
    r->set_seq(w.seq());
    r->set_token(-1);
    r->set_logits_tensor(-1);
    r->set_error(why);
    release(w.seq());
  };

  for (const pb::SeqWork& w : req.work()) {
    if (w.tokens().empty()) {
      fail(w, "sequence " + std::to_string(w.seq()) + ": no tokens in this step");
      continue;
    }
    bool bad_token = false;
    for (int32_t t : w.tokens()) bad_token |= t < 0 || t >= cfg.vocab_size;
    if (bad_token) {
      fail(w, "token id out of range [0, " + std::to_string(cfg.vocab_size) + ")");
      continue;
    }
    if (w.is_first()) {
      if (seqs_.count(w.seq())) release(w.seq());  // a resubmission starts over
      try {
        SamplingParams sp = sampling_from_proto(w.sampling());
        sp.validate();
        std::vector<int32_t> prompt(w.prompt().begin(), w.prompt().end());
        if (prompt.empty()) prompt.assign(w.tokens().begin(), w.tokens().end());
        seqs_.emplace(w.seq(), Seq{engine_->create_sequence(), Sampler(sp, prompt, eos_ids_)});
      } catch (const Error& e) {
        fail(w, e.what());
        continue;
      }
    } else if (!seqs_.count(w.seq())) {
      fail(w, "unknown sequence " + std::to_string(w.seq()) + " (not started on this worker)");
      continue;
    }
    const Seq& s = seqs_.at(w.seq());
    const int64_t need = kv.blocks_needed(s.id, kv.length(s.id) + w.tokens_size());
    if (need > blocks_left) {
      fail(w, "kv_full: no KV blocks left on this worker");
      continue;
    }
    blocks_left -= need;
    inputs.push_back({s.id, std::vector<int32_t>(w.tokens().begin(), w.tokens().end()), false});
    admitted.push_back(&w);
    if (w.is_first() || !w.sample()) prompt_tokens_computed_ += w.tokens_size();
  }
  if (inputs.empty()) return resp;

  std::vector<StepOutput> outs;
  try {
    outs = engine_->step(inputs);
  } catch (const Error& e) {  // checked above, so this is unexpected: fail the whole step
    spdlog::error("step {}: {}", req.step(), e.what());
    for (const auto* w : admitted) fail(*w, e.what());
    return resp;
  }
  for (size_t i = 0; i < admitted.size(); ++i) {
    const pb::SeqWork& w = *admitted[i];
    Seq& s = seqs_.at(w.seq());
    auto* r = resp.add_results();
    r->set_seq(w.seq());
    r->set_token(-1);
    r->set_logits_tensor(-1);
    const std::span<const float> row(outs[i].logits.data(), size_t(cfg.vocab_size));
    if (w.return_logits()) {
      r->set_logits_tensor(int32_t(logits.size()));
      logits.emplace_back(row.begin(), row.end());
    }
    if (w.sample()) {
      SampledToken t = s.sampler.sample(row);
      r->set_token(t.id);
      r->set_logprob(t.logprob);
      for (const auto& [id, lp] : t.top) {
        auto* tl = r->add_top();
        tl->set_token(id);
        tl->set_logprob(lp);
      }
    }
  }
  return resp;
}

}  // namespace moemesh::actors
