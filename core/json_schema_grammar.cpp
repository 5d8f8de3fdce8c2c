#include "core/json_schema_grammar.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "core/grammar_regex.h"

namespace moemesh {

using ojson = nlohmann::ordered_json;

namespace {

constexpr int kMaxDepth = 64;
constexpr size_t kMaxNodes = 200000;
constexpr int64_t kMaxInt = 999999999999999;  // 15 digits: exact in a double
const char* const kFraction = "(\\.[0-9]{1,6})";

std::bitset<256> byte_range(int lo, int hi) {
  std::bitset<256> s;
  for (int c = lo; c <= hi; ++c) s.set(size_t(c));
  return s;
}

// What a pattern or format may put in a JSON string without escaping.
std::bitset<256> json_safe_ascii() {
  auto s = byte_range(0x20, 0x7E);
  s.reset('"');
  s.reset('\\');
  return s;
}

// Keywords whose meaning this cannot enforce: refused rather than silently ignored.
const std::set<std::string> kUnsupported = {"oneOf",
                                            "not",
                                            "if",
                                            "then",
                                            "else",
                                            "dependentRequired",
                                            "dependentSchemas",
                                            "dependencies",
                                            "patternProperties",
                                            "propertyNames",
                                            "unevaluatedProperties",
                                            "unevaluatedItems",
                                            "uniqueItems",
                                            "contains",
                                            "minContains",
                                            "maxContains",
                                            "prefixItems",
                                            "additionalItems",
                                            "minProperties",
                                            "maxProperties",
                                            "$dynamicRef",
                                            "$recursiveRef"};

// A string format as a regex (whole match), chosen so every match is valid for the format.
std::optional<std::string> format_regex(const std::string& f) {
  const std::string date = "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])";
  const std::string time = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,3})?Z";
  if (f == "date") return date;
  if (f == "time") return time;
  if (f == "date-time") return date + "T" + time;
  if (f == "uuid") return "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}";
  if (f == "email") return "[a-z0-9]{1,20}(\\.[a-z0-9]{1,20})?@[a-z0-9]{1,20}\\.[a-z]{2,6}";
  if (f == "hostname") return "[a-z][a-z0-9]{0,20}(\\.[a-z][a-z0-9]{0,20}){0,3}";
  if (f == "ipv4") {
    const std::string octet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    return octet + "(\\." + octet + "){3}";
  }
  if (f == "uri") return "https://[a-z][a-z0-9]{0,20}\\.[a-z]{2,6}(/[a-z0-9_-]{1,20}){0,4}";
  return std::nullopt;
}

double number_of(const ojson& s, const char* key) {
  if (!s[key].is_number()) throw SchemaError(key, "must be a number");
  return s[key].get<double>();
}

}  // namespace

JsonGrammarBuilder::JsonGrammarBuilder(Grammar& g) : g_(g) {
  space_ = g_.optional(g_.byte(' '));
  // One character of a JSON string: unescaped ASCII, an escape, or a valid UTF-8 sequence.
  auto plain = byte_range(0x20, 0x7F);
  plain.reset('"');
  plain.reset('\\');
  const auto cont = g_.bytes(byte_range(0x80, 0xBF));
  const auto hex = g_.bytes(byte_range('0', '9') | byte_range('a', 'f') | byte_range('A', 'F'));
  std::bitset<256> esc;
  for (char c : std::string("\"\\/bfnrt")) esc.set(static_cast<unsigned char>(c));
  char_ = g_.alt({
      g_.bytes(plain),
      g_.seq({g_.byte('\\'), g_.bytes(esc)}),
      g_.seq({g_.byte('\\'), g_.byte('u'), hex, hex, hex, hex}),
      g_.seq({g_.bytes(byte_range(0xC2, 0xDF)), cont}),
      g_.seq({g_.byte(0xE0), g_.bytes(byte_range(0xA0, 0xBF)), cont}),
      g_.seq({g_.bytes(byte_range(0xE1, 0xEC) | byte_range(0xEE, 0xEF)), cont, cont}),
      g_.seq({g_.byte(0xED), g_.bytes(byte_range(0x80, 0x9F)), cont}),
      g_.seq({g_.byte(0xF0), g_.bytes(byte_range(0x90, 0xBF)), cont, cont}),
      g_.seq({g_.bytes(byte_range(0xF1, 0xF3)), cont, cont, cont}),
      g_.seq({g_.byte(0xF4), g_.bytes(byte_range(0x80, 0x8F)), cont, cont}),
  });
  const auto quote = g_.byte('"');
  string_ = g_.seq({quote, g_.repeat(char_, 0, Grammar::kUnbounded), quote});
  integer_ = compile_regex(g_, "-?(0|[1-9][0-9]{0,14})", json_safe_ascii());
  number_ = g_.seq({integer_, g_.optional(compile_regex(g_, kFraction, json_safe_ascii()))});

  value_ = g_.placeholder();
  const auto comma = g_.seq({g_.byte(','), space_});
  const auto member = g_.seq({string_, g_.byte(':'), space_, value_});
  object_ = g_.seq({g_.byte('{'), g_.repeat(member, 0, Grammar::kUnbounded, comma), g_.byte('}')});
  const auto array = g_.seq({g_.byte('['), g_.repeat(value_, 0, Grammar::kUnbounded, comma), g_.byte(']')});
  g_.define(value_,
            g_.alt({object_, array, string_, number_, g_.literal("true"), g_.literal("false"), g_.literal("null")}));
}

