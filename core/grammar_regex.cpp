#include "core/grammar_regex.h"

#include <cctype>
#include <vector>

#include "core/error.h"

namespace moemesh {

namespace {

std::bitset<256> printable_ascii() {
  std::bitset<256> s;
  for (int c = 0x20; c < 0x7F; ++c) s.set(size_t(c));
  return s;
}

std::bitset<256> range(int lo, int hi) {
  std::bitset<256> s;
  for (int c = lo; c <= hi; ++c) s.set(size_t(c));
  return s;
}

class RegexParser {
 public:
  RegexParser(Grammar& g, std::string_view p, const std::bitset<256>& allowed) : g_(g), p_(p), allowed_(allowed) {}

  Grammar::Id parse() {
    if (!p_.empty() && p_[0] == '^') ++i_;
    Grammar::Id r = alternation();
    if (i_ < p_.size()) fail("unexpected '" + std::string(1, p_[i_]) + "'");
    return r;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error("pattern '" + std::string(p_) + "': " + what + " at offset " + std::to_string(i_));
  }
  bool at_end() const { return i_ >= p_.size(); }
  char peek() const { return p_[i_]; }

  Grammar::Id alternation() {
    std::vector<Grammar::Id> alts{concatenation()};
    while (!at_end() && peek() == '|') {
      ++i_;
      alts.push_back(concatenation());
    }
    return g_.alt(std::move(alts));
  }

  Grammar::Id concatenation() {
    std::vector<Grammar::Id> items;
    while (!at_end() && peek() != '|' && peek() != ')') {
      if (peek() == '$') {
        ++i_;
        if (!at_end() && peek() != ')' && peek() != '|') fail("'$' is only supported at the end");
        continue;
      }
      items.push_back(quantified());
    }
    return g_.seq(std::move(items));
  }

  int number() {
    if (at_end() || !std::isdigit(static_cast<unsigned char>(peek()))) fail("a number was expected");
    int v = 0;
    while (!at_end() && std::isdigit(static_cast<unsigned char>(peek()))) {
      v = v * 10 + (peek() - '0');
      if (v > 10000) fail("a repetition count above 10000");
      ++i_;
    }
    return v;
  }

  Grammar::Id quantified() {
    Grammar::Id a = atom();
    while (!at_end()) {
      int lo, hi;
      const char c = peek();
      if (c == '?') {
        lo = 0, hi = 1;
        ++i_;
      } else if (c == '*') {
        lo = 0, hi = Grammar::kUnbounded;
        ++i_;
      } else if (c == '+') {
        lo = 1, hi = Grammar::kUnbounded;
        ++i_;
      } else if (c == '{') {
        ++i_;
        lo = hi = number();
        if (!at_end() && peek() == ',') {
          ++i_;
          hi = !at_end() && peek() == '}' ? Grammar::kUnbounded : number();
        }
        if (at_end() || peek() != '}') fail("'}' was expected");
        ++i_;
        if (hi != Grammar::kUnbounded && hi < lo) fail("{m,n} with n < m");
      } else {
        break;
      }
      if (!at_end() && (peek() == '?' || peek() == '+')) ++i_;  // lazy / possessive: same language
      a = g_.repeat(a, lo, hi);
    }
    return a;
  }

  Grammar::Id cls(std::bitset<256> s) {
    s &= allowed_;
    if (s.none()) fail("a character class with no character a JSON string can hold unescaped");
    return g_.bytes(s);
  }

  // \d \w \s and friends, as a set; nullopt-like empty set when `c` is not a class escape.
  std::bitset<256> class_escape(char c) const {
    std::bitset<256> s;
    switch (c) {
      case 'd':
        return range('0', '9');
      case 'w':
        return range('0', '9') | range('a', 'z') | range('A', 'Z') | range('_', '_');
      case 's':
        return range(' ', ' ') | range('\t', '\t') | range('\n', '\n') | range('\r', '\r');
      case 'D':
        return printable_ascii() & ~range('0', '9');
      case 'W':
        return printable_ascii() & ~(range('0', '9') | range('a', 'z') | range('A', 'Z') | range('_', '_'));
      case 'S':
        return printable_ascii() & ~range(' ', ' ');
      default:
        return s;
    }
  }

  // One escaped character (after the backslash) as a byte; fails on what is not one.
  unsigned char escaped_char() {
    if (at_end()) fail("a trailing backslash");
    const char c = p_[i_++];
    switch (c) {
      case 'n':
        return '\n';
      case 't':
        return '\t';
      case 'r':
        return '\r';
      case 'u': {
        if (i_ + 4 > p_.size()) fail("\\u needs 4 hex digits");
        const int v = std::stoi(std::string(p_.substr(i_, 4)), nullptr, 16);
        i_ += 4;
        if (v >= 0x80) fail("\\u escapes beyond ASCII are not supported");
        return static_cast<unsigned char>(v);
      }
      default:
        if (std::isalnum(static_cast<unsigned char>(c))) fail(std::string("the escape \\") + c + " is not supported");
        return static_cast<unsigned char>(c);
    }
  }

