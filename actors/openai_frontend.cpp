#include "actors/openai_frontend.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <random>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/completion_session.h"
#include "actors/metrics_util.h"
#include "actors/scheduler.h"
#include "actors/trace_span.h"
#include "core/constrained_decoding.h"
#include "core/error.h"
#include "core/openai_api.h"
#include "core/responses_api.h"

namespace moemesh::actors {
namespace {

using nlohmann::json;
using openai::ApiError;

// A chat request without max_tokens generates at most this many tokens (and no more than the
// context leaves); an explicit max_tokens may ask for more.
constexpr int64_t kChatDefaultMaxTokens = 1024;

// Why a request was refused before it was queued (the rejected_requests_total label):
// rate_limit (RPM/TPM/concurrency), quota (max_tokens, models), draining (SIGTERM).
constexpr const char* kRejectReasons[] = {"rate_limit", "quota", "draining"};

// The tenant gate's reasons, folded into the bounded label above ("auth" is counted by status).
const char* reject_reason(const std::string& admission_reason) {
  if (admission_reason == "rpm" || admission_reason == "tpm" || admission_reason == "concurrency") return "rate_limit";
  return "quota";
}

// "Authorization: Bearer KEY" (OpenAI clients), or "x-api-key: KEY".
std::string api_key(const http::Request& req) {
  std::string h = req.header("authorization");
  if (h.size() > 7 && (h.compare(0, 7, "Bearer ") == 0 || h.compare(0, 7, "bearer ") == 0)) return h.substr(7);
  return req.header("x-api-key");
}

// The request-level series (docs/metrics.md). Thread-safe: prometheus-cpp's Family::Add and
// the metrics themselves may be used from any HTTP or actor thread.
struct FrontendMetrics {
  FrontendMetrics(std::shared_ptr<prometheus::Registry> reg, const std::string& model)
      : registry(std::move(reg)),
        model(model),
        requests(
            metrics::counter_family(*registry, "moemesh_router_requests_total",
                                    "Completion requests answered, by tenant, model, HTTP status and finish reason "
                                    "(none: refused before generation).")),
        prompt_tokens(metrics::counter_family(*registry, "moemesh_router_prompt_tokens_total",
                                              "Prompt tokens of completed requests.")),
        completion_tokens(metrics::counter_family(*registry, "moemesh_router_completion_tokens_total",
                                                  "Generated tokens of completed requests.")),
        rejected(metrics::counter_family(*registry, "moemesh_router_rejected_requests_total",
                                         "Requests refused before they were queued, by tenant and reason.")),
        duration(metrics::histogram_family(*registry, "moemesh_router_request_duration_seconds",
                                           "End-to-end latency of a completion request that reached the scheduler, "
                                           "from arrival to the response.")) {
    const std::string t = metrics::kDefaultTenant;
    // Zero series up front, so rates and ratios exist before the first request.
    for (const char* fr : {"stop", "length"})
      requests.Add({{"tenant", t}, {"model", model}, {"status", "200"}, {"finish_reason", fr}});
    requests.Add({{"tenant", t}, {"model", model}, {"status", "500"}, {"finish_reason", "error"}});
    prompt_tokens.Add({{"tenant", t}, {"model", model}});
    completion_tokens.Add({{"tenant", t}, {"model", model}});
    for (const char* r : kRejectReasons) rejected.Add({{"tenant", t}, {"reason", r}});
    duration.Add({{"tenant", t}}, metrics::request_latency_buckets());
  }

  // served: the model the request was served as (a LoRA adapter's name; empty: the base model).
  void answered(const std::string& tenant, int status, const std::string& finish_reason,
                const std::string& served = {}) {
    requests
        .Add({{"tenant", tenant},
              {"model", served.empty() ? model : served},
              {"status", std::to_string(status)},
              {"finish_reason", finish_reason}})
        .Increment();
  }
  void completed(const std::string& tenant, int64_t prompt, int64_t completion, const std::string& served = {}) {
    const std::string& m = served.empty() ? model : served;
    prompt_tokens.Add({{"tenant", tenant}, {"model", m}}).Increment(double(prompt));
    completion_tokens.Add({{"tenant", tenant}, {"model", m}}).Increment(double(completion));
  }
  void finished(const std::string& tenant, std::chrono::steady_clock::time_point arrival) {
    duration.Add({{"tenant", tenant}}, metrics::request_latency_buckets())
        .Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - arrival).count());
  }