Grammar::Id JsonGrammarBuilder::schema(const ojson& s) {
  root_ = &s;
  refs_.clear();
  const auto id = node(s, 0);
  if (g_.size() > kMaxNodes) throw SchemaError("schema", "is too large");
  return id;
}

Grammar::Id JsonGrammarBuilder::ref(const std::string& pointer, int depth) {
  if (auto it = refs_.find(pointer); it != refs_.end()) return it->second;
  if (pointer.empty() || pointer[0] != '#') throw SchemaError("$ref", "only local references (#/...) are supported");
  const ojson* target = root_;
  try {
    if (pointer.size() > 1) target = &root_->at(ojson::json_pointer(pointer.substr(1)));
  } catch (const std::exception&) {
    throw SchemaError("$ref", "'" + pointer + "' does not name a part of the schema");
  }
  const auto ph = g_.placeholder();  // a reference may recurse into itself
  refs_[pointer] = ph;
  g_.define(ph, node(*target, depth + 1));
  return ph;
}

Grammar::Id JsonGrammarBuilder::node(const ojson& s, int depth) {
  if (depth > kMaxDepth) throw SchemaError("schema", "nests deeper than " + std::to_string(kMaxDepth));
  if (g_.size() > kMaxNodes) throw SchemaError("schema", "is too large");
  if (s.is_boolean()) {
    if (!s.get<bool>()) throw SchemaError("false", "a false schema matches nothing");
    return value_;
  }
  if (!s.is_object()) throw SchemaError("schema", "a schema must be an object or a boolean");
  for (const auto& [k, v] : s.items())
    if (kUnsupported.count(k)) throw SchemaError(k, "is not supported by constrained decoding");
  if (s.contains("$ref")) {
    if (!s["$ref"].is_string()) throw SchemaError("$ref", "must be a string");
    return ref(s["$ref"].get<std::string>(), depth);
  }
  if (s.contains("const")) return g_.literal(s["const"].dump());
  if (s.contains("enum")) {
    if (!s["enum"].is_array() || s["enum"].empty()) throw SchemaError("enum", "must be a non-empty list");
    std::vector<Grammar::Id> alts;
    for (const auto& v : s["enum"]) alts.push_back(g_.literal(v.dump()));
    return g_.alt(std::move(alts));
  }
  for (const char* comb : {"anyOf", "allOf"}) {
    if (!s.contains(comb)) continue;
    const ojson& list = s[comb];
    if (!list.is_array() || list.empty()) throw SchemaError(comb, "must be a non-empty list");
    for (const char* other : {"type", "properties", "items", "enum", "const"})
      if (s.contains(other)) throw SchemaError(comb, std::string("cannot be combined with '") + other + "' here");
    if (std::string(comb) == "allOf") {
      if (list.size() != 1) throw SchemaError("allOf", "with more than one schema is not supported");
      return node(list[0], depth + 1);
    }
    std::vector<Grammar::Id> alts;
    for (const auto& b : list) alts.push_back(node(b, depth + 1));
    return g_.alt(std::move(alts));
  }
  std::vector<std::string> types;
  if (s.contains("type")) {
    const ojson& t = s["type"];
    if (t.is_string()) {
      types.push_back(t.get<std::string>());
    } else if (t.is_array() && !t.empty()) {
      for (const auto& x : t) {
        if (!x.is_string()) throw SchemaError("type", "must be a string or a list of strings");
        types.push_back(x.get<std::string>());
      }
    } else {
      throw SchemaError("type", "must be a string or a list of strings");
    }
  } else if (s.contains("properties") || s.contains("required") || s.contains("additionalProperties")) {
    types = {"object"};
  } else if (s.contains("items") || s.contains("minItems") || s.contains("maxItems")) {
    types = {"array"};
  } else if (s.contains("minLength") || s.contains("maxLength") || s.contains("pattern") || s.contains("format")) {
    types = {"string"};
  } else if (s.contains("minimum") || s.contains("maximum") || s.contains("exclusiveMinimum") ||
             s.contains("exclusiveMaximum")) {
    types = {"number"};
  } else {
    return value_;
  }
  if (s.value("nullable", false)) types.push_back("null");
  std::vector<Grammar::Id> alts;
  for (const auto& t : types) alts.push_back(typed(t, s, depth));
  return g_.alt(std::move(alts));
}