  Grammar::Id atom() {
    const char c = peek();
    if (c == '(') {
      ++i_;
      if (!at_end() && peek() == '?') {
        if (i_ + 1 < p_.size() && p_[i_ + 1] == ':')
          i_ += 2;
        else
          fail("lookaround and named groups are not supported");
      }
      Grammar::Id r = alternation();
      if (at_end() || peek() != ')') fail("')' was expected");
      ++i_;
      return r;
    }
    if (c == '[') return bracket();
    if (c == '.') {
      ++i_;
      return cls(printable_ascii());
    }
    if (c == '^') fail("'^' is only supported at the start");
    if (c == '*' || c == '+' || c == '?' || c == '{') fail("a quantifier with nothing to repeat");
    if (c == '\\') {
      ++i_;
      if (at_end()) fail("a trailing backslash");
      if (auto s = class_escape(peek()); s.any()) {
        ++i_;
        return cls(s);
      }
      if (std::isdigit(static_cast<unsigned char>(peek()))) fail("backreferences are not supported");
      if (peek() == 'b' || peek() == 'B') fail("word boundaries are not supported");
      return lit(escaped_char());
    }
    ++i_;
    return lit(static_cast<unsigned char>(c));
  }

  Grammar::Id lit(unsigned char c) {
    if (c < 0x80 && !allowed_.test(c)) fail("the character '" + std::string(1, char(c)) + "', which JSON escapes");
    return g_.byte(c);  // bytes of a UTF-8 literal pass through one by one
  }

  Grammar::Id bracket() {
    ++i_;  // '['
    bool negate = false;
    if (!at_end() && peek() == '^') {
      negate = true;
      ++i_;
    }
    std::bitset<256> s;
    bool first = true;
    while (true) {
      if (at_end()) fail("an unterminated character class");
      char c = peek();
      if (c == ']' && !first) {
        ++i_;
        break;
      }
      first = false;
      unsigned char lo;
      if (c == '\\') {
        ++i_;
        if (at_end()) fail("a trailing backslash");
        if (auto e = class_escape(peek()); e.any()) {
          ++i_;
          s |= e;
          continue;
        }
        lo = escaped_char();
      } else {
        lo = static_cast<unsigned char>(c);
        ++i_;
      }
      if (lo >= 0x80) fail("non-ASCII characters in a class are not supported");
      unsigned char hi = lo;
      if (i_ + 1 < p_.size() && peek() == '-' && p_[i_ + 1] != ']') {
        ++i_;
        if (peek() == '\\') {
          ++i_;
          hi = escaped_char();
        } else {
          hi = static_cast<unsigned char>(peek());
          ++i_;
        }
        if (hi < lo) fail("a class range out of order");
        if (hi >= 0x80) fail("non-ASCII characters in a class are not supported");
      }
      s |= range(lo, hi);
    }
    if (negate) s = printable_ascii() & ~s;
    return cls(s);
  }

  Grammar& g_;
  std::string_view p_;
  std::bitset<256> allowed_;
  size_t i_ = 0;
};

// Digits of [lo, hi], both with the same number of digits.
std::string same_length(const std::string& lo, const std::string& hi) {
  if (lo.empty()) return "";
  if (lo == hi) return lo;
  const size_t rest = lo.size() - 1;
  // [a-b] followed by any digits: one class and a count (splitting further doubles per digit).
  if (lo.find_first_not_of('0', 1) == std::string::npos && hi.find_first_not_of('9', 1) == std::string::npos)
    return std::string("[") + lo[0] + "-" + hi[0] + "]" + (rest ? "[0-9]{" + std::to_string(rest) + "}" : "");
  if (lo.size() == 1) return std::string("[") + lo[0] + "-" + hi[0] + "]";
  if (lo[0] == hi[0]) return lo.substr(0, 1) + "(" + same_length(lo.substr(1), hi.substr(1)) + ")";
  std::string out = lo.substr(0, 1) + "(" + same_length(lo.substr(1), std::string(rest, '9')) + ")";
  if (hi[0] - lo[0] > 1)
    out += std::string("|[") + char(lo[0] + 1) + "-" + char(hi[0] - 1) + "][0-9]{" + std::to_string(rest) + "}";
  out += "|" + hi.substr(0, 1) + "(" + same_length(std::string(rest, '0'), hi.substr(1)) + ")";
  return out;
}

// [lo, hi] with 0 <= lo <= hi.
std::string nonnegative_range(int64_t lo, int64_t hi) {
  std::string out;
  int64_t start = lo;
  for (int64_t p = 10, digits = 1; start <= hi; p *= 10, ++digits) {
    const int64_t end = std::min(hi, p - 1);
    if (start <= end) {
      if (!out.empty()) out += "|";
      out += "(" + same_length(std::to_string(start), std::to_string(end)) + ")";
      start = end + 1;
    }
    if (p > INT64_MAX / 10) break;
  }
  return out;
}

}  // namespace

Grammar::Id compile_regex(Grammar& g, std::string_view pattern, const std::bitset<256>& allowed) {
  return RegexParser(g, pattern, allowed).parse();
}

std::string integer_range_regex(int64_t lo, int64_t hi) {
  if (lo > hi) throw Error("an empty integer range");
  std::string out;
  if (hi >= 0) out = nonnegative_range(std::max<int64_t>(lo, 0), hi);
  if (lo < 0) {
    const std::string neg = "-(" + nonnegative_range(std::max<int64_t>(1, -hi), -lo) + ")";
    out = out.empty() ? neg : out + "|" + neg;
  }
  return "(" + out + ")";
}

}  // namespace moemesh
