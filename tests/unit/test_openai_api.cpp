// The OpenAI request parsers (completions and chat): accepted shapes, each bad parameter named in
// a 400, and the keys and types of every response and stream-chunk builder.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/openai_api.h"

using namespace moemesh::openai;
using nlohmann::json;

namespace {

using Parser = CompletionRequest (*)(const json&, const nlohmann::ordered_json*);

std::string bad_param(const json& body, Parser parse = parse_completion_request) {
  try {
    parse(body, nullptr);
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 400);
    json err = e.to_json()["error"];
    EXPECT_EQ(err["type"], "invalid_request_error");
    EXPECT_FALSE(std::string(e.what()).empty());
    return err["param"].is_null() ? "" : err["param"].get<std::string>();
  }
  ADD_FAILURE() << "accepted " << body.dump();
  return "";
}

json completion(json extra) {
  json b{{"prompt", "x"}};
  if (!extra.is_null()) b.update(extra);  // {} is null in nlohmann
  return b;
}

json chat(json extra) {
  json b{{"messages", json::array({{{"role", "user"}, {"content", "hi"}}})}};
  if (!extra.is_null()) b.update(extra);  // {} is null in nlohmann
  return b;
}

// Each bad value of a shared parameter is refused by both endpoints under its own name.
void expect_refused_by_both(const json& extra, const std::string& param) {
  EXPECT_EQ(bad_param(completion(extra)), param) << extra.dump();
  EXPECT_EQ(bad_param(chat(extra), parse_chat_request), param) << extra.dump();
}

std::string piece(int32_t id) { return id == 7 ? "\xE4\xB8" : "t" + std::to_string(id); }

}  // namespace

TEST(OpenAiApi, TextAndTokenPrompts) {
  auto r = parse_completion_request({{"model", "m"}, {"prompt", "hi"}, {"max_tokens", 5}, {"temperature", 0}});
  EXPECT_EQ(*r.prompt_text, "hi");
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.max_tokens, 5);
  EXPECT_EQ(r.sampling.temperature, 0);
  EXPECT_FALSE(r.sampling.seed.has_value());
  EXPECT_FALSE(r.chat);
  r = parse_completion_request({{"prompt", {1, 2, 3}}, {"seed", 7}, {"return_token_ids", true}});
  EXPECT_EQ(r.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(*r.sampling.seed, 7u);
  EXPECT_TRUE(r.return_token_ids);
  r = parse_completion_request({{"prompt", {"one"}}});
  EXPECT_EQ(*r.prompt_text, "one");
}

TEST(OpenAiApi, Defaults) {
  for (const auto& r : {parse_completion_request(completion({})), parse_chat_request(chat({}))}) {
    EXPECT_EQ(r.max_tokens, 16);
    EXPECT_FALSE(r.max_tokens_given);  // the frontend picks chat's default from the context
    EXPECT_EQ(r.n, 1);
    EXPECT_TRUE(r.stop.empty());
    EXPECT_FALSE(r.stream);
    EXPECT_FALSE(r.include_usage);
    EXPECT_FALSE(r.priority.has_value());
    EXPECT_FALSE(r.logprobs.has_value());
    EXPECT_EQ(r.sampling.top_logprobs, 0);
    EXPECT_FALSE(r.echo);
    EXPECT_TRUE(r.user.empty());
  }
}

TEST(OpenAiApi, MaxTokensGivenEitherWay) {
  EXPECT_TRUE(parse_chat_request(chat({{"max_tokens", 5}})).max_tokens_given);
  EXPECT_TRUE(parse_chat_request(chat({{"max_completion_tokens", 5}})).max_tokens_given);
  EXPECT_FALSE(parse_chat_request(chat({{"max_tokens", nullptr}})).max_tokens_given);
}

