// Test helper: runs tests/tokenizer/reference.js (the @lenml/tokenizers JS implementation) on
// bootstrap's cached tokenizers and returns its JSON. Missing node or cache is a test failure
// with a clear message, never a silent pass: CI runs scripts/bootstrap first.
#pragma once
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "core/tokenizer.h"

namespace moemesh::testing {

inline std::filesystem::path cache_dir() {
  if (const char* env = std::getenv("MOEMESH_CACHE"); env && *env) return env;
  return MOEMESH_CACHE_DIR;
}
inline std::filesystem::path tokenizer_dir(const std::string& name) {
  return cache_dir() / ("tokenizer-" + name) / "models";
}
inline std::filesystem::path corpus_path() {
  return std::filesystem::path(MOEMESH_SOURCE_DIR) / "tests/tokenizer/corpus.json";
}

// Empty when everything the reference needs is present, else what is missing.
inline std::string missing_prerequisites(const std::string& name) {
  if (!std::filesystem::exists(tokenizer_dir(name) / "tokenizer.json"))
    return (tokenizer_dir(name) / "tokenizer.json").string() + " is missing: run scripts/bootstrap";
  if (!std::filesystem::exists(cache_dir() / "js/node_modules/@lenml/tokenizers"))
    return (cache_dir() / "js/node_modules/@lenml/tokenizers").string() + " is missing: run scripts/bootstrap";
  if (std::system("command -v node >/dev/null 2>&1") != 0) return "node is not on PATH: run scripts/bootstrap";
  return {};
}

inline std::string run_capture(const std::string& cmd, int* status) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    *status = -1;
    return out;
  }
  std::array<char, 65536> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  *status = pclose(p);
  return out;
}

// Runs the reference for tokenizer `name` over the corpus (and chats_file when given).
// Fails the current test and returns null JSON when it cannot.
inline nlohmann::json js_reference(const std::string& name, const std::string& chats_file = {}) {
  static std::map<std::string, nlohmann::json> memo;
  std::string key = name + "|" + chats_file;
  if (auto it = memo.find(key); it != memo.end()) return it->second;
  if (std::string miss = missing_prerequisites(name); !miss.empty()) {
    ADD_FAILURE() << "JS reference unavailable: " << miss;
    return nullptr;
  }
  auto err = std::filesystem::temp_directory_path() / ("moemesh-ref-" + std::to_string(getpid()) + ".err");
  std::string cmd = "node '" + std::string(MOEMESH_SOURCE_DIR) + "/tests/tokenizer/reference.js' '" +
                    cache_dir().string() + "' '" + name + "' '" + corpus_path().string() + "'";
  if (!chats_file.empty()) cmd += " '" + chats_file + "'";
  cmd += " 2>'" + err.string() + "'";
  int status = 0;
  std::string out = run_capture(cmd, &status);
  std::ifstream ef(err);
  std::string errtext((std::istreambuf_iterator<char>(ef)), {});
  std::filesystem::remove(err);
  if (status != 0) {
    ADD_FAILURE() << "JS reference failed (status " << status << "): " << errtext;
    return nullptr;
  }
  nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  if (j.is_discarded()) {
    ADD_FAILURE() << "JS reference printed invalid JSON: " << out.substr(0, 200);
    return nullptr;
  }
  memo[key] = j;
  return j;
}

// Loads the C++ tokenizer with the tokenizer_config the reference used (the llama2 package
// ships its config only inside its JS bundle), so both sides see identical files.
inline std::shared_ptr<Tokenizer> load_like_reference(const std::string& name, const nlohmann::json& ref) {
  auto cfg = std::filesystem::temp_directory_path() /
             ("moemesh-tokcfg-" + name + "-" + std::to_string(getpid()) + ".json");
  std::ofstream(cfg) << ref.at("config").dump();
  auto tok = Tokenizer::from_files(tokenizer_dir(name) / "tokenizer.json", cfg);
  std::filesystem::remove(cfg);
  return tok;
}

}  // namespace moemesh::testing
