// The router's OpenAI-compatible HTTP API: POST /v1/completions, POST /v1/chat/completions,
// GET /v1/models, the Responses API, and (vLLM's) POST /v1/load_lora_adapter and
// /v1/unload_lora_adapter. Validation and response shapes live in core/openai_api; this file tokenizes
// (through the chat template for chat), applies the tenant gate and hands the request to a
// completion session actor (actors/completion_session.h), which streams or answers it.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include <caf/all.hpp>
#include <prometheus/registry.h>

#include "actors/http_server.h"
#include "core/conversation_store.h"
#include "core/lora_cache.h"
#include "core/tenants.h"
#include "core/tokenizer.h"

namespace moemesh::actors {

struct FrontendConfig {
  std::string served_model;
  std::shared_ptr<const Tokenizer> tokenizer;  // may be null: then prompts must be token ids
  int64_t max_context = 4096;                  // prompt + max_tokens may not exceed it
  int64_t vocab_size = 0;
  caf::actor scheduler;
  // Set on SIGTERM: new requests get 503 while the ones in flight finish.
  std::shared_ptr<std::atomic<bool>> draining = std::make_shared<std::atomic<bool>>(false);
  // Where the moemesh_router_* request metrics go (docs/metrics.md); none without it.
  std::shared_ptr<prometheus::Registry> metrics;
  // API keys and limits; open (every request is tenant "default") when empty.
  std::shared_ptr<TenantRegistry> tenants = std::make_shared<TenantRegistry>();
  // The Responses API's stored responses (null: /v1/responses answers only with store: false)
  // and how many turns of a conversation the model is given (0: all).
  std::shared_ptr<ConversationStore> responses;
  int keep_turns = 5;
  // The LoRA adapters served beside the base model (null: none); with allow_runtime_lora,
  // POST /v1/load_lora_adapter and /v1/unload_lora_adapter change them.
  std::shared_ptr<LoraRegistry> loras;
  bool allow_runtime_lora = false;
  // The share of requests without a traceparent header whose spans are logged (0-1); a header's
  // own sampled flag is kept.
  double trace_sample_ratio = 1.0;
};

void install_openai_routes(http::HttpServer& server, caf::actor_system& sys, FrontendConfig cfg);

}  // namespace moemesh::actors
