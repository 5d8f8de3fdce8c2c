// The Responses API's pieces (core/responses_api, core/conversation_store): request validation,
// turn keeping and truncation, the response shape, and stored responses that belong to a tenant,
// expire, and survive a restart (the file is replayed).
#include <gtest/gtest.h>

#include <fstream>

#include "core/conversation_store.h"
#include "core/openai_api.h"
#include "core/responses_api.h"
#include "tests/support/temp_dir.h"

using namespace moemesh;
using namespace moemesh::openai;
using nlohmann::json;

namespace {

json conversation(int turns) {
  json m = json::array({{{"role", "system"}, {"content", "sys"}}});
  for (int i = 1; i <= turns; ++i) {
    m.push_back({{"role", "user"}, {"content", "u" + std::to_string(i)}});
    m.push_back({{"role", "assistant"}, {"content", "a" + std::to_string(i)}});
  }
  return m;
}

std::string bad_field(const json& body) {
  try {
    parse_responses_request(body);
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 400);
    const json err = e.to_json()["error"];
    return err["param"].is_null() ? "" : err["param"].get<std::string>();
  }
  ADD_FAILURE() << "accepted " << body.dump();
  return "";
}

}  // namespace

TEST(ResponsesApi, ParsesInputAndMapsToAChatRequest) {
  auto r = parse_responses_request({{"input", "hi"}, {"max_output_tokens", 9}, {"temperature", 0}, {"stream", true}});
  EXPECT_EQ(r.input, json::array({{{"role", "user"}, {"content", "hi"}}}));
  EXPECT_TRUE(r.store);
  EXPECT_EQ(r.truncation, "disabled");
  EXPECT_EQ(r.chat_body["max_tokens"], 9);
  EXPECT_EQ(r.chat_body["stream"], true);
  const json parts = json::array({{{"type", "input_text"}, {"text", "a"}}, {{"type", "input_text"}, {"text", "b"}}});
  const json input = json::array(
      {{{"role", "user"}, {"content", parts}}, {{"type", "message"}, {"role", "assistant"}, {"content", "c"}}});
  r = parse_responses_request({{"input", input},
                               {"instructions", "be terse"},
                               {"previous_response_id", "resp_1"},
                               {"store", false},
                               {"truncation", "auto"}});
  EXPECT_EQ(r.input[0]["content"], "a\nb");
  EXPECT_EQ(r.input[1]["role"], "assistant");
  EXPECT_EQ(r.instructions, "be terse");
  EXPECT_EQ(r.previous_response_id, "resp_1");
  EXPECT_FALSE(r.store);
  EXPECT_EQ(bad_field({{"input", "x"}, {"tools", json::array()}}), "tools");
  EXPECT_EQ(bad_field({{"input", "x"}, {"reasoning", json::object()}}), "reasoning");
  EXPECT_EQ(bad_field({{"input", json::array()}}), "input");
  EXPECT_EQ(bad_field({{"input", json::array({{{"type", "function_call_output"}}})}}), "input");
  EXPECT_EQ(bad_field({{"input", "x"}, {"truncation", "sometimes"}}), "truncation");
  EXPECT_EQ(bad_field({{"input", "x"}, {"text", {{"format", {{"type", "json_schema"}}}}}}), "text");
  EXPECT_EQ(bad_field({{"instructions", "x"}}), "input");
}

TEST(ResponsesApi, KeepsTheLastTurnsAndTheSystemPrefix) {
  const json six = conversation(6);
  const json kept = keep_last_turns(six, 5);
  ASSERT_EQ(kept.size(), 11u);  // sys + 5 x (user, assistant)
  EXPECT_EQ(kept[0]["content"], "sys");
  EXPECT_EQ(kept[1]["content"], "u2");
  EXPECT_EQ(keep_last_turns(six, 0), six);
  EXPECT_EQ(keep_last_turns(six, 7), six);
  json m = conversation(2);
  ASSERT_TRUE(drop_oldest_turn(m));
  EXPECT_EQ(m, json::array({{{"role", "system"}, {"content", "sys"}},
                            {{"role", "user"}, {"content", "u2"}},
                            {{"role", "assistant"}, {"content", "a2"}}}));
  EXPECT_FALSE(drop_oldest_turn(m)) << "the last turn stays";
}

TEST(ResponsesApi, ResponseObjectShape) {
  const auto req = parse_responses_request({{"input", "hi"}, {"max_output_tokens", 4}});
  const json started = response_object("resp_42", 100, "m", req, nullptr);
  EXPECT_EQ(started["status"], "in_progress");
  EXPECT_TRUE(started["output"].empty());
  const ResponseOutcome o{"hello", false, 7, 4, 3};
  const json done = response_object("resp_42", 100, "m", req, &o);
  EXPECT_EQ(done["object"], "response");
  EXPECT_EQ(done["status"], "incomplete");
  EXPECT_EQ(done["incomplete_details"]["reason"], "max_output_tokens");
  EXPECT_EQ(done["output"][0]["content"][0]["type"], "output_text");
  EXPECT_EQ(done["output"][0]["content"][0]["text"], "hello");
  EXPECT_EQ(done["usage"]["input_tokens_details"]["cached_tokens"], 3);
  EXPECT_EQ(done["usage"]["total_tokens"], 11);
  const json items = input_items("resp_42", conversation(1));
  EXPECT_EQ(items["data"].size(), 3u);
  EXPECT_EQ(items["data"][2]["content"][0]["type"], "output_text");
}

TEST(ConversationStore, BelongsToItsTenantExpiresAndSurvivesARestart) {
  moemesh::testing::TempDir dir("moemesh-responses");
  {
    ConversationStore s(dir.path(), std::chrono::hours(1));
    s.put({"resp_a", "acme", conversation(1), json::array(), {{"id", "resp_a"}}, 0});
    s.put({"resp_b", "acme", conversation(2), json::array(), {{"id", "resp_b"}}, 0});
    s.put({"resp_c", "globex", conversation(1), json::array(), {{"id", "resp_c"}}, 0});
    EXPECT_TRUE(s.get("resp_a", "acme"));
    EXPECT_FALSE(s.get("resp_a", "globex")) << "another tenant's response is not found";
    EXPECT_FALSE(s.erase("resp_a", "globex"));
    EXPECT_TRUE(s.erase("resp_b", "acme"));
  }
  {
    std::ofstream torn(dir.path() / "responses.jsonl", std::ios::app);
    torn << "{\"id\": \"resp_torn\", \"ten";  // a crash mid-write
  }
  ConversationStore again(dir.path(), std::chrono::hours(1));
  auto a = again.get("resp_a", "acme");
  ASSERT_TRUE(a) << "a restart replays the file";
  EXPECT_EQ(a->messages, conversation(1));
  EXPECT_FALSE(again.get("resp_b", "acme")) << "the delete is remembered";
  EXPECT_TRUE(again.get("resp_c", "globex"));
  EXPECT_EQ(again.size(), 2u);

  ConversationStore short_lived({}, std::chrono::seconds(0));
  short_lived.put({"resp_x", "acme", json::array(), json::array(), json::object(), 0});
  EXPECT_FALSE(short_lived.get("resp_x", "acme")) << "expired";
}
