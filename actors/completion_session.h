// One OpenAI completion or chat request after validation and admission: a short-lived actor
// that runs its n choices through the scheduler and answers the client, either as one JSON
// body or as Server-Sent Events while the tokens arrive.
//
// Each choice's tokens go through a TextStream (core/text_stream.h): it decides which text is
// final and matches stop strings across token boundaries; a choice that hits a stop string is
// cancelled in the scheduler at once (its KV blocks are freed) and ends with "stop". A client
// that goes away cancels every choice. No HTTP thread waits: the Responder is completed from
// the actor.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <caf/all.hpp>

#include "actors/http_server.h"
#include "actors/scheduler.h"
#include "core/openai_api.h"
#include "core/responses_api.h"
#include "core/tokenizer.h"
#include "core/tool_calls.h"

namespace moemesh::actors {

// How the request ended, for the caller's metrics, tenant accounting and trace span.
struct SessionOutcome {
  int status = 200;               // 499 when the client went away
  std::string finish_reason;      // of the first choice: stop, length, cancelled, error, none
  int64_t completion_tokens = 0;  // over all choices
  std::string worker;             // of the first choice
  std::string text;               // of the first choice (the Responses API stores it)
  int64_t prompt_tokens = 0, cached_tokens = 0;
};

struct SessionSpec {
  openai::CompletionRequest request;  // stream, chat, n, stop, logprobs, ...
  GenerationRequest base;             // choice i gets seed base.seed + i
  std::string id, model;
  int64_t created = 0;
  std::shared_ptr<const Tokenizer> tokenizer;          // may be null (token-id prompts)
  http::HeaderList headers;                            // sent with the response (traceparent)
  std::function<void(const SessionOutcome&)> on_done;  // once, when the request has ended, before its answer goes out
  // Set when tools were offered (tool_choice other than none): calls in this format are parsed
  // out of each choice into tool_calls, and the stream holds back text that may start one.
  std::optional<ToolCallFormat> tool_format;
  // Set for POST /v1/responses: the answer is a response object, streamed as Responses events
  // (response.created, response.output_text.delta, ..., response.completed), n = 1.
  std::optional<openai::ResponsesRequest> responses;
};

void start_completion_session(caf::actor_system& sys, caf::actor scheduler, http::Responder res, SessionSpec spec);

}  // namespace moemesh::actors