  std::shared_ptr<prometheus::Registry> registry;  // outlives the families below
  std::string model;
  prometheus::Family<prometheus::Counter>&requests, &prompt_tokens, &completion_tokens, &rejected;
  prometheus::Family<prometheus::Histogram>& duration;
};

struct Frontend {
  FrontendConfig cfg;
  std::unique_ptr<FrontendMetrics> metrics;  // null without a registry
};

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void send_json(http::Responder& r, int status, const json& body, http::HeaderList headers = {}) {
  r.send({status, "application/json", body.dump(), std::move(headers)});
}

void send_error(http::Responder& r, const ApiError& e, http::HeaderList headers = {}) {
  send_json(r, e.status(), e.to_json(), std::move(headers));
}

// One request's trace: its context (from the client's traceparent, or new), when it started, and
// the span line logged when it is answered.
struct RequestTrace {
  trace::Context ctx;
  std::string peer;
  std::chrono::system_clock::time_point start = std::chrono::system_clock::now();
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();

  http::HeaderList headers() const { return {{"traceparent", trace::traceparent(ctx)}}; }
  void done(int status, const std::string& finish_reason, nlohmann::json attrs = nlohmann::json::object()) const {
    attrs["peer"] = peer;
    attrs["status"] = status;
    attrs["finish_reason"] = finish_reason;
    trace::log_span("router", "completion", ctx, start, std::chrono::steady_clock::now() - t0, std::move(attrs));
  }
};

// An error answer before generation, counted and traced.
void refuse(http::Responder& r, const ApiError& e, FrontendMetrics* m, const std::string& tenant,
            const RequestTrace& tr) {
  if (m) m->answered(tenant, e.status(), "none");
  tr.done(e.status(), "none");
  auto headers = tr.headers();
  if (e.status() == 503) headers.emplace_back("Retry-After", "1");  // draining: another replica, soon
  send_error(r, e, std::move(headers));
}

uint64_t random_seed() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

// The prompt's token ids: the chat template over the messages, the text, or the ids as given.
std::vector<int32_t> prompt_tokens(const openai::CompletionRequest& cr, const FrontendConfig& cfg) {
  if (cr.chat || cr.prompt_text) {
    if (!cfg.tokenizer)
      throw openai::invalid_request(cr.chat ? "this model has no tokenizer, so it cannot serve chat requests"
                                            : "this model has no tokenizer: send the prompt as token ids",
                                    cr.chat ? "messages" : "prompt");
    if (!cr.chat) return cfg.tokenizer->encode(*cr.prompt_text, true);
    std::string text;
    try {
      // Tools go to a template that knows them as the `tools` variable; one that does not gets
      // them in a preamble (core/tool_calls.h).
      const std::string& tmpl = cfg.tokenizer->chat_template();
      const json tools = cr.tools.is_null() ? json() : json::parse(cr.tools.dump());
      const json messages = messages_for_template(cr.messages, tools, tmpl, tool_call_format_for(tmpl));
      const json extra = tools.is_null() ? json::object() : json{{"tools", tools}};
      text = cfg.tokenizer->apply_chat_template(messages, /*add_generation_prompt=*/true, &extra);
    } catch (const Error& e) {  // no template, or the template raised (e.g. roles out of order)
      throw openai::invalid_request(std::string("the chat template refused these messages: ") + e.what(), "messages");
    }
    return cfg.tokenizer->encode(text, false);  // the template writes the BOS itself
  }
  for (int32_t t : cr.prompt_ids)
    if (t >= cfg.vocab_size)
      throw openai::invalid_request("token id " + std::to_string(t) + " is outside the vocabulary (" +
                                        std::to_string(cfg.vocab_size) + " tokens)",
                                    "prompt");
  return cr.prompt_ids;
}

// POST /v1/completions and /v1/chat/completions: validate, admit, then hand the request to a
// completion session (actors/completion_session.h), which answers it.
// A Responses API request on its way through the chat path: the conversation it continues and
// how it is answered and stored.
struct ResponsesTurn {
  openai::ResponsesRequest req;
  json conversation;   // previous messages + the new input (what is stored, with the answer)
  std::string tenant;  // who stores it
};

