// Tenants of a multi-tenant deployment: API keys (stored as SHA-256 hashes), rate limits,
// concurrency and size limits, allowed models, scheduling weight and priority class.
//
// The tenants file is JSON (mounted from a Kubernetes Secret in production):
//   {"tenants": [{"name": "acme", "api_key_sha256": ["<64 hex>", ...], "weight": 2,
//                 "priority": "high"|"normal"|"low", "requests_per_minute": 600,
//                 "tokens_per_minute": 200000, "max_concurrent": 32, "max_tokens": 4096,
//                 "models": ["*"], "adapters": ["acme-support", ...]}]}
// "adapters": the LoRA adapters (their served names) the tenant may ask for as its model; none
// when left out ("*": all). Another tenant's adapter is a 404, as a model that does not exist.
// Limits left out (or 0) are unlimited. `moemesh hash-key KEY` prints a key's hash.
//
// Rate limits are token buckets refilled continuously (capacity = the per-minute limit).
// Tokens are charged at admission as prompt + max_tokens and the unused part is refunded when
// the request ends, so a tenant cannot overrun its budget with long generations in flight.
#pragma once
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace moemesh {

enum class Priority { High = 0, Normal = 1, Low = 2 };
Priority parse_priority(const std::string& s);  // throws moemesh::Error
const char* priority_name(Priority p);

struct TenantSpec {
  std::string name;
  std::vector<std::string> key_hashes;  // lower-case hex SHA-256 of each API key
  double weight = 1.0;
  Priority priority = Priority::Normal;
  double requests_per_minute = 0;  // 0: unlimited
  double tokens_per_minute = 0;
  int64_t max_concurrent = 0;
  int64_t max_tokens = 0;
  std::vector<std::string> models{"*"};
  std::vector<std::string> adapters;  // LoRA adapters it may use (none by default; "*": all)
  // "prefix_cache": "private" (default: its prompts never share cached KV blocks with another
  // tenant's, so cache timing cannot leak them) or "shared" (shares with the other shared tenants).
  bool shared_prefix_cache = false;
  bool allows_model(const std::string& model) const;
  bool allows_adapter(const std::string& name) const;
};

std::string sha256_hex(const std::string& data);

// Parses a tenants file; throws moemesh::Error naming the file, the tenant and the field.
std::vector<TenantSpec> load_tenants(const std::filesystem::path& file);

class TokenBucket {
 public:
  using Clock = std::chrono::steady_clock;
  TokenBucket() = default;
  TokenBucket(double per_minute, Clock::time_point now)
      : rate_(per_minute / 60.0), cap_(per_minute), level_(per_minute), t_(now) {}
  bool unlimited() const { return cap_ <= 0; }
  // Takes n if there are n; otherwise takes nothing and returns the wait until there would be.
  std::optional<std::chrono::milliseconds> take(double n, Clock::time_point now);
  void give_back(double n, Clock::time_point now);
  double level(Clock::time_point now);

 private:
  void refill(Clock::time_point now);
  double rate_ = 0, cap_ = 0, level_ = 0;
  Clock::time_point t_{};
};

struct Admission {
  bool ok = false;
  int status = 200;           // 401, 403, 404, 429, 400
  std::string reason;         // bounded label: "bad_key", "model", "rpm", "tpm", "concurrency", "max_tokens"
  std::string message;        // for the client
  int64_t retry_after_s = 0;  // for 429
  std::string tenant;
  double weight = 1.0;
  Priority priority = Priority::Normal;
  std::string cache_salt;  // prefix-cache namespace of the request: "" shared, else per tenant
};

class TenantRegistry {
 public:
  using Clock = std::chrono::steady_clock;
  // No tenants: open mode (every request is tenant "default", no limits).
  TenantRegistry() = default;
  explicit TenantRegistry(std::vector<TenantSpec> tenants);

  bool open() const;
  // Replaces the tenants (SIGHUP); buckets and in-flight counts of tenants that stay are kept.
  void reload(std::vector<TenantSpec> tenants);
  size_t size() const;

  // Who holds `api_key`, charging nothing (reading or deleting what a tenant stored): ok with
  // the tenant, or the 401 admit() would give. Open mode: tenant "default".
  Admission identify(const std::string& api_key) const;
  // Checks key, model, max_tokens, concurrency, RPM and TPM, and on success charges them.
  // adapter: `model` names a LoRA adapter (checked against the tenant's "adapters").
  Admission admit(const std::string& api_key, const std::string& model, int64_t prompt_tokens, int64_t max_tokens,
                  Clock::time_point now = Clock::now(), bool adapter = false);
  // A request admitted for `tenant` ended having generated `completion_tokens`.
  void finish(const std::string& tenant, int64_t max_tokens, int64_t completion_tokens,
              Clock::time_point now = Clock::now());
  int64_t in_flight(const std::string& tenant) const;

 private:
  struct State {
    TenantSpec spec;
    TokenBucket rpm, tpm;
    int64_t in_flight = 0;
  };
  // The tenant holding api_key (mu_ held, tenants configured), or null with a's 401 filled in.
  const State* holder(const std::string& api_key, Admission& a) const;

  mutable std::mutex mu_;
  std::map<std::string, State> tenants_;            // by name
  std::map<std::string, std::string> by_key_hash_;  // key hash -> name
};

}  // namespace moemesh
