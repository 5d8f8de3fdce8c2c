#include "core/responses_api.h"

#include <set>

#include "core/openai_api.h"

namespace moemesh::openai {

using nlohmann::json;

namespace {

const std::set<std::string> kFields = {"model",
                                       "input",
                                       "instructions",
                                       "previous_response_id",
                                       "store",
                                       "stream",
                                       "truncation",
                                       "metadata",
                                       "max_output_tokens",
                                       "temperature",
                                       "top_p",
                                       "user",
                                       "service_tier",
                                       "text",
                                       "seed"};

std::string content_text(const json& content, const std::string& where) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array())
    throw invalid_request("'" + where + ".content' must be a string or a list of parts", "input");
  std::string text;
  for (size_t i = 0; i < content.size(); ++i) {
    const json& p = content[i];
    const std::string type = p.is_object() ? p.value("type", "") : "";
    if (type != "input_text" && type != "output_text" && type != "text")
      throw invalid_request(
          "'" + where + ".content[" + std::to_string(i) + "]': only input_text and output_text parts are supported",
          "input");
    if (!p.contains("text") || !p["text"].is_string())
      throw invalid_request("'" + where + ".content[" + std::to_string(i) + "].text' must be a string", "input");
    if (i) text += '\n';
    text += p["text"].get<std::string>();
  }
  return text;
}

}  // namespace

ResponsesRequest parse_responses_request(const json& body) {
  if (!body.is_object()) throw invalid_request("the request body must be a JSON object");
  for (const auto& [k, v] : body.items())
    if (!kFields.count(k)) throw invalid_request("'" + k + "' is not supported by this server", k);
  ResponsesRequest r;
  if (!body.contains("input") || body["input"].is_null()) throw invalid_request("'input' is required", "input");
  const json& in = body["input"];
  r.input = json::array();
  if (in.is_string()) {
    r.input.push_back({{"role", "user"}, {"content", in.get<std::string>()}});
  } else if (in.is_array() && !in.empty()) {
    for (size_t i = 0; i < in.size(); ++i) {
      const json& m = in[i];
      const std::string where = "input[" + std::to_string(i) + "]";
      if (!m.is_object() || (m.contains("type") && m["type"] != "message"))
        throw invalid_request("'" + where + "': only message items are supported", "input");
      const std::string role = m.value("role", "");
      if (role != "user" && role != "assistant" && role != "system" && role != "developer")
        throw invalid_request("'" + where + ".role' must be user, assistant, system or developer", "input");
      if (!m.contains("content")) throw invalid_request("'" + where + ".content' is required", "input");
      r.input.push_back({{"role", role}, {"content", content_text(m["content"], where)}});
    }
  } else {
    throw invalid_request("'input' must be a string or a non-empty list of messages", "input");
  }
  auto str = [&](const char* k, std::string& out) {
    if (!body.contains(k) || body[k].is_null()) return;
    if (!body[k].is_string()) throw invalid_request(std::string("'") + k + "' must be a string", k);
    out = body[k].get<std::string>();
  };
  str("instructions", r.instructions);
  str("previous_response_id", r.previous_response_id);
  str("truncation", r.truncation);
  if (r.truncation != "auto" && r.truncation != "disabled")
    throw invalid_request("'truncation' must be auto or disabled", "truncation");
  for (const char* k : {"store", "stream"})
    if (body.contains(k) && !body[k].is_null() && !body[k].is_boolean())
      throw invalid_request(std::string("'") + k + "' must be a boolean", k);
  r.store = body.value("store", true);
  r.stream = body.contains("stream") && body["stream"].is_boolean() && body["stream"].get<bool>();
  if (body.contains("text") && !body["text"].is_null()) {
    const json& t = body["text"];
    if (!t.is_object() ||
        (t.contains("format") && (!t["format"].is_object() || t["format"].value("type", "") != "text")))
      throw invalid_request(
          "'text.format' other than text is not supported here (use chat completions' response_format)", "text");
  }
  r.metadata = body.contains("metadata") ? body["metadata"] : json();
  // The rest is a chat request's: validated by the chat parser (with messages added).
  r.chat_body = json::object();
  for (const char* k : {"temperature", "top_p", "user", "metadata", "service_tier", "seed"})
    if (body.contains(k)) r.chat_body[k] = body[k];
  if (body.contains("max_output_tokens")) r.chat_body["max_tokens"] = body["max_output_tokens"];
  if (r.stream) r.chat_body["stream"] = true;
  return r;
}

