// Hugging Face tokenizer.json: BPE model (byte-level or SentencePiece-style with byte
// fallback), normalizers, pre-tokenizers, decoders, post-processor and added tokens, following
// the Rust `tokenizers` crate where behaviour matters for real checkpoints.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "core/chat_template.h"
#include "core/error.h"
#include "core/tokenizer.h"
#include "core/unicode.h"

namespace moemesh {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Small helpers

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

json read_json_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("tokenizer: cannot open " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw Error("tokenizer: " + path.string() + " is not valid JSON: " + e.what());
  }
}

bool is_space_char(char32_t c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out.append(to);
  }
  if (pos == 0) return;
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}

// ---------------------------------------------------------------------------------------------
// PCRE2 in UTF + UCP mode (\p{L}, \s etc. are Unicode-aware, as in the Rust regex crate).

class Regex {
 public:
  explicit Regex(const std::string& pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw Error("tokenizer: bad regex /" + pattern + "/ at " + std::to_string(off) + ": " +
                  reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // best effort: falls back to the interpreter
    code_.reset(code, pcre2_code_free);
  }

  // Non-empty matches as [begin, end) byte ranges. s must be valid UTF-8.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    size_t pos = 0;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                           PCRE2_NO_UTF_CHECK, md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) throw Error("tokenizer: regex match failed (code " + std::to_string(rc) + ")");
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      size_t b = ov[0], e = ov[1];
      if (e > b) {
        out.emplace_back(b, e);
        pos = e;
      } else {  // empty match: step over one character
        if (b >= s.size()) break;
        pos = b + utf8::seq_len(static_cast<unsigned char>(s[b]));
      }
    }
    return out;
  }

 private:
  std::shared_ptr<pcre2_code> code_;
};

std::string escape_regex(std::string_view lit) {
  std::string out = "\\Q";
  for (size_t i = 0; i < lit.size(); ++i) {
    if (lit.substr(i, 2) == "\\E") {
      out += "\\E\\\\E\\Q";
      ++i;
    } else {
      out += lit[i];
    }
  }
  return out + "\\E";
}

// {"String": "..."} or {"Regex": "..."} as used by Split, Replace.
Regex pattern_regex(const json& pattern) {
  if (pattern.contains("Regex")) return Regex(pattern["Regex"].get<std::string>());
  if (pattern.contains("String")) return Regex(escape_regex(pattern["String"].get<std::string>()));
  throw Error("tokenizer: pattern must hold String or Regex: " + pattern.dump());
}

// ---------------------------------------------------------------------------------------------
// Normalizers

struct Normalizer {
  virtual ~Normalizer() = default;
  virtual void apply(std::string& s) const = 0;
};

struct NormalizerSequence : Normalizer {
  std::vector<std::unique_ptr<Normalizer>> parts;
  void apply(std::string& s) const override {
    for (const auto& p : parts) p->apply(s);
  }
};

struct PrependNormalizer : Normalizer {
  std::string prepend;
  void apply(std::string& s) const override {
    if (!s.empty()) s.insert(0, prepend);
  }
};

struct ReplaceNormalizer : Normalizer {
  std::optional<std::string> literal;
  std::optional<Regex> regex;
  std::string content;
  void apply(std::string& s) const override {
    if (literal) return replace_all(s, *literal, content);
    auto hits = regex->find_all(s);
    if (hits.empty()) return;
    std::string out;
    size_t pos = 0;
    for (auto [b, e] : hits) {
      out.append(s, pos, b - pos);
      out += content;
      pos = e;
    }
    out.append(s, pos, std::string::npos);
    s = std::move(out);
  }
};

struct StripNormalizer : Normalizer {
  bool left = true, right = true;
  void apply(std::string& s) const override {
    if (right) {
      while (!s.empty()) {
        size_t i = s.size() - 1;
        while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
        size_t j = i;
        if (!is_space_char(utf8::next(s, j))) break;
        s.resize(i);
      }
    }
    if (left) {
      size_t i = 0;
      while (i < s.size()) {
        size_t j = i;
        if (!is_space_char(utf8::next(s, j))) break;
        i = j;
      }
      s.erase(0, i);
    }
  }
};

// Unicode normalization forms need tables we do not ship; prompts are almost always NFC
// already, so these pass text through unchanged (logged once).
struct PassThroughNormalizer : Normalizer {
  void apply(std::string&) const override {}
};

