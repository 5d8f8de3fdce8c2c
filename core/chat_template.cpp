// Jinja2 subset interpreter for chat templates: lexer -> AST -> tree-walking evaluator.
// Semantics follow Python Jinja2 as configured by transformers (trim_blocks, lstrip_blocks).
#include "core/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"

namespace moemesh {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& msg) { throw Error("chat template: " + msg); }

// ---------------------------------------------------------------------------------------------
// Values

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // keeps insertion order, like Python
using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;
using Func = std::function<Value(Args&, Kwargs&)>;

struct Value {
  enum Kind { Undefined, None, Bool, Int, Float, Str, ListK, DictK, FuncK };
  Kind kind = Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<List> list;  // shared: lists and dicts (namespaces) have reference semantics
  std::shared_ptr<Dict> dict;
  std::shared_ptr<Func> fn;

  static Value none() { Value v; v.kind = None; return v; }
  static Value boolean(bool x) { Value v; v.kind = Bool; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.kind = Int; v.i = x; return v; }
  static Value real(double x) { Value v; v.kind = Float; v.f = x; return v; }
  static Value str(std::string x) { Value v; v.kind = Str; v.s = std::move(x); return v; }
  static Value make_list(List l = {}) { Value v; v.kind = ListK; v.list = std::make_shared<List>(std::move(l)); return v; }
  static Value make_dict(Dict d = {}) { Value v; v.kind = DictK; v.dict = std::make_shared<Dict>(std::move(d)); return v; }
  static Value func(Func f) { Value v; v.kind = FuncK; v.fn = std::make_shared<Func>(std::move(f)); return v; }

  bool is_num() const { return kind == Int || kind == Float || kind == Bool; }
  double num() const { return kind == Float ? f : kind == Int ? static_cast<double>(i) : b ? 1.0 : 0.0; }
  bool defined() const { return kind != Undefined; }

  const Value* find(std::string_view key) const {
    if (kind != DictK) return nullptr;
    for (const auto& [k, v] : *dict)
      if (k == key) return &v;
    return nullptr;
  }
  void set(const std::string& key, Value v) {
    for (auto& [k, old] : *dict)
      if (k == key) {
        old = std::move(v);
        return;
      }
    dict->emplace_back(key, std::move(v));
  }
};

const char* kind_name(const Value& v) {
  switch (v.kind) {
    case Value::Undefined: return "undefined";
    case Value::None: return "none";
    case Value::Bool: return "bool";
    case Value::Int: return "int";
    case Value::Float: return "float";
    case Value::Str: return "string";
    case Value::ListK: return "list";
    case Value::DictK: return "dict";
    case Value::FuncK: return "function";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Undefined:
    case Value::None: return false;
    case Value::Bool: return v.b;
    case Value::Int: return v.i != 0;
    case Value::Float: return v.f != 0;
    case Value::Str: return !v.s.empty();
    case Value::ListK: return !v.list->empty();
    case Value::DictK: return !v.dict->empty();
    case Value::FuncK: return true;
  }
  return false;
}

Value from_json(const json& j) {
  switch (j.type()) {
    case json::value_t::null: return Value::none();
    case json::value_t::boolean: return Value::boolean(j.get<bool>());
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return Value::integer(j.get<int64_t>());
    case json::value_t::number_float: return Value::real(j.get<double>());
    case json::value_t::string: return Value::str(j.get<std::string>());
    case json::value_t::array: {
      List l;
      for (const auto& e : j) l.push_back(from_json(e));
      return Value::make_list(std::move(l));
    }
    case json::value_t::object: {
      Dict d;
      for (auto it = j.begin(); it != j.end(); ++it) d.emplace_back(it.key(), from_json(it.value()));
      return Value::make_dict(std::move(d));
    }
    default: return Value();
  }
}

std::string format_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, x);
  std::string s(buf, r.ptr);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // Python prints 1.0, not 1
  return s;
}

void json_escape(std::string& out, std::string_view s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// Python's json.dumps(ensure_ascii=False) with its default separators, as transformers' tojson.
void to_json_text(std::string& out, const Value& v, int indent, int depth) {
  auto newline = [&](int d) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(indent * d), ' ');
  };
  switch (v.kind) {
    case Value::Undefined:
    case Value::None: out += "null"; break;
    case Value::Bool: out += v.b ? "true" : "false"; break;
    case Value::Int: out += std::to_string(v.i); break;
    case Value::Float: out += format_float(v.f); break;
    case Value::Str: json_escape(out, v.s); break;
    case Value::ListK: {
      if (v.list->empty()) {
        out += "[]";
        break;
      }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += indent < 0 ? ", " : ",";
        newline(depth + 1);
        to_json_text(out, (*v.list)[k], indent, depth + 1);
      }
      newline(depth);
      out += ']';
      break;
    }
    case Value::DictK: {
      if (v.dict->empty()) {
        out += "{}";
        break;
      }
      out += '{';
      size_t k = 0;
      for (const auto& [key, val] : *v.dict) {
        if (k++) out += indent < 0 ? ", " : ",";
        newline(depth + 1);
        json_escape(out, key);
        out += ": ";
        to_json_text(out, val, indent, depth + 1);
      }
      newline(depth);
      out += '}';
      break;
    }
    case Value::FuncK: fail("cannot serialize a function to JSON");
  }
}

std::string repr(const Value& v);

// Python str() of a value, which is what {{ }} prints.
std::string to_str(const Value& v) {
  switch (v.kind) {
    case Value::Undefined: return "";
    case Value::None: return "None";
    case Value::Bool: return v.b ? "True" : "False";
    case Value::Int: return std::to_string(v.i);
    case Value::Float: return format_float(v.f);
    case Value::Str: return v.s;
    default: return repr(v);
  }
}

std::string repr(const Value& v) {
  switch (v.kind) {
    case Value::Str: {
      std::string out = "'";
      for (char c : v.s) {
        if (c == '\'' || c == '\\') out += '\\';
        if (c == '\n') {
          out += "\\n";
          continue;
        }
        out += c;
      }
      return out + "'";
    }
    case Value::ListK: {
      std::string out = "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + repr((*v.list)[k]);
      return out + "]";
    }
    case Value::DictK: {
      std::string out = "{";
      size_t k = 0;
      for (const auto& [key, val] : *v.dict) out += (k++ ? ", " : "") + repr(Value::str(key)) + ": " + repr(val);
      return out + "}";
    }
    case Value::FuncK: return "<function>";
    default: return to_str(v);
  }
}

bool equals(const Value& a, const Value& b) {
  if (a.is_num() && b.is_num()) {
    if (a.kind == Value::Float || b.kind == Value::Float) return a.num() == b.num();
    return (a.kind == Value::Int ? a.i : a.b) == (b.kind == Value::Int ? b.i : b.b);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Undefined:
    case Value::None: return true;
    case Value::Str: return a.s == b.s;
    case Value::ListK:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equals((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case Value::DictK:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, v] : *a.dict) {
        const Value* o = b.find(k);
        if (!o || !equals(v, *o)) return false;
      }
      return true;
    case Value::FuncK: return a.fn == b.fn;
    default: return false;
  }
}

int compare(const Value& a, const Value& b) {
  if (a.is_num() && b.is_num()) return a.num() < b.num() ? -1 : a.num() > b.num() ? 1 : 0;
  if (a.kind == Value::Str && b.kind == Value::Str) return a.s.compare(b.s) < 0 ? -1 : a.s == b.s ? 0 : 1;
  fail(std::string("cannot compare ") + kind_name(a) + " with " + kind_name(b));
}

// Items a for loop or filter walks: list elements, dict keys, string characters.
List iterate(const Value& v) {
  switch (v.kind) {
    case Value::Undefined:
    case Value::None: return {};
    case Value::ListK: return *v.list;
    case Value::DictK: {
      List keys;
      for (const auto& [k, val] : *v.dict) keys.push_back(Value::str(k));
      return keys;
    }
    case Value::Str: {
      List chars;
      for (size_t i = 0; i < v.s.size();) {
        size_t n = 1;
        auto c = static_cast<unsigned char>(v.s[i]);
        if (c >= 0xF0) n = 4;
        else if (c >= 0xE0) n = 3;
        else if (c >= 0xC0) n = 2;
        chars.push_back(Value::str(v.s.substr(i, n)));
        i += n;
      }
      return chars;
    }
    default: fail(std::string("cannot iterate over ") + kind_name(v));
  }
}

