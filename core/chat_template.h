// A Jinja2 subset for Hugging Face chat templates, rendered the way transformers does
// (trim_blocks, lstrip_blocks, loop controls, tojson without HTML escaping).
//
// Supported: {{ }}, {% if/elif/else %}, {% for %} (loop.*, else, inline if filter, tuple
// unpacking), {% set %} (names, namespace attributes, block form), {% macro %},
// {% break/continue %}, {% generation %}, {% raw %}, comments, whitespace control {%- -%};
// expressions with and/or/not, comparisons, in, is tests, + - * / // % ** ~, indexing, slices,
// attribute access, method calls on strings and dicts, filters (trim, length, tojson, join,
// default, upper, lower, ...), and the globals namespace(), range(), raise_exception().
#pragma once
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

namespace moemesh {

class ChatTemplate {
 public:
  // Parses the template; throws moemesh::Error on a syntax error.
  explicit ChatTemplate(std::string_view source);
  ~ChatTemplate();
  ChatTemplate(const ChatTemplate&) = delete;
  ChatTemplate& operator=(const ChatTemplate&) = delete;

  // Renders with variables (a JSON object). raise_exception(msg) and runtime errors throw
  // moemesh::Error; raise_exception's message is passed through unchanged.
  std::string render(const nlohmann::json& variables) const;

 private:
  struct Program;
  std::unique_ptr<Program> program_;
};

// Renders a chat template with the variables transformers passes: messages,
// add_generation_prompt, bos_token, eos_token, plus any extra ones (e.g. tools).
std::string render_chat(const ChatTemplate& tmpl, const nlohmann::json& messages, bool add_generation_prompt,
                        const std::string& bos_token, const std::string& eos_token);
std::string render_chat(const ChatTemplate& tmpl, const nlohmann::json& messages, bool add_generation_prompt,
                        const std::string& bos_token, const std::string& eos_token,
                        const nlohmann::json& extra_variables);

}  // namespace moemesh
