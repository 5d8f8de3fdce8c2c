#include "actors/step_worker.h"

#include <algorithm>
#include <chrono>
#include <span>

#include <spdlog/spdlog.h>

#include "core/error.h"
#include "core/prefix_hash.h"

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
  for (const auto& [id, b] : p.logit_bias()) s.logit_bias.emplace_back(id, b);
  std::sort(s.logit_bias.begin(), s.logit_bias.end());  // a proto map has no order
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
  for (const auto& [id, b] : s.logit_bias) (*p->mutable_logit_bias())[id] = b;
}

StepWorker::StepWorker(std::shared_ptr<Engine> engine, std::vector<int32_t> eos_ids, StepWorkerOptions opts)
    : engine_(std::move(engine)), eos_ids_(std::move(eos_ids)), opts_(std::move(opts)) {
  if (opts_.micro_batches != 1 && opts_.micro_batches != 2)
    throw Error("micro_batches must be 1 or 2, got " + std::to_string(opts_.micro_batches));
}

std::shared_ptr<GrammarMasks> StepWorker::masks_for(const std::string& spec) {
  if (!opts_.vocabulary) throw Error("constrained decoding: this attention worker has no tokenizer");
  if (auto it = masks_.find(spec); it != masks_.end()) return it->second;
  if (masks_.size() >= 64) masks_.clear();  // specs differ per request only with their schema
  auto m = std::make_shared<GrammarMasks>(compile_constraint(spec), opts_.vocabulary);
  masks_.emplace(spec, m);
  return m;
}

void StepWorker::release(uint64_t seq, bool publish, const char* end) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  if (publish && opts_.prefix_store) gather_blocks(it->second);
  if (const Seq& s = it->second; s.span)
    s.span->finish("attention", "sequence",
                   {{"peer", "router"},
                    {"seq", seq},
                    {"end", end},
                    {"prompt_tokens", s.prompt_len},
                    {"generated_tokens", s.generated},
                    {"cached_tokens", s.restored},
                    {"steps", s.steps}});
  engine_->free_sequence(it->second.id);
  seqs_.erase(it);
}

StepWorker::PrefixBlocks StepWorker::fetch_prefixes(const std::vector<const pb::SeqWork*>& work) {
  PrefixBlocks found;
  if (!opts_.prefix_store) return found;
  std::vector<PrefixQuery> queries;
  std::vector<uint64_t> of;
  for (const pb::SeqWork* w : work) {
    if (!w->is_first() || w->prompt_size() == 0) continue;
    const Seq& s = seqs_.at(w->seq());
    // At least the last prompt token is computed: its logits are the first sample.
    const int64_t want = (s.prompt_len - 1) / kBlockTokens;
    if (want <= 0) continue;
    queries.push_back({prefix_block_keys(s.key_ns, std::span(s.tokens).first(size_t(want * kBlockTokens))), s.trace()});
    of.push_back(w->seq());
  }
  if (queries.empty()) return found;
  const auto t0 = std::chrono::steady_clock::now();
  WaitUntil give_up = kWaitForTheStore;
  if (opts_.prefix_wait_budget && prefill_speed_.per_position_s() > 0) {
    double positions = 0;  // what all hits together would spare
    for (const PrefixQuery& q : queries) positions += double(q.keys.size() * size_t(kBlockTokens));
    give_up = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(positions * prefill_speed_.per_position_s()));
  }
  auto blocks = opts_.prefix_store->fetch_many(queries, size_t(engine_->kv_cache().block_floats()), give_up);
  phases_.prefix_lookup = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (size_t i = 0; i < of.size(); ++i) found[of[i]] = std::move(blocks[i]);
  return found;
}

void StepWorker::learn_prefill_speed(const std::vector<StepInput>& inputs, uint64_t prompt_computed_before,
                                     double engine_seconds) {
  size_t rows = 0;
  for (const StepInput& in : inputs) rows += in.tokens.size();
  const uint64_t prompt = counts_.prompt_tokens_computed - prompt_computed_before;
  prefill_speed_.add(int64_t(rows), int64_t(prompt), engine_seconds);
}

