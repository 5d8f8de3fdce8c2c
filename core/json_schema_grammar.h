// JSON values as grammar nodes (core/grammar.h): any JSON value, or one conforming to a JSON
// schema — what response_format and forced tool calls constrain decoding to.
//
// Output is compact JSON with at most one space after ':' and ','. Objects list their declared
// properties in the schema's key order (hence ordered_json) (required ones always, optional ones or not); strings are
// valid UTF-8 with JSON escapes; numbers have at most 15 integer and 6 fraction digits, no
// exponent. What a schema asks that this cannot guarantee is refused with SchemaError naming the
// keyword (oneOf, not, if/then/else, uniqueItems, patternProperties, multipleOf other than 1 on
// integers, ...); annotations (title, description, default, examples, $schema, ...) and unknown
// keywords are ignored, as JSON Schema itself does.
#pragma once
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/grammar.h"

namespace moemesh {

class SchemaError : public Error {
 public:
  SchemaError(const std::string& keyword, const std::string& message)
      : Error("response schema: '" + keyword + "': " + message), keyword_(keyword) {}
  const std::string& keyword() const { return keyword_; }

 private:
  std::string keyword_;
};

class JsonGrammarBuilder {
 public:
  explicit JsonGrammarBuilder(Grammar& g);

  // Any JSON value / any JSON object.
  Grammar::Id any_value() const { return value_; }
  Grammar::Id any_object() const { return object_; }
  // A value conforming to `schema` (its $refs resolve against `schema` itself); throws SchemaError.
  Grammar::Id schema(const nlohmann::ordered_json& schema);
  // Optional single space (after ':' and ',').
  Grammar::Id space() const { return space_; }

 private:
  Grammar::Id node(const nlohmann::ordered_json& s, int depth);
  Grammar::Id typed(const std::string& type, const nlohmann::ordered_json& s, int depth);
  Grammar::Id object(const nlohmann::ordered_json& s, int depth);
  Grammar::Id array(const nlohmann::ordered_json& s, int depth);
  Grammar::Id string(const nlohmann::ordered_json& s);
  Grammar::Id number(const nlohmann::ordered_json& s, bool integer);
  Grammar::Id ref(const std::string& pointer, int depth);

  Grammar& g_;
  Grammar::Id space_, char_, string_, integer_, number_, value_, object_;
  const nlohmann::ordered_json* root_ = nullptr;
  std::map<std::string, Grammar::Id> refs_;
};

}  // namespace moemesh
