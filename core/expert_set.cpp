#include "core/expert_set.h"

#include <charconv>
#include <optional>

#include "core/error.h"

namespace moemesh {
namespace {

struct Range {
  int64_t lo = 0, hi = -1;  // inclusive
  bool wildcard = false;
};

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

std::optional<int64_t> to_int(std::string_view s) {
  s = trim(s);
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size() || v < 0) return std::nullopt;
  return v;
}

// "N", "N-M" or "*"; `what` is "layer" or "expert", `limit` the exclusive upper bound.
Range parse_range(std::string_view part, std::string_view item, const char* what, int64_t limit) {
  part = trim(part);
  auto bad = [&](const std::string& why) {
    return Error("--experts: bad item \"" + std::string(item) + "\": " + why);
  };
  if (part == "*") return {0, limit - 1, true};
  Range r;
  if (auto dash = part.find('-'); dash != std::string_view::npos) {
    auto lo = to_int(part.substr(0, dash)), hi = to_int(part.substr(dash + 1));
    if (!lo || !hi) throw bad(std::string(what) + " range \"" + std::string(part) + "\" is not N-M");
    if (*lo > *hi) throw bad(std::string(what) + " range \"" + std::string(part) + "\" is empty");
    r = {*lo, *hi, false};
  } else {
    auto v = to_int(part);
    if (!v) throw bad(std::string(what) + " \"" + std::string(part) + "\" is not a number, N-M or *");
    r = {*v, *v, false};
  }
  if (r.hi >= limit)
    throw bad(std::string(what) + " " + std::to_string(r.hi) + " is out of range (the model has " +
              std::to_string(limit) + ")");
  return r;
}

}  // namespace

ExpertSet all_experts(const ModelConfig& cfg) {
  ExpertSet out;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    if (cfg.is_moe_layer(l))
      for (int64_t e = 0; e < cfg.num_experts; ++e) out.insert({int32_t(l), int32_t(e)});
  return out;
}

ExpertSet parse_expert_spec(std::string_view spec, const ModelConfig& cfg) {
  ExpertSet out;
  if (trim(spec).empty()) throw Error("--experts: empty expert list");
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    if (comma == std::string_view::npos) comma = spec.size();
    const std::string_view item = trim(spec.substr(start, comma - start));
    start = comma + 1;
    if (item.empty()) throw Error("--experts: empty item in \"" + std::string(spec) + "\"");
    if (item == "all" || item == "*") {
      auto all = all_experts(cfg);
      out.insert(all.begin(), all.end());
      continue;
    }
    const size_t colon = item.find(':');
    if (colon == std::string_view::npos)
      throw Error("--experts: bad item \"" + std::string(item) + "\": expected LAYER:EXPERT (e.g. 0:3, 1:0-7, 2:*) or all");
    const Range layers = parse_range(item.substr(0, colon), item, "layer", cfg.num_hidden_layers);
    const Range experts = parse_range(item.substr(colon + 1), item, "expert", cfg.num_experts);
    for (int64_t l = layers.lo; l <= layers.hi; ++l) {
      if (!cfg.is_moe_layer(l)) {
        if (layers.wildcard) continue;
        throw Error("--experts: bad item \"" + std::string(item) + "\": layer " + std::to_string(l) +
                    " is a dense layer, it has no routed experts");
      }
      for (int64_t e = experts.lo; e <= experts.hi; ++e) out.insert({int32_t(l), int32_t(e)});
    }
  }
  return out;
}

std::string format_expert_set(const ExpertSet& set) {
  std::string out;
  auto it = set.begin();
  while (it != set.end()) {
    const int32_t layer = it->first, lo = it->second;
    int32_t hi = lo;
    auto next = std::next(it);
    while (next != set.end() && next->first == layer && next->second == hi + 1) {
      ++hi;
      ++next;
    }
    if (!out.empty()) out += ',';
    out += std::to_string(layer) + ':' + std::to_string(lo);
    if (hi != lo) out += '-' + std::to_string(hi);
    it = next;
  }
  return out;
}

}  // namespace moemesh