std::string strip_chars(std::string s, std::string_view chars, bool left, bool right) {
  if (right) s.erase(s.find_last_not_of(chars) + 1);
  if (left) s.erase(0, std::min(s.find_first_not_of(chars), s.size()));
  return s;
}
constexpr std::string_view kSpace = " \t\n\r\v\f";

// ---------------------------------------------------------------------------------------------
// Lexer

enum class Tok { Text, ExprOpen, ExprClose, StmtOpen, StmtClose, Name, String, Int, Float, Op, End };

struct Token {
  Tok type;
  std::string text;
  size_t line = 1;
};

bool is_name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

class Lexer {
 public:
  explicit Lexer(std::string_view src) : src_(src) {
    // keep_trailing_newline=False: one trailing newline of the template is dropped.
    if (src_.ends_with('\n')) src_.remove_suffix(1);
  }

  std::vector<Token> run() {
    size_t pos = 0;
    bool strip_next = false;  // a "-%}" / "-}}" asked to strip the following whitespace
    while (pos < src_.size()) {
      size_t open = find_open(pos);
      std::string text(src_.substr(pos, open - pos));
      if (strip_next) text = strip_chars(text, kSpace, true, false);
      strip_next = false;
      if (open == src_.size()) {
        emit_text(std::move(text));
        break;
      }
      char kind = src_[open + 1];  // '{', '%' or '#'
      size_t inner = open + 2;
      char mod = inner < src_.size() ? src_[inner] : 0;
      if (mod == '-') {
        text = strip_chars(text, kSpace, false, true);
        ++inner;
      } else if (mod == '+') {
        ++inner;
      } else if (kind != '{' && at_line_start(open)) {
        // lstrip_blocks: indentation before a block or comment tag on its own line goes.
        text = strip_chars(text, " \t", false, true);
      }
      emit_text(std::move(text));

      if (kind == '#') {
        size_t close = src_.find("#}", inner);
        if (close == std::string::npos) fail("unterminated comment");
        strip_next = close > inner && src_[close - 1] == '-';
        pos = trim_block_newline(close + 2, strip_next);
        continue;
      }
      if (kind == '%' && is_raw(inner)) {
        pos = lex_raw(inner);
        continue;
      }
      tokens_.push_back({kind == '{' ? Tok::ExprOpen : Tok::StmtOpen, "", line_at(open)});
      pos = lex_inside(inner, kind == '{' ? "}}" : "%}", &strip_next);
      if (kind == '%') pos = trim_block_newline(pos, strip_next);
    }
    tokens_.push_back({Tok::End, "", line_at(src_.size())});
    return std::move(tokens_);
  }

 private:
  size_t find_open(size_t pos) const {
    for (size_t i = src_.find('{', pos); i != std::string::npos; i = src_.find('{', i + 1))
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    return src_.size();
  }
  bool at_line_start(size_t open) const {
    size_t i = open;
    while (i > 0 && (src_[i - 1] == ' ' || src_[i - 1] == '\t')) --i;
    return i == 0 || src_[i - 1] == '\n';
  }
  // trim_blocks: the first newline after a block tag is removed.
  size_t trim_block_newline(size_t pos, bool already_stripping) const {
    if (!already_stripping && pos < src_.size() && src_[pos] == '\n') return pos + 1;
    return pos;
  }
  size_t line_at(size_t pos) const {
    return 1 + static_cast<size_t>(std::count(src_.begin(), src_.begin() + static_cast<std::ptrdiff_t>(pos), '\n'));
  }
  void emit_text(std::string text) {
    if (!text.empty()) tokens_.push_back({Tok::Text, std::move(text), 0});
  }
  bool is_raw(size_t inner) const {
    size_t i = inner;
    while (i < src_.size() && std::isspace(static_cast<unsigned char>(src_[i]))) ++i;
    return src_.compare(i, 3, "raw") == 0 && i + 3 < src_.size() && !is_name_char(src_[i + 3]);
  }
  size_t lex_raw(size_t inner) {
    size_t close = src_.find("%}", inner);
    if (close == std::string::npos) fail("unterminated raw tag");
    size_t body = close + 2;
    // The body ends at the next {% endraw %} (with optional whitespace / dashes).
    for (size_t at = src_.find("{%", body); at != std::string::npos; at = src_.find("{%", at + 2)) {
      size_t k = at + 2;
      if (k < src_.size() && src_[k] == '-') ++k;
      while (k < src_.size() && std::isspace(static_cast<unsigned char>(src_[k]))) ++k;
      if (src_.compare(k, 6, "endraw") != 0) continue;
      size_t end = src_.find("%}", k);
      if (end == std::string::npos) break;
      std::string text(src_.substr(body, at - body));
      if (src_[at + 2] == '-') text = strip_chars(text, kSpace, false, true);
      emit_text(std::move(text));
      return trim_block_newline(end + 2, false);
    }
    fail("missing {% endraw %}");
  }

  size_t lex_inside(size_t pos, std::string_view close, bool* strip_next) {
    size_t line = line_at(pos);
    while (true) {
      while (pos < src_.size() && std::isspace(static_cast<unsigned char>(src_[pos]))) {
        if (src_[pos] == '\n') ++line;
        ++pos;
      }
      if (pos >= src_.size()) fail("unterminated tag at line " + std::to_string(line));
      if (src_.compare(pos, close.size(), close) == 0 ||
          (src_[pos] == '-' && src_.compare(pos + 1, close.size(), close) == 0)) {
        *strip_next = src_[pos] == '-';
        pos += close.size() + (*strip_next ? 1 : 0);
        tokens_.push_back({close == "}}" ? Tok::ExprClose : Tok::StmtClose, "", line});
        return pos;
      }
      char c = src_[pos];
      if (c == '\'' || c == '"') {
        std::string s;
        size_t i = pos + 1;
        for (; i < src_.size() && src_[i] != c; ++i) {
          if (src_[i] == '\\' && i + 1 < src_.size()) {
            char e = src_[++i];
            switch (e) {
              case 'n': s += '\n'; break;
              case 't': s += '\t'; break;
              case 'r': s += '\r'; break;
              case '\\': s += '\\'; break;
              case '\'': s += '\''; break;
              case '"': s += '"'; break;
              default: s += '\\'; s += e;
            }
          } else {
            if (src_[i] == '\n') ++line;
            s += src_[i];
          }
        }
        if (i >= src_.size()) fail("unterminated string at line " + std::to_string(line));
        tokens_.push_back({Tok::String, std::move(s), line});
        pos = i + 1;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t i = pos;
        while (i < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[i])) || src_[i] == '_')) ++i;
        bool is_float = false;
        if (i + 1 < src_.size() && src_[i] == '.' && std::isdigit(static_cast<unsigned char>(src_[i + 1]))) {
          is_float = true;
          ++i;
          while (i < src_.size() && std::isdigit(static_cast<unsigned char>(src_[i]))) ++i;
        }
        std::string num(src_.substr(pos, i - pos));
        num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
        tokens_.push_back({is_float ? Tok::Float : Tok::Int, num, line});
        pos = i;
      } else if (is_name_start(c)) {
        size_t i = pos;
        while (i < src_.size() && is_name_char(src_[i])) ++i;
        tokens_.push_back({Tok::Name, std::string(src_.substr(pos, i - pos)), line});
        pos = i;
      } else {
        static const char* two[] = {"==", "!=", "<=", ">=", "//", "**"};
        std::string op(1, c);
        for (const char* t : two)
          if (src_.compare(pos, 2, t) == 0) op = t;
        if (std::string_view("+-*/%~|.,:()[]{}=<>!").find(c) == std::string_view::npos)
          fail(std::string("unexpected character '") + c + "' at line " + std::to_string(line));
        tokens_.push_back({Tok::Op, op, line});
        pos += op.size();
      }
    }
  }

  std::string_view src_;
  std::vector<Token> tokens_;
};

// ---------------------------------------------------------------------------------------------
// AST

struct Context;

struct Expr {
  virtual ~Expr() = default;
  virtual Value eval(Context& ctx) const = 0;
};
using ExprP = std::unique_ptr<Expr>;

struct Node {
  virtual ~Node() = default;
  virtual void render(Context& ctx, std::string& out) const = 0;
};
using NodeP = std::unique_ptr<Node>;
using Body = std::vector<NodeP>;

