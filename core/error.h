// One exception type for everything a user can get wrong (bad checkpoint, bad flag, bad
// input). Its message is a single readable line; front ends print it and exit non-zero
// (CLI) or turn it into an error reply (services).
#pragma once
#include <stdexcept>
#include <string>

namespace moemesh {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace moemesh
