// A byte-level grammar and the state of matching output against it: what constrained decoding
// (structured outputs, forced tool calls) checks each candidate token with.
//
// A grammar is a graph of nodes over bytes: a byte class, a sequence, alternatives and a bounded
// repetition. Nodes refer to each other by index, so recursion (JSON values inside JSON values,
// a schema's $ref) needs nothing more. Regular expressions, JSON schemas and tool-call formats
// all compile to these nodes (core/grammar_regex.h, core/json_schema_grammar.h).
//
// Matching is a nondeterministic pushdown automaton: the state is the set of stacks ("threads")
// that can still match, each with a byte class on top; a byte advances every thread whose top
// class holds it. Every node knows the fewest bytes that complete it, so a state knows the
// fewest bytes that finish the output: the decoder uses that to end a value inside max_tokens.
#pragma once
#include <bitset>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace moemesh {

class Grammar {
 public:
  using Id = int32_t;
  static constexpr int32_t kUnbounded = -1;
  static constexpr int32_t kInfinite = std::numeric_limits<int32_t>::max() / 4;

  enum class Kind : uint8_t { Bytes, Seq, Alt, Repeat };
  struct Node {
    Kind kind = Kind::Seq;
    std::bitset<256> bytes;    // Bytes
    std::vector<Id> children;  // Seq: in order; Alt: the choices; Repeat: {item} or {item, separator}
    int32_t min = 0, max = 0;  // Repeat: item count bounds (max kUnbounded: no bound)
  };

  Id bytes(const std::bitset<256>& set);
  Id byte(unsigned char c);
  Id literal(std::string_view s);  // a Seq of single bytes ("" is the empty Seq)
  Id seq(std::vector<Id> children);
  Id alt(std::vector<Id> choices);
  Id repeat(Id item, int32_t min, int32_t max, Id separator = -1);
  Id optional(Id item) { return repeat(item, 0, 1); }
  // A node to be defined later (recursion): define() fills it in.
  Id placeholder();
  void define(Id placeholder, Id as);

  // Fixes the start node, computes each node's fewest completing bytes and checks the graph
  // (no unfilled placeholder, no empty alternative list); throws moemesh::Error.
  void finish(Id start);

  Id start() const { return start_; }
  const Node& node(Id id) const { return nodes_[size_t(id)]; }
  size_t size() const { return nodes_.size(); }
  // Fewest bytes that complete node `id` (kInfinite when none can).
  int32_t min_bytes(Id id) const { return min_bytes_[size_t(id)]; }

 private:
  Id add(Node n);
  std::vector<Node> nodes_;
  std::vector<int32_t> min_bytes_;
  std::vector<bool> placeholder_;
  Id start_ = -1;
};

// Where matching stands: the live threads. Copyable and comparable (its key() names it in
// caches); advance() is the only way forward.
class GrammarState {
 public:
  explicit GrammarState(const Grammar& g);

  // Consumes one byte; false (and the state is dead) when no thread accepts it.
  bool advance(unsigned char b);
  bool advance(std::string_view bytes);
  // Some thread has matched the whole grammar: the output may end here.
  bool accepting() const { return accepting_; }
  // No thread can take another byte: the output must end here.
  bool finished() const { return threads_.empty(); }
  bool dead() const { return threads_.empty() && !accepting_; }
  // The fewest bytes that complete the output (0 when accepting; Grammar::kInfinite when dead).
  int32_t min_completion() const;
  // Whether byte b can come next.
  bool allows(unsigned char b) const;
  // A compact, canonical name of this state (equal states, equal keys).
  std::string key() const;

 private:
  struct Frame {
    Grammar::Id node;
    int32_t pos;  // Seq: the child being matched; Repeat: 2*items done (+1 while in a separator)
    bool operator==(const Frame&) const = default;
    auto operator<=>(const Frame&) const = default;
  };
  using Thread = std::vector<Frame>;

  // Expands `t` (whose top frame was just pushed or advanced) until byte classes are on top;
  // finished threads set accepting_.
  void expand(Thread t, std::vector<Thread>& out, int depth);
  // The top frame of `t` completed: pop it and move its parent on.
  void complete(Thread t, std::vector<Thread>& out, int depth);
  // `t`'s top is a Repeat with `done` items matched: end it, or start the next item.
  void decide(Thread t, int32_t done, std::vector<Thread>& out, int depth);
  void normalize(std::vector<Thread>& ts);

  const Grammar* g_;
  std::vector<Thread> threads_;
  bool accepting_ = false;
};

}  // namespace moemesh