std::unique_ptr<Normalizer> make_normalizer(const json& j) {
  if (j.is_null()) return nullptr;
  std::string type = j.value("type", "");
  if (type == "Sequence") {
    auto seq = std::make_unique<NormalizerSequence>();
    for (const auto& n : j.at("normalizers"))
      if (auto p = make_normalizer(n)) seq->parts.push_back(std::move(p));
    return seq;
  }
  if (type == "Prepend") {
    auto p = std::make_unique<PrependNormalizer>();
    p->prepend = j.at("prepend").get<std::string>();
    return p;
  }
  if (type == "Replace") {
    auto r = std::make_unique<ReplaceNormalizer>();
    const json& pat = j.at("pattern");
    if (pat.contains("String"))
      r->literal = pat["String"].get<std::string>();
    else
      r->regex = pattern_regex(pat);
    r->content = j.at("content").get<std::string>();
    return r;
  }
  if (type == "Strip") {
    auto s = std::make_unique<StripNormalizer>();
    s->left = j.value("strip_left", true);
    s->right = j.value("strip_right", true);
    return s;
  }
  if (type == "NFC" || type == "NFKC" || type == "NFD" || type == "NFKD") {
    spdlog::warn("tokenizer: {} normalizer is applied as identity (input is assumed normalized)", type);
    return std::make_unique<PassThroughNormalizer>();
  }
  throw Error("tokenizer: unsupported normalizer type '" + type + "'");
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers: split each piece of a list into smaller pieces.

using Pieces = std::vector<std::string>;

struct PreTokenizer {
  virtual ~PreTokenizer() = default;
  // first: whether the text being split starts the input (Metaspace's prepend_scheme "first").
  virtual void apply(Pieces& pieces, bool first) const = 0;
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// Splits s at the delimiters found by regex, as SplitDelimiterBehavior does in tokenizers.
void split_with(std::string_view s, const Regex& re, SplitBehavior behavior, bool invert, Pieces& out) {
  // Alternating (range, is_delimiter) spans covering s.
  std::vector<std::tuple<size_t, size_t, bool>> spans;
  size_t pos = 0;
  for (auto [b, e] : re.find_all(s)) {
    if (b > pos) spans.emplace_back(pos, b, invert);
    spans.emplace_back(b, e, !invert);
    pos = e;
  }
  if (pos < s.size()) spans.emplace_back(pos, s.size(), invert);

  std::vector<std::pair<size_t, size_t>> parts;
  bool prev_delim = false;
  for (auto [b, e, delim] : spans) {
    switch (behavior) {
      case SplitBehavior::Removed:
        if (!delim) parts.emplace_back(b, e);
        break;
      case SplitBehavior::Isolated:
        parts.emplace_back(b, e);
        break;
      case SplitBehavior::MergedWithPrevious:
        if (delim && !parts.empty() && !prev_delim)
          parts.back().second = e;
        else
          parts.emplace_back(b, e);
        break;
      case SplitBehavior::MergedWithNext:
        if (!delim && prev_delim && !parts.empty())
          parts.back().second = e;
        else
          parts.emplace_back(b, e);
        break;
      case SplitBehavior::Contiguous:
        if (delim && prev_delim && !parts.empty())
          parts.back().second = e;
        else
          parts.emplace_back(b, e);
        break;
    }
    prev_delim = delim;
  }
  for (auto [b, e] : parts)
    if (e > b) out.emplace_back(s.substr(b, e - b));
}

struct SplitPreTokenizer : PreTokenizer {
  std::optional<Regex> re;
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  void apply(Pieces& pieces, bool) const override {
    Pieces out;
    for (const auto& p : pieces) split_with(p, *re, behavior, invert, out);
    pieces = std::move(out);
  }
};

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string to_byte_level(std::string_view s) {
  std::string out;
  out.reserve(s.size() * 2);
  const auto& map = utf8::byte_to_char();
  for (unsigned char b : s) utf8::append(out, map[b]);
  return out;
}

struct ByteLevelPreTokenizer : PreTokenizer {
  bool add_prefix_space = false;
  std::optional<Regex> re;  // GPT-2 split when use_regex
  void apply(Pieces& pieces, bool) const override {
    Pieces out;
    for (auto& p : pieces) {
      if (add_prefix_space && (p.empty() || p[0] != ' ')) p.insert(0, " ");
      if (re) {
        Pieces split;
        split_with(p, *re, SplitBehavior::Isolated, false, split);
        for (auto& s : split) out.push_back(to_byte_level(s));
      } else {
        out.push_back(to_byte_level(p));
      }
    }
    pieces = std::move(out);
  }
};

struct MetaspacePreTokenizer : PreTokenizer {
  std::string replacement = "\xE2\x96\x81";  // U+2581
  std::string prepend_scheme = "always";
  bool split = true;
  void apply(Pieces& pieces, bool first) const override {
    Pieces out;
    for (auto p : pieces) {
      replace_all(p, " ", replacement);
      bool prepend = prepend_scheme == "always" || (prepend_scheme == "first" && first);
      if (prepend && p.rfind(replacement, 0) != 0) p.insert(0, replacement);
      if (!split) {
        out.push_back(std::move(p));
        continue;
      }
      // MergedWithNext on the replacement character.
      size_t start = 0;
      for (size_t hit = p.find(replacement, 1); hit != std::string::npos; hit = p.find(replacement, hit + 1)) {
        if (hit > start) out.push_back(p.substr(start, hit - start));
        start = hit;
      }
      if (start < p.size()) out.push_back(p.substr(start));
    }
    pieces = std::move(out);
  }
};

struct PreTokenizerSequence : PreTokenizer {
  std::vector<std::unique_ptr<PreTokenizer>> parts;
  void apply(Pieces& pieces, bool first) const override {
    for (const auto& p : parts) p->apply(pieces, first);
  }
};

SplitBehavior parse_behavior(const std::string& b) {
  if (b == "Removed") return SplitBehavior::Removed;
  if (b == "Isolated") return SplitBehavior::Isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (b == "Contiguous") return SplitBehavior::Contiguous;
  throw Error("tokenizer: unknown split behavior '" + b + "'");
}

std::unique_ptr<PreTokenizer> make_split(const std::string& regex, SplitBehavior b, bool invert) {
  auto s = std::make_unique<SplitPreTokenizer>();
  s->re = Regex(regex);
  s->behavior = b;
  s->invert = invert;
  return s;
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j) {
  if (j.is_null()) return nullptr;
  std::string type = j.value("type", "");
  if (type == "Sequence") {
    auto seq = std::make_unique<PreTokenizerSequence>();
    for (const auto& p : j.at("pretokenizers"))
      if (auto q = make_pre_tokenizer(p)) seq->parts.push_back(std::move(q));
    return seq;
  }
  if (type == "Split") {
    auto s = std::make_unique<SplitPreTokenizer>();
    s->re = pattern_regex(j.at("pattern"));
    s->behavior = parse_behavior(j.value("behavior", "Isolated"));
    s->invert = j.value("invert", false);
    return s;
  }
  if (type == "ByteLevel") {
    auto b = std::make_unique<ByteLevelPreTokenizer>();
    b->add_prefix_space = j.value("add_prefix_space", false);
    if (j.value("use_regex", true)) b->re = Regex(kGpt2Pattern);
    return b;
  }
  if (type == "Metaspace") {
    auto m = std::make_unique<MetaspacePreTokenizer>();
    m->replacement = j.value("replacement", m->replacement);
    if (j.contains("prepend_scheme"))
      m->prepend_scheme = j["prepend_scheme"].get<std::string>();
    else
      m->prepend_scheme = j.value("add_prefix_space", true) ? "always" : "never";
    m->split = j.value("split", true);
    return m;
  }
  if (type == "Digits")
    return make_split(j.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", SplitBehavior::Isolated, false);
  if (type == "Whitespace") return make_split(R"(\w+|[^\w\s]+)", SplitBehavior::Removed, true);
  if (type == "WhitespaceSplit") return make_split(R"(\s+)", SplitBehavior::Removed, false);
  throw Error("tokenizer: unsupported pre_tokenizer type '" + type + "'");
}

// ---------------------------------------------------------------------------------------------
// Decoders: map the token strings, in order, to text pieces.

struct Decoder {
  virtual ~Decoder() = default;
  virtual void apply(std::vector<std::string>& toks) const = 0;
  // As apply, but the bytes a token adds mid-text: no stripping at the start and no U+FFFD for
  // bytes that are part of a character (Tokenizer::token_bytes).
  virtual void apply_raw(std::vector<std::string>& toks) const { apply(toks); }
};

struct DecoderSequence : Decoder {
  std::vector<std::unique_ptr<Decoder>> parts;
  void apply(std::vector<std::string>& toks) const override {
    for (const auto& p : parts) p->apply(toks);
  }
  void apply_raw(std::vector<std::string>& toks) const override {
    for (const auto& p : parts) p->apply_raw(toks);
  }
};

struct ReplaceDecoder : Decoder {
  ReplaceNormalizer impl;
  void apply(std::vector<std::string>& toks) const override {
    for (auto& t : toks) impl.apply(t);
  }
};

struct ByteFallbackDecoder : Decoder {
  static int byte_of(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      return -1;
    };
    int h = hex(t[3]), l = hex(t[4]);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
  }
  void apply(std::vector<std::string>& toks) const override { run(toks, false); }
  void apply_raw(std::vector<std::string>& toks) const override { run(toks, true); }
  void run(std::vector<std::string>& toks, bool raw) const {
    std::vector<std::string> out;
    std::string bytes;
    size_t nbytes = 0;
    auto flush = [&] {
      if (nbytes == 0) return;
      if (raw || utf8::valid(bytes)) {
        out.push_back(bytes);
      } else {  // as tokenizers does: one U+FFFD per byte token
        for (size_t i = 0; i < nbytes; ++i) out.emplace_back(utf8::kReplacement);
      }
      bytes.clear();
      nbytes = 0;
    };
    for (auto& t : toks) {
      int b = byte_of(t);
      if (b >= 0) {
        bytes += static_cast<char>(b);
        ++nbytes;
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    toks = std::move(out);
  }
};

struct FuseDecoder : Decoder {
  void apply(std::vector<std::string>& toks) const override {
    std::string all;
    for (const auto& t : toks) all += t;
    toks.assign(1, std::move(all));
  }
};

struct StripDecoder : Decoder {
  char32_t content = ' ';
  size_t start = 0, stop = 0;
  void apply_raw(std::vector<std::string>&) const override {}
  void apply(std::vector<std::string>& toks) const override {
    for (auto& t : toks) {
      std::vector<std::pair<size_t, char32_t>> chars;  // (byte offset, code point)
      for (size_t i = 0; i < t.size();) {
        size_t at = i;
        chars.emplace_back(at, utf8::next(t, i));
      }
      size_t start_cut = 0;
      for (size_t i = 0; i < start && i < chars.size() && chars[i].second == content; ++i) start_cut = i + 1;
      size_t stop_cut = chars.size();
      for (size_t i = 0; i < stop && i < chars.size(); ++i) {
        size_t idx = chars.size() - i - 1;
        if (chars[idx].second != content) break;
        stop_cut = idx;
      }
      if (start_cut >= stop_cut) {
        t.clear();
        continue;
      }
      size_t b = chars[start_cut].first;
      size_t e = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
      t = t.substr(b, e - b);
    }
  }
};

struct ByteLevelDecoder : Decoder {
  void apply(std::vector<std::string>& toks) const override { run(toks, false); }
  void apply_raw(std::vector<std::string>& toks) const override { run(toks, true); }
  void run(std::vector<std::string>& toks, bool raw) const {
    std::string bytes;
    for (const auto& t : toks) {
      size_t mark = bytes.size();
      bool ok = true;
      for (size_t i = 0; i < t.size();) {
        int b = utf8::char_to_byte(utf8::next(t, i));
        if (b < 0) {
          ok = false;
          break;
        }
        bytes += static_cast<char>(b);
      }
      if (!ok) {  // not byte-level text (an added token): keep its raw bytes
        bytes.resize(mark);
        bytes += t;
      }
    }
    toks.assign(1, raw ? std::move(bytes) : utf8::lossy(bytes));
  }
};

struct MetaspaceDecoder : Decoder {
  std::string replacement = "\xE2\x96\x81";
  bool strip_first = true;
  void apply(std::vector<std::string>& toks) const override { run(toks, strip_first); }
  void apply_raw(std::vector<std::string>& toks) const override { run(toks, false); }
  void run(std::vector<std::string>& toks, bool strip) const {
    for (size_t i = 0; i < toks.size(); ++i) {
      replace_all(toks[i], replacement, " ");
      if (i == 0 && strip && !toks[i].empty() && toks[i][0] == ' ') toks[i].erase(0, 1);
    }
  }
};

std::unique_ptr<Decoder> make_decoder(const json& j) {
  if (j.is_null()) return nullptr;
  std::string type = j.value("type", "");
  if (type == "Sequence") {
    auto seq = std::make_unique<DecoderSequence>();
    for (const auto& d : j.at("decoders"))
      if (auto p = make_decoder(d)) seq->parts.push_back(std::move(p));
    return seq;
  }
  if (type == "Replace") {
    auto r = std::make_unique<ReplaceDecoder>();
    const json& pat = j.at("pattern");
    if (pat.contains("String"))
      r->impl.literal = pat["String"].get<std::string>();
    else
      r->impl.regex = pattern_regex(pat);
    r->impl.content = j.at("content").get<std::string>();
    return r;
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    auto s = std::make_unique<StripDecoder>();
    std::string c = j.value("content", " ");
    size_t i = 0;
    s->content = c.empty() ? U' ' : utf8::next(c, i);
    s->start = j.value("start", 0);
    s->stop = j.value("stop", 0);
    return s;
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    auto m = std::make_unique<MetaspaceDecoder>();
    m->replacement = j.value("replacement", m->replacement);
    if (j.contains("prepend_scheme"))
      m->strip_first = j["prepend_scheme"].get<std::string>() != "never";
    else
      m->strip_first = j.value("add_prefix_space", true);
    return m;
  }
  throw Error("tokenizer: unsupported decoder type '" + type + "'");
}

// ---------------------------------------------------------------------------------------------
// Added tokens: found in the text before the model runs, leftmost-longest like tokenizers'
// aho-corasick matcher, honouring lstrip/rstrip/single_word.

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, normalized = false, single_word = false;
};

class AddedTokenMatcher {
 public:
  void add(const AddedToken& t) {
    if (t.content.empty()) return;
    int32_t node = 0;
    for (unsigned char c : t.content) {
      uint64_t key = (static_cast<uint64_t>(node) << 8) | c;
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        it = edges_.emplace(key, static_cast<int32_t>(terminal_.size())).first;
        terminal_.push_back(nullptr);
      }
      node = it->second;
    }
    terminal_[node] = &t;
    first_byte_[static_cast<unsigned char>(t.content[0])] = true;
  }
  bool empty() const { return terminal_.size() == 1; }

  // Calls emit(text, nullptr) for plain text and emit(content, token) for each match.
  template <typename F>
  void split(std::string_view s, F&& emit) const {
    size_t plain_begin = 0;
    size_t i = 0;
    while (i < s.size()) {
      if (!first_byte_[static_cast<unsigned char>(s[i])]) {
        ++i;
        continue;
      }
      const AddedToken* best = nullptr;
      size_t best_end = 0;
      int32_t node = 0;
      for (size_t j = i; j < s.size(); ++j) {
        auto it = edges_.find((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(s[j]));
        if (it == edges_.end()) break;
        node = it->second;
        if (terminal_[node]) {
          best = terminal_[node];
          best_end = j + 1;
        }
      }
      if (!best || (best->single_word && !single_word_ok(s, i, best_end))) {
        ++i;
        continue;
      }
      size_t b = i, e = best_end;
      if (best->lstrip)
        while (b > plain_begin && is_ascii_space(s[b - 1])) --b;
      if (best->rstrip)
        while (e < s.size() && is_ascii_space(s[e])) ++e;
      if (b > plain_begin) emit(s.substr(plain_begin, b - plain_begin), nullptr);
      emit(std::string_view(best->content), best);
      plain_begin = i = e;
    }
    if (plain_begin < s.size()) emit(s.substr(plain_begin), nullptr);
  }

 private:
  // Byte-wise scan, so only ASCII whitespace: a UTF-8 continuation byte must never match.
  static bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
  static bool is_word_byte(unsigned char c) { return std::isalnum(c) || c == '_' || c >= 0x80; }
  static bool single_word_ok(std::string_view s, size_t b, size_t e) {
    return (b == 0 || !is_word_byte(s[b - 1])) && (e >= s.size() || !is_word_byte(s[e]));
  }
  std::unordered_map<uint64_t, int32_t> edges_;  // (node << 8 | byte) -> child
  std::vector<const AddedToken*> terminal_{nullptr};
  bool first_byte_[256] = {};
};

// ---------------------------------------------------------------------------------------------
// BPE model

class BpeModel {
 public:
  void load(const json& model) {
    const json& vocab = model.at("vocab");
    vocab_.reserve(vocab.size() * 2);
    for (auto it = vocab.begin(); it != vocab.end(); ++it) vocab_.emplace(it.key(), it.value().get<int32_t>());

    const json& merges = model.at("merges");
    merges_.reserve(merges.size() * 2);
    int32_t rank = 0;
    for (const auto& m : merges) {
      std::string a, b;
      if (m.is_array()) {
        a = m.at(0).get<std::string>();
        b = m.at(1).get<std::string>();
      } else {
        const std::string& s = m.get_ref<const std::string&>();
        size_t sp = s.find(' ');
        if (sp == std::string::npos) throw Error("tokenizer: bad merge '" + s + "'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      }
      auto ia = vocab_.find(a), ib = vocab_.find(b), im = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || im == vocab_.end())
        throw Error("tokenizer: merge '" + a + " " + b + "' uses tokens missing from the vocabulary");
      merges_.emplace(pair_key(ia->second, ib->second), Merge{rank++, im->second});
    }

    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      auto it = vocab_.find(model["unk_token"].get<std::string>());
      if (it != vocab_.end()) unk_id_ = it->second;
    }
    fuse_unk_ = model.value("fuse_unk", false);
    byte_fallback_ = model.value("byte_fallback", false);
    ignore_merges_ = model.value("ignore_merges", false);
    auto str_or_empty = [&](const char* key) {
      return model.contains(key) && model[key].is_string() ? model[key].get<std::string>() : std::string();
    };
    continuing_prefix_ = str_or_empty("continuing_subword_prefix");
    end_of_word_suffix_ = str_or_empty("end_of_word_suffix");
    if (byte_fallback_) {
      static const char* hex = "0123456789ABCDEF";
      for (int b = 0; b < 256; ++b) {
        std::string name = std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
        auto it = vocab_.find(name);
        byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
      }
    }
  }

  const StringMap<int32_t>& vocab() const { return vocab_; }

  void encode(std::string_view piece, std::vector<int32_t>& out) const {
    if (piece.empty()) return;
    if (ignore_merges_) {
      if (auto it = vocab_.find(piece); it != vocab_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    {
      std::lock_guard lock(cache_mu_);
      if (auto it = cache_.find(piece); it != cache_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids = bpe(piece);
    out.insert(out.end(), ids.begin(), ids.end());
    if (piece.size() <= kMaxCachedPiece) {
      std::lock_guard lock(cache_mu_);
      if (cache_.size() >= kCacheCapacity) cache_.clear();  // crude bound; refills quickly
      cache_.emplace(std::string(piece), std::move(ids));
    }
  }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
    bool unk;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  static constexpr size_t kMaxCachedPiece = 256;
  static constexpr size_t kCacheCapacity = 200000;

  std::vector<int32_t> bpe(std::string_view piece) const {
    // Initial symbols: one per character (or its byte-fallback tokens, or unk).
    std::vector<Symbol> syms;
    syms.reserve(piece.size());
    std::string ch;
    auto push = [&](int32_t id, bool unk) {
      if (unk && fuse_unk_ && !syms.empty() && syms.back().unk) return;  // fuse runs of unknowns
      int32_t idx = static_cast<int32_t>(syms.size());
      syms.push_back({id, idx - 1, -1, true, unk});
      if (idx > 0) syms[idx - 1].next = idx;
    };
    for (size_t i = 0; i < piece.size();) {
      size_t b = i;
      i += std::min(utf8::seq_len(static_cast<unsigned char>(piece[i])), piece.size() - i);
      ch.assign(piece.substr(b, i - b));
      if (b > 0 && !continuing_prefix_.empty()) ch.insert(0, continuing_prefix_);
      if (i == piece.size() && !end_of_word_suffix_.empty()) ch += end_of_word_suffix_;
      if (auto it = vocab_.find(ch); it != vocab_.end()) {
        push(it->second, false);
        continue;
      }
      bool done = false;
      if (byte_fallback_) {
        done = true;
        for (size_t k = b; k < i; ++k)
          if (byte_ids_[static_cast<unsigned char>(piece[k])] < 0) done = false;
        if (done)
          for (size_t k = b; k < i; ++k) push(byte_ids_[static_cast<unsigned char>(piece[k])], false);
      }
      if (!done && unk_id_ >= 0) push(unk_id_, true);
      // Without an unk token the character is dropped, as tokenizers would fail on it.
    }

    struct Cand {
      int32_t rank, pos, new_id;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> queue;
    auto consider = [&](int32_t pos) {
      if (pos < 0) return;
      int32_t nx = syms[pos].next;
      if (nx < 0) return;
      auto it = merges_.find(pair_key(syms[pos].id, syms[nx].id));
      if (it != merges_.end()) queue.push({it->second.rank, pos, it->second.new_id});
    };
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) consider(i);
    while (!queue.empty()) {
      Cand c = queue.top();
      queue.pop();
      Symbol& s = syms[c.pos];
      if (!s.alive || s.next < 0) continue;
      auto it = merges_.find(pair_key(s.id, syms[s.next].id));
      if (it == merges_.end() || it->second.new_id != c.new_id) continue;  // stale entry
      Symbol& n = syms[s.next];
      s.id = c.new_id;
      s.unk = false;
      n.alive = false;
      s.next = n.next;
      if (s.next >= 0) syms[s.next].prev = c.pos;
      consider(s.prev);
      consider(c.pos);
    }
    std::vector<int32_t> ids;
    for (const auto& s : syms)
      if (s.alive) ids.push_back(s.id);
    return ids;
  }

  StringMap<int32_t> vocab_;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  std::string continuing_prefix_, end_of_word_suffix_;
  int32_t byte_ids_[256];
  mutable std::mutex cache_mu_;
  mutable StringMap<std::vector<int32_t>> cache_;
};

// ---------------------------------------------------------------------------------------------


// Reference clean-up of English tokenization artefacts (transformers' clean_up_tokenization).
std::string clean_up_tokenization(std::string s) {
  for (auto [from, to] : {std::pair{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
                          {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}})
    replace_all(s, from, to);
  return s;
}

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(const json& tj, const json& cfg) {
    const json& model = tj.at("model");
    std::string type = model.value("type", "BPE");
    if (type != "BPE") throw Error("tokenizer: unsupported model type '" + type + "' (only BPE is supported)");
    bpe_.load(model);
    normalizer_ = make_normalizer(tj.value("normalizer", json()));
    pre_tokenizer_ = make_pre_tokenizer(tj.value("pre_tokenizer", json()));
    decoder_ = make_decoder(tj.value("decoder", json()));

    // id -> token, model vocabulary first, then added tokens (which win on conflicts).
    int32_t max_id = -1;
    for (const auto& [tok, id] : bpe_.vocab()) max_id = std::max(max_id, id);
    if (tj.contains("added_tokens"))
      for (const auto& a : tj["added_tokens"]) max_id = std::max(max_id, a.at("id").get<int32_t>());
    id_to_token_.resize(static_cast<size_t>(max_id + 1));
    is_special_.assign(id_to_token_.size(), false);
    for (const auto& [tok, id] : bpe_.vocab())
      if (id >= 0) id_to_token_[id] = tok;

    if (tj.contains("added_tokens")) {
      for (const auto& a : tj["added_tokens"]) {
        AddedToken t;
        t.content = a.at("content").get<std::string>();
        t.id = a.at("id").get<int32_t>();
        t.special = a.value("special", false);
        t.lstrip = a.value("lstrip", false);
        t.rstrip = a.value("rstrip", false);
        t.normalized = a.value("normalized", !t.special);
        t.single_word = a.value("single_word", false);
        added_.push_back(std::move(t));
      }
    }
    for (const auto& t : added_) {  // added_ no longer grows: pointers into it stay valid
      if (t.id < 0) continue;
      id_to_token_[t.id] = t.content;
      added_to_id_[t.content] = t.id;
      if (t.special) is_special_[t.id] = true;
      // Tokens marked normalized are matched on normalized text, the others on raw text.
      (t.normalized && normalizer_ ? normalized_matcher_ : raw_matcher_).add(t);
    }

    read_config(cfg);
    read_post_processor(tj.value("post_processor", json()), cfg);
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::string fixed;
    if (!utf8::valid(text)) {
      fixed = utf8::lossy(text);
      text = fixed;
    }
    std::vector<int32_t> ids;
    if (add_special_tokens) ids = prefix_;
    bool first = true;
    raw_matcher_.split(text, [&](std::string_view part, const AddedToken* tok) {
      if (tok) {
        ids.push_back(tok->id);
      } else {
        encode_section(part, first && part.data() == text.data(), ids);
      }
      first = false;
    });
    if (add_special_tokens) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return ids;
  }

  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (int32_t id : ids) {
      // Ids past the vocabulary (models pad their embedding tables) decode to nothing.
      if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) continue;
      if (skip_special_tokens && is_special_[id]) continue;
      toks.push_back(id_to_token_[id]);
    }
    std::string out;
    if (decoder_) {
      decoder_->apply(toks);
      for (const auto& t : toks) out += t;
    } else {
      for (size_t i = 0; i < toks.size(); ++i) out += (i ? " " : "") + toks[i];
    }
    if (clean_up_spaces_) out = clean_up_tokenization(std::move(out));
    return out;
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }

  std::string token_bytes(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || is_special_[id]) return {};
    std::vector<std::string> toks{id_to_token_[id]};
    if (!decoder_) return toks[0];
    decoder_->apply_raw(toks);
    std::string out;
    for (const auto& t : toks) out += t;
    return out;
  }

  std::optional<int32_t> token_to_id(std::string_view token) const override {
    if (auto it = added_to_id_.find(token); it != added_to_id_.end()) return it->second;
    if (auto it = bpe_.vocab().find(token); it != bpe_.vocab().end()) return it->second;
    return std::nullopt;
  }
  std::optional<std::string> id_to_token(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || id_to_token_[id].empty()) return std::nullopt;
    return id_to_token_[id];
  }
  std::optional<int32_t> bos_id() const override { return bos_.empty() ? std::nullopt : token_to_id(bos_); }
  std::optional<int32_t> eos_id() const override { return eos_.empty() ? std::nullopt : token_to_id(eos_); }
  const std::string& bos_token() const override { return bos_; }
  const std::string& eos_token() const override { return eos_; }
  const std::string& chat_template() const override { return chat_template_; }

  std::string apply_chat_template(const json& messages, bool add_generation_prompt,
                                  const json* extra) const override {
    if (chat_template_.empty())
      throw Error("tokenizer has no chat_template (pass one explicitly, e.g. moemesh::kMixtralChatTemplate)");
    std::call_once(compiled_once_, [&] { compiled_ = std::make_shared<ChatTemplate>(chat_template_); });
    return render_chat(*compiled_, messages, add_generation_prompt, bos_, eos_, extra ? *extra : json::object());
  }

 private:
  void encode_section(std::string_view part, bool first, std::vector<int32_t>& ids) const {
    std::string s(part);
    if (normalizer_) normalizer_->apply(s);
    if (s.empty()) return;
    if (normalized_matcher_.empty()) return pre_tokenize_and_bpe(s, first, ids);
    bool head = true;
    normalized_matcher_.split(s, [&](std::string_view p, const AddedToken* tok) {
      if (tok)
        ids.push_back(tok->id);
      else
        pre_tokenize_and_bpe(std::string(p), first && head, ids);
      head = false;
    });
  }

  void pre_tokenize_and_bpe(std::string s, bool first, std::vector<int32_t>& ids) const {
    if (!pre_tokenizer_) return bpe_.encode(s, ids);
    Pieces pieces{std::move(s)};
    pre_tokenizer_->apply(pieces, first);
    for (const auto& p : pieces) bpe_.encode(p, ids);
  }

  void read_config(const json& cfg) {
    if (auto t = config_token_content(cfg, "bos_token")) bos_ = *t;
    if (auto t = config_token_content(cfg, "eos_token")) eos_ = *t;
    if (cfg.empty()) {
      // No tokenizer_config.json: recognise the usual names of well-known families.
      for (const char* b : {"<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<bos>"})
        if (bos_.empty() && added_to_id_.count(b)) bos_ = b;
      for (const char* e : {"</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<eos>", "<|endoftext|>"})
        if (eos_.empty() && added_to_id_.count(e)) eos_ = e;
    }
    if (cfg.contains("additional_special_tokens") && cfg["additional_special_tokens"].is_array()) {
      for (const auto& t : cfg["additional_special_tokens"]) {
        std::string c = t.is_string() ? t.get<std::string>() : t.value("content", "");
        if (auto id = token_to_id(c)) is_special_[*id] = true;
      }
    }
    if (cfg.contains("chat_template")) {
      const json& ct = cfg["chat_template"];
      if (ct.is_string()) {
        chat_template_ = ct.get<std::string>();
      } else if (ct.is_array()) {  // [{name, template}, ...]: use "default"
        for (const auto& t : ct)
          if (t.value("name", "") == "default") chat_template_ = t.value("template", "");
      }
    }
    // transformers now defaults this to false; configs that want it say so.
    clean_up_spaces_ = cfg.value("clean_up_tokenization_spaces", false);
  }

  // The special tokens that add_special_tokens puts around the text. tokenizer.json's
  // TemplateProcessing gives the default; add_bos_token/add_eos_token in the config override
  // it, as transformers' Llama fast tokenizers rebuild their post-processor from them.
  void read_post_processor(const json& pp, const json& cfg) {
    std::function<void(const json&)> visit = [&](const json& p) {
      if (p.is_null()) return;
      std::string type = p.value("type", "");
      if (type == "Sequence") {
        for (const auto& q : p.at("processors")) visit(q);
      } else if (type == "TemplateProcessing") {
        bool after = false;
        for (const auto& item : p.at("single")) {
          if (item.contains("Sequence")) {
            after = true;
          } else if (item.contains("SpecialToken")) {
            std::string name = item["SpecialToken"].at("id").get<std::string>();
            std::vector<int32_t> tok_ids;
            if (p.contains("special_tokens") && p["special_tokens"].contains(name))
              tok_ids = p["special_tokens"][name].at("ids").get<std::vector<int32_t>>();
            else if (auto id = token_to_id(name))
              tok_ids = {*id};
            auto& dst = after ? suffix_ : prefix_;
            dst.insert(dst.end(), tok_ids.begin(), tok_ids.end());
          }
        }
      } else if (type != "ByteLevel") {
        spdlog::warn("tokenizer: post_processor '{}' is not supported; no special tokens are added", type);
      }
    };
    visit(pp);
    auto want = [&](const char* key, const std::string& token, std::vector<int32_t>& dst) {
      if (!cfg.contains(key) || !cfg[key].is_boolean()) return;
      dst.clear();
      if (!cfg[key].get<bool>()) return;
      auto id = token.empty() ? std::nullopt : token_to_id(token);
      if (!id) throw Error(std::string("tokenizer: ") + key + " is set but the token is not in the vocabulary");
      dst.push_back(*id);
    };
    want("add_bos_token", bos_, prefix_);
    want("add_eos_token", eos_, suffix_);
  }

  BpeModel bpe_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  std::vector<AddedToken> added_;
  StringMap<int32_t> added_to_id_;
  AddedTokenMatcher raw_matcher_, normalized_matcher_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> is_special_;
  std::vector<int32_t> prefix_, suffix_;
  std::string bos_, eos_, chat_template_;
  bool clean_up_spaces_ = false;
  mutable std::once_flag compiled_once_;
  mutable std::shared_ptr<ChatTemplate> compiled_;
};

}  // namespace

std::shared_ptr<Tokenizer> Tokenizer::from_files(const std::filesystem::path& tokenizer_json,
                                                 const std::filesystem::path& tokenizer_config) {
  json tj = read_json_file(tokenizer_json);
  json cfg = json::object();
  if (!tokenizer_config.empty()) cfg = read_json_file(tokenizer_config);
  try {
    return std::make_shared<HfTokenizer>(tj, cfg);
  } catch (const json::exception& e) {
    throw Error("tokenizer: unexpected structure in " + tokenizer_json.string() + ": " + e.what());
  }
}

std::shared_ptr<Tokenizer> Tokenizer::from_dir(const std::filesystem::path& dir) {
  auto tj = dir / "tokenizer.json";
  if (!std::filesystem::exists(tj)) throw Error("tokenizer: no tokenizer.json in " + dir.string());
  auto cfg = dir / "tokenizer_config.json";
  return from_files(tj, std::filesystem::exists(cfg) ? cfg : std::filesystem::path());
}

// ---------------------------------------------------------------------------------------------

std::optional<std::string> config_token_content(const nlohmann::json& cfg, const char* key) {
  if (!cfg.contains(key)) return std::nullopt;
  const nlohmann::json& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace moemesh
