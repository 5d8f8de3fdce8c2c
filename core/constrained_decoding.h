// Constrained decoding: which tokens may come next so that the output stays in a grammar
// (core/grammar.h), and ends inside max_tokens.
//
// The router validates a request's constraint and sends it to the attention worker as a spec
// (SeqWork.constraint, JSON text):
//   {"type": "json_object"}
//   {"type": "json_schema", "schema": {...}}
//   {"type": "tool_calls", "format": "hermes"|"mistral"|"deepseek",
//    "tools": [{"name": ..., "parameters": {...}}], "parallel": true|false}
// The worker compiles it once (a cache keyed by the spec), walks the tokenizer's vocabulary as a
// byte trie from the sequence's grammar state, and masks the logits before sampling. A state's
// mask is cached with, for each allowed token, the fewest bytes that would still finish the output
// after it: with b tokens left only tokens needing at most b - 1 more bytes are allowed, and once
// the grammar is complete only EOS is (every byte has a token of its own in byte-level BPE and in
// SentencePiece with byte fallback, so a finish always exists).
#pragma once
#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/grammar.h"

namespace moemesh {

class Tokenizer;

// Compiles a constraint spec (above); throws SchemaError naming a keyword the grammar cannot
// enforce, or moemesh::Error for a malformed spec.
std::shared_ptr<const Grammar> compile_constraint(std::string_view spec);

// Each token's bytes as a trie, and the ids that end an output.
class TokenVocabulary {
 public:
  // bytes[id]: what the token adds to the output ("" for tokens that never appear in constrained
  // output, such as BOS/EOS and other special tokens).
  TokenVocabulary(std::vector<std::string> bytes, std::vector<int32_t> eos);
  static std::shared_ptr<const TokenVocabulary> from_tokenizer(const Tokenizer& tok, std::vector<int32_t> eos,
                                                               int64_t model_vocab);

  int64_t size() const { return int64_t(bytes_.size()); }
  const std::string& bytes(int32_t id) const { return bytes_[size_t(id)]; }
  const std::vector<int32_t>& eos() const { return eos_; }

  struct TrieNode {
    std::vector<std::pair<unsigned char, int32_t>> children;  // (byte, node), by byte
    std::vector<int32_t> tokens;                              // tokens ending here
  };
  const std::vector<TrieNode>& trie() const { return trie_; }

 private:
  std::vector<std::string> bytes_;
  std::vector<int32_t> eos_;
  std::vector<TrieNode> trie_;
};

// The allowed next tokens of one grammar state: need[t] is the fewest bytes that finish the output
// after token t (kNotAllowed when t cannot come next); EOS has 0 when the output may end.
struct TokenMask {
  static constexpr uint16_t kNotAllowed = 0xFFFF;
  std::vector<uint16_t> need;
  uint16_t most_needed = 0;  // the largest finite need
  int64_t allowed = 0;
};

// Masks of one grammar over one vocabulary, cached by state (shared by the sequences that use the
// same constraint; not thread-safe).
//
// The trie walk runs on numbered states: every distinct GrammarState met gets an id and a row of
// 256 next-state ids filled in as bytes are tried, so a grammar is turned into a DFA lazily, as
// far as outputs go. Inside a JSON string almost every byte leads back to one state, so a walk
// over the whole vocabulary costs a table lookup per trie node once the row is known.
class GrammarMasks {
 public:
  GrammarMasks(std::shared_ptr<const Grammar> g, std::shared_ptr<const TokenVocabulary> v, size_t capacity = 512);
  const Grammar& grammar() const { return *g_; }
  const TokenVocabulary& vocabulary() const { return *v_; }
  // The mask of `state` (computed on a miss).
  std::shared_ptr<const TokenMask> mask(const GrammarState& state);
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }

 private:
  std::shared_ptr<TokenMask> compute(const GrammarState& state);
  static constexpr int32_t kUnknown = -2, kDead = -1;
  int32_t id_of(GrammarState s);
  int32_t step(int32_t id, unsigned char b);
  // The numbered states (cleared when they pass a bound: deep any-JSON nesting has no end).
  std::vector<GrammarState> states_;
  std::vector<std::array<int32_t, 256>> next_;
  std::vector<int32_t> min_completion_;
  std::unordered_map<std::string, int32_t> state_ids_;

  std::shared_ptr<const Grammar> g_;
  std::shared_ptr<const TokenVocabulary> v_;
  size_t capacity_;
  std::list<std::string> lru_;
  std::unordered_map<std::string, std::pair<std::shared_ptr<const TokenMask>, std::list<std::string>::iterator>> cache_;
  uint64_t hits_ = 0, misses_ = 0;
};

// One sequence's constraint: its grammar state and the tokens it has left.
class ConstrainedDecoder {
 public:
  ConstrainedDecoder(std::shared_ptr<GrammarMasks> masks, int64_t max_tokens);
  // Sets the logits of the tokens that cannot come next to -inf. Throws moemesh::Error when no
  // token can (a budget too small for the grammar).
  void apply(std::span<float> logits);
  // Moves past a chosen (or replayed) token; EOS ends the output.
  void accept(int32_t token);
  // The fewest tokens the output still needs (bytes, as every byte has a token).
  int32_t min_completion() const { return state_.min_completion(); }
  bool accepting() const { return state_.accepting(); }
  uint64_t masks_misses() const { return masks_->misses(); }

 private:
  std::shared_ptr<GrammarMasks> masks_;
  GrammarState state_;
  int64_t left_;
  bool ended_ = false;
};

}  // namespace moemesh