void serve_body(const http::Request& req, json body, http::Responder res, caf::actor_system& sys,
                const std::shared_ptr<const Frontend>& fe, bool chat, std::optional<ResponsesTurn> turn);

void serve(const http::Request& req, http::Responder res, caf::actor_system& sys,
           const std::shared_ptr<const Frontend>& fe, bool chat) {
  serve_body(req, json::parse(req.body, nullptr, false), std::move(res), sys, fe, chat, std::nullopt);
}

void serve_body(const http::Request& req, json body, http::Responder res, caf::actor_system& sys,
                const std::shared_ptr<const Frontend>& fe, bool chat, std::optional<ResponsesTurn> turn) {
  const auto arrival = std::chrono::steady_clock::now();
  const FrontendConfig& cfg = fe->cfg;
  FrontendMetrics* m = fe->metrics.get();
  std::string tenant = metrics::kDefaultTenant;
  RequestTrace tr{trace::from_header(req.header("traceparent"), cfg.trace_sample_ratio), req.peer};
  if (cfg.draining->load()) {
    if (m) m->rejected.Add({{"tenant", tenant}, {"reason", "draining"}}).Increment();
    return refuse(res, ApiError(503, "server_error", "the server is shutting down; retry on another replica"), m,
                  tenant, tr);
  }
  if (body.is_discarded())
    return refuse(res, openai::invalid_request("the request body is not valid JSON"), m, tenant, tr);
  // JSON schemas keep their key order (properties are generated in it): parse those bodies again.
  std::optional<nlohmann::ordered_json> raw;
  if (!turn && body.is_object() && (body.contains("response_format") || body.contains("tools")))
    raw = nlohmann::ordered_json::parse(req.body, nullptr, false);
  openai::CompletionRequest cr;
  std::vector<int32_t> prompt;
  std::optional<LoraRef> adapter;  // the LoRA adapter `model` names, if it names one
  const ToolCallFormat tool_format =
      cfg.tokenizer ? tool_call_format_for(cfg.tokenizer->chat_template()) : ToolCallFormat::Hermes;
  try {
    cr = chat ? openai::parse_chat_request(body, raw ? &*raw : nullptr)
              : openai::parse_completion_request(body, raw ? &*raw : nullptr);
    if (std::string forced = openai::forced_tool_call_constraint(cr, to_string(tool_format)); !forced.empty()) {
      const auto g = compile_constraint(forced);  // each tool's schema was checked on parsing
      cr.constraint = std::move(forced);
      cr.constraint_min_bytes = g->min_bytes(g->start());
    }
    if (!cr.model.empty() && cr.model != cfg.served_model) {
      adapter = cfg.loras ? cfg.loras->find(cr.model) : std::nullopt;
      if (!adapter)
        throw ApiError(404, "invalid_request_error",
                       "the model '" + cr.model + "' does not exist (this server has '" + cfg.served_model + "'" +
                           (cfg.loras && !cfg.loras->list().empty() ? " and its LoRA adapters: GET /v1/models" : "") +
                           ")",
                       "model", "model_not_found");
    }
    prompt = prompt_tokens(cr, cfg);
    // Responses with truncation "auto": the oldest turns go until the conversation fits.
    const int64_t room = cfg.max_context - (cr.max_tokens_given ? cr.max_tokens : 1);
    while (turn && turn->req.truncation == "auto" && int64_t(prompt.size()) > room &&
           openai::drop_oldest_turn(cr.messages))
      prompt = prompt_tokens(cr, cfg);
    // Chat clients rarely send max_tokens (OpenAI's default is "up to the context"): the answer may
    // use what the context leaves, up to kChatDefaultMaxTokens.
    if (cr.chat && !cr.max_tokens_given)
      cr.max_tokens = std::clamp<int64_t>(cfg.max_context - int64_t(prompt.size()), 1, kChatDefaultMaxTokens);
    if (int64_t(prompt.size()) + cr.max_tokens > cfg.max_context)
      throw ApiError(400, "invalid_request_error",
                     "this model's maximum context length is " + std::to_string(cfg.max_context) +
                         " tokens; the prompt has " + std::to_string(prompt.size()) + " and max_tokens asks for " +
                         std::to_string(cr.max_tokens),
                     chat ? "messages" : "prompt", "context_length_exceeded");
    // Every byte has a token, so this many tokens always finish the constrained output.
    if (!cr.constraint.empty() && cr.max_tokens < cr.constraint_min_bytes)
      throw openai::invalid_request("max_tokens (" + std::to_string(cr.max_tokens) +
                                        ") is too small for the requested format: its shortest output takes up to " +
                                        std::to_string(cr.constraint_min_bytes) + " tokens",
                                    cr.max_tokens_given ? "max_tokens" : "response_format");
  } catch (const ApiError& e) {
    return refuse(res, e, m, tenant, tr);
  }
  const int64_t n_prompt = int64_t(prompt.size());
  const int64_t charged = cr.max_tokens * cr.n;  // every choice may use all of max_tokens
  // The tenant gate: key, model, size and rate limits; tokens are charged now, refunded at the end.
  const Admission adm =
      cfg.tenants->admit(api_key(req), cr.model.empty() ? cfg.served_model : cr.model, n_prompt, charged,
                         TenantRegistry::Clock::now(), adapter.has_value());
  if (!adm.ok) {
    if (!adm.tenant.empty()) tenant = adm.tenant;
    if (m && adm.status != 401)
      m->rejected.Add({{"tenant", tenant}, {"reason", reject_reason(adm.reason)}}).Increment();
    const bool limit = adm.status == 429;
    ApiError e(adm.status,
               adm.status == 401 ? "authentication_error"
               : limit           ? "rate_limit_error"
                                 : "invalid_request_error",
               adm.message,
               adm.reason == "max_tokens" ? "max_tokens"
               : adm.reason == "model"    ? "model"
                                          : "",
               adm.status == 401      ? "invalid_api_key"
               : limit                ? "rate_limit_exceeded"
               : adm.reason == "model" ? "model_not_found"
                                      : "");
    if (m) m->answered(tenant, e.status(), "none");
    tr.done(e.status(), "none");
    auto headers = tr.headers();
    if (limit) headers.emplace_back("Retry-After", std::to_string(adm.retry_after_s));
    return send_error(res, e, std::move(headers));
  }
  tenant = adm.tenant;

  SessionSpec spec;
  GenerationRequest& gen = spec.base;
  gen.prompt = std::move(prompt);
  gen.sampling = cr.sampling;
  if (!gen.sampling.seed) gen.sampling.seed = random_seed();  // a resubmission must repeat itself
  gen.max_tokens = cr.max_tokens;
  gen.return_logits = cr.return_logits;
  gen.tenant = tenant;
  gen.weight = adm.weight;
  // A request may lower its tenant's priority class, never raise it.
  gen.priority = cr.priority ? std::max(*cr.priority, adm.priority) : adm.priority;
  gen.cache_salt = adm.cache_salt;
  if (adapter) {
    gen.adapter = *adapter;
    // Its KV blocks are the adapter's (its q/k/v change them): a prefix cached under another
    // adapter, or none, must not be restored.
    gen.cache_salt += "\x1flora:" + adapter->key;
  }
  gen.traceparent = trace::traceparent(tr.ctx);
  gen.constraint = cr.constraint;
  if (chat && cr.tool_choice != "none") spec.tool_format = tool_format;
  gen.arrival = arrival;
  spec.id = (turn ? "resp_" : chat ? "chatcmpl-" : "cmpl-") + std::to_string(random_seed() >> 16);
  if (turn) spec.responses = turn->req;
  const json model_input = cr.messages;
  spec.model = adapter ? adapter->name : cfg.served_model;
  spec.created = unix_now();
  spec.tokenizer = cfg.tokenizer;
  spec.headers = tr.headers();
  spec.request = std::move(cr);
  auto tenants = cfg.tenants;
  auto store = cfg.responses;
  std::optional<StoredResponse> to_store;
  if (turn && turn->req.store && store) {
    // What the model was given, less the instructions (they are not part of the conversation).
    json input = json::array();
    for (const auto& msg : model_input)
      if (turn->req.instructions.empty() || msg != json{{"role", "system"}, {"content", turn->req.instructions}})
        input.push_back(msg);
    to_store = StoredResponse{spec.id, turn->tenant, turn->conversation, std::move(input), json(), 0};
  }
  std::optional<openai::ResponsesRequest> responses_req;
  if (turn) responses_req = turn->req;
  spec.on_done = [fe, tenants, tenant, charged, n_prompt, arrival, tr, store, to_store, responses_req, id = spec.id,
                  model = spec.model, created = spec.created](const SessionOutcome& o) {
    if (to_store && o.status == 200) {  // the answer joins the conversation
      StoredResponse r = *to_store;
      r.messages.push_back({{"role", "assistant"}, {"content", o.text}});
      const openai::ResponseOutcome ro{o.text, o.finish_reason != "length", o.prompt_tokens, o.completion_tokens,
                                       o.cached_tokens};
      r.response = openai::response_object(id, created, model, *responses_req, &ro);
      store->put(std::move(r));
    }
    tenants->finish(tenant, charged, o.completion_tokens);
    if (FrontendMetrics* metrics = fe->metrics.get()) {  // the captured `fe` keeps it alive
      metrics->finished(tenant, arrival);
      metrics->answered(tenant, o.status, o.finish_reason, model);
      if (o.status == 200) metrics->completed(tenant, n_prompt, o.completion_tokens, model);
    }
    tr.done(o.status, o.finish_reason,
            {{"worker", o.worker}, {"prompt_tokens", n_prompt}, {"completion_tokens", o.completion_tokens}});
  };
  start_completion_session(sys, cfg.scheduler, std::move(res), std::move(spec));
}

