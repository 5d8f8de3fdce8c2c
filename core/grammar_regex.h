// Regular expressions (the subset JSON-schema patterns and string formats use) compiled into
// grammar nodes (core/grammar.h), and the regexes of bounded numbers.
#pragma once
#include <bitset>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/grammar.h"

namespace moemesh {

// Compiles `pattern` for a whole-string match (a leading ^ and trailing $ are accepted and
// implied). Supported: literals, escapes (\d \w \s and their negations, \. and other escaped
// punctuation, \n \t \r, \uXXXX), classes [a-z0-9_] and [^...], ., groups (...) and (?:...),
// alternation |, and the quantifiers ? * + {m} {m,} {m,n}. Every byte a class can match is
// intersected with `allowed` (. and negated classes stay within printable ASCII). Anything else
// (backreferences, lookaround, anchors inside, \b) throws moemesh::Error naming it.
Grammar::Id compile_regex(Grammar& g, std::string_view pattern, const std::bitset<256>& allowed);

// A regex matching the decimal integers in [lo, hi] (canonical forms, no leading zeros).
std::string integer_range_regex(int64_t lo, int64_t hi);

}  // namespace moemesh
