// What a sampler needs of one row of logits when the row stays where it was computed (the GPU):
// the k largest logits, the log-normalisers at temperature 1 and at the request's temperature,
// and the logits of the tokens its penalties touch. Every other token's logit is at most the k-th
// largest and unpenalised, which is what lets Sampler::sample_from decide exactly, or say that it
// cannot (then the caller fetches the full row). A few hundred bytes per row instead of the
// vocabulary's 4 bytes per token.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace moemesh {

struct LogitsRequest {
  int64_t k = 64;               // how many of the largest logits
  double temperature = 1.0;     // for lse_scaled (0: greedy, lse_scaled = lse)
  std::vector<int32_t> watch;   // ids whose logits are wanted whatever their rank
  // Opaque to backends: the requesting Sampler's output length when it asked (what lets it
  // refuse a request made before its last token without rebuilding `watch`).
  size_t made_at = 0;
};

struct LogitsSummary {
  int64_t vocab = 0;
  std::vector<int32_t> top_ids;     // the k largest, by value descending, ties lowest id first
  std::vector<float> top_values;
  double lse = 0;                   // log Σ exp(logit)
  double lse_scaled = 0;            // log Σ exp(logit / temperature)
  std::vector<float> watch_values;  // the logits of request.watch, in its order (-inf: not a token)
};

// Throws moemesh::Error when k < 1 (every backend checks requests with it).
void check_logits_request(const LogitsRequest& request);

// The summary of one row on the host (the CPU backend's, and the reference for the CUDA kernel).
// Throws moemesh::Error for an empty row or k < 1.
LogitsSummary summarise_logits(std::span<const float> logits, const LogitsRequest& request);

}  // namespace moemesh