void StepWorker::restore_prefix(Seq& s, int64_t max_blocks, const std::vector<std::vector<float>>& blocks) {
  const int64_t n = std::min<int64_t>(int64_t(blocks.size()), max_blocks);
  if (n <= 0) return;
  KvCache& kv = engine_->kv_cache();
  kv.reserve(s.id, n * kBlockTokens);
  for (int64_t b = 0; b < n; ++b) kv.write_block(s.id, b, blocks[size_t(b)].data());
  kv.set_length(s.id, n * kBlockTokens);
  s.restored = n * kBlockTokens;
}

void StepWorker::gather_blocks(const Seq& s) {
  KvCache& kv = engine_->kv_cache();
  const int64_t full = std::min<int64_t>(kv.length(s.id), int64_t(s.tokens.size())) / kBlockTokens;
  const int64_t first = s.restored / kBlockTokens;  // those came from the store
  if (full <= first) return;
  // Under a sliding window the leading blocks may be released already: the store's chain of keys
  // would have a gap, so such a sequence offers nothing.
  if (kv.first_held_block(s.id) > first) return;
  try {
    auto keys = prefix_block_keys(s.key_ns, std::span(s.tokens).first(size_t(full * kBlockTokens)));
    Publication p{{keys.begin() + first, keys.end()}, {}, s.trace()};
    for (int64_t b = first; b < full; ++b)
      kv.read_block(s.id, b, p.blocks.emplace_back(size_t(kv.block_floats())).data());
    freed_.push_back(std::move(p));
  } catch (const std::exception& e) {  // the store is an optimisation: never fail a step for it
    spdlog::warn("prefix cache: gathering sequence {}'s blocks failed: {}", s.id, e.what());
  }
}

void StepWorker::publish_freed() {
  for (Publication& p : freed_) {
    const size_t n = p.keys.size();
    opts_.prefix_store->publish(p.keys, std::move(p.blocks), p.trace);  // never throws
    counts_.published_blocks += n;
  }
  freed_.clear();
}