// POST /v1/responses: the conversation it continues (the tenant's own, else 404), the last
// --keep-turns turns of it plus the instructions, then the chat path answering as a response.
void serve_responses(const http::Request& req, http::Responder res, caf::actor_system& sys,
                     const std::shared_ptr<const Frontend>& fe) {
  const FrontendConfig& cfg = fe->cfg;
  RequestTrace tr{trace::from_header(req.header("traceparent"), cfg.trace_sample_ratio), req.peer};
  const json body = json::parse(req.body, nullptr, false);
  ResponsesTurn turn;
  try {
    if (body.is_discarded()) throw openai::invalid_request("the request body is not valid JSON");
    turn.req = openai::parse_responses_request(body);
    const Admission who = cfg.tenants->identify(api_key(req));
    if (!who.ok) throw ApiError(401, "authentication_error", who.message, "", "invalid_api_key");
    turn.tenant = who.tenant;
    turn.conversation = json::array();
    if (!turn.req.previous_response_id.empty()) {
      auto prev = cfg.responses ? cfg.responses->get(turn.req.previous_response_id, turn.tenant) : std::nullopt;
      if (!prev)
        throw ApiError(404, "invalid_request_error",
                       "Previous response with id '" + turn.req.previous_response_id + "' not found.",
                       "previous_response_id");
      turn.conversation = prev->messages;
    }
    if (turn.req.store && !cfg.responses)
      throw openai::invalid_request("this router keeps no responses: send 'store': false", "store");
  } catch (const ApiError& e) {
    return refuse(res, e, fe->metrics.get(), turn.tenant.empty() ? metrics::kDefaultTenant : turn.tenant, tr);
  }
  for (const auto& msg : turn.req.input) turn.conversation.push_back(msg);
  json messages = openai::keep_last_turns(turn.conversation, cfg.keep_turns);
  if (!turn.req.instructions.empty())
    messages.insert(messages.begin(), json{{"role", "system"}, {"content", turn.req.instructions}});
  json chat_body = turn.req.chat_body;
  chat_body["model"] = body.value("model", cfg.served_model);
  chat_body["messages"] = std::move(messages);
  serve_body(req, std::move(chat_body), std::move(res), sys, fe, true, std::move(turn));
}

