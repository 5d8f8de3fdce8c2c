// Hugging Face tokenizer.json: byte-level BPE (GPT-2 / Llama-3 / DeepSeek-V3) and
// SentencePiece-style BPE with byte fallback (Llama-2 / Mixtral), with added and special
// tokens, plus tokenizer_config.json (bos/eos, add_bos_token, chat_template).
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moemesh {

// A token named in tokenizer_config.json: "<s>" or {"content": "<s>", ...}.
std::optional<std::string> config_token_content(const nlohmann::json& cfg, const char* key);

class Tokenizer {
 public:
  // Reads dir/tokenizer.json and, when present, dir/tokenizer_config.json.
  static std::shared_ptr<Tokenizer> from_dir(const std::filesystem::path& dir);
  static std::shared_ptr<Tokenizer> from_files(const std::filesystem::path& tokenizer_json,
                                               const std::filesystem::path& tokenizer_config = {});
  virtual ~Tokenizer() = default;

  // add_special_tokens: prepend BOS when the config says add_bos_token (as HF does).
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const = 0;
  virtual std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const = 0;

  virtual int64_t vocab_size() const = 0;  // highest id + 1, added tokens included
  // The bytes token `id` adds to a text in the middle of an output (no start-of-text stripping,
  // parts of a UTF-8 character as they are); "" for special tokens and unknown ids.
  virtual std::string token_bytes(int32_t id) const = 0;
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::optional<std::string> id_to_token(int32_t id) const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  virtual const std::string& bos_token() const = 0;
  virtual const std::string& eos_token() const = 0;

  // The chat_template of tokenizer_config.json ("" when none).
  virtual const std::string& chat_template() const = 0;
  // Renders the chat template over messages ([{role, content}, ...]); throws moemesh::Error
  // when there is no template or it raises.
  // `extra`: more template variables (e.g. tools), when not null.
  virtual std::string apply_chat_template(const nlohmann::json& messages, bool add_generation_prompt,
                                          const nlohmann::json* extra = nullptr) const = 0;
};

}  // namespace moemesh
