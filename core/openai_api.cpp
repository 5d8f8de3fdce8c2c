#include "core/openai_api.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

#include "core/constrained_decoding.h"
#include "core/json_schema_grammar.h"
#include "core/unicode.h"

namespace moemesh::openai {

using nlohmann::json;

json ApiError::to_json() const {
  json e{{"message", what()}, {"type", type_}, {"param", nullptr}, {"code", nullptr}};
  if (!param_.empty()) e["param"] = param_;
  if (!code_.empty()) e["code"] = code_;
  return json{{"error", e}};
}

ApiError invalid_request(std::string message, std::string param) {
  return ApiError(400, "invalid_request_error", std::move(message), std::move(param));
}

namespace {

double number(const json& body, const char* key, double lo, double hi, double dflt) {
  if (!body.contains(key) || body[key].is_null()) return dflt;
  const json& v = body[key];
  if (!v.is_number()) throw invalid_request(std::string("'") + key + "' must be a number", key);
  double x = v.get<double>();
  if (!(x >= lo && x <= hi))
    throw invalid_request(std::string("'") + key + "' must be between " + json(lo).dump() + " and " + json(hi).dump(),
                          key);
  return x;
}

int64_t integer(const json& body, const char* key, int64_t lo, int64_t hi, int64_t dflt) {
  if (!body.contains(key) || body[key].is_null()) return dflt;
  const json& v = body[key];
  if (!v.is_number_integer()) throw invalid_request(std::string("'") + key + "' must be an integer", key);
  int64_t x = v.get<int64_t>();
  if (x < lo || x > hi)
    throw invalid_request(
        std::string("'") + key + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi), key);
  return x;
}

bool boolean(const json& body, const char* key, bool dflt) {
  if (!body.contains(key) || body[key].is_null()) return dflt;
  if (!body[key].is_boolean()) throw invalid_request(std::string("'") + key + "' must be a boolean", key);
  return body[key].get<bool>();
}

}  // namespace

