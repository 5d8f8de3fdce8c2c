// Comma-separated integer flags of the CLI (`--prompt-ids 1,2,3`, `--batches 1,8,32`).
#pragma once
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace moemesh::cli {

// The integers of "a,b,c", each in [lo, hi]; an item that is not one throws moemesh::Error
// "FLAG: "ITEM" is not WHAT (expected EXPECTED)".
inline std::vector<int64_t> parse_int_list(const std::string& s, const std::string& flag, int64_t lo, int64_t hi,
                                           const std::string& what, const std::string& expected) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size() || v < lo || v > hi)
      throw Error(flag + ": \"" + item + "\" is not " + what + " (expected " + expected + ")");
    out.push_back(v);
  }
  return out;
}

}  // namespace moemesh::cli
