// Tool calls in the shape a model family writes them: how tools reach the prompt, the grammar
// a forced call is decoded under, and parsing calls back out of the generated text.
//
// Formats, chosen from the chat template:
//   deepseek
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
//   mistral   [TOOL_CALLS][{"name": NAME, "arguments": ARGS}, ...]
//   hermes    <tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call> (one per call; the
//             default for templates that know no tools, told to the model in a preamble)
#pragma once
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/grammar.h"
#include "core/json_schema_grammar.h"

namespace moemesh {

enum class ToolCallFormat { Hermes, Mistral, DeepSeek };

ToolCallFormat tool_call_format_for(const std::string& chat_template);
const char* to_string(ToolCallFormat f);
ToolCallFormat parse_tool_call_format(const std::string& name);  // throws moemesh::Error

// A function the model may call: its name and its parameters' JSON schema.
struct ToolSpec {
  std::string name;
  nlohmann::ordered_json parameters = nlohmann::ordered_json::object();
};

// One or more calls (one unless `parallel`) of the given tools, in `format`.
Grammar::Id tool_calls_grammar(Grammar& g, JsonGrammarBuilder& json, ToolCallFormat format,
                               const std::vector<ToolSpec>& tools, bool parallel);

struct ToolCall {
  std::string id, name, arguments;  // arguments: the JSON text of the arguments object
};
struct ParsedOutput {
  std::string content;  // the text outside the calls
  std::vector<ToolCall> calls;
};
// Finds the calls in a model's output. Calls that do not parse stay in `content`.
ParsedOutput parse_tool_calls(ToolCallFormat format, const std::string& text);
// The text that starts a call in this format (a stream holds back text that may begin it).
const std::string& tool_calls_marker(ToolCallFormat format);

// The messages to render with a template that does not handle tools itself. A template that
// lists no `tools` gets them and the call format in a preamble before the first user message; one
// that renders no `tool_calls` gets assistant calls as text in `format` and tool results as user
// turns (turns of one role in a row joined). What the template handles is left to it.
nlohmann::json messages_for_template(const nlohmann::json& messages, const nlohmann::json& tools,
                                     const std::string& chat_template, ToolCallFormat format);

}  // namespace moemesh