// GET /v1/responses/{id}[/input_items] and DELETE /v1/responses/{id}, for the caller's tenant.
void stored_response(const http::Request& req, http::Responder res, const Frontend& fe, bool erase) {
  std::string id = req.path.substr(std::string("/v1/responses/").size());
  const std::string items_suffix = "/input_items";
  const bool items = !erase && id.size() > items_suffix.size() &&
                     id.compare(id.size() - items_suffix.size(), items_suffix.size(), items_suffix) == 0;
  if (items) id.resize(id.size() - items_suffix.size());
  const Admission who = fe.cfg.tenants->identify(api_key(req));
  if (!who.ok) return send_error(res, ApiError(401, "authentication_error", who.message, "", "invalid_api_key"));
  auto not_found = [&] {
    send_error(res, ApiError(404, "invalid_request_error", "Response with id '" + id + "' not found.", "response_id"));
  };
  if (!fe.cfg.responses || id.empty() || id.find('/') != std::string::npos) return not_found();
  if (erase) {
    if (!fe.cfg.responses->erase(id, who.tenant)) return not_found();
    return send_json(res, 200, json{{"id", id}, {"object", "response.deleted"}, {"deleted", true}});
  }
  auto r = fe.cfg.responses->get(id, who.tenant);
  if (!r) return not_found();
  send_json(res, 200, items ? openai::input_items(id, r->input) : r->response);
}

// POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter
// {"lora_name"}, as vLLM answers them. Requests already accepted keep their adapter: the
// workers' caches still hold it.
void change_adapters(const http::Request& req, http::Responder& res, Frontend& fe, bool load) {
  const FrontendConfig& cfg = fe.cfg;
  try {
    if (!cfg.allow_runtime_lora || !cfg.loras)
      throw ApiError(403, "invalid_request_error",
                     "loading and unloading LoRA adapters at run time is off (start the router with "
                     "--allow-runtime-lora)");
    const json body = json::parse(req.body, nullptr, false);
    if (!body.is_object()) throw openai::invalid_request("the body is not a JSON object");
    auto field = [&](const char* name) {
      if (!body.contains(name) || !body[name].is_string() || body[name].get<std::string>().empty())
        throw openai::invalid_request(std::string(name) + " is required (a non-empty string)", name);
      return body[name].get<std::string>();
    };
    const std::string name = field("lora_name");
    if (load) {
      try {
        cfg.loras->add(name, field("lora_path"), cfg.served_model);
      } catch (const Error& e) {
        throw openai::invalid_request(e.what(), "lora_path");
      }
      spdlog::info("router: LoRA adapter '{}' loaded", name);
      return res.send({200, "text/plain", "Success: LoRA adapter '" + name + "' added successfully.", {}});
    }
    if (!cfg.loras->remove(name))
      throw ApiError(404, "invalid_request_error", "the LoRA adapter '" + name + "' cannot be found", "lora_name",
                     "model_not_found");
    spdlog::info("router: LoRA adapter '{}' unloaded", name);
    res.send({200, "text/plain", "Success: LoRA adapter '" + name + "' removed successfully.", {}});
  } catch (const ApiError& e) {
    send_error(res, e);
  }
}

}  // namespace

void install_openai_routes(http::HttpServer& server, caf::actor_system& sys, FrontendConfig cfg) {
  auto shared = std::make_shared<Frontend>();
  if (cfg.metrics) shared->metrics = std::make_unique<FrontendMetrics>(cfg.metrics, cfg.served_model);
  shared->cfg = std::move(cfg);
  const int64_t created = unix_now();
  server.route("POST", "/v1/completions",
               [&sys, shared](const http::Request& req, http::Responder res) { serve(req, res, sys, shared, false); });
  server.route("POST", "/v1/chat/completions",
               [&sys, shared](const http::Request& req, http::Responder res) { serve(req, res, sys, shared, true); });
  server.route("POST", "/v1/responses", [&sys, shared](const http::Request& req, http::Responder res) {
    serve_responses(req, res, sys, shared);
  });
  server.route("GET", "/v1/responses/*",
               [shared](const http::Request& req, http::Responder res) { stored_response(req, res, *shared, false); });
  server.route("DELETE", "/v1/responses/*",
               [shared](const http::Request& req, http::Responder res) { stored_response(req, res, *shared, true); });
  server.route("GET", "/v1/models", [shared, created](const http::Request&, http::Responder res) {
    const auto& c = shared->cfg;
    send_json(res, 200, openai::models_response(c.served_model, created, c.loras ? c.loras->list() : std::vector<LoraRef>{}));
  });
  server.route("POST", "/v1/load_lora_adapter",
               [shared](const http::Request& req, http::Responder res) { change_adapters(req, res, *shared, true); });
  server.route("POST", "/v1/unload_lora_adapter",
               [shared](const http::Request& req, http::Responder res) { change_adapters(req, res, *shared, false); });
}

}  // namespace moemesh::actors