namespace {
// Where the turns start: messages before the first user message (system, developer) are a
// prefix that every truncation keeps.
std::vector<size_t> turn_starts(const json& messages) {
  std::vector<size_t> starts;
  for (size_t i = 0; i < messages.size(); ++i)
    if (messages[i].value("role", "") == "user") starts.push_back(i);
  return starts;
}

json without_turns(const json& messages, size_t prefix_end, size_t from) {
  std::vector<json> out(messages.begin(), messages.begin() + long(prefix_end));
  out.insert(out.end(), messages.begin() + long(from), messages.end());
  return json(std::move(out));
}
}  // namespace

json keep_last_turns(const json& messages, int turns) {
  const auto starts = turn_starts(messages);
  if (turns <= 0 || starts.size() <= size_t(turns)) return messages;
  return without_turns(messages, starts.front(), starts[starts.size() - size_t(turns)]);
}

bool drop_oldest_turn(json& messages) {
  const auto starts = turn_starts(messages);
  if (starts.size() < 2) return false;
  messages = without_turns(messages, starts[0], starts[1]);
  return true;
}

json response_object(const std::string& id, int64_t created_at, const std::string& model, const ResponsesRequest& req,
                     const ResponseOutcome* o) {
  json r{{"id", id},
         {"object", "response"},
         {"created_at", created_at},
         {"status", !o            ? "in_progress"
                    : o->complete ? "completed"
                                  : "incomplete"},
         {"model", model},
         {"output", json::array()},
         {"error", nullptr},
         {"incomplete_details", nullptr},
         {"instructions", req.instructions.empty() ? json(nullptr) : json(req.instructions)},
         {"previous_response_id", req.previous_response_id.empty() ? json(nullptr) : json(req.previous_response_id)},
         {"store", req.store},
         {"truncation", req.truncation},
         {"metadata", req.metadata.is_null() ? json::object() : req.metadata},
         {"temperature", req.chat_body.value("temperature", 1.0)},
         {"top_p", req.chat_body.value("top_p", 1.0)},
         {"max_output_tokens", req.chat_body.contains("max_tokens") ? req.chat_body["max_tokens"] : json(nullptr)},
         {"parallel_tool_calls", true},
         {"tool_choice", "auto"},
         {"tools", json::array()},
         {"text", {{"format", {{"type", "text"}}}}},
         {"usage", nullptr}};
  if (!o) return r;
  if (!o->complete) r["incomplete_details"] = {{"reason", "max_output_tokens"}};
  r["output"].push_back(
      {{"type", "message"},
       {"id", "msg_" + id.substr(id.find('_') + 1)},
       {"status", o->complete ? "completed" : "incomplete"},
       {"role", "assistant"},
       {"content", json::array({{{"type", "output_text"}, {"text", o->text}, {"annotations", json::array()}}})}});
  r["usage"] = {{"input_tokens", o->input_tokens},
                {"input_tokens_details", {{"cached_tokens", o->cached_tokens}}},
                {"output_tokens", o->output_tokens},
                {"output_tokens_details", {{"reasoning_tokens", 0}}},
                {"total_tokens", o->input_tokens + o->output_tokens}};
  return r;
}

json input_items(const std::string& response_id, const json& messages) {
  json data = json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    const std::string role = m.value("role", "user");
    data.push_back({{"type", "message"},
                    {"id", "msg_" + response_id.substr(response_id.find('_') + 1) + "_" + std::to_string(i)},
                    {"role", role},
                    {"status", "completed"},
                    {"content", json::array({{{"type", role == "assistant" ? "output_text" : "input_text"},
                                              {"text", m.value("content", std::string())}}})}});
  }
  return {{"object", "list"},
          {"data", data},
          {"first_id", data.empty() ? json(nullptr) : data.front()["id"]},
          {"last_id", data.empty() ? json(nullptr) : data.back()["id"]},
          {"has_more", false}};
}

}  // namespace moemesh::openai
