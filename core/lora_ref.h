// Which LoRA adapter a request runs with, as processes name it to each other: the name it is
// served under, the folder every process reads it from (a path they share), and a key of its
// content, so that a folder loaded again with new weights is a new adapter to every cache.
#pragma once
#include <string>

namespace moemesh {

struct LoraRef {
  std::string name, path, key;
  bool empty() const { return key.empty(); }
  bool operator==(const LoraRef&) const = default;
};

}  // namespace moemesh
