#include "core/lora_cache.h"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "core/error.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace moemesh {

namespace fs = std::filesystem;

std::string lora_content_key(const fs::path& dir) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  std::vector<char> buf(1 << 20);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"}) {
    std::ifstream in(dir / f, std::ios::binary);
    if (!in) throw Error((dir / f).string() + ": cannot open");
    while (in) {
      in.read(buf.data(), std::streamsize(buf.size()));
      XXH3_64bits_update(&state, buf.data(), size_t(in.gcount()));
    }
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(XXH3_64bits_digest(&state)));
  return hex;
}

std::pair<std::string, std::string> parse_lora_module(const std::string& spec) {
  const size_t eq = spec.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size())
    throw Error("--lora-modules: \"" + spec + "\" is not name=path");
  return {spec.substr(0, eq), spec.substr(eq + 1)};
}

LoraRef LoraRegistry::add(const std::string& name, const fs::path& dir, const std::string& base_name) {
  if (name.empty()) throw Error("an adapter needs a name");
  if (name == base_name) throw Error("the adapter name '" + name + "' is the base model's");
  // Every tensor is checked; none is read (an empty selection).
  LoraAdapter::load(dir, base_, WeightSelection{false, false, {}}, name);
  LoraRef ref{name, fs::absolute(dir).lexically_normal().string(), lora_content_key(dir)};
  std::lock_guard<std::mutex> lk(mu_);
  if (by_name_.count(name)) throw Error("an adapter named '" + name + "' is already loaded");
  by_name_.emplace(name, ref);
  return ref;
}

bool LoraRegistry::remove(const std::string& name) {
  std::lock_guard<std::mutex> lk(mu_);
  return by_name_.erase(name) > 0;
}

std::optional<LoraRef> LoraRegistry::find(const std::string& name) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = by_name_.find(name);
  if (it == by_name_.end()) return std::nullopt;
  return it->second;
}

std::vector<LoraRef> LoraRegistry::list() const {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<LoraRef> out;
  for (const auto& [n, r] : by_name_) out.push_back(r);
  return out;
}

namespace {

// Whether an adapter loaded for `have` holds every module `want` asks for.
bool covers(const WeightSelection& have, const WeightSelection& want) {
  if (want.dense_parts && !have.dense_parts) return false;
  if (have.all_experts) return true;
  if (want.all_experts) return false;
  return std::includes(have.experts.begin(), have.experts.end(), want.experts.begin(), want.experts.end());
}

}  // namespace

std::shared_ptr<const LoraAdapter> LoraCache::get(const LoraRef& ref, const WeightSelection& sel) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = entries_.find(ref.key);
  if (it != entries_.end() && covers(it->second.first.sel, sel)) {
    ++stats_.hits;
    lru_.splice(lru_.begin(), lru_, it->second.second);
    return it->second.first.adapter;
  }
  ++stats_.misses;
  // Loading under the lock keeps one copy per adapter; adapters are small next to a step.
  auto adapter = LoraAdapter::load(ref.path, base_, sel, ref.name, ref.key, dtype_);
  if (it != entries_.end()) {
    stats_.bytes -= it->second.first.adapter->bytes();
    lru_.erase(it->second.second);
    entries_.erase(it);
  }
  lru_.push_front(ref.key);
  entries_.emplace(ref.key, std::make_pair(Entry{adapter, sel}, lru_.begin()));
  stats_.bytes += adapter->bytes();
  // Least recently used out until the budget holds (the one just loaded always stays).
  while (stats_.bytes > max_bytes_ && lru_.size() > 1) {
    auto victim = entries_.find(lru_.back());
    stats_.bytes -= victim->second.first.adapter->bytes();
    entries_.erase(victim);
    lru_.pop_back();
    ++stats_.evictions;
  }
  stats_.adapters = entries_.size();
  return adapter;
}

LoraCache::Stats LoraCache::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

}  // namespace moemesh
