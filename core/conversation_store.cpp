#include "core/conversation_store.h"

#include <spdlog/spdlog.h>

#include "core/error.h"

namespace moemesh {

using nlohmann::json;

int64_t ConversationStore::now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

ConversationStore::ConversationStore(std::filesystem::path dir, std::chrono::seconds ttl) : ttl_(ttl) {
  if (dir.empty()) return;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw Error("responses store: cannot create " + dir.string() + ": " + ec.message());
  file_ = dir / "responses.jsonl";
  if (std::ifstream in(file_); in) {
    std::string line;
    size_t bad = 0;
    while (std::getline(in, line)) {
      const json j = json::parse(line, nullptr, false);
      if (!j.is_object() || !j.contains("id") || !j["id"].is_string()) {
        ++bad;  // a torn last line after a crash
        continue;
      }
      const std::string id = j["id"].get<std::string>();
      if (j.value("deleted", false)) {
        items_.erase(id);
        continue;
      }
      items_[id] = StoredResponse{id,
                                  j.value("tenant", ""),
                                  j.value("messages", json::array()),
                                  j.value("input", json::array()),
                                  j.value("response", json::object()),
                                  j.value("expires_at", int64_t(0))};
    }
    if (bad) spdlog::warn("responses store: skipped {} unreadable line(s) of {}", bad, file_.string());
  }
  const int64_t t = now();
  std::erase_if(items_, [&](const auto& kv) { return kv.second.expires_at <= t; });
  // Rewrite compacted: only what is alive.
  const auto tmp = file_.string() + ".tmp";
  {
    std::ofstream o(tmp, std::ios::trunc);
    for (const auto& [id, r] : items_)
      o << json{{"id", id},         {"tenant", r.tenant},     {"messages", r.messages},
                {"input", r.input}, {"response", r.response}, {"expires_at", r.expires_at}}
               .dump()
        << '\n';
    if (!o) throw Error("responses store: cannot write " + tmp);
  }
  std::filesystem::rename(tmp, file_);
  out_.open(file_, std::ios::app);
  if (!out_) throw Error("responses store: cannot append to " + file_.string());
}

void ConversationStore::append(const json& line) {
  if (!out_.is_open()) return;
  out_ << line.dump() << '\n';
  out_.flush();  // a restart must find it
}

void ConversationStore::put(StoredResponse r) {
  r.expires_at = now() + ttl_.count();
  std::lock_guard<std::mutex> lk(mu_);
  append({{"id", r.id},
          {"tenant", r.tenant},
          {"messages", r.messages},
          {"input", r.input},
          {"response", r.response},
          {"expires_at", r.expires_at}});
  items_[r.id] = std::move(r);
}

std::optional<StoredResponse> ConversationStore::get(const std::string& id, const std::string& tenant) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = items_.find(id);
  if (it == items_.end() || it->second.tenant != tenant) return std::nullopt;
  if (it->second.expires_at <= now()) {
    items_.erase(it);
    return std::nullopt;
  }
  return it->second;
}

bool ConversationStore::erase(const std::string& id, const std::string& tenant) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = items_.find(id);
  if (it == items_.end() || it->second.tenant != tenant) return false;
  items_.erase(it);
  append({{"id", id}, {"deleted", true}});
  return true;
}

size_t ConversationStore::size() const {
  std::lock_guard<std::mutex> lk(mu_);
  return items_.size();
}

}  // namespace moemesh