Grammar::Id JsonGrammarBuilder::typed(const std::string& type, const ojson& s, int depth) {
  if (type == "null") return g_.literal("null");
  if (type == "boolean") return g_.alt({g_.literal("true"), g_.literal("false")});
  if (type == "integer") return number(s, true);
  if (type == "number") return number(s, false);
  if (type == "string") return string(s);
  if (type == "array") return array(s, depth);
  if (type == "object") return object(s, depth);
  throw SchemaError("type", "unknown type '" + type + "'");
}

Grammar::Id JsonGrammarBuilder::object(const ojson& s, int depth) {
  const ojson empty = ojson::object();
  const ojson& props = s.contains("properties") ? s["properties"] : empty;
  if (!props.is_object()) throw SchemaError("properties", "must be an object");
  std::set<std::string> required;
  if (s.contains("required")) {
    if (!s["required"].is_array()) throw SchemaError("required", "must be a list of property names");
    for (const auto& r : s["required"]) {
      if (!r.is_string()) throw SchemaError("required", "must be a list of property names");
      required.insert(r.get<std::string>());
    }
  }
  const ojson additional = s.contains("additionalProperties") ? s["additionalProperties"] : ojson(true);
  if (!additional.is_boolean() && !additional.is_object())
    throw SchemaError("additionalProperties", "must be a boolean or a schema");

  // (name, schema, required) in the schema's order; required names without a schema come last.
  std::vector<std::tuple<std::string, Grammar::Id, bool>> members;
  for (const auto& [name, sub] : props.items())
    members.emplace_back(name, node(sub, depth + 1), required.count(name) > 0);
  for (const auto& name : required)
    if (!props.contains(name)) {
      if (additional.is_boolean() && !additional.get<bool>())
        throw SchemaError("required", "names '" + name + "', which additionalProperties: false forbids");
      const Grammar::Id v = additional.is_object() ? node(additional, depth + 1) : value_;
      members.emplace_back(name, v, true);
    }
  if (members.empty()) {
    if (additional.is_boolean() && !additional.get<bool>()) return g_.literal("{}");
    if (additional.is_boolean()) return object_;
    // Free keys, values of the additionalProperties schema.
    const auto member = g_.seq({string_, g_.byte(':'), space_, node(additional, depth + 1)});
    return g_.seq(
        {g_.byte('{'), g_.repeat(member, 0, Grammar::kUnbounded, g_.seq({g_.byte(','), space_})), g_.byte('}')});
  }
  // Only the declared properties are written (valid whatever additionalProperties says), in
  // order, optional ones or not: first[i] = the rest from i when none was written yet,
  // after[i] = the rest from i after one was (so it starts with a comma).
  const size_t n = members.size();
  std::vector<Grammar::Id> first(n + 1), after(n + 1);
  first[n] = after[n] = g_.seq({});
  for (size_t i = n; i-- > 0;) {
    const auto& [name, value, req] = members[i];
    const auto member = g_.seq({g_.literal(ojson(name).dump()), g_.byte(':'), space_, value});
    std::vector<Grammar::Id> a{g_.seq({g_.byte(','), space_, member, after[i + 1]})};
    std::vector<Grammar::Id> f{g_.seq({member, after[i + 1]})};
    if (!req) {
      a.push_back(after[i + 1]);
      f.push_back(first[i + 1]);
    }
    after[i] = g_.alt(std::move(a));
    first[i] = g_.alt(std::move(f));
  }
  return g_.seq({g_.byte('{'), first[0], g_.byte('}')});
}

// A count bound of the schema (minItems, maxLength, ...): dflt when absent.
static int32_t bound(const ojson& s, const char* k, int32_t dflt) {
  if (!s.contains(k)) return dflt;
  if (!s[k].is_number_integer() || s[k].get<int64_t>() < 0 || s[k].get<int64_t>() > 100000)
    throw SchemaError(k, "must be an integer in [0, 100000]");
  return int32_t(s[k].get<int64_t>());
}

