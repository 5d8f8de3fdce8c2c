#include "actors/openai_frontend.h"

#include <chrono>
#include <random>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/scheduler.h"
#include "core/openai_api.h"

namespace moemesh::actors {
namespace {

using nlohmann::json;
using openai::ApiError;

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void send_json(http::Responder& r, int status, const json& body, http::HeaderList headers = {}) {
  r.send({status, "application/json", body.dump(), std::move(headers)});
}

void send_error(http::Responder& r, const ApiError& e) { send_json(r, e.status(), e.to_json()); }

uint64_t random_seed() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

void completions(const http::Request& req, http::Responder res, caf::actor_system& sys, const FrontendConfig& cfg) {
  if (cfg.draining->load())
    return send_error(res, ApiError(503, "server_error", "the server is shutting down; retry on another replica"));
  json body = json::parse(req.body, nullptr, false);
  if (body.is_discarded()) return send_error(res, openai::invalid_request("the request body is not valid JSON"));
  openai::CompletionRequest cr;
  try {
    cr = openai::parse_completion_request(body);
    if (!cr.model.empty() && cr.model != cfg.served_model)
      throw ApiError(404, "invalid_request_error", "the model '" + cr.model + "' does not exist (this server has '" +
                                                       cfg.served_model + "')",
                     "model", "model_not_found");
  } catch (const ApiError& e) {
    return send_error(res, e);
  }
  auto gen = std::make_shared<GenerationRequest>();
  if (cr.prompt_text) {
    if (!cfg.tokenizer)
      return send_error(res, openai::invalid_request("this model has no tokenizer: send the prompt as token ids", "prompt"));
    gen->prompt = cfg.tokenizer->encode(*cr.prompt_text, true);
  } else {
    for (int32_t t : cr.prompt_ids)
      if (t >= cfg.vocab_size)
        return send_error(res, openai::invalid_request("token id " + std::to_string(t) + " is outside the vocabulary (" +
                                                           std::to_string(cfg.vocab_size) + " tokens)",
                                                       "prompt"));
    gen->prompt = cr.prompt_ids;
  }
  const int64_t prompt_tokens = int64_t(gen->prompt.size());
  if (prompt_tokens + cr.max_tokens > cfg.max_context)
    return send_error(res, openai::invalid_request("this model's maximum context length is " +
                                                       std::to_string(cfg.max_context) + " tokens; the prompt has " +
                                                       std::to_string(prompt_tokens) + " and max_tokens asks for " +
                                                       std::to_string(cr.max_tokens),
                                                   "prompt"));
  gen->sampling = cr.sampling;
  if (!gen->sampling.seed) gen->sampling.seed = random_seed();  // a resubmission must repeat itself
  gen->max_tokens = cr.max_tokens;
  gen->return_logits = cr.return_logits;

  const std::string id = "cmpl-" + std::to_string(random_seed() >> 16);
  auto tokenizer = cfg.tokenizer;
  const std::string model = cfg.served_model;
  const bool with_ids = cr.return_token_ids;
  caf::actor scheduler = cfg.scheduler;
  // A short-lived actor awaits the scheduler's answer, so no HTTP thread blocks.
  sys.spawn([=](caf::event_based_actor* self) mutable {
    self->request(scheduler, caf::infinite, generate_atom::value, GenerationRequestPtr(gen))
        .then(
            [=](GenerationResultPtr r) mutable {
              if (r->finish_reason == "error")
                return send_error(res, ApiError(500, "server_error", "generation failed: " + r->error));
              openai::CompletionChoice c;
              c.token_ids = r->tokens;
              c.text = tokenizer ? tokenizer->decode(r->tokens, true) : std::string();
              c.finish_reason = r->finish_reason;
              c.logits = r->logits;
              if (gen->sampling.top_logprobs > 0 || body.contains("logprobs")) c.logprobs = r->logprobs;
              send_json(res, 200,
                        openai::completion_response(id, unix_now(), model, {c}, prompt_tokens, int64_t(r->tokens.size()),
                                                    r->cached_tokens, with_ids));
            },
            [=](caf::error& e) mutable {
              send_error(res, ApiError(503, "server_error", "the scheduler is unavailable: " + self->system().render(e)));
            });
  });
}

}  // namespace

void install_openai_routes(http::HttpServer& server, caf::actor_system& sys, FrontendConfig cfg) {
  auto shared = std::make_shared<FrontendConfig>(std::move(cfg));
  const int64_t created = unix_now();
  server.route("POST", "/v1/completions",
               [&sys, shared](const http::Request& req, http::Responder res) { completions(req, res, sys, *shared); });
  server.route("GET", "/v1/models", [shared, created](const http::Request&, http::Responder res) {
    send_json(res, 200, openai::models_response(shared->served_model, created));
  });
}

}  // namespace moemesh::actors
