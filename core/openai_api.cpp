#include "core/openai_api.h"

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
    throw invalid_request(std::string("'") + key + "' must be between " + std::to_string(lo) + " and " +
                              std::to_string(hi),
                          key);
  return x;
}

bool boolean(const json& body, const char* key, bool dflt) {
  if (!body.contains(key) || body[key].is_null()) return dflt;
  if (!body[key].is_boolean()) throw invalid_request(std::string("'") + key + "' must be a boolean", key);
  return body[key].get<bool>();
}

}  // namespace

CompletionRequest parse_completion_request(const json& body) {
  if (!body.is_object()) throw invalid_request("the request body must be a JSON object");
  CompletionRequest r;
  if (body.contains("model")) {
    if (!body["model"].is_string()) throw invalid_request("'model' must be a string", "model");
    r.model = body["model"].get<std::string>();
  }
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
  r.max_tokens = integer(body, "max_tokens", 1, 1 << 20, 16);
  r.max_tokens = integer(body, "max_completion_tokens", 1, 1 << 20, r.max_tokens);
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
      if (!t.is_number_integer()) throw invalid_request("'stop_token_ids' must hold integers", "stop_token_ids");
      s.stop_token_ids.push_back(t.get<int32_t>());
    }
  }
  if (body.contains("logprobs") && !body["logprobs"].is_null()) {
    r.logprobs = int(integer(body, "logprobs", 0, 20, 0));
    s.top_logprobs = *r.logprobs;
  }
  const int64_t n = integer(body, "n", 1, 1, 1);
  (void)n;  // n > 1 comes with the serving work; refused above until then
  r.stream = boolean(body, "stream", false);
  if (r.stream) throw invalid_request("'stream' is not supported yet", "stream");
  r.return_token_ids = boolean(body, "return_token_ids", false);
  r.return_logits = boolean(body, "return_logits", false);
  if (body.contains("user") && body["user"].is_string()) r.user = body["user"].get<std::string>();
  return r;
}

json completion_response(const std::string& id, int64_t created, const std::string& model,
                         const std::vector<CompletionChoice>& choices, int64_t prompt_tokens,
                         int64_t completion_tokens, int64_t cached_tokens, bool with_token_ids) {
  json cs = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const auto& c = choices[i];
    json o{{"index", i}, {"text", c.text}, {"finish_reason", c.finish_reason}, {"logprobs", nullptr}};
    if (with_token_ids) o["token_ids"] = c.token_ids;
    if (!c.logprobs.empty()) o["logprobs"] = json{{"token_logprobs", c.logprobs}};
    if (!c.logits.empty()) o["logits"] = c.logits;
    cs.push_back(std::move(o));
  }
  return json{{"id", id},
              {"object", "text_completion"},
              {"created", created},
              {"model", model},
              {"choices", cs},
              {"usage",
               {{"prompt_tokens", prompt_tokens},
                {"completion_tokens", completion_tokens},
                {"total_tokens", prompt_tokens + completion_tokens},
                {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}}}}};
}

json models_response(const std::string& model, int64_t created) {
  return json{{"object", "list"},
              {"data", json::array({json{{"id", model}, {"object", "model"}, {"created", created}, {"owned_by", "moemesh"}}})}};
}

}  // namespace moemesh::openai