namespace {

// What each endpoint accepts; any other field is refused by name, never silently ignored.
const std::set<std::string> kCommonFields = {"model",
                                             "max_tokens",
                                             "max_completion_tokens",
                                             "temperature",
                                             "top_p",
                                             "top_k",
                                             "min_p",
                                             "repetition_penalty",
                                             "presence_penalty",
                                             "frequency_penalty",
                                             "seed",
                                             "ignore_eos",
                                             "stop_token_ids",
                                             "stop",
                                             "n",
                                             "stream",
                                             "stream_options",
                                             "priority",
                                             "return_token_ids",
                                             "return_logits",
                                             "user",
                                             "logit_bias",
                                             "response_format",
                                             "metadata",
                                             "service_tier"};
const std::set<std::string> kCompletionFields = {"prompt", "logprobs", "best_of", "echo"};
const std::set<std::string> kChatFields = {
    "messages", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "store"};

void reject_unknown(const json& body, const std::set<std::string>& own) {
  for (const auto& [k, v] : body.items())
    if (!kCommonFields.count(k) && !own.count(k))
      throw invalid_request("'" + k + "' is not supported by this server", k);
}

// The schema parts of the body, with their key order (properties are generated in that order).
nlohmann::ordered_json ordered(const json& body, const nlohmann::ordered_json* raw, const char* key) {
  if (raw && raw->contains(key)) return (*raw)[key];
  return nlohmann::ordered_json::parse(body[key].dump());
}

// Compiles a constraint spec, turning what it cannot enforce into a 400 naming the keyword.
int32_t check_constraint(const std::string& spec, const char* param) {
  try {
    const auto g = compile_constraint(spec);
    return g->min_bytes(g->start());
  } catch (const SchemaError& e) {
    throw invalid_request(e.what(), param);
  } catch (const Error& e) {
    throw invalid_request(std::string("'") + param + "': " + e.what(), param);
  }
}

void parse_response_format(const json& body, const nlohmann::ordered_json* raw, CompletionRequest& r) {
  if (!body.contains("response_format") || body["response_format"].is_null()) return;
  const auto rf = ordered(body, raw, "response_format");
  if (!rf.is_object() || !rf.contains("type") || !rf["type"].is_string())
    throw invalid_request("'response_format' must be an object with a 'type'", "response_format");
  const std::string type = rf["type"].get<std::string>();
  nlohmann::ordered_json spec;
  if (type == "text") return;
  if (type == "json_object") {
    spec = {{"type", "json_object"}};
  } else if (type == "json_schema") {
    if (!rf.contains("json_schema") || !rf["json_schema"].is_object())
      throw invalid_request("'response_format.json_schema' must be an object", "response_format");
    const auto& js = rf["json_schema"];
    if (!js.contains("name") || !js["name"].is_string())
      throw invalid_request("'response_format.json_schema.name' must be a string", "response_format");
    if (js.contains("strict") && !js["strict"].is_null() && !js["strict"].is_boolean())
      throw invalid_request("'response_format.json_schema.strict' must be a boolean", "response_format");
    const auto schema = js.contains("schema") ? js["schema"] : nlohmann::ordered_json::object();
    spec = {{"type", "json_schema"}, {"schema", schema}};
  } else {
    throw invalid_request("'response_format.type' must be text, json_object or json_schema (got '" + type + "')",
                          "response_format");
  }
  r.constraint = spec.dump();
  r.constraint_min_bytes = check_constraint(r.constraint, "response_format");
}

// Parameters that /v1/completions and /v1/chat/completions share.
void parse_common(const json& body, CompletionRequest& r) {
  if (body.contains("model")) {
    if (!body["model"].is_string()) throw invalid_request("'model' must be a string", "model");
    r.model = body["model"].get<std::string>();
  }
  r.max_tokens = integer(body, "max_tokens", 1, 1 << 20, 16);
  r.max_tokens = integer(body, "max_completion_tokens", 1, 1 << 20, r.max_tokens);
  auto given = [&](const char* k) { return body.contains(k) && !body[k].is_null(); };
  r.max_tokens_given = given("max_tokens") || given("max_completion_tokens");
  auto& s = r.sampling;
  s.temperature = number(body, "temperature", 0, 2, 1.0);
  s.top_p = number(body, "top_p", 0, 1, 1.0);
  if (s.top_p == 0) throw invalid_request("'top_p' must be greater than 0", "top_p");
  s.top_k = integer(body, "top_k", -1, 1 << 20, 0);
  s.min_p = number(body, "min_p", 0, 1, 0.0);
  s.repetition_penalty = number(body, "repetition_penalty", 1e-6, 100, 1.0);
  s.presence_penalty = number(body, "presence_penalty", -2, 2, 0.0);
  s.frequency_penalty = number(body, "frequency_penalty", -2, 2, 0.0);
  if (body.contains("seed") && !body["seed"].is_null()) {
    if (!body["seed"].is_number_integer()) throw invalid_request("'seed' must be an integer", "seed");
    s.seed = uint64_t(body["seed"].get<int64_t>());
  }
  s.ignore_eos = boolean(body, "ignore_eos", false);
  if (body.contains("stop_token_ids") && !body["stop_token_ids"].is_null()) {
    if (!body["stop_token_ids"].is_array()) throw invalid_request("'stop_token_ids' must be a list", "stop_token_ids");
    for (const auto& t : body["stop_token_ids"]) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
        throw invalid_request("'stop_token_ids' must hold non-negative integers", "stop_token_ids");
      s.stop_token_ids.push_back(t.get<int32_t>());
    }
  }
  if (body.contains("stop") && !body["stop"].is_null()) {
    const json& st = body["stop"];
    if (st.is_string()) {
      r.stop.push_back(st.get<std::string>());
    } else if (st.is_array()) {
      if (st.size() > 4) throw invalid_request("'stop' may hold at most 4 strings", "stop");
      for (const auto& x : st) {
        if (!x.is_string()) throw invalid_request("'stop' must be a string or a list of strings", "stop");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      throw invalid_request("'stop' must be a string or a list of strings", "stop");
    }
    for (const auto& x : r.stop)
      if (x.empty()) throw invalid_request("'stop' strings must not be empty", "stop");
  }
  r.n = int(integer(body, "n", 1, 16, 1));
  r.stream = boolean(body, "stream", false);
  if (body.contains("stream_options") && !body["stream_options"].is_null()) {
    const json& so = body["stream_options"];
    if (!r.stream) throw invalid_request("'stream_options' is only allowed when 'stream' is true", "stream_options");
    if (!so.is_object()) throw invalid_request("'stream_options' must be an object", "stream_options");
    if (so.contains("include_usage") && !so["include_usage"].is_null() && !so["include_usage"].is_boolean())
      throw invalid_request("'stream_options.include_usage' must be a boolean", "stream_options");
    r.include_usage = boolean(so, "include_usage", false);
  }
  if (body.contains("priority") && !body["priority"].is_null()) {
    if (!body["priority"].is_string()) throw invalid_request("'priority' must be a string", "priority");
    try {
      r.priority = parse_priority(body["priority"].get<std::string>());
    } catch (const Error& e) {
      throw invalid_request(std::string("'priority': ") + e.what(), "priority");
    }
  }
  r.return_token_ids = boolean(body, "return_token_ids", false);
  r.return_logits = boolean(body, "return_logits", false);
  if (body.contains("user") && !body["user"].is_null()) {
    if (!body["user"].is_string()) throw invalid_request("'user' must be a string", "user");
    r.user = body["user"].get<std::string>();
  }
  if (body.contains("metadata") && !body["metadata"].is_null()) {
    const json& md = body["metadata"];
    if (!md.is_object() || md.size() > 16)
      throw invalid_request("'metadata' must be an object of at most 16 strings", "metadata");
    for (const auto& [k, v] : md.items())
      if (!v.is_string() || k.size() > 64 || v.get<std::string>().size() > 512)
        throw invalid_request("'metadata' values must be strings (keys up to 64, values up to 512 characters)",
                              "metadata");
  }
  if (body.contains("service_tier") && !body["service_tier"].is_null() && !body["service_tier"].is_string())
    throw invalid_request("'service_tier' must be a string", "service_tier");
  if (body.contains("logit_bias") && !body["logit_bias"].is_null()) {
    const json& lb = body["logit_bias"];
    if (!lb.is_object()) throw invalid_request("'logit_bias' must be an object of token id to bias", "logit_bias");
    if (lb.size() > 300) throw invalid_request("'logit_bias' may hold at most 300 tokens", "logit_bias");
    for (const auto& [k, v] : lb.items()) {
      size_t used = 0;
      long long id = -1;
      try {
        id = std::stoll(k, &used);
      } catch (const std::exception&) {
      }
      if (used != k.size() || id < 0 || id > INT32_MAX)
        throw invalid_request("'logit_bias' keys must be token ids (got '" + k + "')", "logit_bias");
      if (!v.is_number() || v.get<double>() < -100 || v.get<double>() > 100)
        throw invalid_request("'logit_bias' values must be numbers in [-100, 100]", "logit_bias");
      r.sampling.logit_bias.emplace_back(int32_t(id), v.get<float>());
    }
  }
}

const char* const kRoles[] = {"system", "user", "assistant", "tool", "developer"};

// A message's content: a string, or text parts joined by newlines (as vLLM joins them).
std::string message_content(const json& content, const std::string& where) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array())
    throw invalid_request("'" + where + ".content' must be a string or a list of content parts", "messages");
  std::string text;
  for (size_t i = 0; i < content.size(); ++i) {
    const json& part = content[i];
    const std::string at = where + ".content[" + std::to_string(i) + "]";
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
      throw invalid_request("'" + at + "' must be an object with a 'type'", "messages");
    if (part["type"] != "text")
      throw invalid_request("'" + at + "': content parts of type '" + part["type"].get<std::string>() +
                                "' are not supported (only 'text')",
                            "messages");
    if (!part.contains("text") || !part["text"].is_string())
      throw invalid_request("'" + at + ".text' must be a string", "messages");
    if (i) text += '\n';
    text += part["text"].get<std::string>();
  }
  return text;
}

