// Constrained decoding's cost on the attention worker: decode steps of N streams through the
// StepWorker (engine + sampling) with every stream under a JSON schema, against the same steps
// unconstrained, interleaved round by round (the machine is shared and noisy). Prints per-step
// times, the ratio and the mask cache's hit rate.
//
//   bench_constrained_decoding --model DIR [--streams 32] [--steps 64] [--rounds 3]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "actors/step_worker.h"
#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/tokenizer.h"

using namespace moemesh;
using namespace moemesh::actors;

namespace {

const char* kSpec =
    R"({"type":"json_schema","schema":{"type":"object","properties":{"name":{"type":"string","maxLength":24},)"
    R"("age":{"type":"integer","minimum":0,"maximum":150},"email":{"type":"string","format":"email"},)"
    R"("tags":{"type":"array","items":{"type":"string"},"maxItems":5},"active":{"type":"boolean"}},)"
    R"("required":["name","age","tags","active"]}})";

// Decode seconds per step for `streams` sequences over `steps` steps (after one prefill step).
double run(const std::shared_ptr<Checkpoint>& ckpt, const std::shared_ptr<const TokenVocabulary>& vocab, int streams,
           int steps, bool constrained, uint64_t* hits, uint64_t* misses) {
  auto engine = std::make_shared<Engine>(ckpt, EngineOptions{int64_t(streams) * 8});
  std::vector<int32_t> eos;
  for (int64_t id : ckpt->config().eos_token_ids) eos.push_back(int32_t(id));
  StepWorkerOptions o;
  o.vocabulary = vocab;
  o.micro_batches = 1;
  StepWorker worker(engine, eos, o);
  std::vector<std::vector<float>> logits;
  pb::StepRequest first;
  first.set_step(0);
  for (int i = 0; i < streams; ++i) {
    auto* w = first.add_work();
    w->set_seq(uint64_t(i + 1));
    for (int t = 0; t < 8; ++t) w->add_tokens(int32_t(100 + 7 * i + t));
    w->set_is_first(true);
    w->set_sample(true);
    w->mutable_sampling()->set_temperature(1.0f);
    w->mutable_sampling()->set_seed(uint64_t(i));
    if (constrained) {
      w->set_constraint(kSpec);
      w->set_max_tokens(steps + 64);
    }
  }
  pb::StepResponse r = worker.run(first, logits);
  double seconds = 0;
  for (int s = 1; s <= steps; ++s) {
    pb::StepRequest req;
    req.set_step(uint64_t(s));
    for (const auto& res : r.results()) {
      if (!res.error().empty()) {
        std::fprintf(stderr, "sequence %llu failed: %s\n", (unsigned long long)res.seq(), res.error().c_str());
        std::exit(1);
      }
      auto* w = req.add_work();
      w->set_seq(res.seq());
      w->add_tokens(res.token());
      w->set_sample(true);
    }
    const auto t0 = std::chrono::steady_clock::now();
    r = worker.run(req, logits);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  *hits += worker.counts().constrained_tokens - worker.counts().constraint_mask_misses;
  *misses += worker.counts().constraint_mask_misses;
  return seconds / steps;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model;
  int streams = 32, steps = 64, rounds = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--model")
      model = argv[i + 1];
    else if (a == "--streams")
      streams = std::atoi(argv[i + 1]);
    else if (a == "--steps")
      steps = std::atoi(argv[i + 1]);
    else if (a == "--rounds")
      rounds = std::atoi(argv[i + 1]);
  }
  if (model.empty()) {
    std::fprintf(stderr, "usage: bench_constrained_decoding --model DIR [--streams N] [--steps N] [--rounds N]\n");
    return 2;
  }
  try {
    auto ckpt = Checkpoint::open(model);
    std::vector<int32_t> eos;
    for (int64_t id : ckpt->config().eos_token_ids) eos.push_back(int32_t(id));
    auto vocab = TokenVocabulary::from_tokenizer(*Tokenizer::from_dir(model), eos, ckpt->config().vocab_size);
    std::printf("%d streams, %d decode steps, %lld-token vocabulary\n", streams, steps, (long long)vocab->size());
    std::printf(
        "| round | unconstrained ms/step | constrained ms/step | ratio | mask cache hits |\n|---|---|---|---|---|\n");
    std::vector<double> ratios;
    for (int k = 0; k < rounds; ++k) {
      uint64_t hits = 0, misses = 0;
      const double plain = run(ckpt, vocab, streams, steps, false, &hits, &misses);
      const double constrained = run(ckpt, vocab, streams, steps, true, &hits, &misses);
      ratios.push_back(constrained / plain);
      std::printf("| %d | %.2f | %.2f | %.3f | %.1f%% |\n", k + 1, plain * 1e3, constrained * 1e3, constrained / plain,
                  100.0 * double(hits) / double(std::max<uint64_t>(hits + misses, 1)));
    }
    std::sort(ratios.begin(), ratios.end());
    std::printf("median ratio (constrained / unconstrained): %.3f\n", ratios[ratios.size() / 2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_constrained_decoding: %s\n", e.what());
    return 1;
  }
}
