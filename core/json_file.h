// Reading a JSON file with errors that name it.
#pragma once
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace moemesh {

// The file's JSON. A moemesh::Error starts with `name` (default: the file's name) and says
// "cannot open" (then `hint`, when given) or "not valid JSON (why)".
nlohmann::json read_json_file(const std::filesystem::path& file, const std::string& name = {},
                              const std::string& hint = {});

}  // namespace moemesh
