// Constrained decoding (core/grammar, core/grammar_regex, core/json_schema_grammar,
// core/constrained_decoding, core/tool_calls): grammars accept exactly what they should, random
// token walks under the masks always end in valid, conforming JSON inside max_tokens, and what
// cannot be enforced is refused naming the keyword. (The independent check, ajv over a served
// model's outputs, is the structured_outputs integration test.)
#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <regex>

#include <nlohmann/json.hpp>

#include "core/constrained_decoding.h"
#include "core/grammar_regex.h"
#include "core/json_schema_grammar.h"
#include "core/tokenizer.h"
#include "core/tool_calls.h"

namespace moemesh {
namespace {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

bool matches(const Grammar& g, std::string_view s) {
  GrammarState st(g);
  return st.advance(s) && st.accepting();
}

std::shared_ptr<const Grammar> schema_grammar(const std::string& schema) {
  return compile_constraint(ojson{{"type", "json_schema"}, {"schema", ojson::parse(schema)}}.dump());
}

// A vocabulary like a real one: every byte, plus multi-byte pieces that cross JSON structure.
std::shared_ptr<const TokenVocabulary> test_vocabulary() {
  std::vector<std::string> bytes{""};  // id 0: EOS
  for (int c = 0; c < 256; ++c) bytes.push_back(std::string(1, char(c)));
  for (const char* p : {"{\"", "\":", "\": \"", "\",", "\"}",     "true",     "false", "null",     " the", "ing", "12",
                        "-3",  ".5",  "}]",     "[{",  "\\u00e9", "\xC3\xA9", "name",  "\"name\"", ", \"", "0000"})
    bytes.push_back(p);
  return std::make_shared<TokenVocabulary>(std::move(bytes), std::vector<int32_t>{0});
}

// Samples uniformly among the allowed tokens until EOS or max_tokens; returns the text.
std::string random_walk(const std::string& spec, int64_t max_tokens, uint64_t seed, int64_t* used = nullptr) {
  auto vocab = test_vocabulary();
  auto masks = std::make_shared<GrammarMasks>(compile_constraint(spec), vocab);
  ConstrainedDecoder d(masks, max_tokens);
  std::mt19937_64 rng(seed);
  std::string out;
  int64_t n = 0;
  for (; n < max_tokens; ++n) {
    std::vector<float> logits(size_t(vocab->size()), 0.0f);
    d.apply(logits);
    std::vector<int32_t> allowed;
    for (size_t t = 0; t < logits.size(); ++t)
      if (std::isfinite(logits[t])) allowed.push_back(int32_t(t));
    const int32_t t = allowed[rng() % allowed.size()];
    d.accept(t);
    if (t == 0) break;
    out += vocab->bytes(t);
  }
  if (used) *used = n;
  return out;
}

TEST(Grammar, RegexAcceptsExactlyItsLanguage) {
  Grammar g;
  std::bitset<256> all;
  all.set();
  g.finish(compile_regex(g, "^(ab|c)+[0-9]{2,3}x?$", all));
  for (const char* ok : {"ab12", "cab123", "cc99x", "abab000"}) EXPECT_TRUE(matches(g, ok)) << ok;
  for (const char* bad : {"", "ab1", "ab1234", "a12", "12", "abx12"}) EXPECT_FALSE(matches(g, bad)) << bad;
}

TEST(Grammar, IntegerRangesMatchTheirNumbersOnly) {
  for (auto [lo, hi] : {std::pair<int64_t, int64_t>{-37, 142}, {5, 5}, {0, 9}, {-120, -3}, {99, 1001}}) {
    Grammar g;
    std::bitset<256> all;
    all.set();
    g.finish(compile_regex(g, integer_range_regex(lo, hi), all));
    for (int64_t v = -250; v <= 1100; ++v)
      ASSERT_EQ(matches(g, std::to_string(v)), v >= lo && v <= hi) << v << " in [" << lo << ", " << hi << "]";
    EXPECT_FALSE(matches(g, "007"));
    EXPECT_FALSE(matches(g, "-0"));
  }
}

TEST(Grammar, MinCompletionIsTheShortestFinish) {
  auto g = schema_grammar(R"({"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"string"}},
                              "required":["a","b"]})");
  GrammarState st(*g);
  EXPECT_EQ(st.min_completion(), int32_t(std::string(R"({"a":0,"b":""})").size()));
  ASSERT_TRUE(st.advance(R"({"a":12,"b":"x)"));
  EXPECT_EQ(st.min_completion(), 2);  // "}
  ASSERT_TRUE(st.advance("\"}"));
  EXPECT_TRUE(st.accepting());
  EXPECT_TRUE(st.finished());
}