TEST(OpenAiApi, BadPromptsAreNamed) {
  EXPECT_EQ(bad_param({{"max_tokens", 3}}), "prompt");
  EXPECT_EQ(bad_param({{"prompt", 5}}), "prompt");
  EXPECT_EQ(bad_param({{"prompt", ""}}), "prompt");
  EXPECT_EQ(bad_param({{"prompt", {1, -2}}}), "prompt");
  EXPECT_EQ(bad_param({{"prompt", {"a", "b"}}}), "prompt");
  EXPECT_EQ(bad_param(json::array()), "");
  EXPECT_EQ(bad_param(json::array(), parse_chat_request), "");
}

TEST(OpenAiApi, SharedParameterEdges) {
  expect_refused_by_both({{"model", 3}}, "model");
  expect_refused_by_both({{"max_tokens", 0}}, "max_tokens");
  expect_refused_by_both({{"max_tokens", "ten"}}, "max_tokens");
  expect_refused_by_both({{"max_completion_tokens", 0}}, "max_completion_tokens");
  expect_refused_by_both({{"temperature", 2.5}}, "temperature");
  expect_refused_by_both({{"temperature", -0.1}}, "temperature");
  expect_refused_by_both({{"top_p", 0}}, "top_p");
  expect_refused_by_both({{"top_p", 1.01}}, "top_p");
  expect_refused_by_both({{"top_k", -2}}, "top_k");
  expect_refused_by_both({{"top_k", 1.5}}, "top_k");
  expect_refused_by_both({{"min_p", 1.5}}, "min_p");
  expect_refused_by_both({{"repetition_penalty", 0}}, "repetition_penalty");
  expect_refused_by_both({{"presence_penalty", 2.1}}, "presence_penalty");
  expect_refused_by_both({{"frequency_penalty", -2.1}}, "frequency_penalty");
  expect_refused_by_both({{"seed", "s"}}, "seed");
  expect_refused_by_both({{"ignore_eos", 1}}, "ignore_eos");
  expect_refused_by_both({{"stop_token_ids", 3}}, "stop_token_ids");
  expect_refused_by_both({{"stop_token_ids", {1, -1}}}, "stop_token_ids");
  expect_refused_by_both({{"return_token_ids", "yes"}}, "return_token_ids");
  expect_refused_by_both({{"return_logits", 0}}, "return_logits");
  expect_refused_by_both({{"user", 5}}, "user");

  // Upper edges are accepted, and both endpoints read them alike.
  json edges{{"temperature", 2},
             {"top_p", 1},
             {"top_k", -1},
             {"min_p", 1},
             {"presence_penalty", -2},
             {"frequency_penalty", 2},
             {"max_completion_tokens", 9},
             {"stop_token_ids", {2, 5}},
             {"ignore_eos", true},
             {"seed", 3},
             {"user", "u1"},
             {"return_logits", true}};
  for (const auto& r : {parse_completion_request(completion(edges)), parse_chat_request(chat(edges))}) {
    EXPECT_EQ(r.sampling.temperature, 2);
    EXPECT_EQ(r.sampling.top_k, -1);
    EXPECT_EQ(r.sampling.min_p, 1);
    EXPECT_EQ(r.sampling.presence_penalty, -2);
    EXPECT_EQ(r.max_tokens, 9);  // max_completion_tokens wins over the default
    EXPECT_EQ(r.sampling.stop_token_ids, (std::vector<int32_t>{2, 5}));
    EXPECT_TRUE(r.sampling.ignore_eos);
    EXPECT_EQ(*r.sampling.seed, 3u);
    EXPECT_EQ(r.user, "u1");
    EXPECT_TRUE(r.return_logits);
  }
}

