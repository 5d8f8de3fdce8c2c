#include "core/constrained_decoding.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/json_schema_grammar.h"
#include "core/tokenizer.h"
#include "core/tool_calls.h"

namespace moemesh {

using ojson = nlohmann::ordered_json;

std::shared_ptr<const Grammar> compile_constraint(std::string_view spec_text) {
  const ojson spec = ojson::parse(spec_text, nullptr, false);
  if (!spec.is_object() || !spec.contains("type") || !spec["type"].is_string())
    throw Error("constraint: not a JSON object with a 'type'");
  const std::string type = spec["type"].get<std::string>();
  auto g = std::make_shared<Grammar>();
  JsonGrammarBuilder jb(*g);
  Grammar::Id start;
  if (type == "json_object") {
    start = jb.any_object();
  } else if (type == "json_schema") {
    if (!spec.contains("schema")) throw Error("constraint: json_schema without a 'schema'");
    start = jb.schema(spec["schema"]);
  } else if (type == "tool_calls") {
    if (!spec.contains("tools") || !spec["tools"].is_array() || spec["tools"].empty())
      throw Error("constraint: tool_calls without 'tools'");
    std::vector<ToolSpec> tools;
    for (const auto& t : spec["tools"]) {
      if (!t.is_object() || !t.contains("name") || !t["name"].is_string())
        throw Error("constraint: a tool without a 'name'");
      tools.push_back({t["name"].get<std::string>(), t.value("parameters", ojson::object())});
    }
    start = tool_calls_grammar(*g, jb, parse_tool_call_format(spec.value("format", "hermes")), tools,
                               spec.value("parallel", false));
  } else {
    throw Error("constraint: unknown type '" + type + "'");
  }
  g->finish(start);
  return g;
}

TokenVocabulary::TokenVocabulary(std::vector<std::string> bytes, std::vector<int32_t> eos)
    : bytes_(std::move(bytes)), eos_(std::move(eos)) {
  trie_.emplace_back();
  for (size_t id = 0; id < bytes_.size(); ++id) {
    const std::string& b = bytes_[id];
    if (b.empty()) continue;
    int32_t at = 0;
    for (unsigned char c : b) {
      auto& ch = trie_[size_t(at)].children;
      auto it = std::lower_bound(ch.begin(), ch.end(), c, [](const auto& p, unsigned char x) { return p.first < x; });
      if (it != ch.end() && it->first == c) {
        at = it->second;
      } else {
        const int32_t next = int32_t(trie_.size());
        ch.insert(it, {c, next});
        trie_.emplace_back();  // (invalidates `ch`; not used again)
        at = next;
      }
    }
    trie_[size_t(at)].tokens.push_back(int32_t(id));
  }
}

std::shared_ptr<const TokenVocabulary> TokenVocabulary::from_tokenizer(const Tokenizer& tok, std::vector<int32_t> eos,
                                                                       int64_t model_vocab) {
  std::vector<std::string> bytes(size_t(std::max<int64_t>(model_vocab, 0)));
  const int64_t n = std::min<int64_t>(model_vocab, tok.vocab_size());
  for (int64_t id = 0; id < n; ++id) bytes[size_t(id)] = tok.token_bytes(int32_t(id));
  for (int32_t e : eos)
    if (e >= 0 && e < model_vocab) bytes[size_t(e)].clear();
  return std::make_shared<TokenVocabulary>(std::move(bytes), std::move(eos));
}

GrammarMasks::GrammarMasks(std::shared_ptr<const Grammar> g, std::shared_ptr<const TokenVocabulary> v, size_t capacity)
    : g_(std::move(g)), v_(std::move(v)), capacity_(std::max<size_t>(capacity, 1)) {}

std::shared_ptr<const TokenMask> GrammarMasks::mask(const GrammarState& state) {
  std::string key = state.key();
  if (auto it = cache_.find(key); it != cache_.end()) {
    ++hits_;
    lru_.splice(lru_.begin(), lru_, it->second.second);
    return it->second.first;
  }
  ++misses_;
  std::shared_ptr<const TokenMask> m = compute(state);
  if (cache_.size() >= capacity_) {
    cache_.erase(lru_.back());
    lru_.pop_back();
  }
  lru_.push_front(key);
  cache_.emplace(std::move(key), std::make_pair(m, lru_.begin()));
  return m;
}

int32_t GrammarMasks::id_of(GrammarState s) {
  std::string key = s.key();
  if (auto it = state_ids_.find(key); it != state_ids_.end()) return it->second;
  const int32_t id = int32_t(states_.size());
  min_completion_.push_back(s.min_completion());
  states_.push_back(std::move(s));
  next_.emplace_back();
  next_.back().fill(kUnknown);
  state_ids_.emplace(std::move(key), id);
  return id;
}

int32_t GrammarMasks::step(int32_t id, unsigned char b) {
  int32_t& n = next_[size_t(id)][b];
  if (n != kUnknown) return n;
  GrammarState s = states_[size_t(id)];
  const int32_t to = s.allows(b) && s.advance(b) ? id_of(std::move(s)) : kDead;
  next_[size_t(id)][b] = to;  // (`n` may dangle: id_of grew next_)
  return to;
}

std::shared_ptr<TokenMask> GrammarMasks::compute(const GrammarState& state) {
  constexpr size_t kMaxStates = 100000;  // ~100 MB of rows at most
  if (states_.size() > kMaxStates) {
    states_.clear();
    next_.clear();
    min_completion_.clear();
    state_ids_.clear();
  }
  auto m = std::make_shared<TokenMask>();
  m->need.assign(size_t(v_->size()), TokenMask::kNotAllowed);
  auto allow = [&](int32_t token, int32_t need) {
    const uint16_t n = uint16_t(std::min<int32_t>(need, TokenMask::kNotAllowed - 1));
    m->need[size_t(token)] = n;
    m->most_needed = std::max(m->most_needed, n);
    ++m->allowed;
  };
  if (state.accepting())
    for (int32_t e : v_->eos())
      if (e >= 0 && e < v_->size()) allow(e, 0);
  // Depth-first over the trie: a subtree is skipped as soon as its prefix leaves the grammar.
  const auto& trie = v_->trie();
  auto walk = [&](auto& self, int32_t node, int32_t sid) -> void {
    for (const auto& [b, child] : trie[size_t(node)].children) {
      const int32_t next = step(sid, b);
      if (next == kDead) continue;
      const auto& cn = trie[size_t(child)];
      for (int32_t t : cn.tokens) allow(t, min_completion_[size_t(next)]);
      if (!cn.children.empty()) self(self, child, next);
    }
  };
  walk(walk, 0, id_of(state));
  return m;
}

ConstrainedDecoder::ConstrainedDecoder(std::shared_ptr<GrammarMasks> masks, int64_t max_tokens)
    : masks_(std::move(masks)), state_(masks_->grammar()), left_(max_tokens) {}

void ConstrainedDecoder::apply(std::span<float> logits) {
  const auto m = masks_->mask(state_);
  const int64_t budget = left_ - 1;  // bytes that may follow the token chosen now
  const size_t n = std::min(logits.size(), m->need.size());
  const uint16_t* need = m->need.data();
  int64_t limit = budget;
  if (budget < m->most_needed) {
    // When even the least needing token does not fit (a budget smaller than the grammar's
    // shortest output), keep the tokens that get closest: the output stays valid as far as it goes.
    uint16_t least = TokenMask::kNotAllowed;
    for (size_t t = 0; t < n; ++t) least = std::min(least, need[t]);
    limit = std::max<int64_t>(budget, least);
  } else {
    limit = TokenMask::kNotAllowed - 1;  // the budget excludes nothing: one test per token
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t kept = 0;
  for (size_t t = 0; t < n; ++t) {
    const bool ok = need[t] <= limit;
    kept += ok;
    if (!ok) logits[t] = ninf;
  }
  for (size_t t = n; t < logits.size(); ++t) logits[t] = ninf;
  if (kept == 0) throw Error("constrained decoding: no token can continue the output");
}

void ConstrainedDecoder::accept(int32_t token) {
  --left_;
  if (ended_) return;
  const auto& v = masks_->vocabulary();
  if (token < 0 || token >= v.size() || v.bytes(token).empty()) {
    ended_ = true;  // EOS (or a token outside the vocabulary): nothing more is checked
    return;
  }
  state_.advance(v.bytes(token));
}

}  // namespace moemesh
