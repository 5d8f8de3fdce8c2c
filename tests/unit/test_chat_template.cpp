// Chat templates: DeepSeek-V3's (from its tokenizer_config.json) and kMixtralChatTemplate
// rendered by our Jinja subset must equal transformers.js' apply_chat_template output; plus
// the Jinja features server users rely on, checked against Python Jinja2 semantics.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/chat_template.h"
#include "core/chat_templates.h"
#include "core/error.h"
#include "core/tokenizer.h"
#include "tests/tokenizer/js_reference.h"

namespace moemesh {
namespace {

using nlohmann::json;

json msg(const std::string& role, const json& content) { return {{"role", role}, {"content", content}}; }

struct Case {
  std::string name;
  json messages;
  bool add_generation_prompt;
};

std::vector<Case> deepseek_cases() {
  json tool_call = {{"role", "assistant"},
                    {"content", nullptr},
                    {"tool_calls", json::array({{{"type", "function"},
                                                 {"function", {{"name", "get_weather"}, {"arguments", "{\"city\": \"Paris\"}"}}}},
                                                {{"type", "function"},
                                                 {"function", {{"name", "get_time"}, {"arguments", "{}"}}}}})}};
  return {
      {"single user, prompt", json::array({msg("user", "Hello!")}), true},
      {"single user, no prompt", json::array({msg("user", "Hello!")}), false},
      {"system + user", json::array({msg("system", "You are terse."), msg("user", "2+2?")}), true},
      {"two systems", json::array({msg("system", "A."), msg("system", "B."), msg("user", "hi")}), true},
      {"multi-turn",
       json::array({msg("system", "Be kind."), msg("user", "Hi"), msg("assistant", "Hello! How can I help?"),
                    msg("user", "写一首诗 🌸\nwith newlines\n")}),
       true},
      {"ends with assistant", json::array({msg("user", "Hi"), msg("assistant", "Yo")}), false},
      {"tool calls",
       json::array({msg("user", "Weather in Paris?"), tool_call, msg("tool", "{\"temp\": 21}"), msg("tool", "12:00"),
                    msg("assistant", "21°C at noon.")}),
       true},
      {"tool output last", json::array({msg("user", "w?"), tool_call, msg("tool", "sunny")}), true},
  };
}

std::vector<Case> mixtral_cases() {
  return {
      {"single user, no prompt", json::array({msg("user", "Hello!")}), false},
      {"single user, prompt", json::array({msg("user", "Hello!")}), true},
      {"multi-turn",
       json::array({msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bonjour 🇫🇷, ça va ?")}), false},
      {"raise: system role", json::array({msg("system", "x"), msg("user", "Hi")}), false},
      {"raise: not alternating", json::array({msg("user", "a"), msg("user", "b")}), false},
      {"raise: unknown role second", json::array({msg("user", "a"), msg("tool", "b")}), false},
  };
}

// Runs the JS reference over the cases; template empty = the tokenizer's own.
json reference_chats(const std::string& name, const std::vector<Case>& cases, const std::string& tmpl) {
  json chats = json::array();
  for (const auto& c : cases) {
    json j = {{"messages", c.messages}, {"add_generation_prompt", c.add_generation_prompt}};
    if (!tmpl.empty()) j["template"] = tmpl;
    chats.push_back(j);
  }
  auto path = std::filesystem::temp_directory_path() / ("moemesh-chats-" + name + "-" + std::to_string(getpid()) + ".json");
  std::ofstream(path) << chats.dump();
  json ref = testing::js_reference(name, path.string());
  std::filesystem::remove(path);
  return ref;
}

// Our output or "ERROR: message", in the same shape as the reference's {text}/{error}.
std::string outcome(const std::function<std::string()>& render) {
  try {
    return render();
  } catch (const Error& e) {
    return std::string("ERROR: ") + e.what();
  }
}
std::string outcome(const json& ref) {
  return ref.contains("text") ? ref["text"].get<std::string>() : "ERROR: " + ref.at("error").get<std::string>();
}

TEST(ChatTemplateVsJs, DeepSeekV3TemplateMatchesReference) {
  auto cases = deepseek_cases();
  json ref = reference_chats("deepseek_v3", cases, "");
  ASSERT_FALSE(ref.is_null());
  auto tok = testing::load_like_reference("deepseek_v3", ref);
  ASSERT_EQ(ref.at("chats").size(), cases.size());
  size_t matched = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    std::string want = outcome(ref["chats"][i]);
    std::string got = outcome([&] { return tok->apply_chat_template(c.messages, c.add_generation_prompt); });
    EXPECT_EQ(got, want) << c.name;
    EXPECT_EQ(want.rfind("ERROR", 0), std::string::npos) << c.name << ": reference failed: " << want;
    matched += got == want;
  }
  std::printf("deepseek_v3 chat template: %zu/%zu conversations matched\n", matched, cases.size());
  // Spot check the shape, so a broken reference cannot make this pass vacuously.
  EXPECT_EQ(outcome(ref["chats"][2]), "<｜begin▁of▁sentence｜>You are terse.<｜User｜>2+2?<｜Assistant｜>");
}

TEST(ChatTemplateVsJs, MixtralTemplateMatchesReferenceIncludingRaise) {
  auto cases = mixtral_cases();
  json ref = reference_chats("llama2", cases, kMixtralChatTemplate);
  ASSERT_FALSE(ref.is_null());
  auto tok = testing::load_like_reference("llama2", ref);
  ChatTemplate tmpl(kMixtralChatTemplate);
  size_t matched = 0, raised = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    std::string want = outcome(ref["chats"][i]);
    std::string got = outcome(
        [&] { return render_chat(tmpl, c.messages, c.add_generation_prompt, tok->bos_token(), tok->eos_token()); });
    EXPECT_EQ(got, want) << c.name;
    EXPECT_EQ(c.name.rfind("raise", 0) == 0, want.rfind("ERROR", 0) == 0) << c.name << ": " << want;
    matched += got == want;
    raised += want.rfind("ERROR", 0) == 0;
  }
  std::printf("mixtral chat template: %zu/%zu conversations matched (%zu raise)\n", matched, cases.size(), raised);
  EXPECT_EQ(outcome(ref["chats"][2]), "<s>[INST] Hi [/INST]Hello!</s>[INST] Bonjour 🇫🇷, ça va ? [/INST]");
}

TEST(ChatTemplate, RaiseExceptionBecomesErrorWithItsMessage) {
  ChatTemplate tmpl(kMixtralChatTemplate);
  try {
    render_chat(tmpl, json::array({msg("assistant", "x")}), false, "<s>", "</s>");
    FAIL() << "expected moemesh::Error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "Conversation roles must alternate user/assistant/user/assistant/...");
  }
}

std::string render(const std::string& src, const json& vars = json::object()) { return ChatTemplate(src).render(vars); }

TEST(ChatTemplate, WhitespaceControlTrimAndLstripBlocks) {
  EXPECT_EQ(render("a  {%- if true -%}  b  {%- endif -%}  c"), "abc");
  EXPECT_EQ(render("a {{- 'x' -}} b"), "axb");
  // trim_blocks drops the newline after a tag; lstrip_blocks the indentation before it.
  EXPECT_EQ(render("{% if true %}\n  x\n{% endif %}\ny"), "  x\ny");
  EXPECT_EQ(render("list:\n  {% for i in [1, 2] %}\n  - {{ i }}\n  {% endfor %}\nend\n"), "list:\n  - 1\n  - 2\nend");
  EXPECT_EQ(render("{# comment #}\nA{# another #}B"), "AB");
  EXPECT_EQ(render("{% raw %}{{ not evaluated }}{% endraw %}"), "{{ not evaluated }}");
  EXPECT_EQ(render("  {{ 'expr tags keep indentation' }}"), "  expr tags keep indentation");
}

TEST(ChatTemplate, LoopsNamespacesAndScoping) {
  EXPECT_EQ(render("{% for x in xs %}{{ loop.index }}:{{ x }}{% if not loop.last %}, {% endif %}{% endfor %}",
                   {{"xs", {"a", "b", "c"}}}),
            "1:a, 2:b, 3:c");
  EXPECT_EQ(render("{% for x in xs %}{{ loop.index0 }}{{ loop.first }}{{ loop.revindex }}{% endfor %}", {{"xs", {1, 2}}}),
            "0True21False1");
  // set inside a loop does not leak; a namespace does.
  EXPECT_EQ(render("{% set a = 1 %}{% set ns = namespace(n=0) %}{% for x in [1, 2, 3] %}{% set a = x %}"
                   "{% set ns.n = ns.n + x %}{% endfor %}{{ a }} {{ ns.n }}"),
            "1 6");
  EXPECT_EQ(render("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(render("{% for x in [1, 2, 3, 4] if x is even %}{{ x }}{% endfor %}"), "24");
  EXPECT_EQ(render("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", {{"d", {{"a", 1}, {"b", 2}}}}), "a=1;b=2;");
  EXPECT_EQ(render("{% for x in range(5) %}{% if x == 1 %}{% continue %}{% endif %}{% if x == 3 %}{% break %}"
                   "{% endif %}{{ x }}{% endfor %}"),
            "02");
  EXPECT_EQ(render("{% for m in messages[1:] %}{{ m }}{% endfor %}|{{ messages[-1] }}|{{ messages[::-1] | join(',') }}",
                   {{"messages", {"a", "b", "c"}}}),
            "bc|c|c,b,a");
}

TEST(ChatTemplate, ExpressionsTestsAndPythonPrinting) {
  json vars = {{"m", {{"role", "user"}, {"content", nullptr}}}, {"n", 7}};
  EXPECT_EQ(render("{{ m.role }}{{ m['role'] }}{{ m.missing is defined }}{{ m.content is none }}"
                   "{{ m.role is not none }}{{ undefined_var is defined }}",
                   vars),
            "useruserFalseTrueTrueFalse");
  EXPECT_EQ(render("{{ n % 4 }} {{ -7 % 3 }} {{ n // 2 }} {{ n / 2 }} {{ 2 ** 3 }} {{ n != 7 }}", vars),
            "3 2 3 3.5 8 False");
  EXPECT_EQ(render("{{ 'a' + 'b' ~ 1 }} {{ 'x' if n > 5 else 'y' }} {{ 'ell' in 'hello' }} {{ 3 in [1, 2] }}", vars),
            "ab1 x True False");
  EXPECT_EQ(render("{{ none }} {{ true }} {{ 1.0 }} {{ [1, 'a'] }} {{ {'k': none} }}"), "None True 1.0 [1, 'a'] {'k': None}");
  EXPECT_EQ(render("{% if n < 5 %}small{% elif n < 10 %}medium{% else %}large{% endif %}", vars), "medium");
  EXPECT_EQ(render("{{ not m.content and m.role == 'user' or 'no' }}", vars), "True");
  EXPECT_EQ(render("{{ n is divisibleby 7 }} {{ n is odd }} {{ 'x' is string }} {{ m is mapping }}", vars),
            "True True True True");
}

TEST(ChatTemplate, FiltersAndMethods) {
  EXPECT_EQ(render("[{{ '  hi \n' | trim }}] {{ [1, 2, 3] | length }} {{ 'abc' | length }} {{ 'ab' | upper }}"),
            "[hi] 3 3 AB");
  EXPECT_EQ(render("{{ {'a': [1, 'x\"y'], 'b': none, 'c': 'é'} | tojson }}"), R"({"a": [1, "x\"y"], "b": null, "c": "é"})");
  EXPECT_EQ(render("{{ {'a': [1]} | tojson(indent=2) }}"), "{\n  \"a\": [\n    1\n  ]\n}");
  EXPECT_EQ(render("{{ missing | default('dflt') }} {{ '' | default('e', true) }} {{ ['a', 'b'] | join('-') }}"),
            "dflt e a-b");
  EXPECT_EQ(render("{{ xs | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(',') }}",
                   {{"xs", {{{"role", "user"}, {"content", "1"}}, {{"role", "bot"}, {"content", "2"}}, {{"role", "user"}, {"content", "3"}}}}}),
            "1,3");
  EXPECT_EQ(render("{{ ' x '.strip() }}|{{ 'a,b'.split(',') | last }}|{{ 'Hello'.startswith('He') }}|"
                   "{{ d.get('k', 'none') }}|{{ 'aXa'.replace('a', 'b') }}|{{ 'hi there' | title }}",
                   {{"d", json::object()}}),
            "x|b|True|none|bXb|Hi There");
  EXPECT_EQ(render("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bob') }} {{ greet('Al', '?') }}"),
            "Hi Bob! Hi Al?");
  EXPECT_EQ(render("{% set block %}inner {{ 1 + 1 }}{% endset %}[{{ block }}]"), "[inner 2]");
}

TEST(ChatTemplate, ErrorsAreReadable) {
  auto error_of = [](const std::string& src, const json& vars = json::object()) -> std::string {
    try {
      ChatTemplate(src).render(vars);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(error_of("{% if x %}unclosed").find("endif"), std::string::npos);
  EXPECT_NE(error_of("line1\n{{ 1 + }}").find("line 2"), std::string::npos);
  EXPECT_NE(error_of("{{ x | nosuchfilter }}").find("nosuchfilter"), std::string::npos);
  EXPECT_NE(error_of("{% frobnicate %}").find("frobnicate"), std::string::npos);
  EXPECT_NE(error_of("{{ 'a' + 1 }}").find("unsupported operand"), std::string::npos);
  EXPECT_NE(error_of("{{ nothing() }}").find("not callable"), std::string::npos);
  EXPECT_EQ(error_of("{{ raise_exception('custom message') }}"), "custom message");
  EXPECT_THROW(render_chat(ChatTemplate("x"), json::object(), false, "", ""), Error);
}

}  // namespace
}  // namespace moemesh