TEST(JsonSchemaGrammar, AcceptsConformingAndRejectsOtherValues) {
  auto g = schema_grammar(R"({"type":"object","properties":{
      "name":{"type":"string","maxLength":5},
      "age":{"type":"integer","minimum":0,"maximum":120},
      "tags":{"type":"array","items":{"enum":["a","b"]},"minItems":1,"maxItems":2},
      "when":{"type":"string","format":"date"},
      "kind":{"anyOf":[{"type":"null"},{"type":"number","exclusiveMinimum":0}]}},
      "required":["name","age"],"additionalProperties":false})");
  for (const char* ok :
       {R"({"name":"bob","age":7})", R"({"name": "", "age": 120, "tags": ["a", "b"]})",
        R"({"name":"\u00e9","age":0,"when":"2024-02-28","kind":null})", R"({"name":"x","age":1,"kind":3.25})"})
    EXPECT_TRUE(matches(*g, ok)) << ok;
  for (const char* bad : {R"({"age":7,"name":"bob"})",  // properties come in schema order
                          R"({"name":"toolong","age":7})", R"({"name":"a","age":121})",
                          R"({"name":"a","age":1,"tags":[]})", R"({"name":"a","age":1,"when":"2024-13-01"})",
                          R"({"name":"a","age":1,"kind":0})", R"({"name":"a","age":1,"x":1})"})
    EXPECT_FALSE(matches(*g, bad)) << bad;
}