TEST(OpenAiApi, StopStrings) {
  EXPECT_EQ(parse_completion_request(completion({{"stop", "\n\n"}})).stop, (std::vector<std::string>{"\n\n"}));
  EXPECT_EQ(parse_chat_request(chat({{"stop", {"a", "b", "c", "d"}}})).stop,
            (std::vector<std::string>{"a", "b", "c", "d"}));
  EXPECT_TRUE(parse_completion_request(completion({{"stop", nullptr}})).stop.empty());
  EXPECT_TRUE(parse_completion_request(completion({{"stop", json::array()}})).stop.empty());
  expect_refused_by_both({{"stop", {"a", "b", "c", "d", "e"}}}, "stop");
  expect_refused_by_both({{"stop", ""}}, "stop");
  expect_refused_by_both({{"stop", {"a", ""}}}, "stop");
  expect_refused_by_both({{"stop", {"a", 1}}}, "stop");
  expect_refused_by_both({{"stop", 1}}, "stop");
  expect_refused_by_both({{"stop", {{"k", "v"}}}}, "stop");
}

TEST(OpenAiApi, ChoicesCount) {
  EXPECT_EQ(parse_completion_request(completion({{"n", 16}})).n, 16);
  EXPECT_EQ(parse_chat_request(chat({{"n", 3}})).n, 3);
  expect_refused_by_both({{"n", 0}}, "n");
  expect_refused_by_both({{"n", 17}}, "n");
  expect_refused_by_both({{"n", "2"}}, "n");
  // best_of (completions) may only repeat n.
  EXPECT_EQ(parse_completion_request(completion({{"n", 2}, {"best_of", 2}})).n, 2);
  EXPECT_EQ(parse_completion_request(completion({{"best_of", nullptr}})).n, 1);
  EXPECT_EQ(bad_param(completion({{"n", 2}, {"best_of", 3}})), "best_of");
  EXPECT_EQ(bad_param(completion({{"best_of", 2}})), "best_of");
  EXPECT_EQ(bad_param(completion({{"best_of", "1"}})), "best_of");
}

TEST(OpenAiApi, StreamAndStreamOptions) {
  auto r = parse_completion_request(completion({{"stream", true}}));
  EXPECT_TRUE(r.stream);
  EXPECT_FALSE(r.include_usage);
  r = parse_chat_request(chat({{"stream", true}, {"stream_options", {{"include_usage", true}}}}));
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  r = parse_completion_request(completion({{"stream", true}, {"stream_options", {{"include_usage", false}}}}));
  EXPECT_FALSE(r.include_usage);
  EXPECT_FALSE(parse_completion_request(completion({{"stream_options", nullptr}})).include_usage);
  expect_refused_by_both({{"stream", "yes"}}, "stream");
  expect_refused_by_both({{"stream_options", {{"include_usage", true}}}}, "stream_options");
  expect_refused_by_both({{"stream", false}, {"stream_options", {{"include_usage", true}}}}, "stream_options");
  expect_refused_by_both({{"stream", true}, {"stream_options", true}}, "stream_options");
  expect_refused_by_both({{"stream", true}, {"stream_options", {{"include_usage", "yes"}}}}, "stream_options");
}

TEST(OpenAiApi, Priority) {
  EXPECT_EQ(parse_completion_request(completion({{"priority", "high"}})).priority, moemesh::Priority::High);
  EXPECT_EQ(parse_chat_request(chat({{"priority", "low"}})).priority, moemesh::Priority::Low);
  EXPECT_EQ(parse_chat_request(chat({{"priority", "normal"}})).priority, moemesh::Priority::Normal);
  EXPECT_FALSE(parse_chat_request(chat({{"priority", nullptr}})).priority.has_value());
  expect_refused_by_both({{"priority", "urgent"}}, "priority");
  expect_refused_by_both({{"priority", 1}}, "priority");
}

TEST(OpenAiApi, CompletionLogprobsAndEcho) {
  auto r = parse_completion_request(completion({{"logprobs", 0}}));
  ASSERT_TRUE(r.logprobs.has_value());
  EXPECT_EQ(*r.logprobs, 0);
  r = parse_completion_request(completion({{"logprobs", 20}}));
  EXPECT_EQ(*r.logprobs, 20);
  EXPECT_EQ(r.sampling.top_logprobs, 20);
  EXPECT_FALSE(parse_completion_request(completion({{"logprobs", nullptr}})).logprobs.has_value());
  EXPECT_EQ(bad_param(completion({{"logprobs", 21}})), "logprobs");
  EXPECT_EQ(bad_param(completion({{"logprobs", -1}})), "logprobs");
  EXPECT_EQ(bad_param(completion({{"logprobs", true}})), "logprobs");
  EXPECT_FALSE(parse_completion_request(completion({{"echo", false}})).echo);
  EXPECT_EQ(bad_param(completion({{"echo", true}})), "echo");
  EXPECT_EQ(bad_param(completion({{"echo", "no"}})), "echo");
}