pb::StepResponse StepWorker::run(const pb::StepRequest& req, std::vector<std::vector<float>>& logits) {
  publish_freed();  // what the caller left of the step before
  StepPhaseTimer phase_timer(phases_);
  pb::StepResponse resp;
  resp.set_step(req.step());
  if (req.router_epoch() != router_epoch_) {
    // The router restarted: its old run's sequences have no one to step or free them.
    if (router_epoch_ != 0 && !seqs_.empty()) {
      spdlog::warn("step worker: the router restarted; releasing the {} sequences of its previous run", seqs_.size());
      while (!seqs_.empty()) release(seqs_.begin()->first, false, "orphaned");
    }
    router_epoch_ = req.router_epoch();
  }
  for (uint64_t seq : req.free()) release(seq, /*publish=*/true);

  const ModelConfig& cfg = engine_->config();
  KvCache& kv = engine_->kv_cache();
  std::vector<StepInput> inputs;
  std::vector<const pb::SeqWork*> admitted;
  std::map<uint64_t, int64_t> cached;  // first chunks' restored tokens, for their results
  int64_t blocks_left = kv.free_blocks();
  const uint64_t prompt_computed_before = counts_.prompt_tokens_computed;
  auto fail = [&](const pb::SeqWork& w, const std::string& why) {
    auto* r = resp.add_results();
    r->set_seq(w.seq());
    r->set_token(-1);
    r->set_logits_tensor(-1);
    r->set_error(why);
    release(w.seq(), false, "failed");
  };

  // First the work is checked and new sequences are made; then their prefix lookups go to the
  // store together, one round trip for the step; then each sequence's chunk is taken in.
  std::vector<const pb::SeqWork*> accepted;
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
      if (seqs_.count(w.seq())) release(w.seq(), false, "restarted");  // a resubmission starts over
      try {
        SamplingParams sp = sampling_from_proto(w.sampling());
        sp.validate();
        std::vector<int32_t> prompt(w.prompt().begin(), w.prompt().end());
        if (prompt.empty()) prompt.assign(w.tokens().begin(), w.tokens().end());
        Sampler sampler(sp, prompt, eos_ids_);
        // A resumed sequence: its context is prompt + what it generated before it was preempted.
        sampler.replay(std::span(w.generated().data(), size_t(w.generated_size())));
        std::vector<int32_t> context = prompt;
        context.insert(context.end(), w.generated().begin(), w.generated().end());
        const int64_t context_len = int64_t(context.size());
        std::string key_ns = w.cache_salt().empty() ? opts_.model_id : opts_.model_id + '\x1f' + w.cache_salt();
        Seq s{engine_->create_sequence(), std::move(sampler), std::move(context), context_len, 0, 0, std::move(key_ns)};
        // An unsampled request stays untraced here and on the hosts and the KV store it reaches.
        if (auto c = trace::parse_traceparent(w.traceparent()); c && c->sampled()) s.span.emplace(*c);
        if (!w.constraint().empty()) {
          s.constraint = std::make_shared<ConstrainedDecoder>(masks_for(w.constraint()), w.max_tokens());
          for (int32_t t : w.generated()) s.constraint->accept(t);
        }
        if (w.has_adapter() && !w.adapter().key().empty()) {
          if (!opts_.lora_cache) throw Error("this attention worker serves no LoRA adapters");
          const LoraRef ref{w.adapter().name(), w.adapter().path(), w.adapter().key()};
          s.adapter = opts_.lora_cache->get(ref, WeightSelection::attention_side());
        }
        seqs_.emplace(w.seq(), std::move(s));
      } catch (const Error& e) {
        fail(w, e.what());
        continue;
      }
    } else if (!seqs_.count(w.seq())) {
      fail(w, "unknown sequence " + std::to_string(w.seq()) + " (not started on this worker)");
      continue;
    }
    accepted.push_back(&w);
  }
  const PrefixBlocks prefixes = fetch_prefixes(accepted);

  for (const pb::SeqWork* wp : accepted) {
    const pb::SeqWork& w = *wp;
    if (!seqs_.count(w.seq())) continue;  // failed earlier in this step
    if (w.is_first() && opts_.prefix_store && w.prompt_size() > 0) {
      Seq& s = seqs_.at(w.seq());
      counts_.prefix_query_tokens += uint64_t(s.prompt_len);
      const int64_t free_before = kv.free_blocks();
      if (auto p = prefixes.find(w.seq()); p != prefixes.end()) {
        try {
          restore_prefix(s, blocks_left, p->second);
        } catch (const std::exception& e) {  // compute it all instead
          spdlog::warn("prefix cache: restoring sequence {} failed: {}", w.seq(), e.what());
          kv.set_length(s.id, 0);
          s.restored = 0;
        }
      }
      blocks_left -= free_before - kv.free_blocks();
      counts_.prefix_hit_tokens += uint64_t(s.restored);
      cached[w.seq()] = s.restored;
    }
    Seq& s = seqs_.at(w.seq());
    ++s.steps;

    // This chunk covers positions [fed, fed + n); those below `restored` are in the cache already.
    const int64_t n = w.tokens_size();
    bool mismatch = false;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = s.fed + i;
      const int32_t t = w.tokens(int(i));
      if (pos < int64_t(s.tokens.size())) {
        mismatch |= pos < s.restored && s.tokens[size_t(pos)] != t;
        s.tokens[size_t(pos)] = t;
      } else {
        s.tokens.push_back(t);
      }
    }
    if (mismatch) {
      fail(w, "sequence " + std::to_string(w.seq()) + ": chunk tokens differ from the prompt of its first chunk");
      continue;
    }
    const int64_t skip = std::clamp<int64_t>(s.restored - s.fed, 0, n);
    const int64_t prompt_in_chunk = std::clamp<int64_t>(s.prompt_len - s.fed, 0, n);
    if (skip == n) {  // all restored: nothing to compute for it in this step
      if (w.sample()) {
        fail(w, "sequence " + std::to_string(w.seq()) + ": asked to sample a position restored from the prefix cache");
        continue;
      }
      s.fed += n;
      counts_.prompt_tokens_skipped += uint64_t(skip);
      auto* r = resp.add_results();
      r->set_seq(w.seq());
      r->set_token(-1);
      r->set_logits_tensor(-1);
      if (auto c = cached.find(w.seq()); c != cached.end()) r->set_cached_tokens(int32_t(c->second));
      continue;
    }
    const int64_t need = kv.blocks_needed(s.id, kv.length(s.id) + (n - skip));
    if (need > blocks_left) {
      fail(w, "kv_full: no KV blocks left on this worker");
      continue;
    }
    blocks_left -= need;
    inputs.push_back({s.id, std::vector<int32_t>(w.tokens().begin() + skip, w.tokens().end()), false, s.trace()});
    inputs.back().adapter = s.adapter;
    if (opts_.sample_from_summaries && w.sample() && !w.return_logits() && !s.constraint &&
        s.sampler.params().logit_bias.empty())
      inputs.back().summary = s.sampler.logits_request();
    admitted.push_back(&w);
    s.fed += n;
    counts_.prompt_tokens_skipped += uint64_t(std::min(skip, prompt_in_chunk));
    counts_.prompt_tokens_computed += uint64_t(std::max<int64_t>(prompt_in_chunk - skip, 0));
  }
  if (inputs.empty()) return resp;

  std::vector<StepOutput> outs;
  const auto engine_t0 = std::chrono::steady_clock::now();
  try {
    outs = engine_->step(inputs, {opts_.micro_batches});
  } catch (const Error& e) {  // checked above, so this is unexpected: fail the whole step
    spdlog::error("step {}: {}", req.step(), e.what());
    for (const auto* w : admitted) fail(*w, e.what());
    return resp;
  }
  learn_prefill_speed(inputs, prompt_computed_before,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - engine_t0).count());
  if (opts_.expert_waits) phases_.expert_wait = blocked_seconds(engine_->last_lanes(), opts_.expert_waits->take());
  if (const MicroBatchTiming& t = engine_->last_timing(); t.micro_batches == 2) {
    ++counts_.microbatch_steps;
    counts_.microbatch_step_seconds += t.step_seconds;
    counts_.microbatch_overlap_seconds += t.overlap_seconds;
    counts_.last_overlap_ratio = t.step_seconds > 0 ? std::min(1.0, t.overlap_seconds / t.step_seconds) : 0.0;
  }
  for (size_t i = 0; i < admitted.size(); ++i) {
    const pb::SeqWork& w = *admitted[i];
    Seq& s = seqs_.at(w.seq());
    auto* r = resp.add_results();
    r->set_seq(w.seq());
    r->set_token(-1);
    r->set_logits_tensor(-1);
    if (auto c = cached.find(w.seq()); c != cached.end()) r->set_cached_tokens(int32_t(c->second));
    if (w.return_logits()) {
      r->set_logits_tensor(int32_t(logits.size()));
      logits.push_back(outs[i].logits);
    }
    if (w.sample()) {
      const auto t0 = std::chrono::steady_clock::now();
      std::optional<SampledToken> chosen;
      const bool shaped = s.constraint || !s.sampler.params().logit_bias.empty();
      if (shaped) {  // the full row, biased and masked before sampling
        std::span<float> row(outs[i].logits.data() + outs[i].logits.size() - engine_->config().vocab_size,
                             size_t(engine_->config().vocab_size));  // the last row, changed in place
        for (const auto& [id, b] : s.sampler.params().logit_bias)
          if (id >= 0 && size_t(id) < row.size()) row[size_t(id)] += b;
        if (s.constraint) {
          const uint64_t misses = s.constraint->masks_misses();
          try {
            s.constraint->apply(row);
          } catch (const Error& e) {
            r->set_error(e.what());
            release(w.seq(), false, "failed");
            continue;
          }
          counts_.constraint_mask_misses += s.constraint->masks_misses() - misses;
          ++counts_.constrained_tokens;
        }
        chosen = s.sampler.sample(row);
        if (s.constraint) s.constraint->accept(chosen->id);
      } else if (outs[i].summary) {
        chosen = s.sampler.sample_from(*inputs[i].summary, *outs[i].summary);
      }
      if (shaped) {
        ++counts_.sampled_from_full_row;
      } else if (chosen) {
        ++counts_.sampled_from_summary;
      } else {
        ++counts_.sampled_from_full_row;
        // The summary the step made, not one computed again from the row.
        chosen = outs[i].summary ? s.sampler.sample_full_row(engine_->full_logits(outs[i]), &*outs[i].summary)
                                 : s.sampler.sample(outs[i].logits);
      }
      const SampledToken& t = *chosen;
      phases_.sampling += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      ++s.generated;
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
