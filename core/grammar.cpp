#include "core/grammar.h"

#include <algorithm>

#include "core/error.h"

namespace moemesh {

namespace {
// Deeper stacks are dropped: it bounds nesting (and stops a left-recursive grammar) without a
// separate depth rule per format.
constexpr size_t kMaxStack = 768;

int32_t add_sat(int64_t a, int64_t b) { return int32_t(std::min<int64_t>(a + b, Grammar::kInfinite)); }
int32_t mul_sat(int64_t a, int64_t b) { return int32_t(std::min<int64_t>(a * b, Grammar::kInfinite)); }
}  // namespace

Grammar::Id Grammar::add(Node n) {
  nodes_.push_back(std::move(n));
  placeholder_.push_back(false);
  return Id(nodes_.size() - 1);
}

Grammar::Id Grammar::bytes(const std::bitset<256>& set) {
  Node n;
  n.kind = Kind::Bytes;
  n.bytes = set;
  return add(std::move(n));
}

Grammar::Id Grammar::byte(unsigned char c) {
  std::bitset<256> s;
  s.set(c);
  return bytes(s);
}

Grammar::Id Grammar::literal(std::string_view s) {
  std::vector<Id> ch;
  for (unsigned char c : s) ch.push_back(byte(c));
  return seq(std::move(ch));
}

Grammar::Id Grammar::seq(std::vector<Id> children) {
  if (children.size() == 1) return children[0];
  Node n;
  n.kind = Kind::Seq;
  n.children = std::move(children);
  return add(std::move(n));
}

Grammar::Id Grammar::alt(std::vector<Id> choices) {
  if (choices.size() == 1) return choices[0];
  Node n;
  n.kind = Kind::Alt;
  n.children = std::move(choices);
  return add(std::move(n));
}

Grammar::Id Grammar::repeat(Id item, int32_t min, int32_t max, Id separator) {
  if (min < 0 || (max != kUnbounded && max < min)) throw Error("grammar: bad repetition bounds");
  Node n;
  n.kind = Kind::Repeat;
  n.children = {item};
  if (separator >= 0) n.children.push_back(separator);
  n.min = min;
  n.max = max;
  return add(std::move(n));
}

Grammar::Id Grammar::placeholder() {
  const Id id = add(Node{Kind::Seq, {}, {}, 0, 0});
  placeholder_[size_t(id)] = true;
  return id;
}

void Grammar::define(Id ph, Id as) {
  if (!placeholder_.at(size_t(ph))) throw Error("grammar: define() of a node that is not a placeholder");
  nodes_[size_t(ph)] = Node{Kind::Seq, {}, {as}, 0, 0};
  placeholder_[size_t(ph)] = false;
}

void Grammar::finish(Id start) {
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (placeholder_[i]) throw Error("grammar: a placeholder was never defined");
    if (nodes_[i].kind == Kind::Alt && nodes_[i].children.empty()) throw Error("grammar: no alternatives");
  }
  start_ = start;
  // Fewest completing bytes, as a fixed point (recursive nodes start at infinity and come down).
  min_bytes_.assign(nodes_.size(), kInfinite);
  for (bool changed = true; changed;) {
    changed = false;
    for (size_t i = 0; i < nodes_.size(); ++i) {
      const Node& n = nodes_[i];
      int32_t v = kInfinite;
      switch (n.kind) {
        case Kind::Bytes:
          v = n.bytes.any() ? 1 : kInfinite;
          break;
        case Kind::Seq:
          v = 0;
          for (Id c : n.children) v = add_sat(v, min_bytes_[size_t(c)]);
          break;
        case Kind::Alt:
          for (Id c : n.children) v = std::min(v, min_bytes_[size_t(c)]);
          break;
        case Kind::Repeat: {
          const int64_t item = min_bytes_[size_t(n.children[0])];
          const int64_t sep = n.children.size() > 1 ? min_bytes_[size_t(n.children[1])] : 0;
          v = n.min == 0 ? 0 : add_sat(mul_sat(item, n.min), mul_sat(sep, n.min - 1));
          break;
        }
      }
      if (v < min_bytes_[i]) {
        min_bytes_[i] = v;
        changed = true;
      }
    }
  }
  if (min_bytes_[size_t(start)] >= kInfinite) throw Error("grammar: no finite output matches it");
}

GrammarState::GrammarState(const Grammar& g) : g_(&g) {
  std::vector<Thread> out;
  expand(Thread{Frame{g.start(), 0}}, out, 0);
  threads_ = std::move(out);
  normalize(threads_);
}