TEST(OpenAiApi, ChatMessages) {
  json msgs = json::array({
      {{"role", "system"}, {"content", "be brief"}},
      {{"role", "developer"}, {"content", "rules"}},
      {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "part one"}}, {{"type", "text"}, {"text", "two"}}}}},
      {{"role", "assistant"}, {"content", ""}, {"name", "bot"}},
      {{"role", "tool"}, {"tool_call_id", "call_1"}, {"content", json::array()}},
  });
  auto r = parse_chat_request({{"messages", msgs}, {"model", "m"}});
  EXPECT_TRUE(r.chat);
  EXPECT_EQ(r.model, "m");
  EXPECT_FALSE(r.prompt_text.has_value());
  ASSERT_EQ(r.messages.size(), 5u);
  EXPECT_EQ(r.messages[0], (json{{"role", "system"}, {"content", "be brief"}}));
  EXPECT_EQ(r.messages[2]["content"], "part one\ntwo");  // parts joined into a plain string
  EXPECT_EQ(r.messages[3]["name"], "bot");               // other keys kept as given
  EXPECT_EQ(r.messages[4]["content"], "");

  auto bad_messages = [](json messages) { return bad_param({{"messages", messages}}, parse_chat_request); };
  EXPECT_EQ(bad_param(json::object(), parse_chat_request), "messages");
  EXPECT_EQ(bad_messages(nullptr), "messages");
  EXPECT_EQ(bad_messages(json::array()), "messages");
  EXPECT_EQ(bad_messages("hi"), "messages");
  EXPECT_EQ(bad_messages({"hi"}), "messages");
  EXPECT_EQ(bad_messages({{{"content", "x"}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "robot"}, {"content", "x"}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", 1}, {"content", "x"}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "user"}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "user"}, {"content", nullptr}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "user"}, {"content", 5}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "user"}, {"content", {"plain"}}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "user"}, {"content", {{{"text", "no type"}}}}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "user"}, {"content", {{{"type", "text"}}}}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "user"}, {"content", {{{"type", "text"}, {"text", 3}}}}}}), "messages");
  EXPECT_EQ(bad_messages({{{"role", "user"},
                           {"content", {{{"type", "image_url"}, {"image_url", {{"url", "http://x/y.png"}}}}}}}}),
            "messages");
  // A chat request carries messages, never a prompt.
  EXPECT_EQ(bad_param(chat({{"prompt", "x"}}), parse_chat_request), "prompt");
}

TEST(OpenAiApi, ChatLogprobs) {
  auto r = parse_chat_request(chat({{"logprobs", true}}));
  ASSERT_TRUE(r.logprobs.has_value());
  EXPECT_EQ(*r.logprobs, 0);
  r = parse_chat_request(chat({{"logprobs", true}, {"top_logprobs", 20}}));
  EXPECT_EQ(*r.logprobs, 20);
  EXPECT_EQ(r.sampling.top_logprobs, 20);
  r = parse_chat_request(chat({{"logprobs", false}}));
  EXPECT_FALSE(r.logprobs.has_value());
  EXPECT_EQ(bad_param(chat({{"logprobs", 5}}), parse_chat_request), "logprobs");
  EXPECT_EQ(bad_param(chat({{"top_logprobs", 2}}), parse_chat_request), "top_logprobs");
  EXPECT_EQ(bad_param(chat({{"logprobs", false}, {"top_logprobs", 2}}), parse_chat_request), "top_logprobs");
  EXPECT_EQ(bad_param(chat({{"logprobs", true}, {"top_logprobs", 21}}), parse_chat_request), "top_logprobs");
  EXPECT_EQ(bad_param(chat({{"logprobs", true}, {"top_logprobs", -1}}), parse_chat_request), "top_logprobs");
}

TEST(OpenAiApi, UsageShape) {
  json u = usage_json(3, 4, 2);
  EXPECT_EQ(u, (json{{"prompt_tokens", 3},
                     {"completion_tokens", 4},
                     {"total_tokens", 7},
                     {"prompt_tokens_details", {{"cached_tokens", 2}}}}));
}

TEST(OpenAiApi, CompletionResponseShape) {
  CompletionChoice a{"hello", {5, 6}, {}, false, {}, "length", {}};
  CompletionChoice b{"yo", {7}, {{7, -0.5f, {{7, -0.5f}, {9, -1.5f}}}}, true, {{0.5f, 1.5f}}, "stop", {}};
  json j = completion_response("cmpl-1", 100, "m", {a, b}, 3, 3, 1, true, piece);
  EXPECT_EQ(j["id"], "cmpl-1");
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["created"], 100);
  EXPECT_EQ(j["model"], "m");
  ASSERT_EQ(j["choices"].size(), 2u);
  EXPECT_EQ(j["choices"][0]["index"], 0);
  EXPECT_EQ(j["choices"][0]["text"], "hello");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(j["choices"][0]["token_ids"], json({5, 6}));
  EXPECT_FALSE(j["choices"][0].contains("logits"));
  EXPECT_EQ(j["choices"][1]["index"], 1);
  const json& lp = j["choices"][1]["logprobs"];
  EXPECT_EQ(lp["tokens"], json({"\xEF\xBF\xBD"}));  // a partial character becomes U+FFFD, never bad JSON
  EXPECT_EQ(lp["token_logprobs"], json({-0.5}));
  EXPECT_EQ(lp["top_logprobs"], json::array({{{"\xEF\xBF\xBD", -0.5}, {"t9", -1.5}}}));
  EXPECT_EQ(lp["text_offset"], json({0}));
  EXPECT_EQ(j["choices"][1]["logits"], json::array({{0.5, 1.5}}));
  EXPECT_EQ(j["usage"]["total_tokens"], 6);
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
  EXPECT_NO_THROW(j.dump());
  EXPECT_FALSE(completion_response("c", 1, "m", {a}, 1, 1, 0, false, piece)["choices"][0].contains("token_ids"));
  EXPECT_EQ(ApiError(404, "not_found_error", "no such model", "model", "model_not_found").to_json()["error"]["code"],
            "model_not_found");
}

TEST(OpenAiApi, CompletionLogprobsShape) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<TokenLogprob> lp{{1, -0.25f, {}}, {22, -inf, {{22, -1.f}, {5, -2.f}}}, {3, -1.f, {{3, -1.f}, {3, -3.f}}}};
  int64_t offset = 10;
  json j = completion_logprobs(lp, piece, &offset);
  EXPECT_EQ(j["tokens"], json({"t1", "t22", "t3"}));
  EXPECT_EQ(j["token_logprobs"], json({-0.25, -9999.0, -1.0}));  // -inf clamped: JSON has no infinity
  EXPECT_TRUE(j["top_logprobs"][0].is_null());
  EXPECT_EQ(j["top_logprobs"][1], (json{{"t22", -1.0}, {"t5", -2.0}}));
  EXPECT_EQ(j["top_logprobs"][2], (json{{"t3", -1.0}}));  // one text twice: the likelier stays
  EXPECT_EQ(j["text_offset"], json({10, 12, 15}));        // characters, continuing from the counter
  EXPECT_EQ(offset, 17);
  // Without a token text function tokens are named by id.
  EXPECT_EQ(completion_logprobs({{4, -1.f, {}}}, nullptr)["tokens"], json({"token_id:4"}));
}