json parse_messages(const json& body) {
  if (!body.contains("messages") || body["messages"].is_null())
    throw invalid_request("'messages' is required", "messages");
  const json& ms = body["messages"];
  if (!ms.is_array() || ms.empty()) throw invalid_request("'messages' must be a non-empty list", "messages");
  json out = json::array();
  for (size_t i = 0; i < ms.size(); ++i) {
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!ms[i].is_object()) throw invalid_request("'" + where + "' must be an object", "messages");
    json m = ms[i];
    if (!m.contains("role") || !m["role"].is_string())
      throw invalid_request("'" + where + ".role' must be a string", "messages");
    const std::string role = m["role"].get<std::string>();
    if (std::find(std::begin(kRoles), std::end(kRoles), role) == std::end(kRoles))
      throw invalid_request(
          "'" + where + ".role' must be one of system, user, assistant, tool, developer (got '" + role + "')",
          "messages");
    const bool calls = role == "assistant" && m.contains("tool_calls") && !m["tool_calls"].is_null();
    if (calls) {
      const json& tc = m["tool_calls"];
      if (!tc.is_array()) throw invalid_request("'" + where + ".tool_calls' must be a list", "messages");
      for (size_t k = 0; k < tc.size(); ++k) {
        const json& c = tc[k];
        const std::string at = where + ".tool_calls[" + std::to_string(k) + "]";
        if (!c.is_object() || !c.contains("id") || !c["id"].is_string() || !c.contains("function") ||
            !c["function"].is_object() || !c["function"].contains("name") || !c["function"]["name"].is_string() ||
            !c["function"].contains("arguments") || !c["function"]["arguments"].is_string())
          throw invalid_request(
              "'" + at + "' must be {id, type: \"function\", function: {name, arguments}} (arguments a JSON string)",
              "messages");
      }
    }
    if (role == "tool" && (!m.contains("tool_call_id") || !m["tool_call_id"].is_string()))
      throw invalid_request("'" + where + ".tool_call_id' is required for role 'tool'", "messages");
    if (calls && (!m.contains("content") || m["content"].is_null())) {
      m["content"] = nullptr;  // templates test `content is none` for pure tool-call turns
    } else {
      if (!m.contains("content")) throw invalid_request("'" + where + ".content' is required", "messages");
      m["content"] = message_content(m["content"], where);
    }
    out.push_back(std::move(m));
  }
  return out;
}

