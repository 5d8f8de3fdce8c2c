// `moemesh tokenize`: encode text, decode ids, or render a chat with a model's tokenizer.
//   moemesh tokenize --tokenizer DIR --text "Hello"          -> 1,22557
//   moemesh tokenize --tokenizer DIR --ids 1,22557           -> <s> Hello
//   moemesh tokenize --tokenizer DIR --chat chat.json        -> the rendered prompt
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/chat_template.h"
#include "core/chat_templates.h"
#include "core/error.h"
#include "core/tokenizer.h"
#include "services/cli/commands.h"

namespace moemesh::cli {
namespace {

struct TokenizeArgs {
  std::string tokenizer;
  std::string text;
  std::string ids;
  std::string chat;
  std::string chat_template;
  bool no_special = false;
  bool no_generation_prompt = false;
  bool json = false;
};

std::vector<int32_t> parse_id_list(const std::string& s) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) continue;
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || v < 0 || v > INT32_MAX)
      throw Error("--ids: \"" + item + "\" is not a token id (expected e.g. 1,2,3)");
    ids.push_back(static_cast<int32_t>(v));
  }
  return ids;
}

std::string read_file_or_stdin(const std::string& path, const char* what) {
  if (path == "-") return std::string(std::istreambuf_iterator<char>(std::cin), {});
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(std::string(what) + ": cannot open " + path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::shared_ptr<Tokenizer> load(const std::string& where) {
  std::filesystem::path p(where);
  if (std::filesystem::is_directory(p)) return Tokenizer::from_dir(p);
  if (std::filesystem::is_regular_file(p)) {  // a tokenizer.json; its config may sit next to it
    auto cfg = p.parent_path() / "tokenizer_config.json";
    return Tokenizer::from_files(p, std::filesystem::exists(cfg) ? cfg : std::filesystem::path());
  }
  throw Error("--tokenizer: " + where + " is neither a folder with tokenizer.json nor a tokenizer.json");
}

std::string join_ids(const std::vector<int32_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? "," : "") + std::to_string(ids[i]);
  return out;
}

std::string render(const Tokenizer& tok, const TokenizeArgs& a) {
  std::string src = read_file_or_stdin(a.chat, "--chat");
  nlohmann::json chat = nlohmann::json::parse(src, nullptr, false);
  if (chat.is_discarded()) throw Error("--chat: " + a.chat + " is not valid JSON");
  // Either [{role, content}, ...] or {"messages": [...], "add_generation_prompt": bool, ...}.
  nlohmann::json messages = chat.is_object() ? chat.value("messages", nlohmann::json()) : chat;
  if (!messages.is_array()) throw Error("--chat: expected a JSON array of messages or {\"messages\": [...]}");
  bool gen = !a.no_generation_prompt;
  nlohmann::json extra = nlohmann::json::object();
  if (chat.is_object()) {
    gen = chat.value("add_generation_prompt", gen);
    for (auto it = chat.begin(); it != chat.end(); ++it)
      if (it.key() != "messages" && it.key() != "add_generation_prompt") extra[it.key()] = it.value();
  }
  std::string tmpl = tok.chat_template();
  if (a.chat_template == "mixtral") {
    tmpl = kMixtralChatTemplate;
  } else if (!a.chat_template.empty()) {
    tmpl = read_file_or_stdin(a.chat_template, "--chat-template");
  } else if (tmpl.empty()) {
    throw Error("the tokenizer has no chat_template; pass --chat-template FILE (or --chat-template mixtral)");
  }
  ChatTemplate compiled(tmpl);
  return render_chat(compiled, messages, gen, tok.bos_token(), tok.eos_token(), extra);
}

void run_tokenize(const TokenizeArgs& a) {
  int modes = !a.text.empty() + !a.ids.empty() + !a.chat.empty();
  if (modes != 1) throw Error("tokenize: give exactly one of --text, --ids or --chat");
  auto tok = load(a.tokenizer);
  nlohmann::json out;
  if (!a.text.empty()) {
    auto ids = tok->encode(a.text, !a.no_special);
    if (!a.json) {
      std::cout << join_ids(ids) << "\n";
      return;
    }
    nlohmann::json tokens = nlohmann::json::array();
    for (int32_t id : ids) tokens.push_back(tok->id_to_token(id).value_or(""));
    out = {{"ids", ids}, {"tokens", tokens}};
  } else if (!a.ids.empty()) {
    std::string text = tok->decode(parse_id_list(a.ids), a.no_special);
    if (!a.json) {
      std::cout << text << "\n";
      return;
    }
    out = {{"text", text}};
  } else {
    std::string prompt = render(*tok, a);
    if (!a.json) {
      std::cout << prompt;
      if (!prompt.empty() && prompt.back() != '\n') std::cout << "\n";
      return;
    }
    // The rendered prompt already holds BOS etc., so it is encoded without adding specials.
    out = {{"prompt", prompt}, {"ids", tok->encode(prompt, false)}};
  }
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
}

}  // namespace

void add_tokenize(CLI::App& app) {
  auto a = std::make_shared<TokenizeArgs>();
  auto* cmd = app.add_subcommand("tokenize", "encode text, decode ids or render a chat with a model's tokenizer");
  cmd->add_option("--tokenizer", a->tokenizer, "model folder with tokenizer.json (or the tokenizer.json itself)")
      ->required();
  auto* text = cmd->add_option("--text", a->text, "text to encode; prints comma-separated ids");
  auto* ids = cmd->add_option("--ids", a->ids, "comma-separated ids to decode; prints the text");
  auto* chat = cmd->add_option("--chat", a->chat,
                               "JSON file ('-' for stdin) with [{role, content}, ...] or {\"messages\": [...]}; "
                               "prints the prompt the chat template renders");
  text->excludes(ids)->excludes(chat);
  ids->excludes(chat);
  cmd->add_option("--chat-template", a->chat_template,
                  "Jinja template file to use instead of the tokenizer's, or 'mixtral' for the built-in one");
  cmd->add_flag("--no-special", a->no_special,
                "--text: do not add BOS/EOS; --ids: drop special tokens from the text");
  cmd->add_flag("--no-generation-prompt", a->no_generation_prompt,
                "--chat: do not end with the assistant prompt");
  cmd->add_flag("--json", a->json, "print JSON (ids with token strings, or text, or prompt with ids)");
  cmd->callback([a] { run_tokenize(*a); });
}

}  // namespace moemesh::cli