TEST(OpenAiApi, ChatResponseShape) {
  CompletionChoice a{"hi there", {5}, {{5, -0.1f, {{5, -0.1f}}}}, true, {}, "stop", {}};
  CompletionChoice b{"other", {6}, {}, false, {}, "length", {}};
  json j = chat_response("chatcmpl-1", 7, "m", {a, b}, 2, 2, 0, false, piece);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["id"], "chatcmpl-1");
  EXPECT_EQ(j["created"], 7);
  EXPECT_EQ(j["model"], "m");
  const json& c = j["choices"][0];
  EXPECT_EQ(c["index"], 0);
  EXPECT_EQ(c["message"], (json{{"role", "assistant"}, {"content", "hi there"}}));
  EXPECT_FALSE(c.contains("text"));
  EXPECT_EQ(c["finish_reason"], "stop");
  ASSERT_TRUE(c["logprobs"]["content"].is_array());
  const json& t = c["logprobs"]["content"][0];
  EXPECT_EQ(t["token"], "t5");
  EXPECT_FLOAT_EQ(t["logprob"].get<float>(), -0.1f);
  EXPECT_EQ(t["bytes"], json({'t', '5'}));
  ASSERT_EQ(t["top_logprobs"].size(), 1u);
  EXPECT_EQ(t["top_logprobs"][0]["token"], "t5");
  EXPECT_TRUE(t["top_logprobs"][0]["bytes"].is_array());
  EXPECT_FALSE(t["top_logprobs"][0].contains("top_logprobs"));
  EXPECT_TRUE(j["choices"][1]["logprobs"].is_null());
  EXPECT_EQ(j["choices"][1]["index"], 1);
  EXPECT_EQ(j["usage"]["total_tokens"], 4);
}

