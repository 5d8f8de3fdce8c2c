// Per-request token sampling with its own seeded RNG.
//
// Order of processing (as Hugging Face's generate): repetition penalty (prompt + output tokens),
// presence/frequency penalties (output tokens, OpenAI), temperature, top_k, top_p, min_p; then a
// draw from the remaining distribution. temperature 0 is greedy: argmax of the penalised logits,
// ties to the lowest id. Logprobs are of the model's raw distribution (log_softmax of the
// unprocessed logits), as OpenAI and vLLM report them.
#pragma once
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/logits_summary.h"

namespace moemesh {

struct SamplingParams {
  double temperature = 1.0;         // 0: greedy
  int64_t top_k = 0;                // 0 (or < 0): off
  double top_p = 1.0;               // (0, 1]
  double min_p = 0.0;               // [0, 1]
  double repetition_penalty = 1.0;  // > 0; 1: off
  double presence_penalty = 0.0;    // [-2, 2]
  double frequency_penalty = 0.0;   // [-2, 2]
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  std::optional<uint64_t> seed;  // none: a random seed
  int64_t top_logprobs = 0;      // how many alternatives to report with each token
  // Added to a token's logit before anything else (OpenAI's logit_bias, [-100, 100]); applied by
  // whoever holds the full row (the attention worker), not by Sampler.
  std::vector<std::pair<int32_t, float>> logit_bias;

  // Throws moemesh::Error naming the first bad parameter.
  void validate() const;
};

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.0f;                        // of the chosen token, raw distribution
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs best (id, logprob), ties lowest id
};

class Sampler {
 public:
  // prompt: the prompt's token ids (repetition penalty counts them). eos_ids: the model's EOS
  // tokens, which stop generation unless ignore_eos.
  Sampler(SamplingParams params, std::span<const int32_t> prompt, std::vector<int32_t> eos_ids = {});

  // Chooses the next token from logits[vocab] and records it as output. First from the row's
  // summary (its k largest and its normaliser: one pass instead of sorting or exponentiating the
  // vocabulary; see docs/performance.md), which chooses exactly what sample_full_row would;
  // when the summary cannot decide, sample_full_row.
  SampledToken sample(std::span<const float> logits);
  // The reference: process() over the whole row, then the draw. The draw takes tokens in id order,
  // except with temperature and no cut, where the k largest (and the penalised ones) come first:
  // those are what a summary holds, so most draws end among them. `summary`, when the caller has
  // it: the row's summary for logits_request() as it is now, which that draw would otherwise
  // compute again.
  SampledToken sample_full_row(std::span<const float> logits, const LogitsSummary* summary = nullptr);
  // What this sampler needs of its next row of logits when the row stays on the device.
  LogitsRequest logits_request() const;
  // The token sample() would choose from the row that `summary` summarises (asked for with
  // `request`, made by logits_request() since the last token), when the summary decides it:
  // greedy with a clear winner, a top_k / top_p / min_p cut that stays among the known tokens, or
  // a draw without a cut that ends among them. Otherwise nullopt, with nothing drawn or recorded:
  // call sample_full_row() with the full row.
  std::optional<SampledToken> sample_from(const LogitsRequest& request, const LogitsSummary& summary);
  // Records a token chosen elsewhere (e.g. forced) as output.
  void accept(int32_t id);
  // Brings a fresh sampler to where one that had sampled `generated` would be: the same
  // penalties and the same RNG position (one draw per sampled token unless greedy), so a
  // preempted sequence resumed elsewhere draws exactly what it would have drawn.
  void replay(std::span<const int32_t> generated);
  // Whether generating `id` ends the request (stop ids, or EOS unless ignore_eos).
  bool is_stop(int32_t id) const;

  const SamplingParams& params() const { return params_; }
  const std::vector<int32_t>& output() const { return output_; }

  // The logits after penalties, temperature and the top_k/top_p/min_p filters (removed tokens
  // are -inf). With temperature 0 only the penalties apply. Exposed for tests.
  std::vector<float> process(std::span<const float> logits) const;

  // Uniform double in [0, 1) from the top 53 bits of one mt19937_64 draw.
  static double uniform(std::mt19937_64& rng);

 private:
  // A token whose logit the summary holds: raw, and v after the penalties and the temperature.
  struct Known {
    int32_t id;
    float raw, v;
  };
  // The summary's top k and watched tokens, by id, without repeats; nullopt for a malformed one.
  std::optional<std::vector<Known>> known_tokens(const LogitsRequest& request, const LogitsSummary& summary) const;
  // sample_full_row's draw without a cut (temperature alone): the known tokens first, then the
  // others, as sample_from draws it. False (nothing drawn) where a cut applies or every token is
  // known: there the draw is in id order. `summary`: as for sample_full_row.
  bool draw_known_first(std::span<const float> logits, std::span<const float> x, const LogitsSummary* summary,
                        int32_t& id);
  bool penalties_on() const;
  // The logit of `id` after the repetition and presence/frequency penalties.
  float penalised(int32_t id, float logit) const;

  SamplingParams params_;
  std::vector<int32_t> stop_;
  std::unordered_map<int32_t, int64_t> output_counts_;
  std::vector<int32_t> seen_;  // prompt + output ids, sorted unique (repetition penalty)
  std::vector<int32_t> output_;
  std::mt19937_64 rng_;
};

}  // namespace moemesh