void parse_tools(const json& body, const nlohmann::ordered_json* raw, CompletionRequest& r) {
  const bool has_tools = body.contains("tools") && !body["tools"].is_null();
  if (has_tools) {
    const auto tools = ordered(body, raw, "tools");
    if (!tools.is_array() || tools.empty()) throw invalid_request("'tools' must be a non-empty list", "tools");
    if (tools.size() > 128) throw invalid_request("'tools' may hold at most 128 functions", "tools");
    std::set<std::string> names;
    r.tools = nlohmann::ordered_json::array();
    for (size_t i = 0; i < tools.size(); ++i) {
      const auto& t = tools[i];
      const std::string at = "tools[" + std::to_string(i) + "]";
      if (!t.is_object() || t.value("type", "") != "function" || !t.contains("function") || !t["function"].is_object())
        throw invalid_request("'" + at + "' must be {\"type\": \"function\", \"function\": {...}}", "tools");
      const auto& f = t["function"];
      const std::string name = f.contains("name") && f["name"].is_string() ? f["name"].get<std::string>() : "";
      const bool name_ok = !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
      });
      if (!name_ok) throw invalid_request("'" + at + ".function.name' must be 1-64 of a-z, A-Z, 0-9, _ and -", "tools");
      if (!names.insert(name).second) throw invalid_request("two tools are named '" + name + "'", "tools");
      if (f.contains("description") && !f["description"].is_null() && !f["description"].is_string())
        throw invalid_request("'" + at + ".function.description' must be a string", "tools");
      if (f.contains("strict") && !f["strict"].is_null() && !f["strict"].is_boolean())
        throw invalid_request("'" + at + ".function.strict' must be a boolean", "tools");
      nlohmann::ordered_json params =
          f.contains("parameters") && !f["parameters"].is_null()
              ? f["parameters"]
              : nlohmann::ordered_json{{"type", "object"}, {"properties", nlohmann::ordered_json::object()}};
      if (!params.is_object()) throw invalid_request("'" + at + ".function.parameters' must be a JSON schema", "tools");
      check_constraint(nlohmann::ordered_json{{"type", "json_schema"}, {"schema", params}}.dump(), "tools");
      nlohmann::ordered_json fn{{"name", name}};
      if (f.contains("description") && f["description"].is_string()) fn["description"] = f["description"];
      fn["parameters"] = params;
      r.tools.push_back({{"type", "function"}, {"function", fn}});
    }
  }
  r.tool_choice = has_tools ? "auto" : "none";
  if (body.contains("tool_choice") && !body["tool_choice"].is_null()) {
    const json& tc = body["tool_choice"];
    if (tc.is_string()) {
      r.tool_choice = tc.get<std::string>();
      if (r.tool_choice != "none" && r.tool_choice != "auto" && r.tool_choice != "required")
        throw invalid_request("'tool_choice' must be none, auto, required or {\"type\": \"function\", ...}",
                              "tool_choice");
    } else if (tc.is_object() && tc.value("type", "") == "function" && tc.contains("function") &&
               tc["function"].is_object() && tc["function"].contains("name") && tc["function"]["name"].is_string()) {
      r.tool_choice = tc["function"]["name"].get<std::string>();
      bool found = false;
      for (const auto& t : r.tools) found |= t["function"]["name"] == r.tool_choice;
      if (!found)
        throw invalid_request("'tool_choice' names '" + r.tool_choice + "', which is not in 'tools'", "tool_choice");
    } else {
      throw invalid_request("'tool_choice' must be none, auto, required or {\"type\": \"function\", ...}",
                            "tool_choice");
    }
    if (!has_tools && r.tool_choice != "none")
      throw invalid_request("'tool_choice' is set but no 'tools' were given", "tool_choice");
  }
  r.parallel_tool_calls = boolean(body, "parallel_tool_calls", true);
  if (r.tool_choice != "none" && r.tool_choice != "auto" && !r.constraint.empty())
    throw invalid_request("'response_format' cannot be combined with a tool_choice that forces a call",
                          "response_format");
}