TEST(OpenAiApi, ChatLogprobsKeepRawBytes) {
  // A token holding half a character: the text is U+FFFD, the bytes are the real ones.
  json j = chat_logprobs({{7, -1.f, {}}}, piece);
  EXPECT_EQ(j["content"][0]["token"], "\xEF\xBF\xBD");
  EXPECT_EQ(j["content"][0]["bytes"], json({0xE4, 0xB8}));
  EXPECT_EQ(j["content"][0]["top_logprobs"], json::array());
  EXPECT_EQ(chat_logprobs({}, piece), (json{{"content", json::array()}}));
}

TEST(OpenAiApi, CompletionChunkShape) {
  json j = completion_chunk("cmpl-2", 5, "m", 1, "abc", nullptr, std::nullopt, piece);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["id"], "cmpl-2");
  EXPECT_EQ(j["created"], 5);
  ASSERT_EQ(j["choices"].size(), 1u);
  EXPECT_EQ(j["choices"][0]["index"], 1);
  EXPECT_EQ(j["choices"][0]["text"], "abc");
  EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_FALSE(j.contains("usage"));
  std::vector<TokenLogprob> lp{{1, -1.f, {}}};
  int64_t offset = 4;
  j = completion_chunk("cmpl-2", 5, "m", 0, "t1", &lp, std::string("stop"), piece, &offset, true);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["choices"][0]["logprobs"]["tokens"], json({"t1"}));
  EXPECT_EQ(j["choices"][0]["logprobs"]["text_offset"], json({4}));
  EXPECT_EQ(offset, 6);
  ASSERT_TRUE(j.contains("usage"));
  EXPECT_TRUE(j["usage"].is_null());
}

TEST(OpenAiApi, ChatChunkShape) {
  json first =
      chat_chunk("chatcmpl-3", 9, "m", 0, {{"role", "assistant"}, {"content", ""}}, nullptr, std::nullopt, piece);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"], (json{{"role", "assistant"}, {"content", ""}}));
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(first["choices"][0]["logprobs"].is_null());
  EXPECT_FALSE(first["choices"][0].contains("message"));
  EXPECT_FALSE(first.contains("usage"));
  std::vector<TokenLogprob> lp{{2, -0.5f, {{2, -0.5f}}}};
  json last = chat_chunk("chatcmpl-3", 9, "m", 2, {{"content", "t2"}}, &lp, std::string("length"), piece, true);
  EXPECT_EQ(last["choices"][0]["index"], 2);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(last["choices"][0]["logprobs"]["content"][0]["token"], "t2");
  EXPECT_TRUE(last["usage"].is_null());
}