Grammar::Id JsonGrammarBuilder::array(const ojson& s, int depth) {
  const int32_t lo = bound(s, "minItems", 0), hi = bound(s, "maxItems", Grammar::kUnbounded);
  if (hi != Grammar::kUnbounded && hi < lo) throw SchemaError("maxItems", "is below minItems");
  if (s.contains("items") && s["items"].is_array()) throw SchemaError("items", "as a list (tuples) is not supported");
  const Grammar::Id item = s.contains("items") ? node(s["items"], depth + 1) : value_;
  return g_.seq({g_.byte('['), g_.repeat(item, lo, hi, g_.seq({g_.byte(','), space_})), g_.byte(']')});
}

Grammar::Id JsonGrammarBuilder::string(const ojson& s) {
  const bool has_len = s.contains("minLength") || s.contains("maxLength");
  const auto quote = g_.byte('"');
  for (const char* k : {"pattern", "format"}) {
    if (!s.contains(k)) continue;
    if (!s[k].is_string()) throw SchemaError(k, "must be a string");
    if (has_len)
      throw SchemaError(s.contains("minLength") ? "minLength" : "maxLength",
                        std::string("cannot be combined with '") + k + "'");
    std::string re = s[k].get<std::string>();
    if (std::string(k) == "format") {
      auto f = format_regex(re);
      if (!f) throw SchemaError("format", "'" + re + "' is not supported");
      re = *f;
    }
    try {
      return g_.seq({quote, compile_regex(g_, re, json_safe_ascii()), quote});
    } catch (const SchemaError&) {
      throw;
    } catch (const Error& e) {
      throw SchemaError(k, e.what());
    }
  }
  const int32_t lo = bound(s, "minLength", 0), hi = bound(s, "maxLength", Grammar::kUnbounded);
  if (hi != Grammar::kUnbounded && hi < lo) throw SchemaError("maxLength", "is below minLength");
  if (lo == 0 && hi == Grammar::kUnbounded) return string_;
  return g_.seq({quote, g_.repeat(char_, lo, hi), quote});
}

Grammar::Id JsonGrammarBuilder::number(const ojson& s, bool integer) {
  if (s.contains("multipleOf")) {
    const bool one = s["multipleOf"].is_number() && s["multipleOf"].get<double>() == 1.0;
    if (!(integer && one)) throw SchemaError("multipleOf", "is supported only as 1 on integers");
  }
  // Bounds on the integer part (fractions are added only where they keep the value in range).
  int64_t lo = -kMaxInt, hi = kMaxInt;
  auto clamp = [](double v) { return int64_t(std::clamp(v, -double(kMaxInt), double(kMaxInt))); };
  const bool draft4_xmin =
      s.contains("exclusiveMinimum") && s["exclusiveMinimum"].is_boolean() && s["exclusiveMinimum"].get<bool>();
  const bool draft4_xmax =
      s.contains("exclusiveMaximum") && s["exclusiveMaximum"].is_boolean() && s["exclusiveMaximum"].get<bool>();
  if (s.contains("minimum")) {
    const double m = number_of(s, "minimum");
    lo = std::max(lo, draft4_xmin ? clamp(std::floor(m)) + 1 : clamp(std::ceil(m)));
  }
  if (s.contains("exclusiveMinimum") && s["exclusiveMinimum"].is_number())
    lo = std::max(lo, clamp(std::floor(number_of(s, "exclusiveMinimum"))) + 1);
  if (s.contains("maximum")) {
    const double m = number_of(s, "maximum");
    hi = std::min(hi, draft4_xmax ? clamp(std::ceil(m)) - 1 : clamp(std::floor(m)));
  }
  if (s.contains("exclusiveMaximum") && s["exclusiveMaximum"].is_number())
    hi = std::min(hi, clamp(std::ceil(number_of(s, "exclusiveMaximum"))) - 1);
  if (lo > hi)
    throw SchemaError(s.contains("minimum") ? "minimum" : "exclusiveMinimum",
                      "leaves no whole number in range (ranges narrower than one are not supported)");
  if (lo == -kMaxInt && hi == kMaxInt) return integer ? integer_ : number_;
  std::string re = integer_range_regex(lo, hi);
  if (!integer) {
    // x.f lies in (x, x+1) for x >= 0 and -k.f in (-k-1, -k).
    if (std::max<int64_t>(lo, 0) <= hi - 1)
      re += "|" + integer_range_regex(std::max<int64_t>(lo, 0), hi - 1) + kFraction;
    if (std::max<int64_t>(1, -hi) <= -lo - 1)
      re += "|-" + integer_range_regex(std::max<int64_t>(1, -hi), -lo - 1) + kFraction;
  }
  return compile_regex(g_, re, json_safe_ascii());
}

}  // namespace moemesh