void check_constrained(const CompletionRequest& r) {
  if (!r.constraint.empty() && r.sampling.ignore_eos)
    throw invalid_request("'ignore_eos' cannot be combined with 'response_format': the output ends with its value",
                          "ignore_eos");
}

}  // namespace

std::string forced_tool_call_constraint(const CompletionRequest& r, const std::string& format) {
  if (r.tool_choice == "none" || r.tool_choice == "auto" || r.tools.is_null()) return "";
  nlohmann::ordered_json tools = nlohmann::ordered_json::array();
  for (const auto& t : r.tools)
    if (r.tool_choice == "required" || t["function"]["name"] == r.tool_choice)
      tools.push_back({{"name", t["function"]["name"]}, {"parameters", t["function"]["parameters"]}});
  return nlohmann::ordered_json{
      {"type", "tool_calls"}, {"format", format}, {"tools", tools}, {"parallel", r.parallel_tool_calls}}
      .dump();
}

CompletionRequest parse_completion_request(const json& body, const nlohmann::ordered_json* raw) {
  if (!body.is_object()) throw invalid_request("the request body must be a JSON object");
  reject_unknown(body, kCompletionFields);
  CompletionRequest r;
  if (!body.contains("prompt")) throw invalid_request("'prompt' is required", "prompt");
  const json& p = body["prompt"];
  if (p.is_string()) {
    r.prompt_text = p.get<std::string>();
  } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
    for (const auto& t : p) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
        throw invalid_request("'prompt' token ids must be non-negative integers", "prompt");
      r.prompt_ids.push_back(t.get<int32_t>());
    }
  } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
    r.prompt_text = p[0].get<std::string>();
  } else {
    throw invalid_request("'prompt' must be a string or a list of token ids (batches are not supported)", "prompt");
  }
  if (r.prompt_text && r.prompt_text->empty()) throw invalid_request("'prompt' is empty", "prompt");
  parse_common(body, r);
  if (body.contains("logprobs") && !body["logprobs"].is_null()) {
    r.logprobs = int(integer(body, "logprobs", 0, 20, 0));
    r.sampling.top_logprobs = *r.logprobs;
  }
  if (body.contains("best_of") && !body["best_of"].is_null()) {
    if (!body["best_of"].is_number_integer() || body["best_of"].get<int64_t>() != r.n)
      throw invalid_request("'best_of' must equal 'n' (best-of sampling is not supported)", "best_of");
  }
  r.echo = boolean(body, "echo", false);
  if (r.echo) throw invalid_request("'echo' is not supported", "echo");
  parse_response_format(body, raw, r);
  check_constrained(r);
  return r;
}