struct LoopBreak {};
struct LoopContinue {};

struct Context {
  std::vector<std::unordered_map<std::string, Value>> scopes;
  const std::map<std::string, std::function<Value(Value&, Args&, Kwargs&)>>* filters = nullptr;

  Value lookup(const std::string& name) const {
    for (auto it = scopes.rbegin(); it != scopes.rend(); ++it)
      if (auto f = it->find(name); f != it->end()) return f->second;
    return Value();
  }
  void assign(const std::string& name, Value v) { scopes.back()[name] = std::move(v); }
};

void render_body(const Body& body, Context& ctx, std::string& out) {
  for (const auto& n : body) n->render(ctx, out);
}

struct Literal : Expr {
  Value v;
  explicit Literal(Value x) : v(std::move(x)) {}
  Value eval(Context&) const override { return v; }
};

struct NameExpr : Expr {
  std::string name;
  Value eval(Context& ctx) const override { return ctx.lookup(name); }
};

struct ListExpr : Expr {
  std::vector<ExprP> items;
  Value eval(Context& ctx) const override {
    List l;
    for (const auto& e : items) l.push_back(e->eval(ctx));
    return Value::make_list(std::move(l));
  }
};

struct DictExpr : Expr {
  std::vector<std::pair<ExprP, ExprP>> items;
  Value eval(Context& ctx) const override {
    Value d = Value::make_dict();
    for (const auto& [k, v] : items) {
      Value key = k->eval(ctx);
      if (key.kind != Value::Str) fail("dict keys must be strings");
      d.set(key.s, v->eval(ctx));
    }
    return d;
  }
};

Value bound_method(const Value& obj, const std::string& name);

// obj.name and obj[key]: dict entries first, then methods of strings, dicts and lists.
Value get_member(const Value& obj, const Value& key) {
  if (obj.kind == Value::DictK && key.kind == Value::Str) {
    if (const Value* v = obj.find(key.s)) return *v;
    return bound_method(obj, key.s);
  }
  if ((obj.kind == Value::ListK || obj.kind == Value::Str) && key.kind == Value::Int) {
    int64_t n = obj.kind == Value::ListK ? static_cast<int64_t>(obj.list->size()) : static_cast<int64_t>(obj.s.size());
    int64_t i = key.i < 0 ? key.i + n : key.i;
    if (i < 0 || i >= n) return Value();
    return obj.kind == Value::ListK ? (*obj.list)[i] : Value::str(obj.s.substr(i, 1));
  }
  if (key.kind == Value::Str) return bound_method(obj, key.s);
  return Value();
}

struct MemberExpr : Expr {
  ExprP obj, key;
  Value eval(Context& ctx) const override { return get_member(obj->eval(ctx), key->eval(ctx)); }
};

struct SliceExpr : Expr {
  ExprP obj, start, stop, step;
  Value eval(Context& ctx) const override {
    Value o = obj->eval(ctx);
    List items = o.kind == Value::Str ? iterate(o) : o.kind == Value::ListK ? *o.list : List{};
    if (o.kind != Value::Str && o.kind != Value::ListK) fail(std::string("cannot slice ") + kind_name(o));
    auto n = static_cast<int64_t>(items.size());
    auto get = [&](const ExprP& e, int64_t dflt) -> std::optional<int64_t> {
      if (!e) return std::nullopt;
      Value v = e->eval(ctx);
      if (v.kind == Value::None || v.kind == Value::Undefined) return std::nullopt;
      if (v.kind != Value::Int) fail("slice indices must be integers");
      (void)dflt;
      return v.i;
    };
    int64_t st = get(step, 1).value_or(1);
    if (st == 0) fail("slice step cannot be zero");
    auto norm = [&](std::optional<int64_t> x, int64_t dflt) {
      if (!x) return dflt;
      int64_t v = *x < 0 ? *x + n : *x;
      return st > 0 ? std::clamp<int64_t>(v, 0, n) : std::clamp<int64_t>(v, -1, n - 1);
    };
    int64_t a = norm(get(start, 0), st > 0 ? 0 : n - 1);
    int64_t b = norm(get(stop, 0), st > 0 ? n : -1);
    List out;
    for (int64_t i = a; st > 0 ? i < b : i > b; i += st) out.push_back(items[i]);
    if (o.kind == Value::Str) {
      std::string s;
      for (const auto& c : out) s += c.s;
      return Value::str(s);
    }
    return Value::make_list(std::move(out));
  }
};

struct CallArgs {
  std::vector<ExprP> args;
  std::vector<std::pair<std::string, ExprP>> kwargs;
  void eval(Context& ctx, Args& a, Kwargs& k) const {
    for (const auto& e : args) a.push_back(e->eval(ctx));
    for (const auto& [n, e] : kwargs) k.emplace_back(n, e->eval(ctx));
  }
};

struct CallExpr : Expr {
  ExprP callee;
  CallArgs args;
  std::string what;  // for error messages
  Value eval(Context& ctx) const override {
    Value f = callee->eval(ctx);
    if (f.kind != Value::FuncK) fail("'" + what + "' is not callable (it is " + kind_name(f) + ")");
    Args a;
    Kwargs k;
    args.eval(ctx, a, k);
    return (*f.fn)(a, k);
  }
};

struct FilterExpr : Expr {
  ExprP operand;
  std::string name;
  CallArgs args;
  Value eval(Context& ctx) const override {
    auto it = ctx.filters->find(name);
    if (it == ctx.filters->end()) fail("unknown filter '" + name + "'");
    Value v = operand->eval(ctx);
    Args a;
    Kwargs k;
    args.eval(ctx, a, k);
    return it->second(v, a, k);
  }
};

bool run_test(const std::string& name, const Value& v, const Args& a) {
  auto arg = [&](size_t i) -> const Value& {
    if (i >= a.size()) fail("test '" + name + "' needs an argument");
    return a[i];
  };
  if (name == "defined") return v.defined();
  if (name == "undefined") return !v.defined();
  if (name == "none") return v.kind == Value::None;
  if (name == "boolean") return v.kind == Value::Bool;
  if (name == "true") return v.kind == Value::Bool && v.b;
  if (name == "false") return v.kind == Value::Bool && !v.b;
  if (name == "integer") return v.kind == Value::Int;
  if (name == "float") return v.kind == Value::Float;
  if (name == "number") return v.kind == Value::Int || v.kind == Value::Float;
  if (name == "string") return v.kind == Value::Str;
  if (name == "mapping") return v.kind == Value::DictK;
  if (name == "sequence") return v.kind == Value::ListK || v.kind == Value::Str;
  if (name == "iterable") return v.kind == Value::ListK || v.kind == Value::Str || v.kind == Value::DictK;
  if (name == "callable") return v.kind == Value::FuncK;
  if (name == "odd" || name == "even") {
    if (v.kind != Value::Int) fail("test '" + name + "' needs an integer");
    return (v.i % 2 != 0) == (name == "odd");
  }
  if (name == "divisibleby") return v.kind == Value::Int && arg(0).kind == Value::Int && arg(0).i && v.i % arg(0).i == 0;
  if (name == "eq" || name == "equalto" || name == "==") return equals(v, arg(0));
  if (name == "ne" || name == "!=") return !equals(v, arg(0));
  if (name == "lt" || name == "lessthan" || name == "<") return compare(v, arg(0)) < 0;
  if (name == "gt" || name == "greaterthan" || name == ">") return compare(v, arg(0)) > 0;
  if (name == "le" || name == "<=") return compare(v, arg(0)) <= 0;
  if (name == "ge" || name == ">=") return compare(v, arg(0)) >= 0;
  if (name == "sameas") return equals(v, arg(0)) && v.kind == arg(0).kind;
  if (name == "in") {
    const Value& c = arg(0);
    if (c.kind == Value::Str) return v.kind == Value::Str && c.s.find(v.s) != std::string::npos;
    for (const auto& e : iterate(c))
      if (equals(e, v)) return true;
    return false;
  }
  fail("unknown test '" + name + "'");
}

struct TestExpr : Expr {
  ExprP operand;
  std::string name;
  CallArgs args;
  bool negate = false;
  Value eval(Context& ctx) const override {
    Value v = operand->eval(ctx);
    Args a;
    Kwargs k;
    args.eval(ctx, a, k);
    return Value::boolean(run_test(name, v, a) != negate);
  }
};

