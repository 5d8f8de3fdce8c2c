// The completions request parser: accepted shapes, and each bad parameter named in a 400.
#include <gtest/gtest.h>

#include "core/openai_api.h"

using namespace moemesh::openai;
using nlohmann::json;

namespace {
std::string bad_param(const json& body) {
  try {
    parse_completion_request(body);
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 400);
    return e.to_json()["error"]["param"].is_null() ? "" : e.to_json()["error"]["param"].get<std::string>();
  }
  ADD_FAILURE() << "accepted " << body.dump();
  return "";
}
}  // namespace

TEST(OpenAiApi, TextAndTokenPrompts) {
  auto r = parse_completion_request({{"model", "m"}, {"prompt", "hi"}, {"max_tokens", 5}, {"temperature", 0}});
  EXPECT_EQ(*r.prompt_text, "hi");
  EXPECT_EQ(r.max_tokens, 5);
  EXPECT_EQ(r.sampling.temperature, 0);
  EXPECT_FALSE(r.sampling.seed.has_value());
  r = parse_completion_request({{"prompt", {1, 2, 3}}, {"seed", 7}, {"return_token_ids", true}});
  EXPECT_EQ(r.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(*r.sampling.seed, 7u);
  EXPECT_TRUE(r.return_token_ids);
}

TEST(OpenAiApi, BadParametersAreNamed) {
  EXPECT_EQ(bad_param({{"max_tokens", 3}}), "prompt");
  EXPECT_EQ(bad_param({{"prompt", 5}}), "prompt");
  EXPECT_EQ(bad_param({{"prompt", {1, -2}}}), "prompt");
  EXPECT_EQ(bad_param({{"prompt", "x"}, {"max_tokens", 0}}), "max_tokens");
  EXPECT_EQ(bad_param({{"prompt", "x"}, {"max_tokens", "ten"}}), "max_tokens");
  EXPECT_EQ(bad_param({{"prompt", "x"}, {"temperature", 3}}), "temperature");
  EXPECT_EQ(bad_param({{"prompt", "x"}, {"top_p", 0}}), "top_p");
  EXPECT_EQ(bad_param({{"prompt", "x"}, {"seed", "s"}}), "seed");
  EXPECT_EQ(bad_param(json::array()), "");
}

TEST(OpenAiApi, ResponseShape) {
  CompletionChoice c{"hello", {5, 6}, {}, {}, "length"};
  json j = completion_response("cmpl-1", 100, "m", {c}, 3, 2, 0, true);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["token_ids"], json({5, 6}));
  EXPECT_EQ(j["usage"]["total_tokens"], 5);
  EXPECT_EQ(ApiError(404, "not_found_error", "no such model", "model", "model_not_found").to_json()["error"]["code"],
            "model_not_found");
}