CompletionRequest parse_chat_request(const json& body, const nlohmann::ordered_json* raw) {
  if (!body.is_object()) throw invalid_request("the request body must be a JSON object");
  if (body.contains("prompt")) throw invalid_request("'prompt' is not a chat parameter: send 'messages'", "prompt");
  reject_unknown(body, kChatFields);
  CompletionRequest r;
  r.chat = true;
  r.messages = parse_messages(body);
  parse_common(body, r);
  parse_response_format(body, raw, r);
  parse_tools(body, raw, r);
  check_constrained(r);
  const bool logprobs = boolean(body, "logprobs", false);
  const bool has_top = body.contains("top_logprobs") && !body["top_logprobs"].is_null();
  const int top = int(integer(body, "top_logprobs", 0, 20, 0));
  if (has_top && !logprobs) throw invalid_request("'top_logprobs' requires 'logprobs': true", "top_logprobs");
  if (logprobs) {
    r.logprobs = top;
    r.sampling.top_logprobs = top;
  }
  return r;
}

namespace {

// JSON has no -inf: clamp as OpenAI and vLLM do.
double finite_logprob(float lp) { return std::isfinite(lp) ? double(lp) : -9999.0; }

std::string text_of(const TokenText& token_text, int32_t id) {
  return token_text ? token_text(id) : "token_id:" + std::to_string(id);
}

int64_t count_chars(std::string_view s) {
  return std::count_if(s.begin(), s.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; });
}

json envelope(const std::string& id, const char* object, int64_t created, const std::string& model) {
  return json{{"id", id}, {"object", object}, {"created", created}, {"model", model}};
}

json finish_json(const std::optional<std::string>& finish_reason) {
  return finish_reason ? json(*finish_reason) : json(nullptr);
}

// A non-streaming response: chat choices carry a message, completion choices a text.
json full_response(bool chat, const std::string& id, int64_t created, const std::string& model,
                   const std::vector<CompletionChoice>& choices, int64_t prompt_tokens, int64_t completion_tokens,
                   int64_t cached_tokens, bool with_token_ids, const TokenText& token_text) {
  json cs = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const auto& c = choices[i];
    json o{{"index", i}};
    if (chat) {
      o["message"] = json{{"role", "assistant"}, {"content", c.text}};
      if (!c.tool_calls.empty()) {
        if (c.text.empty()) o["message"]["content"] = nullptr;
        json calls = json::array();
        for (const auto& t : c.tool_calls)
          calls.push_back(
              {{"id", t.id}, {"type", "function"}, {"function", {{"name", t.name}, {"arguments", t.arguments}}}});
        o["message"]["tool_calls"] = std::move(calls);
      }
    } else
      o["text"] = c.text;
    o["finish_reason"] = c.finish_reason.empty() ? json(nullptr) : json(c.finish_reason);
    o["logprobs"] = !c.with_logprobs ? json(nullptr)
                    : chat           ? chat_logprobs(c.logprobs, token_text)
                                     : completion_logprobs(c.logprobs, token_text);
    if (with_token_ids) o["token_ids"] = c.token_ids;
    if (!c.logits.empty()) o["logits"] = c.logits;
    cs.push_back(std::move(o));
  }
  json j = envelope(id, chat ? "chat.completion" : "text_completion", created, model);
  j["choices"] = std::move(cs);
  j["usage"] = usage_json(prompt_tokens, completion_tokens, cached_tokens);
  return j;
}

json chunk(const char* object, const std::string& id, int64_t created, const std::string& model, json choice,
           bool include_usage) {
  json j = envelope(id, object, created, model);
  j["choices"] = json::array({std::move(choice)});
  if (include_usage) j["usage"] = nullptr;
  return j;
}

}  // namespace

json usage_json(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens) {
  return json{{"prompt_tokens", prompt_tokens},
              {"completion_tokens", completion_tokens},
              {"total_tokens", prompt_tokens + completion_tokens},
              {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}}};
}

json completion_logprobs(const std::vector<TokenLogprob>& lp, const TokenText& token_text, int64_t* text_offset) {
  int64_t offset = text_offset ? *text_offset : 0;
  json tokens = json::array(), token_logprobs = json::array(), top_logprobs = json::array(), offsets = json::array();
  for (const auto& t : lp) {
    const std::string text = utf8::lossy(text_of(token_text, t.id));
    tokens.push_back(text);
    token_logprobs.push_back(finite_logprob(t.logprob));
    offsets.push_back(offset);
    offset += count_chars(text);
    if (t.top.empty()) {
      top_logprobs.push_back(nullptr);
      continue;
    }
    json top = json::object();
    for (const auto& [id, l] : t.top) {
      std::string k = utf8::lossy(text_of(token_text, id));
      if (!top.contains(k)) top[k] = finite_logprob(l);  // two ids with one text: keep the likelier
    }
    top_logprobs.push_back(std::move(top));
  }
  if (text_offset) *text_offset = offset;
  return json{
      {"tokens", tokens}, {"token_logprobs", token_logprobs}, {"top_logprobs", top_logprobs}, {"text_offset", offsets}};
}