TEST(JsonSchemaGrammar, RefusesWhatItCannotEnforceNamingTheKeyword) {
  for (auto [schema, keyword] : std::vector<std::pair<const char*, const char*>>{
           {R"({"oneOf":[{"type":"string"},{"type":"integer"}]})", "oneOf"},
           {R"({"type":"array","uniqueItems":true})", "uniqueItems"},
           {R"({"type":"string","pattern":"(?=a)b"})", "pattern"},
           {R"({"type":"number","multipleOf":0.5})", "multipleOf"},
           {R"({"type":"string","format":"ipv6"})", "format"},
           {R"({"type":"object","patternProperties":{"a":{}}})", "patternProperties"},
           {R"({"$ref":"#/$defs/missing"})", "$ref"},
           {R"({"not":{"type":"string"}})", "not"}}) {
    try {
      schema_grammar(schema);
      ADD_FAILURE() << schema << " was accepted";
    } catch (const SchemaError& e) {
      EXPECT_EQ(e.keyword(), keyword) << e.what();
      EXPECT_NE(std::string(e.what()).find(keyword), std::string::npos) << e.what();
    }
  }
}

// Random walks under the masks: whatever is drawn, the output is valid JSON of the schema's shape
// and ends (EOS) within max_tokens, even when max_tokens leaves little room.
TEST(ConstrainedDecoder, RandomWalksEndInConformingJsonWithinMaxTokens) {
  const std::string schema = R"({"type":"object","properties":{
      "id":{"type":"integer","minimum":-5,"maximum":500},
      "label":{"type":"string"},
      "score":{"type":"number"},
      "ok":{"type":"boolean"},
      "items":{"type":"array","items":{"type":"object","properties":{"k":{"type":"string","maxLength":3}},
               "required":["k"]}},
      "node":{"$ref":"#/$defs/node"}},
      "required":["id","label","items"],
      "$defs":{"node":{"type":"object","properties":{"next":{"anyOf":[{"$ref":"#/$defs/node"},{"type":"null"}]}},
               "required":["next"]}}})";
  const std::string spec = ojson{{"type", "json_schema"}, {"schema", ojson::parse(schema)}}.dump();
  for (int64_t max_tokens : {40, 64, 200}) {
    for (uint64_t seed = 0; seed < 15; ++seed) {
      int64_t used = 0;
      const std::string out = random_walk(spec, max_tokens, seed, &used);
      ASSERT_LE(used, max_tokens) << out;  // (EOS itself may not fit: the value is complete then)
      const json j = json::parse(out, nullptr, false);
      ASSERT_FALSE(j.is_discarded()) << out;
      ASSERT_TRUE(j.is_object()) << out;
      EXPECT_TRUE(j["id"].is_number_integer() && j["id"] >= -5 && j["id"] <= 500) << out;
      EXPECT_TRUE(j["label"].is_string()) << out;
      EXPECT_TRUE(j["items"].is_array()) << out;
      for (const auto& it : j["items"]) EXPECT_TRUE(it.is_object() && it["k"].is_string()) << out;
      if (j.contains("node")) {
        EXPECT_TRUE(j["node"].contains("next")) << out;
      }
    }
  }
  for (uint64_t seed = 0; seed < 10; ++seed) {  // json_object: any object
    const std::string out = random_walk(R"({"type":"json_object"})", 60, seed);
    EXPECT_TRUE(json::parse(out, nullptr, false).is_object()) << out;
  }
}

TEST(ToolCalls, ForcedCallsParseBackInEveryFormat) {
  for (auto f : {ToolCallFormat::Hermes, ToolCallFormat::Mistral, ToolCallFormat::DeepSeek}) {
    const ojson spec{
        {"type", "tool_calls"},
        {"format", to_string(f)},
        {"parallel", true},
        {"tools",
         {{{"name", "get_weather"},
           {"parameters", ojson::parse(R"({"type":"object","properties":{"city":{"type":"string","maxLength":8}},
                                         "required":["city"]})")}},
          {{"name", "noop"}, {"parameters", ojson::parse(R"({"type":"object"})")}}}}};
    for (uint64_t seed = 0; seed < 8; ++seed) {
      const std::string out = random_walk(spec.dump(), 150, seed);
      const ParsedOutput p = parse_tool_calls(f, out);
      ASSERT_FALSE(p.calls.empty()) << to_string(f) << ": " << out;
      EXPECT_TRUE(p.content.empty()) << out;
      for (const auto& c : p.calls) {
        EXPECT_TRUE(c.name == "get_weather" || c.name == "noop") << out;
        const json args = json::parse(c.arguments, nullptr, false);
        ASSERT_TRUE(args.is_object()) << out;
        if (c.name == "get_weather") {
          EXPECT_TRUE(args["city"].is_string()) << out;
        }
      }
    }
  }
  EXPECT_TRUE(parse_tool_calls(ToolCallFormat::Hermes, "just text").calls.empty());
}

// A real tokenizer (bootstrap's llama2, 32K tokens): the vocabulary as bytes, and how long a
// mask takes uncached and cached (printed, not asserted).
TEST(ConstrainedDecoder, RealTokenizerVocabulary) {
  const std::filesystem::path dir = std::filesystem::path(MOEMESH_CACHE_DIR) / "tokenizer-llama2/models";
  if (!std::filesystem::exists(dir / "tokenizer.json")) GTEST_SKIP() << "no llama2 tokenizer in " << dir;
  auto tok = Tokenizer::from_dir(dir);
  auto vocab = TokenVocabulary::from_tokenizer(*tok, {*tok->eos_id()}, tok->vocab_size());
  EXPECT_EQ(vocab->bytes(*tok->token_to_id("<0x0A>")), "\n");
  EXPECT_EQ(vocab->bytes(*tok->token_to_id("▁the")), " the");
  EXPECT_EQ(vocab->bytes(*tok->eos_id()), "");
  auto masks = std::make_shared<GrammarMasks>(
      schema_grammar(R"({"type":"object","properties":{"a":{"type":"string"}}})"), vocab);
  GrammarState st(masks->grammar());
  st.advance("{\"a\":\"");
  const auto t0 = std::chrono::steady_clock::now();
  auto m = masks->mask(st);
  const auto t1 = std::chrono::steady_clock::now();
  masks->mask(st);
  const auto t2 = std::chrono::steady_clock::now();
  EXPECT_GT(m->allowed, 20000) << "inside a string almost every token fits";
  EXPECT_EQ(m->need[size_t(*tok->token_to_id("\"}"))], 0) << "closing the string and the object finishes it";
  std::printf("mask over %lld tokens: %.2f ms computed, %.4f ms cached\n", (long long)vocab->size(),
              std::chrono::duration<double, std::milli>(t1 - t0).count(),
              std::chrono::duration<double, std::milli>(t2 - t1).count());
}

}  // namespace
}  // namespace moemesh