TEST(OpenAiApi, UsageChunkShape) {
  json c = usage_chunk(true, "chatcmpl-4", 1, "m", 5, 6, 4);
  EXPECT_EQ(c["object"], "chat.completion.chunk");
  EXPECT_EQ(c["choices"], json::array());
  EXPECT_EQ(c["usage"], usage_json(5, 6, 4));
  json t = usage_chunk(false, "cmpl-4", 1, "m", 5, 6, 0);
  EXPECT_EQ(t["object"], "text_completion");
  EXPECT_EQ(t["id"], "cmpl-4");
  EXPECT_EQ(t["model"], "m");
  EXPECT_EQ(t["usage"]["total_tokens"], 11);
}

TEST(OpenAiApi, ModelsShape) {
  json j = models_response("m", 3);
  EXPECT_EQ(j["object"], "list");
  EXPECT_EQ(j["data"][0]["id"], "m");
  EXPECT_EQ(j["data"][0]["object"], "model");
}

// Fields the server does not support are refused by name, never silently ignored; the documented
// accepted-and-ignored ones pass.
TEST(OpenAiApi, UnknownFieldsAreRefusedByName) {
  for (const char* f : {"prediction", "audio", "modalities", "functions", "suffix_text"})
    expect_refused_by_both({{f, 1}}, f);
  EXPECT_EQ(bad_param(completion({{"tools", json::array()}})), "tools");  // chat only
  EXPECT_NO_THROW(parse_chat_request(chat({{"service_tier", "auto"}, {"store", false}, {"metadata", {{"k", "v"}}}})));
  EXPECT_NO_THROW(parse_completion_request(completion({{"service_tier", "default"}, {"user", "u"}})));
  expect_refused_by_both({{"metadata", {{"k", 1}}}}, "metadata");
}

TEST(OpenAiApi, LogitBias) {
  auto r = parse_completion_request(completion({{"logit_bias", {{"17", 5.5}, {"3", -100}}}}));
  ASSERT_EQ(r.sampling.logit_bias.size(), 2u);
  EXPECT_EQ(r.sampling.logit_bias[0], (std::pair<int32_t, float>{17, 5.5f}));  // (json object keys sort: "17" < "3")
  expect_refused_by_both({{"logit_bias", {{"x", 1}}}}, "logit_bias");
  expect_refused_by_both({{"logit_bias", {{"5", 101}}}}, "logit_bias");
  expect_refused_by_both({{"logit_bias", {{"-5", 1}}}}, "logit_bias");
}

TEST(OpenAiApi, ResponseFormatBecomesAConstraintOrANamedRefusal) {
  auto r = parse_chat_request(chat({{"response_format", {{"type", "json_object"}}}}));
  EXPECT_EQ(json::parse(r.constraint)["type"], "json_object");
  EXPECT_EQ(r.constraint_min_bytes, 2);  // {}
  r = parse_chat_request(chat({{"response_format", {{"type", "text"}}}}));
  EXPECT_TRUE(r.constraint.empty());
  const json schema{{"type", "object"},
                    {"properties", {{"b", {{"type", "integer"}}}, {"a", {{"type", "string"}}}}},
                    {"required", {"a", "b"}}};
  // The schema keeps the client's key order when the raw body is given.
  const std::string raw_text = R"({"prompt":"x","response_format":{"type":"json_schema","json_schema":{"name":"n",
      "schema":{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}},"required":["a","b"]}}}})";
  const auto raw = nlohmann::ordered_json::parse(raw_text);
  r = parse_completion_request(json::parse(raw_text), &raw);
  EXPECT_LT(r.constraint.find("\"b\""), r.constraint.find("\"a\"")) << r.constraint;
  EXPECT_EQ(r.constraint_min_bytes, int32_t(std::string(R"({"b":0,"a":""})").size()));
  expect_refused_by_both({{"response_format", {{"type", "xml"}}}}, "response_format");
  expect_refused_by_both({{"response_format", {{"type", "json_schema"}}}}, "response_format");
  try {
    const json rf{{"type", "json_schema"},
                  {"json_schema", {{"name", "n"}, {"schema", {{"oneOf", json::array({schema})}}}}}};
    parse_chat_request(chat({{"response_format", rf}}), nullptr);
    ADD_FAILURE() << "oneOf accepted";
  } catch (const ApiError& e) {
    EXPECT_NE(std::string(e.what()).find("oneOf"), std::string::npos) << e.what();
  }
  expect_refused_by_both({{"response_format", {{"type", "json_object"}}}, {"ignore_eos", true}}, "ignore_eos");
}

