#include "core/tool_calls.h"

#include <atomic>
#include <random>

#include "core/error.h"

namespace moemesh {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

namespace {

const std::string kDsCallsBegin = "<｜tool▁calls▁begin｜>", kDsCallsEnd = "<｜tool▁calls▁end｜>",
                  kDsCallBegin = "<｜tool▁call▁begin｜>", kDsCallEnd = "<｜tool▁call▁end｜>", kDsSep = "<｜tool▁sep｜>";
const std::string kMistral = "[TOOL_CALLS]";
const std::string kHermesBegin = "<tool_call>\n", kHermesEnd = "\n</tool_call>";

std::string call_id() {
  static std::atomic<uint64_t> counter{std::random_device{}()};
  const uint64_t v = counter.fetch_add(0x9E3779B97F4A7C15ull);
  static const char* digits = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::string id = "call_";
  uint64_t x = v * 0xBF58476D1CE4E5B9ull;
  for (int i = 0; i < 12; ++i, x /= 62) id += digits[x % 62];
  return id;
}

// {"name": NAME, "arguments": ARGS} for one of the tools.
Grammar::Id name_and_arguments(Grammar& g, JsonGrammarBuilder& jb, const std::vector<ToolSpec>& tools) {
  std::vector<Grammar::Id> alts;
  for (const auto& t : tools)
    alts.push_back(g.seq({g.literal("{\"name\":"), jb.space(), g.literal(ojson(t.name).dump()), g.byte(','), jb.space(),
                          g.literal("\"arguments\":"), jb.space(), jb.schema(t.parameters), g.byte('}')}));
  return g.alt(std::move(alts));
}

std::optional<ToolCall> call_from_object(const std::string& text) {
  json j = json::parse(text, nullptr, false);
  if (!j.is_object() || !j.contains("name") || !j["name"].is_string()) return std::nullopt;
  ToolCall c{call_id(), j["name"].get<std::string>(), "{}"};
  if (j.contains("arguments")) {
    const json& a = j["arguments"];
    c.arguments = a.is_string() ? a.get<std::string>() : a.dump();
  }
  return c;
}

}  // namespace

ToolCallFormat tool_call_format_for(const std::string& tmpl) {
  if (tmpl.find("tool▁calls▁begin") != std::string::npos) return ToolCallFormat::DeepSeek;
  if (tmpl.find("[TOOL_CALLS]") != std::string::npos) return ToolCallFormat::Mistral;
  return ToolCallFormat::Hermes;
}

const char* to_string(ToolCallFormat f) {
  switch (f) {
    case ToolCallFormat::DeepSeek:
      return "deepseek";
    case ToolCallFormat::Mistral:
      return "mistral";
    default:
      return "hermes";
  }
}

ToolCallFormat parse_tool_call_format(const std::string& name) {
  for (auto f : {ToolCallFormat::Hermes, ToolCallFormat::Mistral, ToolCallFormat::DeepSeek})
    if (name == to_string(f)) return f;
  throw Error("unknown tool call format '" + name + "' (hermes, mistral, deepseek)");
}

const std::string& tool_calls_marker(ToolCallFormat f) {
  switch (f) {
    case ToolCallFormat::DeepSeek:
      return kDsCallsBegin;
    case ToolCallFormat::Mistral:
      return kMistral;
    default:
      return kHermesBegin;
  }
}

Grammar::Id tool_calls_grammar(Grammar& g, JsonGrammarBuilder& jb, ToolCallFormat format,
                               const std::vector<ToolSpec>& tools, bool parallel) {
  if (tools.empty()) throw Error("tool_calls_grammar: no tools");
  const int32_t most = parallel ? Grammar::kUnbounded : 1;
  switch (format) {
    case ToolCallFormat::DeepSeek: {
      std::vector<Grammar::Id> alts;
      for (const auto& t : tools)
        alts.push_back(g.seq({g.literal(kDsCallBegin + "function" + kDsSep + t.name + "\n```json\n"),
                              jb.schema(t.parameters), g.literal("\n```" + kDsCallEnd)}));
      return g.seq(
          {g.literal(kDsCallsBegin), g.repeat(g.alt(std::move(alts)), 1, most, g.byte('\n')), g.literal(kDsCallsEnd)});
    }
    case ToolCallFormat::Mistral:
      return g.seq({g.literal(kMistral + "["),
                    g.repeat(name_and_arguments(g, jb, tools), 1, most, g.seq({g.byte(','), jb.space()})),
                    g.byte(']')});
    default: {
      const auto call = g.seq({g.literal(kHermesBegin), name_and_arguments(g, jb, tools), g.literal(kHermesEnd)});
      return g.repeat(call, 1, most, g.byte('\n'));
    }
  }
}

ParsedOutput parse_tool_calls(ToolCallFormat format, const std::string& text) {
  ParsedOutput out;
  const std::string& marker = tool_calls_marker(format);
  const size_t at = text.find(marker);
  if (at == std::string::npos) {
    out.content = text;
    return out;
  }
  out.content = text.substr(0, at);
  std::string rest = text.substr(at);
  bool ok = false;
  if (format == ToolCallFormat::Mistral) {
    json arr = json::parse(rest.substr(marker.size()), nullptr, false);
    if (arr.is_array()) {
      ok = true;
      for (const auto& o : arr)
        if (auto c = call_from_object(o.dump()))
          out.calls.push_back(*c);
        else
          ok = false;
    }
  } else if (format == ToolCallFormat::DeepSeek) {
    size_t pos = marker.size();
    ok = true;
    while ((pos = rest.find(kDsCallBegin, pos)) != std::string::npos) {
      const size_t sep = rest.find(kDsSep, pos), nl = rest.find('\n', sep == std::string::npos ? pos : sep);
      const size_t open = rest.find("```json\n", pos), close = rest.find("\n```" + kDsCallEnd, pos);
      if (sep == std::string::npos || nl == std::string::npos || open == std::string::npos ||
          close == std::string::npos || close < open) {
        ok = false;
        break;
      }
      const std::string name = rest.substr(sep + kDsSep.size(), nl - sep - kDsSep.size());
      const std::string args = rest.substr(open + 8, close - open - 8);
      if (json::parse(args, nullptr, false).is_discarded()) {
        ok = false;
        break;
      }
      out.calls.push_back({call_id(), name, args});
      pos = close + 4 + kDsCallEnd.size();
    }
  } else {
    size_t pos = 0;
    ok = true;
    while ((pos = rest.find(kHermesBegin, pos)) != std::string::npos) {
      const size_t end = rest.find(kHermesEnd, pos);
      auto c = end == std::string::npos
                   ? std::nullopt
                   : call_from_object(rest.substr(pos + kHermesBegin.size(), end - pos - kHermesBegin.size()));
      if (!c) {
        ok = false;
        break;
      }
      out.calls.push_back(*c);
      pos = end + kHermesEnd.size();
    }
  }
  if (!ok || out.calls.empty()) {
    out.calls.clear();
    out.content = text;
  }
  return out;
}

json messages_for_template(const json& messages, const json& tools, const std::string& tmpl, ToolCallFormat format) {
  // What the template does itself: list the tools (a `tools` variable), render calls and results.
  const bool lists_tools = tmpl.find("tools") != std::string::npos;
  const bool renders_calls = tmpl.find("tool_calls") != std::string::npos;
  const bool has_tools = !tools.is_null() && !tools.empty();
  bool any_tool_message = false;
  for (const auto& m : messages)
    any_tool_message |= m.value("role", "") == "tool" || (m.contains("tool_calls") && !m["tool_calls"].is_null());
  if ((!has_tools || lists_tools) && (!any_tool_message || renders_calls)) return messages;

  json out = json::array();
  auto push = [&](const std::string& role, const std::string& content) {
    if (!out.empty() && out.back()["role"] == role) {
      out.back()["content"] = out.back()["content"].get<std::string>() + "\n\n" + content;
      return;
    }
    out.push_back(json{{"role", role}, {"content", content}});
  };
  std::string preamble;
  if (has_tools && !lists_tools) {
    preamble = "You can call these functions (JSON schemas of their parameters):\n";
    for (const auto& t : tools) preamble += t.dump() + "\n";
    preamble +=
        "To call one, answer only with " +
        std::string(format == ToolCallFormat::Mistral ? "" : "one block per call: ") +
        (format == ToolCallFormat::Mistral    ? kMistral + "[{\"name\": NAME, \"arguments\": {...}}]"
         : format == ToolCallFormat::DeepSeek ? kDsCallsBegin + kDsCallBegin + "function" + kDsSep +
                                                    "NAME\n```json\n{...}\n```" + kDsCallEnd + kDsCallsEnd
                                              : kHermesBegin + "{\"name\": NAME, \"arguments\": {...}}" + kHermesEnd) +
        "\n\n";
  }
  for (const auto& m : messages) {
    const std::string role = m.value("role", "user");
    std::string content = m.contains("content") && m["content"].is_string() ? m["content"].get<std::string>() : "";
    if (renders_calls && (role == "tool" || role == "assistant")) {
      out.push_back(m);  // the template's own rendering
    } else if (role == "tool") {
      push("user", "Result of tool call " + m.value("tool_call_id", std::string()) + ":\n" + content);
    } else if (role == "assistant" && m.contains("tool_calls") && m["tool_calls"].is_array()) {
      std::string calls;
      for (const auto& c : m["tool_calls"]) {
        const json& f = c["function"];
        const std::string args = f.value("arguments", std::string("{}"));
        if (format == ToolCallFormat::DeepSeek)
          calls += kDsCallBegin + "function" + kDsSep + f.value("name", std::string()) + "\n```json\n" + args +
                   "\n```" + kDsCallEnd;
        else
          calls += (calls.empty()                       ? ""
                    : format == ToolCallFormat::Mistral ? ", "
                                                        : "\n") +
                   std::string(format == ToolCallFormat::Hermes ? kHermesBegin : "") +
                   "{\"name\": " + json(f.value("name", std::string())).dump() + ", \"arguments\": " + args + "}" +
                   (format == ToolCallFormat::Hermes ? kHermesEnd : "");
      }
      if (format == ToolCallFormat::DeepSeek) calls = kDsCallsBegin + calls + kDsCallsEnd;
      if (format == ToolCallFormat::Mistral) calls = kMistral + "[" + calls + "]";
      push("assistant", content.empty() ? calls : content + "\n" + calls);
    } else if (role == "user" && !preamble.empty()) {
      push(role, preamble + content);
      preamble.clear();
    } else {
      push(role, content);
    }
  }
  return out;
}

}  // namespace moemesh