struct NotExpr : Expr {
  ExprP e;
  Value eval(Context& ctx) const override { return Value::boolean(!truthy(e->eval(ctx))); }
};

struct NegExpr : Expr {
  ExprP e;
  Value eval(Context& ctx) const override {
    Value v = e->eval(ctx);
    if (v.kind == Value::Int) return Value::integer(-v.i);
    if (v.kind == Value::Float) return Value::real(-v.f);
    fail(std::string("cannot negate ") + kind_name(v));
  }
};

struct AndOrExpr : Expr {
  bool is_and;
  ExprP l, r;
  Value eval(Context& ctx) const override {
    Value a = l->eval(ctx);  // Python semantics: returns an operand, not a bool
    if (truthy(a) != is_and) return a;
    return r->eval(ctx);
  }
};

struct CondExpr : Expr {
  ExprP test, yes, no;
  Value eval(Context& ctx) const override {
    if (truthy(test->eval(ctx))) return yes->eval(ctx);
    return no ? no->eval(ctx) : Value();
  }
};

int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

Value binary(const std::string& op, const Value& a, const Value& b) {
  auto type_error = [&]() -> Value {
    fail("unsupported operand types for " + op + ": " + kind_name(a) + " and " + kind_name(b));
  };
  if (op == "==") return Value::boolean(equals(a, b));
  if (op == "!=") return Value::boolean(!equals(a, b));
  if (op == "<") return Value::boolean(compare(a, b) < 0);
  if (op == ">") return Value::boolean(compare(a, b) > 0);
  if (op == "<=") return Value::boolean(compare(a, b) <= 0);
  if (op == ">=") return Value::boolean(compare(a, b) >= 0);
  if (op == "in" || op == "not in") return Value::boolean(run_test("in", a, Args{b}) == (op == "in"));
  if (op == "~") return Value::str(to_str(a) + to_str(b));
  bool ints = (a.kind == Value::Int || a.kind == Value::Bool) && (b.kind == Value::Int || b.kind == Value::Bool);
  int64_t ai = a.kind == Value::Int ? a.i : a.b, bi = b.kind == Value::Int ? b.i : b.b;
  if (op == "+") {
    if (a.kind == Value::Str && b.kind == Value::Str) return Value::str(a.s + b.s);
    if (a.kind == Value::ListK && b.kind == Value::ListK) {
      List l = *a.list;
      l.insert(l.end(), b.list->begin(), b.list->end());
      return Value::make_list(std::move(l));
    }
    if (!a.is_num() || !b.is_num()) return type_error();
    return ints ? Value::integer(ai + bi) : Value::real(a.num() + b.num());
  }
  if (op == "*") {
    if (a.kind == Value::Str && b.kind == Value::Int) {
      std::string s;
      for (int64_t k = 0; k < b.i; ++k) s += a.s;
      return Value::str(s);
    }
    if (!a.is_num() || !b.is_num()) return type_error();
    return ints ? Value::integer(ai * bi) : Value::real(a.num() * b.num());
  }
  if (!a.is_num() || !b.is_num()) return type_error();
  if (op == "-") return ints ? Value::integer(ai - bi) : Value::real(a.num() - b.num());
  if (op == "/") {
    if (b.num() == 0) fail("division by zero");
    return Value::real(a.num() / b.num());
  }
  if (op == "//") {
    if (b.num() == 0) fail("division by zero");
    return ints ? Value::integer(floor_div(ai, bi)) : Value::real(std::floor(a.num() / b.num()));
  }
  if (op == "%") {
    if (b.num() == 0) fail("modulo by zero");
    if (ints) return Value::integer(ai - floor_div(ai, bi) * bi);  // sign follows the divisor
    double m = std::fmod(a.num(), b.num());
    if (m != 0 && ((m < 0) != (b.num() < 0))) m += b.num();
    return Value::real(m);
  }
  if (op == "**") {
    if (ints && bi >= 0) {
      int64_t r = 1;
      for (int64_t k = 0; k < bi; ++k) r *= ai;
      return Value::integer(r);
    }
    return Value::real(std::pow(a.num(), b.num()));
  }
  fail("unknown operator " + op);
}

struct BinaryExpr : Expr {
  std::string op;
  ExprP l, r;
  Value eval(Context& ctx) const override { return binary(op, l->eval(ctx), r->eval(ctx)); }
};

// Statements

struct TextNode : Node {
  std::string text;
  void render(Context&, std::string& out) const override { out += text; }
};

struct OutputNode : Node {
  ExprP e;
  void render(Context& ctx, std::string& out) const override { out += to_str(e->eval(ctx)); }
};

struct IfNode : Node {
  std::vector<std::pair<ExprP, Body>> branches;
  Body otherwise;
  void render(Context& ctx, std::string& out) const override {
    for (const auto& [test, body] : branches)
      if (truthy(test->eval(ctx))) return render_body(body, ctx, out);
    render_body(otherwise, ctx, out);
  }
};

// Assignment targets: a name, a namespace attribute (ns.x) or a tuple of names.
struct Target {
  std::vector<std::string> names;  // one name, or several for tuple unpacking
  ExprP object;                    // for ns.attr: the object; names[0] is the attribute
  void assign(Context& ctx, const Value& v) const {
    if (object) {
      Value obj = object->eval(ctx);
      if (obj.kind != Value::DictK) fail("cannot set attribute '" + names[0] + "' on " + kind_name(obj));
      obj.set(names[0], v);
      return;
    }
    if (names.size() == 1) return ctx.assign(names[0], v);
    List items = iterate(v);
    if (items.size() != names.size())
      fail("cannot unpack " + std::to_string(items.size()) + " values into " + std::to_string(names.size()) + " names");
    for (size_t k = 0; k < names.size(); ++k) ctx.assign(names[k], items[k]);
  }
};

struct ForNode : Node {
  Target target;
  ExprP iterable, filter;
  Body body, otherwise;
  void render(Context& ctx, std::string& out) const override {
    List all = iterate(iterable->eval(ctx));
    ctx.scopes.emplace_back();
    List items;
    for (auto& item : all) {
      if (filter) {
        target.assign(ctx, item);
        if (!truthy(filter->eval(ctx))) continue;
      }
      items.push_back(std::move(item));
    }
    auto n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      target.assign(ctx, items[k]);
      Dict loop{{"index", Value::integer(k + 1)},
                {"index0", Value::integer(k)},
                {"revindex", Value::integer(n - k)},
                {"revindex0", Value::integer(n - k - 1)},
                {"first", Value::boolean(k == 0)},
                {"last", Value::boolean(k == n - 1)},
                {"length", Value::integer(n)},
                {"previtem", k > 0 ? items[k - 1] : Value()},
                {"nextitem", k + 1 < n ? items[k + 1] : Value()}};
      ctx.assign("loop", Value::make_dict(std::move(loop)));
      try {
        render_body(body, ctx, out);
      } catch (const LoopBreak&) {
        break;
      } catch (const LoopContinue&) {
      }
    }
    ctx.scopes.pop_back();
    if (items.empty()) render_body(otherwise, ctx, out);
  }
};

struct SetNode : Node {
  Target target;
  ExprP value;
  Body block;  // {% set x %}...{% endset %}
  void render(Context& ctx, std::string&) const override {
    if (value) return target.assign(ctx, value->eval(ctx));
    std::string captured;
    render_body(block, ctx, captured);
    target.assign(ctx, Value::str(captured));
  }
};

struct MacroNode : Node {
  std::string name;
  std::vector<std::pair<std::string, ExprP>> params;  // default may be null
  Body body;
  void render(Context& ctx, std::string&) const override {
    const MacroNode* self = this;
    Context* c = &ctx;  // macros run during the same render
    ctx.assign(name, Value::func([self, c](Args& a, Kwargs& k) {
      c->scopes.emplace_back();
      for (size_t p = 0; p < self->params.size(); ++p) {
        const auto& [pname, dflt] = self->params[p];
        Value v;
        if (p < a.size()) {
          v = a[p];
        } else {
          bool found = false;
          for (auto& [kn, kv] : k)
            if (kn == pname) v = kv, found = true;
          if (!found && dflt) v = dflt->eval(*c);
        }
        c->assign(pname, v);
      }
      std::string out;
      try {
        render_body(self->body, *c, out);
      } catch (...) {
        c->scopes.pop_back();
        throw;
      }
      c->scopes.pop_back();
      return Value::str(out);
    }));
  }
};