TEST(OpenAiApi, ToolsAndToolChoice) {
  const json tool{{"type", "function"},
                  {"function",
                   {{"name", "get_weather"},
                    {"parameters", {{"type", "object"}, {"properties", {{"city", {{"type", "string"}}}}}}}}}};
  auto r = parse_chat_request(chat({{"tools", {tool}}}));
  EXPECT_EQ(r.tool_choice, "auto");
  EXPECT_TRUE(forced_tool_call_constraint(r, "hermes").empty());
  r = parse_chat_request(
      chat({{"tools", {tool}}, {"tool_choice", {{"type", "function"}, {"function", {{"name", "get_weather"}}}}}}));
  EXPECT_EQ(r.tool_choice, "get_weather");
  const json spec = json::parse(forced_tool_call_constraint(r, "mistral"));
  EXPECT_EQ(spec["type"], "tool_calls");
  EXPECT_EQ(spec["format"], "mistral");
  EXPECT_EQ(spec["tools"][0]["name"], "get_weather");
  EXPECT_EQ(bad_param(chat({{"tool_choice", "required"}}), parse_chat_request), "tool_choice");
  EXPECT_EQ(bad_param(chat({{"tools", {tool}}, {"tool_choice", "sometimes"}}), parse_chat_request), "tool_choice");
  EXPECT_EQ(
      bad_param(chat({{"tools", {tool}}, {"tool_choice", {{"type", "function"}, {"function", {{"name", "nope"}}}}}}),
                parse_chat_request),
      "tool_choice");
  EXPECT_EQ(bad_param(chat({{"tools", {tool, tool}}}), parse_chat_request), "tools");  // duplicate name
  json bad = tool;
  bad["function"]["name"] = "has space";
  EXPECT_EQ(bad_param(chat({{"tools", {bad}}}), parse_chat_request), "tools");
  bad = tool;
  bad["function"]["parameters"] = {{"type", "object"}, {"patternProperties", json::object()}};
  EXPECT_EQ(bad_param(chat({{"tools", {bad}}}), parse_chat_request), "tools");
  EXPECT_EQ(
      bad_param(chat({{"tools", {tool}}, {"tool_choice", "required"}, {"response_format", {{"type", "json_object"}}}}),
                parse_chat_request),
      "response_format");
  // Assistant turns may carry calls without content; tool results need their call's id.
  const json turns = json::array(
      {{{"role", "user"}, {"content", "weather?"}},
       {{"role", "assistant"},
        {"content", nullptr},
        {"tool_calls",
         {{{"id", "call_1"}, {"type", "function"}, {"function", {{"name", "get_weather"}, {"arguments", "{}"}}}}}}},
       {{"role", "tool"}, {"tool_call_id", "call_1"}, {"content", "sunny"}}});
  r = parse_chat_request({{"messages", turns}, {"tools", {tool}}});
  EXPECT_TRUE(r.messages[1]["content"].is_null());
  json no_id = turns;
  no_id[2].erase("tool_call_id");
  EXPECT_EQ(bad_param({{"messages", no_id}}, parse_chat_request), "messages");
}