namespace moemesh {
namespace {

// Templates that know no tools get them in a preamble, calls as text in the model's format, and
// results as user turns, alternating roles; templates that do are left to render them.
TEST(ToolCalls, MessagesForTemplatesWithAndWithoutTools) {
  const json tools = json::parse(R"([{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}])");
  const json messages = json::parse(R"([
      {"role":"user","content":"weather?"},
      {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
        "function":{"name":"f","arguments":"{\"x\":1}"}}]},
      {"role":"tool","tool_call_id":"call_1","content":"sunny"},
      {"role":"tool","tool_call_id":"call_2","content":"warm"}])");
  const std::string plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}";
  const json out = messages_for_template(messages, tools, plain, ToolCallFormat::Mistral);
  ASSERT_EQ(out.size(), 3u) << out.dump();
  EXPECT_EQ(out[0]["role"], "user");
  EXPECT_NE(out[0]["content"].get<std::string>().find("\"name\":\"f\""), std::string::npos) << out[0];
  EXPECT_NE(out[0]["content"].get<std::string>().find("weather?"), std::string::npos);
  EXPECT_EQ(out[1]["content"], "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"x\":1}}]");
  EXPECT_EQ(out[2]["role"], "user");  // both results, joined into one turn
  EXPECT_NE(out[2]["content"].get<std::string>().find("sunny"), std::string::npos);
  EXPECT_NE(out[2]["content"].get<std::string>().find("warm"), std::string::npos);
  // The calls written in the preamble's format parse back.
  EXPECT_EQ(parse_tool_calls(ToolCallFormat::Mistral, out[1]["content"]).calls.at(0).name, "f");

  const std::string knows_tools = "{{ tools }}{% for m in messages %}{{ m.tool_calls }}{% endfor %}";
  EXPECT_EQ(messages_for_template(messages, tools, knows_tools, ToolCallFormat::Mistral), messages);
  // DeepSeek-V3's template renders calls and results but lists no tools: only the preamble is added.
  const std::string ds = "{{ message['tool_calls'] }}<｜tool▁calls▁begin｜>";
  const json with_preamble = messages_for_template(messages, tools, ds, tool_call_format_for(ds));
  ASSERT_EQ(with_preamble.size(), messages.size());
  EXPECT_NE(with_preamble[0]["content"].get<std::string>().find("<｜tool▁calls▁begin｜>"), std::string::npos);
  EXPECT_EQ(with_preamble[1], messages[1]);
}

}  // namespace
}  // namespace moemesh