struct BreakNode : Node {
  bool is_break;
  void render(Context&, std::string&) const override {
    if (is_break) throw LoopBreak{};
    throw LoopContinue{};
  }
};

struct BlockNode : Node {  // {% generation %}: renders its body as is
  Body body;
  void render(Context& ctx, std::string& out) const override { render_body(body, ctx, out); }
};

// ---------------------------------------------------------------------------------------------
// Parser

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  Body parse_template() {
    std::string end;
    Body body = parse_body({}, &end);
    return body;
  }

 private:
  const Token& peek(size_t k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool is_op(const char* op, size_t k = 0) const { return peek(k).type == Tok::Op && peek(k).text == op; }
  bool is_name(const char* n, size_t k = 0) const { return peek(k).type == Tok::Name && peek(k).text == n; }
  [[noreturn]] void error(const std::string& msg) const {
    fail(msg + " at line " + std::to_string(peek().line) + (peek().text.empty() ? "" : " near '" + peek().text + "'"));
  }
  void expect_op(const char* op) {
    if (!is_op(op)) error(std::string("expected '") + op + "'");
    ++p_;
  }
  std::string expect_name() {
    if (peek().type != Tok::Name) error("expected a name");
    return t_[p_++].text;
  }
  void expect(Tok type, const char* what) {
    if (peek().type != type) error(std::string("expected ") + what);
    ++p_;
  }

  // Parses nodes until a {% tag %} whose keyword is in `ends`; leaves p_ after that keyword.
  Body parse_body(const std::vector<std::string>& ends, std::string* end_found) {
    Body body;
    while (true) {
      const Token& tok = peek();
      if (tok.type == Tok::End) {
        if (!ends.empty()) error("missing {% " + ends.back() + " %}");
        return body;
      }
      if (tok.type == Tok::Text) {
        auto n = std::make_unique<TextNode>();
        n->text = tok.text;
        body.push_back(std::move(n));
        ++p_;
      } else if (tok.type == Tok::ExprOpen) {
        ++p_;
        auto n = std::make_unique<OutputNode>();
        n->e = parse_expr();
        expect(Tok::ExprClose, "'}}'");
        body.push_back(std::move(n));
      } else if (tok.type == Tok::StmtOpen) {
        if (peek(1).type != Tok::Name) error("expected a statement");
        std::string kw = peek(1).text;
        if (std::find(ends.begin(), ends.end(), kw) != ends.end()) {
          p_ += 2;
          *end_found = kw;
          return body;
        }
        p_ += 2;
        body.push_back(parse_statement(kw));
      } else {
        error("unexpected token");
      }
    }
  }

  NodeP parse_statement(const std::string& kw) {
    if (kw == "if") return parse_if();
    if (kw == "for") return parse_for();
    if (kw == "set") return parse_set();
    if (kw == "macro") return parse_macro();
    if (kw == "break" || kw == "continue") {
      expect(Tok::StmtClose, "'%}'");
      auto n = std::make_unique<BreakNode>();
      n->is_break = kw == "break";
      return n;
    }
    if (kw == "generation") {
      expect(Tok::StmtClose, "'%}'");
      auto n = std::make_unique<BlockNode>();
      std::string end;
      n->body = parse_body({"endgeneration"}, &end);
      expect(Tok::StmtClose, "'%}'");
      return n;
    }
    --p_;
    error("unknown or misplaced tag '" + kw + "'");
  }

  NodeP parse_if() {
    auto n = std::make_unique<IfNode>();
    ExprP test = parse_expr();
    expect(Tok::StmtClose, "'%}'");
    while (true) {
      std::string end;
      Body body = parse_body({"elif", "else", "endif"}, &end);
      n->branches.emplace_back(std::move(test), std::move(body));
      if (end == "elif") {
        test = parse_expr();
        expect(Tok::StmtClose, "'%}'");
        continue;
      }
      expect(Tok::StmtClose, "'%}'");
      if (end == "else") {
        n->otherwise = parse_body({"endif"}, &end);
        expect(Tok::StmtClose, "'%}'");
      }
      return n;
    }
  }

  Target parse_target(bool allow_attr) {
    Target t;
    t.names.push_back(expect_name());
    if (allow_attr && is_op(".")) {
      ++p_;
      auto obj = std::make_unique<NameExpr>();
      obj->name = t.names[0];
      t.object = std::move(obj);
      t.names[0] = expect_name();
      return t;
    }
    while (is_op(",")) {
      ++p_;
      t.names.push_back(expect_name());
    }
    return t;
  }

  NodeP parse_for() {
    auto n = std::make_unique<ForNode>();
    n->target = parse_target(false);
    if (!is_name("in")) error("expected 'in'");
    ++p_;
    n->iterable = parse_or();  // not parse_expr: a trailing `if` filters the loop
    if (is_name("if")) {
      ++p_;
      n->filter = parse_or();
    }
    expect(Tok::StmtClose, "'%}'");
    std::string end;
    n->body = parse_body({"else", "endfor"}, &end);
    expect(Tok::StmtClose, "'%}'");
    if (end == "else") {
      n->otherwise = parse_body({"endfor"}, &end);
      expect(Tok::StmtClose, "'%}'");
    }
    return n;
  }

  NodeP parse_set() {
    auto n = std::make_unique<SetNode>();
    n->target = parse_target(true);
    if (is_op("=")) {
      ++p_;
      n->value = parse_expr();
      if (is_op(",")) {  // set a = 1, 2 builds a tuple
        auto l = std::make_unique<ListExpr>();
        l->items.push_back(std::move(n->value));
        while (is_op(",")) {
          ++p_;
          l->items.push_back(parse_expr());
        }
        n->value = std::move(l);
      }
      expect(Tok::StmtClose, "'%}'");
      return n;
    }
    expect(Tok::StmtClose, "'%}'");
    std::string end;
    n->block = parse_body({"endset"}, &end);
    expect(Tok::StmtClose, "'%}'");
    return n;
  }

  NodeP parse_macro() {
    auto n = std::make_unique<MacroNode>();
    n->name = expect_name();
    expect_op("(");
    while (!is_op(")")) {
      std::string pname = expect_name();
      ExprP dflt;
      if (is_op("=")) {
        ++p_;
        dflt = parse_expr();
      }
      n->params.emplace_back(pname, std::move(dflt));
      if (!is_op(")")) expect_op(",");
    }
    ++p_;
    expect(Tok::StmtClose, "'%}'");
    std::string end;
    n->body = parse_body({"endmacro"}, &end);
    expect(Tok::StmtClose, "'%}'");
    return n;
  }

  // Expressions, lowest precedence first (as Jinja2's parser).
  ExprP parse_expr() {
    ExprP e = parse_or();
    if (is_name("if")) {
      ++p_;
      auto c = std::make_unique<CondExpr>();
      c->yes = std::move(e);
      c->test = parse_or();
      if (is_name("else")) {
        ++p_;
        c->no = parse_expr();
      }
      return c;
    }
    return e;
  }

  ExprP parse_or() {
    ExprP e = parse_and();
    while (is_name("or")) {
      ++p_;
      auto n = std::make_unique<AndOrExpr>();
      n->is_and = false;
      n->l = std::move(e);
      n->r = parse_and();
      e = std::move(n);
    }
    return e;
  }

  ExprP parse_and() {
    ExprP e = parse_not();
    while (is_name("and")) {
      ++p_;
      auto n = std::make_unique<AndOrExpr>();
      n->is_and = true;
      n->l = std::move(e);
      n->r = parse_not();
      e = std::move(n);
    }
    return e;
  }

  ExprP parse_not() {
    if (is_name("not")) {
      ++p_;
      auto n = std::make_unique<NotExpr>();
      n->e = parse_not();
      return n;
    }
    return parse_compare();
  }

  ExprP parse_compare() {
    ExprP e = parse_add();
    while (true) {
      std::string op;
      if (peek().type == Tok::Op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                     peek().text == ">" || peek().text == "<=" || peek().text == ">=")) {
        op = peek().text;
        ++p_;
      } else if (is_name("in")) {
        op = "in";
        ++p_;
      } else if (is_name("not") && is_name("in", 1)) {
        op = "not in";
        p_ += 2;
      } else {
        return e;
      }
      auto n = std::make_unique<BinaryExpr>();
      n->op = op;
      n->l = std::move(e);
      n->r = parse_add();
      e = std::move(n);
    }
  }

  ExprP binary_chain(ExprP (Parser::*next)(), std::initializer_list<const char*> ops) {
    ExprP e = (this->*next)();
    while (true) {
      const char* found = nullptr;
      for (const char* op : ops)
        if (is_op(op)) found = op;
      if (!found) return e;
      ++p_;
      auto n = std::make_unique<BinaryExpr>();
      n->op = found;
      n->l = std::move(e);
      n->r = (this->*next)();
      e = std::move(n);
    }
  }
  ExprP parse_add() { return binary_chain(&Parser::parse_concat, {"+", "-"}); }
  ExprP parse_concat() { return binary_chain(&Parser::parse_mul, {"~"}); }
  ExprP parse_mul() { return binary_chain(&Parser::parse_pow, {"*", "/", "//", "%"}); }
  ExprP parse_pow() { return binary_chain(&Parser::parse_unary, {"**"}); }

  ExprP parse_unary() {
    if (is_op("-")) {
      ++p_;
      auto n = std::make_unique<NegExpr>();
      n->e = parse_unary_no_filter();
      return parse_filters(std::move(n));
    }
    if (is_op("+")) {
      ++p_;
      return parse_filters(parse_unary_no_filter());
    }
    return parse_filters(parse_postfix(parse_primary()));
  }
  ExprP parse_unary_no_filter() {
    if (is_op("-")) {
      ++p_;
      auto n = std::make_unique<NegExpr>();
      n->e = parse_unary_no_filter();
      return n;
    }
    return parse_postfix(parse_primary());
  }

  void parse_call_args(CallArgs& out) {
    expect_op("(");
    while (!is_op(")")) {
      if (peek().type == Tok::Name && is_op("=", 1)) {
        std::string k = t_[p_].text;
        p_ += 2;
        out.kwargs.emplace_back(k, parse_expr());
      } else {
        out.args.push_back(parse_expr());
      }
      if (!is_op(")")) expect_op(",");
    }
    ++p_;
  }

  static std::string describe(const Expr* e) {
    if (auto n = dynamic_cast<const NameExpr*>(e)) return n->name;
    if (auto m = dynamic_cast<const MemberExpr*>(e))
      if (auto k = dynamic_cast<const Literal*>(m->key.get()); k && k->v.kind == Value::Str)
        return describe(m->obj.get()) + "." + k->v.s;
    return "expression";
  }

  ExprP parse_postfix(ExprP e) {
    while (true) {
      if (is_op(".")) {
        ++p_;
        auto m = std::make_unique<MemberExpr>();
        m->obj = std::move(e);
        if (peek().type == Tok::Int) {
          m->key = std::make_unique<Literal>(Value::integer(std::stoll(t_[p_++].text)));
        } else {
          m->key = std::make_unique<Literal>(Value::str(expect_name()));
        }
        e = std::move(m);
      } else if (is_op("[")) {
        ++p_;
        ExprP parts[3];
        int n = 0;
        bool slice = false;
        while (!is_op("]")) {
          if (is_op(":")) {
            slice = true;
            ++p_;
            if (++n > 2) error("too many ':' in slice");
            continue;
          }
          parts[n] = parse_expr();
        }
        ++p_;
        if (slice) {
          auto s = std::make_unique<SliceExpr>();
          s->obj = std::move(e);
          s->start = std::move(parts[0]);
          s->stop = std::move(parts[1]);
          s->step = std::move(parts[2]);
          e = std::move(s);
        } else {
          if (!parts[0]) error("empty subscript");
          auto m = std::make_unique<MemberExpr>();
          m->obj = std::move(e);
          m->key = std::move(parts[0]);
          e = std::move(m);
        }
      } else if (is_op("(")) {
        auto c = std::make_unique<CallExpr>();
        c->what = describe(e.get());
        c->callee = std::move(e);
        parse_call_args(c->args);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  bool starts_primary() const {
    const Token& t = peek();
    if (t.type == Tok::String || t.type == Tok::Int || t.type == Tok::Float) return true;
    if (t.type == Tok::Name) {
      static const char* kw[] = {"and", "or", "not", "in", "is", "if", "else"};
      for (const char* k : kw)
        if (t.text == k) return false;
      return true;
    }
    return t.type == Tok::Op && (t.text == "[" || t.text == "{");
  }

  ExprP parse_filters(ExprP e) {
    while (true) {
      if (is_op("|")) {
        ++p_;
        auto f = std::make_unique<FilterExpr>();
        f->operand = std::move(e);
        f->name = expect_name();
        if (is_op("(")) parse_call_args(f->args);
        e = std::move(f);
      } else if (is_name("is")) {
        ++p_;
        auto t = std::make_unique<TestExpr>();
        t->operand = std::move(e);
        if (is_name("not")) {
          t->negate = true;
          ++p_;
        }
        if (peek().type == Tok::Name) {
          t->name = expect_name();
        } else if (peek().type == Tok::Op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                              peek().text == ">" || peek().text == "<=" || peek().text == ">=")) {
          t->name = t_[p_++].text;
        } else {
          error("expected a test name");
        }
        if (is_op("(")) {
          parse_call_args(t->args);
        } else if (starts_primary()) {  // `is divisibleby 3`, `is sameas false`
          t->args.args.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  ExprP parse_primary() {
    const Token& t = peek();
    switch (t.type) {
      case Tok::String: {
        std::string s = t.text;
        ++p_;
        while (peek().type == Tok::String) s += t_[p_++].text;  // adjacent literals concatenate
        return std::make_unique<Literal>(Value::str(s));
      }
      case Tok::Int: ++p_; return std::make_unique<Literal>(Value::integer(std::stoll(t.text)));
      case Tok::Float: ++p_; return std::make_unique<Literal>(Value::real(std::stod(t.text)));
      case Tok::Name: {
        ++p_;
        if (t.text == "true" || t.text == "True") return std::make_unique<Literal>(Value::boolean(true));
        if (t.text == "false" || t.text == "False") return std::make_unique<Literal>(Value::boolean(false));
        if (t.text == "none" || t.text == "None") return std::make_unique<Literal>(Value::none());
        auto n = std::make_unique<NameExpr>();
        n->name = t.text;
        return n;
      }
      case Tok::Op:
        if (t.text == "(") {
          ++p_;
          ExprP e = parse_expr();
          if (is_op(",")) {  // tuple
            auto l = std::make_unique<ListExpr>();
            l->items.push_back(std::move(e));
            while (is_op(",")) {
              ++p_;
              if (is_op(")")) break;
              l->items.push_back(parse_expr());
            }
            e = std::move(l);
          }
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          ++p_;
          auto l = std::make_unique<ListExpr>();
          while (!is_op("]")) {
            l->items.push_back(parse_expr());
            if (!is_op("]")) expect_op(",");
          }
          ++p_;
          return l;
        }
        if (t.text == "{") {
          ++p_;
          auto d = std::make_unique<DictExpr>();
          while (!is_op("}")) {
            ExprP k = parse_expr();
            expect_op(":");
            d->items.emplace_back(std::move(k), parse_expr());
            if (!is_op("}")) expect_op(",");
          }
          ++p_;
          return d;
        }
        break;
      default: break;
    }
    error("unexpected token in expression");
  }

  std::vector<Token> t_;
  size_t p_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Builtins

const Value* kwarg(const Kwargs& k, std::string_view name) {
  for (const auto& [n, v] : k)
    if (n == name) return &v;
  return nullptr;
}
// Positional argument i, or keyword `name`, or nullptr.
const Value* param(const Args& a, const Kwargs& k, size_t i, std::string_view name) {
  if (i < a.size()) return &a[i];
  return kwarg(k, name);
}
std::string str_param(const Args& a, const Kwargs& k, size_t i, std::string_view name, std::string dflt) {
  const Value* v = param(a, k, i, name);
  return v && v->defined() && v->kind != Value::None ? to_str(*v) : dflt;
}

std::string title_case(const std::string& s) {
  std::string out = s;
  bool start = true;
  for (char& c : out) {
    auto u = static_cast<unsigned char>(c);
    if (std::isalpha(u)) {
      c = static_cast<char>(start ? std::toupper(u) : std::tolower(u));
      start = false;
    } else {
      start = !std::isalnum(u) && u < 0x80;
    }
  }
  return out;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

Value bound_method(const Value& obj, const std::string& name) {
  if (obj.kind == Value::Str) {
    const std::string s = obj.s;
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return Value::func([s, name](Args& a, Kwargs& k) {
        std::string chars = str_param(a, k, 0, "chars", std::string(kSpace));
        return Value::str(strip_chars(s, chars, name != "rstrip", name != "lstrip"));
      });
    if (name == "upper") return Value::func([s](Args&, Kwargs&) { return Value::str(upper(s)); });
    if (name == "lower") return Value::func([s](Args&, Kwargs&) { return Value::str(lower(s)); });
    if (name == "title") return Value::func([s](Args&, Kwargs&) { return Value::str(title_case(s)); });
    if (name == "capitalize")
      return Value::func([s](Args&, Kwargs&) {
        std::string r = lower(s);
        if (!r.empty()) r[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(r[0])));
        return Value::str(r);
      });
    if (name == "startswith" || name == "endswith")
      return Value::func([s, name](Args& a, Kwargs& k) {
        const Value* p = param(a, k, 0, "prefix");
        if (!p) fail(name + "() needs an argument");
        List options = p->kind == Value::ListK ? *p->list : List{*p};
        for (const auto& o : options) {
          if (o.kind != Value::Str) fail(name + "() needs strings");
          if (name == "startswith" ? s.starts_with(o.s) : s.ends_with(o.s)) return Value::boolean(true);
        }
        return Value::boolean(false);
      });
    if (name == "split")
      return Value::func([s](Args& a, Kwargs& k) {
        List parts;
        const Value* sep = param(a, k, 0, "sep");
        if (!sep || sep->kind == Value::None) {  // split on runs of whitespace
          size_t i = 0;
          while (true) {
            i = s.find_first_not_of(kSpace, i);
            if (i == std::string::npos) break;
            size_t j = std::min(s.find_first_of(kSpace, i), s.size());
            parts.push_back(Value::str(s.substr(i, j - i)));
            i = j;
          }
        } else {
          if (sep->kind != Value::Str || sep->s.empty()) fail("split() needs a non-empty separator");
          size_t i = 0;
          for (size_t j; (j = s.find(sep->s, i)) != std::string::npos; i = j + sep->s.size())
            parts.push_back(Value::str(s.substr(i, j - i)));
          parts.push_back(Value::str(s.substr(i)));
        }
        return Value::make_list(std::move(parts));
      });
    if (name == "replace")
      return Value::func([s](Args& a, Kwargs&) {
        if (a.size() < 2 || a[0].kind != Value::Str || a[1].kind != Value::Str) fail("replace() needs two strings");
        std::string out;
        if (a[0].s.empty()) return Value::str(s);
        size_t i = 0;
        for (size_t j; (j = s.find(a[0].s, i)) != std::string::npos; i = j + a[0].s.size())
          out += s.substr(i, j - i) + a[1].s;
        return Value::str(out + s.substr(i));
      });
  }
  if (obj.kind == Value::DictK) {
    const Value d = obj;
    if (name == "get")
      return Value::func([d](Args& a, Kwargs&) {
        if (a.empty() || a[0].kind != Value::Str) fail("get() needs a string key");
        const Value* v = d.find(a[0].s);
        return v ? *v : a.size() > 1 ? a[1] : Value::none();
      });
    if (name == "items" || name == "keys" || name == "values")
      return Value::func([d, name](Args&, Kwargs&) {
        List out;
        for (const auto& [k, v] : *d.dict) {
          if (name == "items") out.push_back(Value::make_list({Value::str(k), v}));
          else out.push_back(name == "keys" ? Value::str(k) : v);
        }
        return Value::make_list(std::move(out));
      });
  }
  return Value();
}

using FilterFn = std::function<Value(Value&, Args&, Kwargs&)>;

std::map<std::string, FilterFn> make_filters() {
  std::map<std::string, FilterFn> f;
  auto need_str = [](const Value& v, const char* filter) -> const std::string& {
    if (v.kind != Value::Str) fail(std::string("filter '") + filter + "' needs a string, got " + kind_name(v));
    return v.s;
  };
  f["trim"] = [need_str](Value& v, Args& a, Kwargs& k) {
    return Value::str(strip_chars(need_str(v, "trim"), str_param(a, k, 0, "chars", std::string(kSpace)), true, true));
  };
  f["length"] = [](Value& v, Args&, Kwargs&) {
    switch (v.kind) {
      case Value::Str: return Value::integer(static_cast<int64_t>(iterate(v).size()));
      case Value::ListK: return Value::integer(static_cast<int64_t>(v.list->size()));
      case Value::DictK: return Value::integer(static_cast<int64_t>(v.dict->size()));
      case Value::Undefined: return Value::integer(0);
      default: fail(std::string("object of type ") + kind_name(v) + " has no length");
    }
  };
  f["count"] = f["length"];
  f["tojson"] = [](Value& v, Args& a, Kwargs& k) {
    const Value* ind = param(a, k, 0, "indent");
    int indent = ind && ind->kind == Value::Int ? static_cast<int>(ind->i) : -1;
    std::string out;
    to_json_text(out, v, indent, 0);
    return Value::str(out);
  };
  f["upper"] = [need_str](Value& v, Args&, Kwargs&) { return Value::str(upper(need_str(v, "upper"))); };
  f["lower"] = [need_str](Value& v, Args&, Kwargs&) { return Value::str(lower(need_str(v, "lower"))); };
  f["title"] = [need_str](Value& v, Args&, Kwargs&) { return Value::str(title_case(need_str(v, "title"))); };
  f["string"] = [](Value& v, Args&, Kwargs&) { return Value::str(to_str(v)); };
  f["safe"] = [](Value& v, Args&, Kwargs&) { return v; };
  f["int"] = [](Value& v, Args&, Kwargs&) {
    if (v.kind == Value::Int) return v;
    if (v.is_num()) return Value::integer(static_cast<int64_t>(v.num()));
    if (v.kind == Value::Str) {
      try {
        return Value::integer(std::stoll(v.s));
      } catch (...) {
      }
    }
    return Value::integer(0);
  };
  f["float"] = [](Value& v, Args&, Kwargs&) {
    if (v.is_num()) return Value::real(v.num());
    if (v.kind == Value::Str) {
      try {
        return Value::real(std::stod(v.s));
      } catch (...) {
      }
    }
    return Value::real(0);
  };
  f["abs"] = [](Value& v, Args&, Kwargs&) {
    if (v.kind == Value::Int) return Value::integer(v.i < 0 ? -v.i : v.i);
    if (v.kind == Value::Float) return Value::real(std::fabs(v.f));
    fail("abs needs a number");
  };
  f["round"] = [](Value& v, Args& a, Kwargs& k) {
    const Value* p = param(a, k, 0, "precision");
    int64_t digits = p && p->kind == Value::Int ? p->i : 0;
    double scale = std::pow(10.0, static_cast<double>(digits));
    return Value::real(std::nearbyint(v.num() * scale) / scale);
  };
  f["default"] = [](Value& v, Args& a, Kwargs& k) {
    const Value* d = param(a, k, 0, "default_value");
    const Value* b = param(a, k, 1, "boolean");
    bool use = !v.defined() || (b && truthy(*b) && !truthy(v));
    return use ? (d ? *d : Value::str("")) : v;
  };
  f["d"] = f["default"];
  f["join"] = [](Value& v, Args& a, Kwargs& k) {
    std::string sep = str_param(a, k, 0, "d", "");
    const Value* attr = param(a, k, 1, "attribute");
    std::string out;
    size_t n = 0;
    for (const auto& e : iterate(v)) {
      if (n++) out += sep;
      out += to_str(attr ? get_member(e, *attr) : e);
    }
    return Value::str(out);
  };
  f["first"] = [](Value& v, Args&, Kwargs&) {
    List l = iterate(v);
    return l.empty() ? Value() : l.front();
  };
  f["last"] = [](Value& v, Args&, Kwargs&) {
    List l = iterate(v);
    return l.empty() ? Value() : l.back();
  };
  f["list"] = [](Value& v, Args&, Kwargs&) { return Value::make_list(iterate(v)); };
  f["reverse"] = [](Value& v, Args&, Kwargs&) {
    List l = iterate(v);
    std::reverse(l.begin(), l.end());
    if (v.kind == Value::Str) {
      std::string s;
      for (const auto& c : l) s += c.s;
      return Value::str(s);
    }
    return Value::make_list(std::move(l));
  };
  f["replace"] = [](Value& v, Args& a, Kwargs& k) { return (*bound_method(Value::str(to_str(v)), "replace").fn)(a, k); };
  f["items"] = [](Value& v, Args& a, Kwargs& k) {
    if (v.kind != Value::DictK) fail("items needs a dict");
    return (*bound_method(v, "items").fn)(a, k);
  };
  f["dictsort"] = [](Value& v, Args&, Kwargs&) {
    if (v.kind != Value::DictK) fail("dictsort needs a dict");
    Dict d = *v.dict;
    std::stable_sort(d.begin(), d.end(), [](const auto& x, const auto& y) { return lower(x.first) < lower(y.first); });
    List out;
    for (auto& [key, val] : d) out.push_back(Value::make_list({Value::str(key), val}));
    return Value::make_list(std::move(out));
  };
  f["unique"] = [](Value& v, Args&, Kwargs&) {
    List out;
    for (const auto& e : iterate(v))
      if (std::none_of(out.begin(), out.end(), [&](const Value& o) { return equals(o, e); })) out.push_back(e);
    return Value::make_list(std::move(out));
  };
  f["sort"] = [](Value& v, Args& a, Kwargs& k) {
    List l = iterate(v);
    const Value* rev = param(a, k, 0, "reverse");
    const Value* attr = kwarg(k, "attribute");
    std::stable_sort(l.begin(), l.end(), [&](const Value& x, const Value& y) {
      return compare(attr ? get_member(x, *attr) : x, attr ? get_member(y, *attr) : y) < 0;
    });
    if (rev && truthy(*rev)) std::reverse(l.begin(), l.end());
    return Value::make_list(std::move(l));
  };
  f["indent"] = [need_str](Value& v, Args& a, Kwargs& k) {
    const Value* w = param(a, k, 0, "width");
    const Value* first = param(a, k, 1, "first");
    std::string pad = w && w->kind == Value::Str ? w->s : std::string(w && w->kind == Value::Int ? w->i : 4, ' ');
    const std::string& s = need_str(v, "indent");
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
      out += s[i];
      if (s[i] == '\n' && i + 1 < s.size() && s[i + 1] != '\n') out += pad;
    }
    return Value::str(first && truthy(*first) ? pad + out : out);
  };
  f["e"] = [](Value& v, Args&, Kwargs&) {
    std::string out;
    for (char c : to_str(v)) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&#34;"; break;
        case '\'': out += "&#39;"; break;
        default: out += c;
      }
    }
    return Value::str(out);
  };
  f["escape"] = f["e"];
  // selectattr/rejectattr("attr"[, "test", arg]), select/reject("test"[, arg]), map(attribute=..|"filter")
  auto select = [](bool by_attr, bool keep) {
    return [by_attr, keep](Value& v, Args& a, Kwargs&) {
      List out;
      size_t t = by_attr ? 1 : 0;
      if (by_attr && a.empty()) fail("selectattr needs an attribute name");
      std::string test = a.size() > t ? to_str(a[t]) : "";
      Args targs(a.begin() + static_cast<std::ptrdiff_t>(std::min(a.size(), t + 1)), a.end());
      for (const auto& e : iterate(v)) {
        Value x = by_attr ? get_member(e, a[0]) : e;
        bool ok = test.empty() ? truthy(x) : run_test(test, x, targs);
        if (ok == keep) out.push_back(e);
      }
      return Value::make_list(std::move(out));
    };
  };
  f["selectattr"] = select(true, true);
  f["rejectattr"] = select(true, false);
  f["select"] = select(false, true);
  f["reject"] = select(false, false);
  return f;
}

const std::map<std::string, FilterFn>& filters() {
  static const std::map<std::string, FilterFn> table = [] {
    auto f = make_filters();
    f["capitalize"] = [](Value& v, Args&, Kwargs& k) {
      Args none;
      return (*bound_method(Value::str(to_str(v)), "capitalize").fn)(none, k);
    };
    f["map"] = [](Value& v, Args& a, Kwargs& k) {
      List out;
      const Value* attr = kwarg(k, "attribute");
      for (const auto& e : iterate(v)) {
        if (attr) {
          Value m = get_member(e, *attr);
          const Value* d = kwarg(k, "default");
          out.push_back(!m.defined() && d ? *d : m);
        } else {
          if (a.empty()) fail("map needs a filter name or attribute=");
          auto it = filters().find(to_str(a[0]));
          if (it == filters().end()) fail("unknown filter '" + to_str(a[0]) + "'");
          Value x = e;
          Args rest(a.begin() + 1, a.end());
          Kwargs none;
          out.push_back(it->second(x, rest, none));
        }
      }
      return Value::make_list(std::move(out));
    };
    return f;
  }();
  return table;
}

void add_globals(Context& ctx) {
  auto& g = ctx.scopes.front();
  g["raise_exception"] = Value::func([](Args& a, Kwargs&) -> Value {
    throw Error(a.empty() ? std::string("chat template raised an exception") : to_str(a[0]));
  });
  g["namespace"] = Value::func([](Args& a, Kwargs& k) {
    Value ns = Value::make_dict();
    if (!a.empty() && a[0].kind == Value::DictK)
      for (const auto& [key, v] : *a[0].dict) ns.set(key, v);
    for (const auto& [key, v] : k) ns.set(key, v);
    return ns;
  });
  g["range"] = Value::func([](Args& a, Kwargs&) {
    if (a.empty() || a.size() > 3) fail("range() takes 1 to 3 arguments");
    for (const auto& x : a)
      if (x.kind != Value::Int) fail("range() needs integers");
    int64_t start = a.size() > 1 ? a[0].i : 0, stop = a.size() > 1 ? a[1].i : a[0].i, step = a.size() > 2 ? a[2].i : 1;
    if (step == 0) fail("range() step must not be zero");
    List out;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(Value::integer(i));
    return Value::make_list(std::move(out));
  });
  g["dict"] = Value::func([](Args&, Kwargs& k) {
    Value d = Value::make_dict();
    for (const auto& [key, v] : k) d.set(key, v);
    return d;
  });
  g["strftime_now"] = Value::func([](Args& a, Kwargs&) {
    std::string fmt = a.empty() ? "%Y-%m-%d" : to_str(a[0]);
    std::time_t now = std::time(nullptr);
    std::tm tm{};
    localtime_r(&now, &tm);
    char buf[256];
    size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
    return Value::str(std::string(buf, n));
  });
}

}  // namespace

struct ChatTemplate::Program {
  Body body;
};

ChatTemplate::ChatTemplate(std::string_view source) : program_(std::make_unique<Program>()) {
  Parser parser(Lexer(source).run());
  program_->body = parser.parse_template();
}

ChatTemplate::~ChatTemplate() = default;

std::string ChatTemplate::render(const json& variables) const {
  if (!variables.is_object()) throw Error("chat template: variables must be a JSON object");
  Context ctx;
  ctx.filters = &filters();
  ctx.scopes.emplace_back();
  add_globals(ctx);
  for (auto it = variables.begin(); it != variables.end(); ++it) ctx.scopes.front()[it.key()] = from_json(it.value());
  ctx.scopes.emplace_back();  // template-level sets live above the globals
  std::string out;
  try {
    render_body(program_->body, ctx, out);
  } catch (const LoopBreak&) {
    fail("{% break %} outside a loop");
  } catch (const LoopContinue&) {
    fail("{% continue %} outside a loop");
  }
  return out;
}

std::string render_chat(const ChatTemplate& tmpl, const json& messages, bool add_generation_prompt,
                        const std::string& bos_token, const std::string& eos_token) {
  return render_chat(tmpl, messages, add_generation_prompt, bos_token, eos_token, json::object());
}

std::string render_chat(const ChatTemplate& tmpl, const json& messages, bool add_generation_prompt,
                        const std::string& bos_token, const std::string& eos_token, const json& extra_variables) {
  if (!messages.is_array()) throw Error("chat: messages must be a JSON array of {role, content} objects");
  json vars = extra_variables.is_object() ? extra_variables : json::object();
  vars["messages"] = messages;
  vars["add_generation_prompt"] = add_generation_prompt;
  vars["bos_token"] = bos_token;
  vars["eos_token"] = eos_token;
  return tmpl.render(vars);
}

}  // namespace moemesh
