// Stored responses of the Responses API: each response's conversation (the messages the model
// saw plus its answer) and its JSON, owned by a tenant, kept for a TTL, and persisted so that a
// router restart keeps conversations going.
//
// Persistence is an append-only JSON-lines file (`responses.jsonl` in the given folder): a put
// writes the record, a delete writes a tombstone; loading replays the file, drops what has
// expired, and rewrites it compacted. Thread-safe.
#pragma once
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace moemesh {

struct StoredResponse {
  std::string id, tenant;
  nlohmann::json messages;  // the conversation up to and including this response's answer
  nlohmann::json input;     // what the model was given for it (after turn keeping and truncation)
  nlohmann::json response;  // the response object as returned
  int64_t expires_at = 0;   // unix seconds
};

class ConversationStore {
 public:
  // dir empty: memory only. ttl: how long a stored response lives.
  ConversationStore(std::filesystem::path dir, std::chrono::seconds ttl);

  void put(StoredResponse r);
  // The response `id` of `tenant`; nullopt when absent, expired or another tenant's.
  std::optional<StoredResponse> get(const std::string& id, const std::string& tenant);
  bool erase(const std::string& id, const std::string& tenant);
  size_t size() const;
  std::chrono::seconds ttl() const { return ttl_; }

 private:
  void append(const nlohmann::json& line);
  static int64_t now();

  std::filesystem::path file_;
  std::chrono::seconds ttl_;
  mutable std::mutex mu_;
  std::map<std::string, StoredResponse> items_;
  std::ofstream out_;
};

}  // namespace moemesh
