// The OpenAI-compatible request and response shapes the router speaks (JSON), kept apart
// from HTTP and actors so they can be tested on their own.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/lora_ref.h"
#include "core/error.h"
#include "core/sampler.h"
#include "core/tenants.h"

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
  bool max_tokens_given = false;  // false: the server picks (completions: 16; chat: see the frontend)
  SamplingParams sampling;        // seed set only when the client gave one
  bool return_token_ids = false;  // vLLM's extension: each choice carries its token ids
  bool return_logits = false;     // moemesh debug extension: the logits of each sampled position
  bool stream = false;
  std::optional<int> logprobs;  // set when logprobs were asked: how many top alternatives
  std::string user;
  std::vector<std::string> stop;     // "stop": a string or a list of up to 4 non-empty strings
  int n = 1;                         // "n": 1..16
  bool include_usage = false;        // "stream_options": {"include_usage": true} (only with stream)
  std::optional<Priority> priority;  // "priority": "high" | "normal" | "low"
  bool chat = false;                 // set by parse_chat_request
  nlohmann::json messages;           // chat: the validated messages, each content a plain string
  bool echo = false;                 // completions "echo": true is refused
  // response_format json_object / json_schema as a constrained-decoding spec
  // (core/constrained_decoding.h); "" for plain text.
  std::string constraint;
  int32_t constraint_min_bytes = 0;  // the shortest output the constraint allows
  // Chat tools: the validated list ([{type: "function", function: {name, description,
  // parameters}}], null without tools), tool_choice ("none", "auto", "required", or the name of
  // the function it forces) and parallel_tool_calls.
  nlohmann::ordered_json tools;
  std::string tool_choice;
  bool parallel_tool_calls = true;
};

// Validates a /v1/completions body; throws ApiError (400) naming the bad parameter (any field it
// does not know is one). `raw`: the same body parsed with its key order, which JSON schemas keep.
CompletionRequest parse_completion_request(const nlohmann::json& body, const nlohmann::ordered_json* raw = nullptr);
// Validates a /v1/chat/completions body (messages instead of prompt; logprobs is a boolean and
// top_logprobs the count; tools); throws ApiError (400) naming the bad parameter.
CompletionRequest parse_chat_request(const nlohmann::json& body, const nlohmann::ordered_json* raw = nullptr);

// The constrained-decoding spec of a request whose tool_choice forces a call ("required" or a
// named function), for a model that writes calls in `format` (core/tool_calls.h); "" otherwise.
std::string forced_tool_call_constraint(const CompletionRequest& r, const std::string& format);

// One sampled token with its logprob and the top alternatives (id, logprob), best first.
struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
};
// A token's text (the frontend passes the tokenizer's piece decode).
using TokenText = std::function<std::string(int32_t)>;

struct ToolCallOut {
  std::string id, name, arguments;
};

struct CompletionChoice {
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<TokenLogprob> logprobs;
  bool with_logprobs = false;  // logprobs were asked: "logprobs" is an object, else null
  std::vector<std::vector<float>> logits;
  std::string finish_reason;
  std::vector<ToolCallOut> tool_calls;  // chat: the message's tool_calls (content null when text is empty)
};

// {prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details: {cached_tokens}}
nlohmann::json usage_json(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens);

// Logprobs of tokens in OpenAI's legacy completions shape: {tokens, token_logprobs,
// top_logprobs ({text: logprob} or null), text_offset}. Offsets count characters of the token
// texts, starting at *text_offset (0 when null), which is advanced past these tokens.
nlohmann::json completion_logprobs(const std::vector<TokenLogprob>& lp, const TokenText& token_text,
                                   int64_t* text_offset = nullptr);
// Logprobs in the chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}.
nlohmann::json chat_logprobs(const std::vector<TokenLogprob>& lp, const TokenText& token_text);

// /v1/completions, non-streaming: object "text_completion".
nlohmann::json completion_response(const std::string& id, int64_t created, const std::string& model,
                                   const std::vector<CompletionChoice>& choices, int64_t prompt_tokens,
                                   int64_t completion_tokens, int64_t cached_tokens, bool with_token_ids,
                                   const TokenText& token_text);
// /v1/chat/completions, non-streaming: object "chat.completion", choices[i] = {index,
// message: {role: "assistant", content}, finish_reason, logprobs}.
nlohmann::json chat_response(const std::string& id, int64_t created, const std::string& model,
                             const std::vector<CompletionChoice>& choices, int64_t prompt_tokens,
                             int64_t completion_tokens, int64_t cached_tokens, bool with_token_ids,
                             const TokenText& token_text);

// Streaming chunk of /v1/completions: object "text_completion", choices: [{index, text,
// finish_reason (null until the last), logprobs}]. text_offset: one counter per choice, kept
// across its chunks so logprobs.text_offset continues (see completion_logprobs); include_usage
// adds "usage": null.
nlohmann::json completion_chunk(const std::string& id, int64_t created, const std::string& model, int index,
                                const std::string& text, const std::vector<TokenLogprob>* logprobs,
                                const std::optional<std::string>& finish_reason, const TokenText& token_text,
                                int64_t* text_offset = nullptr, bool include_usage = false);
// Streaming chunk of /v1/chat/completions: object "chat.completion.chunk", choices: [{index,
// delta, finish_reason, logprobs}]. A choice's first delta is {"role": "assistant", "content": ""}.
nlohmann::json chat_chunk(const std::string& id, int64_t created, const std::string& model, int index,
                          const nlohmann::json& delta, const std::vector<TokenLogprob>* logprobs,
                          const std::optional<std::string>& finish_reason, const TokenText& token_text,
                          bool include_usage = false);
// The last chunk of a stream with include_usage: choices [] and usage.
nlohmann::json usage_chunk(bool chat, const std::string& id, int64_t created, const std::string& model, int64_t prompt,
                           int64_t completion, int64_t cached);

// GET /v1/models: the base model, then each LoRA adapter with the base as its parent (vLLM's shape).
nlohmann::json models_response(const std::string& model, int64_t created, const std::vector<LoraRef>& adapters = {});

}  // namespace moemesh::openai
