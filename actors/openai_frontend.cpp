#include "actors/openai_frontend.h"

#include <chrono>
#include <random>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/metrics_util.h"
#include "actors/scheduler.h"
#include "actors/trace_span.h"
#include "core/openai_api.h"

namespace moemesh::actors {
namespace {

using nlohmann::json;
using openai::ApiError;

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
        requests(metrics::counter_family(*registry, "moemesh_router_requests_total",
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
    for (const char* fr : {"stop", "length"}) requests.Add({{"tenant", t}, {"model", model}, {"status", "200"}, {"finish_reason", fr}});
    requests.Add({{"tenant", t}, {"model", model}, {"status", "500"}, {"finish_reason", "error"}});
    prompt_tokens.Add({{"tenant", t}, {"model", model}});
    completion_tokens.Add({{"tenant", t}, {"model", model}});
    for (const char* r : kRejectReasons) rejected.Add({{"tenant", t}, {"reason", r}});
    duration.Add({{"tenant", t}}, metrics::request_latency_buckets());
  }

  void answered(const std::string& tenant, int status, const std::string& finish_reason) {
    requests.Add({{"tenant", tenant}, {"model", model}, {"status", std::to_string(status)}, {"finish_reason", finish_reason}})
        .Increment();
  }
  void completed(const std::string& tenant, int64_t prompt, int64_t completion) {
    prompt_tokens.Add({{"tenant", tenant}, {"model", model}}).Increment(double(prompt));
    completion_tokens.Add({{"tenant", tenant}, {"model", model}}).Increment(double(completion));
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
  send_error(r, e, tr.headers());
}

uint64_t random_seed() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

void completions(const http::Request& req, http::Responder res, caf::actor_system& sys,
                 const std::shared_ptr<const Frontend>& fe) {
  const auto arrival = std::chrono::steady_clock::now();
  const FrontendConfig& cfg = fe->cfg;
  FrontendMetrics* m = fe->metrics.get();
  std::string tenant = metrics::kDefaultTenant;
  RequestTrace tr{trace::from_header(req.header("traceparent")), req.peer};
  if (cfg.draining->load()) {
    if (m) m->rejected.Add({{"tenant", tenant}, {"reason", "draining"}}).Increment();
    return refuse(res, ApiError(503, "server_error", "the server is shutting down; retry on another replica"), m, tenant, tr);
  }
  json body = json::parse(req.body, nullptr, false);
  if (body.is_discarded()) return refuse(res, openai::invalid_request("the request body is not valid JSON"), m, tenant, tr);
  openai::CompletionRequest cr;
  try {
    cr = openai::parse_completion_request(body);
    if (!cr.model.empty() && cr.model != cfg.served_model)
      throw ApiError(404, "invalid_request_error", "the model '" + cr.model + "' does not exist (this server has '" +
                                                       cfg.served_model + "')",
                     "model", "model_not_found");
  } catch (const ApiError& e) {
    return refuse(res, e, m, tenant, tr);
  }
  auto gen = std::make_shared<GenerationRequest>();
  if (cr.prompt_text) {
    if (!cfg.tokenizer)
      return refuse(res, openai::invalid_request("this model has no tokenizer: send the prompt as token ids", "prompt"), m,
                    tenant, tr);
    gen->prompt = cfg.tokenizer->encode(*cr.prompt_text, true);
  } else {
    for (int32_t t : cr.prompt_ids)
      if (t >= cfg.vocab_size)
        return refuse(res,
                      openai::invalid_request("token id " + std::to_string(t) + " is outside the vocabulary (" +
                                                  std::to_string(cfg.vocab_size) + " tokens)",
                                              "prompt"),
                      m, tenant, tr);
    gen->prompt = cr.prompt_ids;
  }
  const int64_t prompt_tokens = int64_t(gen->prompt.size());
  if (prompt_tokens + cr.max_tokens > cfg.max_context)
    return refuse(res,
                  openai::invalid_request("this model's maximum context length is " + std::to_string(cfg.max_context) +
                                              " tokens; the prompt has " + std::to_string(prompt_tokens) +
                                              " and max_tokens asks for " + std::to_string(cr.max_tokens),
                                          "prompt"),
                  m, tenant, tr);
  // The tenant gate: key, model, size and rate limits; tokens are charged now, refunded at the end.
  const Admission adm = cfg.tenants->admit(api_key(req), cr.model.empty() ? cfg.served_model : cr.model, prompt_tokens,
                                           cr.max_tokens);
  if (!adm.ok) {
    if (!adm.tenant.empty()) tenant = adm.tenant;
    if (m && adm.status != 401) m->rejected.Add({{"tenant", tenant}, {"reason", reject_reason(adm.reason)}}).Increment();
    const bool limit = adm.status == 429;
    ApiError e(adm.status,
               adm.status == 401 ? "authentication_error" : limit ? "rate_limit_error" : "invalid_request_error",
               adm.message, adm.reason == "max_tokens" ? "max_tokens" : adm.reason == "model" ? "model" : "",
               adm.status == 401 ? "invalid_api_key" : limit ? "rate_limit_exceeded" : "");
    if (m) m->answered(tenant, e.status(), "none");
    tr.done(e.status(), "none");
    auto headers = tr.headers();
    if (limit) headers.emplace_back("Retry-After", std::to_string(adm.retry_after_s));
    return send_error(res, e, std::move(headers));
  }
  tenant = adm.tenant;
  gen->weight = adm.weight;
  gen->priority = adm.priority;
  auto tenants = cfg.tenants;
  const int64_t max_tokens = cr.max_tokens;
  gen->sampling = cr.sampling;
  if (!gen->sampling.seed) gen->sampling.seed = random_seed();  // a resubmission must repeat itself
  gen->max_tokens = cr.max_tokens;
  gen->return_logits = cr.return_logits;
  gen->tenant = tenant;
  gen->arrival = arrival;
  gen->traceparent = trace::traceparent(tr.ctx);

  const std::string id = "cmpl-" + std::to_string(random_seed() >> 16);
  auto tokenizer = cfg.tokenizer;
  const std::string model = cfg.served_model;
  const bool with_ids = cr.return_token_ids;
  caf::actor scheduler = cfg.scheduler;
  // A short-lived actor awaits the scheduler's answer, so no HTTP thread blocks.
  // The scheduler is a spawn argument: CAF 0.17 trips UBSan on argument-less function actors.
  sys.spawn([=](caf::event_based_actor* self, caf::actor scheduler) mutable {
    self->request(scheduler, caf::infinite, generate_atom::value, GenerationRequestPtr(gen))
        .then(
            [=](GenerationResultPtr r) mutable {
              tenants->finish(tenant, max_tokens, int64_t(r->tokens.size()));
              FrontendMetrics* metrics = fe->metrics.get();  // the captured `fe` keeps it alive
              if (metrics) metrics->finished(tenant, arrival);
              const nlohmann::json attrs = {{"worker", r->worker},
                                            {"prompt_tokens", prompt_tokens},
                                            {"completion_tokens", r->tokens.size()}};
              if (r->finish_reason == "error" && r->bad_request) {
                if (metrics) metrics->answered(tenant, 400, "error");
                tr.done(400, "error", attrs);
                return send_error(res, openai::invalid_request(r->error, "prompt"), tr.headers());
              }
              if (r->finish_reason == "error") {
                if (metrics) metrics->answered(tenant, 500, "error");
                tr.done(500, "error", attrs);
                return send_error(res, ApiError(500, "server_error", "generation failed: " + r->error), tr.headers());
              }
              tr.done(200, r->finish_reason, attrs);
              if (metrics) {
                metrics->answered(tenant, 200, r->finish_reason);
                metrics->completed(tenant, prompt_tokens, int64_t(r->tokens.size()));
              }
              openai::CompletionChoice c;
              c.token_ids = r->tokens;
              c.text = tokenizer ? tokenizer->decode(r->tokens, true) : std::string();
              c.finish_reason = r->finish_reason;
              c.logits = r->logits;
              if (gen->sampling.top_logprobs > 0 || body.contains("logprobs")) c.logprobs = r->logprobs;
              send_json(res, 200,
                        openai::completion_response(id, unix_now(), model, {c}, prompt_tokens, int64_t(r->tokens.size()),
                                                    r->cached_tokens, with_ids),
                        tr.headers());
            },
            [=](caf::error& e) mutable {
              tenants->finish(tenant, max_tokens, 0);
              FrontendMetrics* metrics = fe->metrics.get();
              refuse(res, ApiError(503, "server_error", "the scheduler is unavailable: " + self->system().render(e)),
                     metrics, tenant, tr);
            });
  }, scheduler);
}

}  // namespace

void install_openai_routes(http::HttpServer& server, caf::actor_system& sys, FrontendConfig cfg) {
  auto shared = std::make_shared<Frontend>();
  if (cfg.metrics) shared->metrics = std::make_unique<FrontendMetrics>(cfg.metrics, cfg.served_model);
  shared->cfg = std::move(cfg);
  const int64_t created = unix_now();
  server.route("POST", "/v1/completions",
               [&sys, shared](const http::Request& req, http::Responder res) { completions(req, res, sys, shared); });
  server.route("GET", "/v1/models", [shared, created](const http::Request&, http::Responder res) {
    send_json(res, 200, openai::models_response(shared->cfg.served_model, created));
  });
}

}  // namespace moemesh::actors
