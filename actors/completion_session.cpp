#include "actors/completion_session.h"

#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/text_stream.h"

namespace moemesh::actors {
namespace {

using nlohmann::json;
using client_gone_atom = caf::atom_constant<caf::atom("clientgone")>;

struct Choice {
  explicit Choice(TextStream t) : text(std::move(t)) {}
  TextStream text;
  std::vector<openai::TokenLogprob> logprobs;  // every token received (when asked)
  size_t streamed_logprobs = 0;                // of them, already sent in a chunk
  int64_t text_offset = 0;                     // completions' logprobs.text_offset, across chunks
  size_t tokens = 0;                           // received
  std::vector<int32_t> ids;                    // every token received (return_token_ids)
  size_t streamed_ids = 0;                     // of them, already sent in a chunk
  // With tools: the text held back while it may still be the start of a call, and whether the
  // output is plain content (streamed as it comes) or calls (sent when they are complete).
  std::string held;
  enum class Tools { Undecided, Content, Calls } tools = Tools::Undecided;
  bool stopped = false;  // a stop string matched; cancelled in the scheduler
  bool done = false;
  std::string finish_reason;
  GenerationResultPtr result;
};

struct SessionState {
  SessionSpec spec;
  http::Responder res{nullptr};
  caf::actor scheduler;
  std::vector<Choice> choices;
  openai::TokenText token_text;
  size_t remaining = 0;
  bool streaming = false;  // headers sent
  bool answered = false;   // an error was sent instead of the response
  int error_status = 0;    // its status
  bool client_gone = false;
  int64_t event_seq = 0;  // Responses events' sequence_number
  static inline const char* name = "completion_session";
};

using Self = caf::stateful_actor<SessionState>;

// Whether token text still goes out as stream chunks (not after an error answer or a hang-up).
bool streams_to_client(const SessionState& st) { return st.spec.request.stream && !st.client_gone && !st.answered; }

void write_event(SessionState& st, const json& j) { st.res.write("data: " + j.dump() + "\n\n"); }

// A Responses API event: `event: TYPE` and the data, which names its type and sequence number too.
void write_responses_event(SessionState& st, const char* type, json data) {
  data["type"] = type;
  data["sequence_number"] = st.event_seq++;
  st.res.write(std::string("event: ") + type + "\ndata: " + data.dump() + "\n\n");
}

std::string message_id(const SessionState& st) { return "msg_" + st.spec.id.substr(st.spec.id.find('_') + 1); }

void start_stream(SessionState& st) {
  if (st.streaming) return;
  st.streaming = true;
  st.res.start_stream(200, "text/event-stream", st.spec.headers);
  if (st.spec.responses) {
    const json r = openai::response_object(st.spec.id, st.spec.created, st.spec.model, *st.spec.responses, nullptr);
    write_responses_event(st, "response.created", {{"response", r}});
    write_responses_event(st, "response.in_progress", {{"response", r}});
    write_responses_event(st, "response.output_item.added",
                          {{"output_index", 0},
                           {"item",
                            {{"type", "message"},
                             {"id", message_id(st)},
                             {"status", "in_progress"},
                             {"role", "assistant"},
                             {"content", json::array()}}}});
    write_responses_event(st, "response.content_part.added",
                          {{"item_id", message_id(st)},
                           {"output_index", 0},
                           {"content_index", 0},
                           {"part", {{"type", "output_text"}, {"text", ""}, {"annotations", json::array()}}}});
    return;
  }
  if (!st.spec.request.chat) return;
  // Chat streams open every choice with the assistant role, as OpenAI's do.
  for (size_t i = 0; i < st.choices.size(); ++i)
    write_event(st, openai::chat_chunk(st.spec.id, st.spec.created, st.spec.model, int(i),
                                       json{{"role", "assistant"}, {"content", ""}}, nullptr, std::nullopt,
                                       st.token_text, st.spec.request.include_usage));
}

// Sends a choice's new text (and the logprobs of the tokens received since its last chunk).
void stream_delta(SessionState& st, int i, const std::string& text, const std::optional<std::string>& finish) {
  Choice& c = st.choices[size_t(i)];
  if (text.empty() && !finish && (!st.spec.request.logprobs || c.streamed_logprobs == c.logprobs.size())) return;
  start_stream(st);
  if (st.spec.responses) {  // the end is sent by complete()
    if (!text.empty())
      write_responses_event(st, "response.output_text.delta",
                            {{"item_id", message_id(st)}, {"output_index", 0}, {"content_index", 0}, {"delta", text}});
    return;
  }
  const std::vector<openai::TokenLogprob> lp(c.logprobs.begin() + long(c.streamed_logprobs), c.logprobs.end());
  const auto* lpp = st.spec.request.logprobs ? &lp : nullptr;
  c.streamed_logprobs = c.logprobs.size();
  const auto& r = st.spec.request;
  json j = r.chat ? openai::chat_chunk(st.spec.id, st.spec.created, st.spec.model, i,
                                       text.empty() ? json::object() : json{{"content", text}}, lpp, finish,
                                       st.token_text, r.include_usage)
                  : openai::completion_chunk(st.spec.id, st.spec.created, st.spec.model, i, text, lpp, finish,
                                             st.token_text, &c.text_offset, r.include_usage);
  if (r.return_token_ids) {  // the tokens since the previous chunk, as vLLM sends them
    j["choices"][0]["token_ids"] = std::vector<int32_t>(c.ids.begin() + long(c.streamed_ids), c.ids.end());
    c.streamed_ids = c.ids.size();
  }
  write_event(st, j);
}

// With tools, what of a choice's new text can be streamed as content now: nothing while the
// output may still begin a call (or is one), all of it once it cannot.
std::string content_to_stream(SessionState& st, Choice& c, const std::string& text) {
  if (!st.spec.tool_format || c.tools == Choice::Tools::Content) return text;
  if (c.tools == Choice::Tools::Calls) return "";
  c.held += text;
  const std::string& marker = tool_calls_marker(*st.spec.tool_format);
  const bool forced = !st.spec.request.constraint.empty();
  if (forced || c.held.rfind(marker, 0) == 0) {
    c.tools = Choice::Tools::Calls;
    return "";
  }
  if (marker.compare(0, c.held.size(), c.held) == 0) return "";  // could still become the marker
  c.tools = Choice::Tools::Content;
  return std::move(c.held);
}

// A finished choice's calls as stream chunks: each call's id and name, then its arguments.
void stream_tool_calls(SessionState& st, int i, const std::vector<openai::ToolCallOut>& calls) {
  start_stream(st);
  for (size_t k = 0; k < calls.size(); ++k) {
    const auto& t = calls[k];
    json head{{"index", k}, {"id", t.id}, {"type", "function"}, {"function", {{"name", t.name}, {"arguments", ""}}}};
    json args{{"index", k}, {"function", {{"arguments", t.arguments}}}};
    for (json* d : {&head, &args})
      write_event(
          st, openai::chat_chunk(st.spec.id, st.spec.created, st.spec.model, i, json{{"tool_calls", json::array({*d})}},
                                 nullptr, std::nullopt, st.token_text, st.spec.request.include_usage));
  }
}

// The calls in a choice's text (with tools offered), and the content outside them.
std::vector<openai::ToolCallOut> tool_calls_of(const SessionState& st, const Choice& c, std::string* content) {
  std::vector<openai::ToolCallOut> out;
  if (!st.spec.tool_format) return out;
  ParsedOutput p = parse_tool_calls(*st.spec.tool_format, c.text.text());
  for (auto& call : p.calls) out.push_back({call.id, call.name, call.arguments});
  if (!out.empty()) *content = p.content;
  return out;
}

void on_token(Self* self, int i, int32_t token, float logprob, std::vector<std::pair<int32_t, float>> top) {
  auto& st = self->state;
  Choice& c = st.choices[size_t(i)];
  ++c.tokens;
  if (c.done || c.stopped || st.answered) return;
  if (st.spec.request.logprobs) c.logprobs.push_back({token, logprob, std::move(top)});
  c.ids.push_back(token);
  const std::string text = c.text.push(token);
  if (c.text.stopped()) {
    // The stop string is not part of the answer, and generating past it is wasted work.
    c.stopped = true;
    self->send(st.scheduler, gen_cancel_atom::value, caf::actor_cast<caf::actor>(self), i);
    if (st.spec.request.logprobs) c.logprobs.resize(size_t(c.text.tokens()));
  }
  if (streams_to_client(st)) stream_delta(st, i, content_to_stream(st, c, text), std::nullopt);
}

int64_t completion_tokens(const Choice& c) {
  // A stop string ends the answer at the token that completed it.
  return c.stopped ? c.text.tokens() : int64_t(c.result ? c.result->tokens.size() : c.tokens);
}

void send_error(SessionState& st, int status, const char* type, const std::string& message, const char* param = "") {
  openai::ApiError e(status, type, message, param);
  if (st.streaming) {  // too late for a status: the error goes as an event, then the stream ends
    write_event(st, e.to_json());
    return;
  }
  st.answered = true;
  st.error_status = status;
  auto headers = st.spec.headers;
  if (status == 503) headers.emplace_back("Retry-After", "1");  // not ready or overloaded: soon
  st.res.send({status, "application/json", e.to_json().dump(), std::move(headers)});
}

// Every choice has its result: answer (or close the stream) and report the outcome.
void complete(Self* self) {
  auto& st = self->state;
  const auto& r = st.spec.request;
  SessionOutcome out;
  for (const Choice& c : st.choices) out.completion_tokens += completion_tokens(c);
  const Choice& first = st.choices.front();
  out.finish_reason = first.finish_reason;
  out.worker = first.result ? first.result->worker : "";
  out.text = first.text.text();
  out.prompt_tokens = int64_t(st.spec.base.prompt.size());
  out.cached_tokens = first.result ? first.result->cached_tokens : 0;
  const openai::ResponseOutcome ro{out.text, first.finish_reason != "length", out.prompt_tokens, out.completion_tokens,
                                   out.cached_tokens};
  if (st.client_gone) {
    out.status = 499;  // nginx's "client closed request": nothing was lost, nobody listened
    out.finish_reason = "cancelled";
  } else if (st.answered) {
    out.status = st.error_status;
    out.finish_reason = "error";
  }
  // Before the answer goes out: a stored response must be there when the client's next turn
  // names it as previous_response_id (it can arrive as soon as the answer does).
  if (st.spec.on_done) st.spec.on_done(out);
  if (st.client_gone || st.answered) {
    // nothing to send
  } else if (st.spec.responses && (st.streaming || r.stream)) {
    start_stream(st);
    const std::string id = message_id(st);
    const json part{{"type", "output_text"}, {"text", out.text}, {"annotations", json::array()}};
    const json full = openai::response_object(st.spec.id, st.spec.created, st.spec.model, *st.spec.responses, &ro);
    write_responses_event(st, "response.output_text.done",
                          {{"item_id", id}, {"output_index", 0}, {"content_index", 0}, {"text", out.text}});
    write_responses_event(st, "response.content_part.done",
                          {{"item_id", id}, {"output_index", 0}, {"content_index", 0}, {"part", part}});
    write_responses_event(st, "response.output_item.done", {{"output_index", 0}, {"item", full["output"][0]}});
    write_responses_event(st, ro.complete ? "response.completed" : "response.incomplete", {{"response", full}});
    st.res.end();
  } else if (st.spec.responses) {
    const json body = openai::response_object(st.spec.id, st.spec.created, st.spec.model, *st.spec.responses, &ro);
    st.res.send({200, "application/json", body.dump(), st.spec.headers});
  } else if (st.streaming || r.stream) {
    if (r.include_usage) {
      const int64_t cached = first.result ? first.result->cached_tokens : 0;
      write_event(st, openai::usage_chunk(r.chat, st.spec.id, st.spec.created, st.spec.model,
                                          int64_t(st.spec.base.prompt.size()), out.completion_tokens, cached));
    }
    start_stream(st);
    st.res.write("data: [DONE]\n\n");
    st.res.end();
  } else {
    std::vector<openai::CompletionChoice> cs;
    for (const Choice& c : st.choices) {
      openai::CompletionChoice oc;
      const auto n = size_t(completion_tokens(c));
      oc.text = c.text.text();
      oc.tool_calls = tool_calls_of(st, c, &oc.text);
      oc.token_ids.assign(c.result->tokens.begin(), c.result->tokens.begin() + long(n));
      oc.with_logprobs = r.logprobs.has_value();
      oc.logprobs.assign(c.logprobs.begin(), c.logprobs.begin() + long(std::min(n, c.logprobs.size())));
      oc.logits.assign(c.result->logits.begin(), c.result->logits.begin() + long(std::min(n, c.result->logits.size())));
      oc.finish_reason = oc.tool_calls.empty() ? c.finish_reason : "tool_calls";
      cs.push_back(std::move(oc));
    }
    const int64_t prompt = int64_t(st.spec.base.prompt.size());
    const int64_t cached = first.result->cached_tokens;
    const json body =
        r.chat ? openai::chat_response(st.spec.id, st.spec.created, st.spec.model, cs, prompt, out.completion_tokens,
                                       cached, r.return_token_ids, st.token_text)
               : openai::completion_response(st.spec.id, st.spec.created, st.spec.model, cs, prompt,
                                             out.completion_tokens, cached, r.return_token_ids, st.token_text);
    st.res.send({200, "application/json", body.dump(), st.spec.headers});
  }
  self->quit();
}

void on_result(Self* self, int i, GenerationResultPtr res) {
  auto& st = self->state;
  Choice& c = st.choices[size_t(i)];
  // Tokens whose events have not arrived (or never will) are taken from the result.
  for (size_t k = c.tokens; k < res->tokens.size(); ++k)
    on_token(self, i, res->tokens[k], k < res->logprobs.size() ? res->logprobs[k] : 0.0f,
             k < res->top_logprobs.size() ? res->top_logprobs[k] : std::vector<std::pair<int32_t, float>>{});
  c.result = res;
  c.done = true;
  if (c.stopped) {
    c.finish_reason = "stop";
    if (streams_to_client(st)) stream_delta(st, i, "", c.finish_reason);
  } else if (res->finish_reason == "error") {
    c.finish_reason = "error";
    if (!st.answered && !st.client_gone) {
      if (res->refused_status == 400)
        send_error(st, 400, "invalid_request_error", res->error, "prompt");
      else if (res->refused_status == 503)
        send_error(st, 503, "server_error", res->error);
      else
        send_error(st, 500, "server_error", "generation failed: " + res->error);
      // One failed choice fails the request: the others stop too.
      self->send(st.scheduler, gen_cancel_atom::value, caf::actor_cast<caf::actor>(self), -1);
    }
  } else {
    c.finish_reason = res->finish_reason;
    std::string rest = c.text.finish();
    if (c.text.stopped()) c.finish_reason = "stop";  // the held-back tail completed a stop string
    if (streams_to_client(st)) {
      std::string content;
      const auto calls = tool_calls_of(st, c, &content);
      if (!calls.empty()) {
        if (c.tools != Choice::Tools::Content && !content.empty()) stream_delta(st, i, content, std::nullopt);
        stream_tool_calls(st, i, calls);
        stream_delta(st, i, "", std::string("tool_calls"));
      } else {
        // No call after all: what was held back (all of it, unless content was streaming) is content.
        const bool held_all = st.spec.tool_format && c.tools != Choice::Tools::Content;
        stream_delta(st, i, held_all ? c.text.text() : rest, c.finish_reason);
      }
    }
  }
  if (--st.remaining == 0) complete(self);
}

caf::behavior session(Self* self, caf::actor scheduler, http::Responder res, std::shared_ptr<SessionSpec> spec) {
  auto& st = self->state;
  st.spec = std::move(*spec);
  st.res = res;
  st.scheduler = scheduler;
  auto tok = st.spec.tokenizer;
  st.token_text = [tok](int32_t id) {
    if (!tok) return "token_id:" + std::to_string(id);
    const int32_t one[1] = {id};
    return tok->decode(one, false);
  };
  const int n = std::max(1, st.spec.request.n);
  for (int i = 0; i < n; ++i) st.choices.emplace_back(TextStream(tok, st.spec.request.stop));
  st.remaining = size_t(n);

  // The client may leave at any time: the HTTP thread tells us, and we tell the scheduler.
  const caf::weak_actor_ptr weak = caf::actor_cast<caf::weak_actor_ptr>(self);
  st.res.on_close([weak] {
    if (auto strong = weak.lock()) caf::anon_send(caf::actor_cast<caf::actor>(strong), client_gone_atom::value);
  });

  for (int i = 0; i < n; ++i) {
    auto g = std::make_shared<GenerationRequest>(st.spec.base);
    g->listener = caf::actor_cast<caf::actor>(self);
    g->index = i;
    g->sampling.seed = st.spec.base.sampling.seed.value_or(0) + uint64_t(i);
    self->request(scheduler, caf::infinite, generate_atom::value, GenerationRequestPtr(std::move(g)))
        .then([=](GenerationResultPtr r) { on_result(self, i, std::move(r)); },
              [=](caf::error& e) {
                auto r = std::make_shared<GenerationResult>();
                r->finish_reason = "error";
                r->refused_status = 503;
                r->error = "the scheduler is unavailable: " + self->system().render(e);
                on_result(self, i, std::move(r));
              });
  }
  return {
      [=](gen_token_atom, TokenEventPtr ev) {
        if (ev && ev->index >= 0 && ev->index < int(self->state.choices.size()))
          on_token(self, ev->index, ev->token, ev->logprob, ev->top);
      },
      [=](client_gone_atom) {
        auto& s = self->state;
        if (s.client_gone) return;
        s.client_gone = true;
        self->send(s.scheduler, gen_cancel_atom::value, caf::actor_cast<caf::actor>(self), -1);
      },
  };
}

}  // namespace

void start_completion_session(caf::actor_system& sys, caf::actor scheduler, http::Responder res, SessionSpec spec) {
  sys.spawn(session, std::move(scheduler), std::move(res), std::make_shared<SessionSpec>(std::move(spec)));
}

}  // namespace moemesh::actors
