#include "core/tenants.h"

#include <openssl/evp.h>

#include <cmath>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_file.h"

namespace moemesh {

Priority parse_priority(const std::string& s) {
  if (s == "high") return Priority::High;
  if (s == "normal") return Priority::Normal;
  if (s == "low") return Priority::Low;
  throw Error("unknown priority \"" + s + "\" (expected high, normal or low)");
}

const char* priority_name(Priority p) {
  switch (p) {
    case Priority::High:
      return "high";
    case Priority::Normal:
      return "normal";
    case Priority::Low:
      return "low";
  }
  return "normal";
}

bool TenantSpec::allows_model(const std::string& model) const {
  for (const auto& m : models)
    if (m == "*" || m == model) return true;
  return false;
}

bool TenantSpec::allows_adapter(const std::string& name) const {
  for (const auto& a : adapters)
    if (a == "*" || a == name) return true;
  return false;
}

std::string sha256_hex(const std::string& data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (!EVP_Digest(data.data(), data.size(), md, &n, EVP_sha256(), nullptr)) throw Error("sha256 failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < n; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

std::vector<TenantSpec> load_tenants(const std::filesystem::path& file) {
  const nlohmann::json j = read_json_file(file, file.string(), "(the tenants file)");
  if (!j.is_object() || !j.contains("tenants") || !j["tenants"].is_array())
    throw Error(file.string() + ": expected {\"tenants\": [...]}");
  std::vector<TenantSpec> out;
  std::map<std::string, std::string> seen_keys;
  for (const auto& t : j["tenants"]) {
    TenantSpec s;
    const std::string where = file.string() + ": tenant " +
                              (t.contains("name") && t["name"].is_string() ? "\"" + t["name"].get<std::string>() + "\""
                                                                           : "#" + std::to_string(out.size()));
    try {
      if (!t.is_object()) throw Error("must be an object");
      if (!t.contains("name") || !t["name"].is_string() || t["name"].get<std::string>().empty())
        throw Error("field \"name\" must be a non-empty string");
      s.name = t["name"];
      for (const auto& o : out)
        if (o.name == s.name) throw Error("defined twice");
      if (!t.contains("api_key_sha256") || !t["api_key_sha256"].is_array() || t["api_key_sha256"].empty())
        throw Error("field \"api_key_sha256\" must list at least one key hash");
      for (const auto& h : t["api_key_sha256"]) {
        if (!h.is_string() || h.get<std::string>().size() != 64 ||
            h.get<std::string>().find_first_not_of("0123456789abcdef") != std::string::npos)
          throw Error("field \"api_key_sha256\": each entry must be 64 lower-case hex digits (moemesh hash-key KEY)");
        if (seen_keys.count(h)) throw Error("an API key is shared with tenant \"" + seen_keys[h] + "\"");
        seen_keys[h] = s.name;
        s.key_hashes.push_back(h);
      }
      auto number = [&](const char* key, double& dst) {
        if (!t.contains(key)) return;
        if (!t[key].is_number() || t[key].get<double>() < 0)
          throw Error(std::string("field \"") + key + "\" must be a non-negative number");
        dst = t[key].get<double>();
      };
      auto integer = [&](const char* key, int64_t& dst) {
        if (!t.contains(key)) return;
        if (!t[key].is_number_integer() || t[key].get<int64_t>() < 0)
          throw Error(std::string("field \"") + key + "\" must be a non-negative integer");
        dst = t[key].get<int64_t>();
      };
      number("weight", s.weight);
      if (s.weight <= 0) throw Error("field \"weight\" must be positive");
      number("requests_per_minute", s.requests_per_minute);
      number("tokens_per_minute", s.tokens_per_minute);
      integer("max_concurrent", s.max_concurrent);
      integer("max_tokens", s.max_tokens);
      if (t.contains("priority")) {
        if (!t["priority"].is_string()) throw Error("field \"priority\" must be a string");
        s.priority = parse_priority(t["priority"]);
      }
      if (t.contains("prefix_cache")) {
        if (t["prefix_cache"] != "private" && t["prefix_cache"] != "shared")
          throw Error("field \"prefix_cache\" must be \"private\" or \"shared\"");
        s.shared_prefix_cache = t["prefix_cache"] == "shared";
      }
      if (t.contains("adapters")) {
        if (!t["adapters"].is_array()) throw Error("field \"adapters\" must be a list of adapter names");
        for (const auto& a : t["adapters"]) {
          if (!a.is_string()) throw Error("field \"adapters\" must hold strings");
          s.adapters.push_back(a);
        }
      }
      if (t.contains("models")) {
        if (!t["models"].is_array() || t["models"].empty()) throw Error("field \"models\" must be a non-empty list");
        s.models.clear();
        for (const auto& m : t["models"]) {
          if (!m.is_string()) throw Error("field \"models\" must hold strings");
          s.models.push_back(m);
        }
      }
    } catch (const Error& e) {
      throw Error(where + ": " + e.what());
    }
    out.push_back(std::move(s));
  }
  return out;
}

void TokenBucket::refill(Clock::time_point now) {
  if (now > t_) {
    level_ = std::min(cap_, level_ + rate_ * std::chrono::duration<double>(now - t_).count());
    t_ = now;
  }
}

std::optional<std::chrono::milliseconds> TokenBucket::take(double n, Clock::time_point now) {
  if (unlimited()) return std::nullopt;
  refill(now);
  if (level_ >= n) {
    level_ -= n;
    return std::nullopt;
  }
  // A request larger than the whole bucket waits for a full bucket, and then some: it can never
  // pass, so report a minute.
  if (n > cap_) return std::chrono::milliseconds(60000);
  return std::chrono::milliseconds(int64_t(std::ceil((n - level_) / rate_ * 1000.0)));
}

void TokenBucket::give_back(double n, Clock::time_point now) {
  if (unlimited()) return;
  refill(now);
  level_ = std::min(cap_, level_ + n);
}

double TokenBucket::level(Clock::time_point now) {
  refill(now);
  return level_;
}

TenantRegistry::TenantRegistry(std::vector<TenantSpec> tenants) { reload(std::move(tenants)); }

bool TenantRegistry::open() const {
  std::lock_guard<std::mutex> lk(mu_);
  return tenants_.empty();
}

size_t TenantRegistry::size() const {
  std::lock_guard<std::mutex> lk(mu_);
  return tenants_.size();
}

void TenantRegistry::reload(std::vector<TenantSpec> tenants) {
  const auto now = Clock::now();
  std::lock_guard<std::mutex> lk(mu_);
  std::map<std::string, State> next;
  std::map<std::string, std::string> keys;
  for (auto& spec : tenants) {
    State st;
    auto old = tenants_.find(spec.name);
    const bool same_limits = old != tenants_.end() &&
                             old->second.spec.requests_per_minute == spec.requests_per_minute &&
                             old->second.spec.tokens_per_minute == spec.tokens_per_minute;
    if (same_limits) {  // keep what the tenant already used
      st.rpm = old->second.rpm;
      st.tpm = old->second.tpm;
    } else {
      st.rpm = TokenBucket(spec.requests_per_minute, now);
      st.tpm = TokenBucket(spec.tokens_per_minute, now);
    }
    if (old != tenants_.end()) st.in_flight = old->second.in_flight;
    for (const auto& h : spec.key_hashes) keys[h] = spec.name;
    st.spec = std::move(spec);
    next.emplace(st.spec.name, std::move(st));
  }
  tenants_ = std::move(next);
  by_key_hash_ = std::move(keys);
}

const TenantRegistry::State* TenantRegistry::holder(const std::string& api_key, Admission& a) const {
  auto k = api_key.empty() ? by_key_hash_.end() : by_key_hash_.find(sha256_hex(api_key));
  if (k != by_key_hash_.end()) return &tenants_.at(k->second);
  a.ok = false;
  a.status = 401;
  a.reason = "bad_key";
  a.message = api_key.empty() ? "missing API key (send Authorization: Bearer <key>)" : "invalid API key";
  return nullptr;
}

Admission TenantRegistry::identify(const std::string& api_key) const {
  Admission a;
  std::lock_guard<std::mutex> lk(mu_);
  a.ok = true;
  a.tenant = "default";
  if (tenants_.empty()) return a;
  a.tenant.clear();
  if (const State* st = holder(api_key, a)) a.tenant = st->spec.name;
  return a;
}

Admission TenantRegistry::admit(const std::string& api_key, const std::string& model, int64_t prompt_tokens,
                                int64_t max_tokens, Clock::time_point now, bool adapter) {
  Admission a;
  std::lock_guard<std::mutex> lk(mu_);
  if (tenants_.empty()) {  // open mode
    a.ok = true;
    a.tenant = "default";
    return a;
  }
  auto deny = [&](int status, std::string reason, std::string message, int64_t retry = 0) {
    a.ok = false;
    a.status = status;
    a.reason = std::move(reason);
    a.message = std::move(message);
    a.retry_after_s = retry;
    return a;
  };
  const State* found = holder(api_key, a);
  if (!found) return a;
  State& st = tenants_.at(found->spec.name);
  a.tenant = st.spec.name;
  a.weight = st.spec.weight;
  a.priority = st.spec.priority;
  if (!st.spec.shared_prefix_cache) a.cache_salt = "tenant:" + st.spec.name;
  if (adapter ? !st.spec.allows_adapter(model) : !st.spec.allows_model(model))
    return deny(404, "model", "the model '" + model + "' does not exist or you do not have access to it");
  if (st.spec.max_tokens > 0 && max_tokens > st.spec.max_tokens)
    return deny(400, "max_tokens",
                "max_tokens " + std::to_string(max_tokens) + " exceeds this key's limit of " +
                    std::to_string(st.spec.max_tokens));
  if (st.spec.max_concurrent > 0 && st.in_flight >= st.spec.max_concurrent)
    return deny(429, "concurrency",
                "too many concurrent requests (limit " + std::to_string(st.spec.max_concurrent) + ")", 1);
  auto seconds = [](std::chrono::milliseconds ms) { return std::max<int64_t>(1, (ms.count() + 999) / 1000); };
  if (auto wait = st.rpm.take(1, now))
    return deny(429, "rpm",
                "rate limit reached: " + std::to_string(int64_t(st.spec.requests_per_minute)) + " requests per minute",
                seconds(*wait));
  const double tokens = double(prompt_tokens + max_tokens);
  if (auto wait = st.tpm.take(tokens, now)) {
    st.rpm.give_back(1, now);
    return deny(429, "tpm",
                "rate limit reached: " + std::to_string(int64_t(st.spec.tokens_per_minute)) +
                    " tokens per minute (this request needs " + std::to_string(int64_t(tokens)) + ")",
                seconds(*wait));
  }
  ++st.in_flight;
  a.ok = true;
  return a;
}

void TenantRegistry::finish(const std::string& tenant, int64_t max_tokens, int64_t completion_tokens,
                            Clock::time_point now) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = tenants_.find(tenant);
  if (it == tenants_.end()) return;
  it->second.in_flight = std::max<int64_t>(0, it->second.in_flight - 1);
  if (completion_tokens < max_tokens) it->second.tpm.give_back(double(max_tokens - completion_tokens), now);
}

int64_t TenantRegistry::in_flight(const std::string& tenant) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = tenants_.find(tenant);
  return it == tenants_.end() ? 0 : it->second.in_flight;
}

}  // namespace moemesh