json chat_logprobs(const std::vector<TokenLogprob>& lp, const TokenText& token_text) {
  // "bytes" carries the token's raw text, so clients can rebuild characters split over tokens.
  auto entry = [&](int32_t id, float l) {
    const std::string raw = text_of(token_text, id);
    json bytes = json::array();
    for (unsigned char c : raw) bytes.push_back(int(c));
    return json{{"token", utf8::lossy(raw)}, {"logprob", finite_logprob(l)}, {"bytes", std::move(bytes)}};
  };
  json content = json::array();
  for (const auto& t : lp) {
    json e = entry(t.id, t.logprob);
    e["top_logprobs"] = json::array();
    for (const auto& [id, l] : t.top) e["top_logprobs"].push_back(entry(id, l));
    content.push_back(std::move(e));
  }
  return json{{"content", std::move(content)}};
}

json completion_response(const std::string& id, int64_t created, const std::string& model,
                         const std::vector<CompletionChoice>& choices, int64_t prompt_tokens, int64_t completion_tokens,
                         int64_t cached_tokens, bool with_token_ids, const TokenText& token_text) {
  return full_response(false, id, created, model, choices, prompt_tokens, completion_tokens, cached_tokens,
                       with_token_ids, token_text);
}

json chat_response(const std::string& id, int64_t created, const std::string& model,
                   const std::vector<CompletionChoice>& choices, int64_t prompt_tokens, int64_t completion_tokens,
                   int64_t cached_tokens, bool with_token_ids, const TokenText& token_text) {
  return full_response(true, id, created, model, choices, prompt_tokens, completion_tokens, cached_tokens,
                       with_token_ids, token_text);
}

json completion_chunk(const std::string& id, int64_t created, const std::string& model, int index,
                      const std::string& text, const std::vector<TokenLogprob>* logprobs,
                      const std::optional<std::string>& finish_reason, const TokenText& token_text,
                      int64_t* text_offset, bool include_usage) {
  json c{{"index", index},
         {"text", text},
         {"finish_reason", finish_json(finish_reason)},
         {"logprobs", logprobs ? completion_logprobs(*logprobs, token_text, text_offset) : json(nullptr)}};
  return chunk("text_completion", id, created, model, std::move(c), include_usage);
}

json chat_chunk(const std::string& id, int64_t created, const std::string& model, int index, const json& delta,
                const std::vector<TokenLogprob>* logprobs, const std::optional<std::string>& finish_reason,
                const TokenText& token_text, bool include_usage) {
  json c{{"index", index},
         {"delta", delta},
         {"finish_reason", finish_json(finish_reason)},
         {"logprobs", logprobs ? chat_logprobs(*logprobs, token_text) : json(nullptr)}};
  return chunk("chat.completion.chunk", id, created, model, std::move(c), include_usage);
}

json usage_chunk(bool chat, const std::string& id, int64_t created, const std::string& model, int64_t prompt,
                 int64_t completion, int64_t cached) {
  json j = envelope(id, chat ? "chat.completion.chunk" : "text_completion", created, model);
  j["choices"] = json::array();
  j["usage"] = usage_json(prompt, completion, cached);
  return j;
}

json models_response(const std::string& model, int64_t created, const std::vector<LoraRef>& adapters) {
  json data = json::array();
  data.push_back({{"id", model}, {"object", "model"}, {"created", created}, {"owned_by", "moemesh"}, {"root", model},
                  {"parent", nullptr}});
  for (const LoraRef& a : adapters)
    data.push_back({{"id", a.name},
                    {"object", "model"},
                    {"created", created},
                    {"owned_by", "moemesh"},
                    {"root", a.path},
                    {"parent", model}});
  return json{{"object", "list"}, {"data", std::move(data)}};
}

}  // namespace moemesh::openai
