// The OpenAI-compatible request and response shapes the router speaks (JSON), kept apart
// from HTTP and actors so they can be tested on their own.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/sampler.h"

namespace moemesh::openai {

// An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status.
class ApiError : public Error {
 public:
  ApiError(int status, std::string type, std::string message, std::string param = {}, std::string code = {})
      : Error(message), status_(status), type_(std::move(type)), param_(std::move(param)), code_(std::move(code)) {}
  int status() const { return status_; }
  nlohmann::json to_json() const;

 private:
  int status_;
  std::string type_, param_, code_;
};

ApiError invalid_request(std::string message, std::string param = {});

struct CompletionRequest {
  std::string model;
  std::optional<std::string> prompt_text;
  std::vector<int32_t> prompt_ids;  // when the prompt was given as token ids
  int64_t max_tokens = 16;
  SamplingParams sampling;          // seed set only when the client gave one
  bool return_token_ids = false;    // vLLM's extension: each choice carries its token ids
  bool return_logits = false;       // moemesh debug extension: the logits of each sampled position
  bool stream = false;
  std::optional<int> logprobs;      // completions API: number of top logprobs
  std::string user;
};

// Validates a /v1/completions body; throws ApiError (400) naming the bad parameter.
CompletionRequest parse_completion_request(const nlohmann::json& body);

struct CompletionChoice {
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<float> logprobs;
  std::vector<std::vector<float>> logits;
  std::string finish_reason;
};

nlohmann::json completion_response(const std::string& id, int64_t created, const std::string& model,
                                   const std::vector<CompletionChoice>& choices, int64_t prompt_tokens,
                                   int64_t completion_tokens, int64_t cached_tokens, bool with_token_ids);

nlohmann::json models_response(const std::string& model, int64_t created);

}  // namespace moemesh::openai