void GrammarState::expand(Thread t, std::vector<Thread>& out, int depth) {
  if (t.size() > kMaxStack || depth > int(kMaxStack)) return;
  Frame& f = t.back();
  const Grammar::Node& n = g_->node(f.node);
  switch (n.kind) {
    case Grammar::Kind::Bytes:
      out.push_back(std::move(t));
      return;
    case Grammar::Kind::Seq:
      if (n.children.empty()) return complete(std::move(t), out, depth + 1);
      f.pos = 0;
      t.push_back(Frame{n.children[0], 0});
      return expand(std::move(t), out, depth + 1);
    case Grammar::Kind::Alt:
      t.pop_back();  // an alternative is replaced by its choice: nothing to come back to
      for (size_t i = 0; i < n.children.size(); ++i) {
        Thread c = i + 1 < n.children.size() ? t : std::move(t);
        c.push_back(Frame{n.children[i], 0});
        expand(std::move(c), out, depth + 1);
      }
      return;
    case Grammar::Kind::Repeat:
      return decide(std::move(t), 0, out, depth + 1);
  }
}

void GrammarState::decide(Thread t, int32_t done, std::vector<Thread>& out, int depth) {
  const Grammar::Node& n = g_->node(t.back().node);
  const bool unbounded = n.max == Grammar::kUnbounded;
  const bool has_sep = n.children.size() > 1;
  // Beyond min (and the first item, which has no separator) counts do not matter: equal states.
  if (unbounded) done = std::min(done, std::max(n.min, 1));
  if (done >= n.min) complete(t, out, depth + 1);  // the repetition ends here
  if (unbounded || done < n.max) {
    const bool sep = has_sep && done > 0;
    t.back().pos = 2 * done + (sep ? 1 : 0);
    t.push_back(Frame{n.children[sep ? 1 : 0], 0});
    expand(std::move(t), out, depth + 1);
  }
}

void GrammarState::complete(Thread t, std::vector<Thread>& out, int depth) {
  if (t.size() > kMaxStack || depth > int(kMaxStack)) return;
  t.pop_back();
  if (t.empty()) {
    accepting_ = true;
    return;
  }
  Frame& p = t.back();
  const Grammar::Node& n = g_->node(p.node);
  if (n.kind == Grammar::Kind::Seq) {
    if (size_t(++p.pos) == n.children.size()) return complete(std::move(t), out, depth + 1);
    t.push_back(Frame{n.children[size_t(p.pos)], 0});
    return expand(std::move(t), out, depth + 1);
  }
  // Repeat: a separator or an item just ended.
  if (p.pos % 2 == 1) {
    p.pos -= 1;  // the separator is done: its item follows (same count, item in progress)
    t.push_back(Frame{n.children[0], 0});
    return expand(std::move(t), out, depth + 1);
  }
  const int32_t done = p.pos / 2 + 1;
  decide(std::move(t), done, out, depth + 1);
}

void GrammarState::normalize(std::vector<Thread>& ts) {
  std::sort(ts.begin(), ts.end());
  ts.erase(std::unique(ts.begin(), ts.end()), ts.end());
}

bool GrammarState::advance(unsigned char b) {
  std::vector<Thread> out;
  accepting_ = false;
  for (const Thread& t : threads_)
    if (g_->node(t.back().node).bytes.test(b)) complete(t, out, 0);
  threads_ = std::move(out);
  normalize(threads_);
  return !dead();
}

bool GrammarState::advance(std::string_view bytes) {
  for (unsigned char c : bytes)
    if (!advance(c)) return false;
  return true;
}

bool GrammarState::allows(unsigned char b) const {
  for (const Thread& t : threads_)
    if (g_->node(t.back().node).bytes.test(b)) return true;
  return false;
}

int32_t GrammarState::min_completion() const {
  if (accepting_) return 0;
  int64_t best = Grammar::kInfinite;
  for (const Thread& t : threads_) {
    int64_t sum = 1;  // the byte class on top
    for (size_t i = 0; i + 1 < t.size(); ++i) {
      const Frame& f = t[i];
      const Grammar::Node& n = g_->node(f.node);
      if (n.kind == Grammar::Kind::Seq) {
        for (size_t j = size_t(f.pos) + 1; j < n.children.size(); ++j) sum += g_->min_bytes(n.children[j]);
      } else {  // Repeat
        const int64_t item = g_->min_bytes(n.children[0]);
        const int64_t sep = n.children.size() > 1 ? g_->min_bytes(n.children[1]) : 0;
        int64_t done = f.pos / 2 + 1;     // once the frame above completes
        if (f.pos % 2 == 1) sum += item;  // in a separator: its item must follow
        sum += std::max<int64_t>(0, n.min - done) * (item + sep);
      }
      sum = std::min<int64_t>(sum, Grammar::kInfinite);
    }
    best = std::min(best, sum);
  }
  return int32_t(best);
}

std::string GrammarState::key() const {
  std::string k(1, accepting_ ? 'A' : 'a');
  for (const Thread& t : threads_) {
    const uint32_t n = uint32_t(t.size());
    k.append(reinterpret_cast<const char*>(&n), sizeof n);
    k.append(reinterpret_cast<const char*>(t.data()), t.size() * sizeof(Frame));
  }
  return k;
}

}  // namespace moemesh
