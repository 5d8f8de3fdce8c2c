// The OpenAI Responses API subset that carries a conversation on the server: request
// validation, turn keeping and truncation, and the response / stream-event / input-item shapes.
// (Generation itself goes through the chat path: actors/openai_frontend.cpp.)
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace moemesh::openai {

struct ResponsesRequest {
  nlohmann::json input;              // the new messages, [{role, content (a string)}]
  std::string instructions;          // a system message before the conversation (not carried over)
  std::string previous_response_id;  // continues that response's conversation
  bool store = true;
  bool stream = false;
  std::string truncation = "disabled";  // "auto": drop the oldest turns to fit the context
  nlohmann::json metadata;              // null or an object of strings
  nlohmann::json chat_body;             // the equivalent chat request, less its messages (max_tokens, temperature, ...)
};

// Validates a POST /v1/responses body; throws ApiError (400) naming the bad field.
ResponsesRequest parse_responses_request(const nlohmann::json& body);

// The last `turns` turns of a conversation (a turn starts at a user message); the messages before
// the first user message (system, developer) are always kept. turns <= 0 keeps everything.
nlohmann::json keep_last_turns(const nlohmann::json& messages, int turns);
// Drops the oldest turn (not the leading system messages); false when a single turn is left.
bool drop_oldest_turn(nlohmann::json& messages);

struct ResponseOutcome {
  std::string text;
  bool complete = true;  // false: stopped by max_output_tokens
  int64_t input_tokens = 0, output_tokens = 0, cached_tokens = 0;
};

// The response object (object "response"); status "in_progress" with an empty output while a
// stream starts, else "completed" / "incomplete".
nlohmann::json response_object(const std::string& id, int64_t created_at, const std::string& model,
                               const ResponsesRequest& req, const ResponseOutcome* outcome);
// GET /v1/responses/{id}/input_items: the messages the model was given, oldest first.
nlohmann::json input_items(const std::string& response_id, const nlohmann::json& messages);

}  // namespace moemesh::openai
