#include "core/json_file.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moemesh {

nlohmann::json read_json_file(const std::filesystem::path& file, const std::string& name, const std::string& hint) {
  const std::string where = name.empty() ? file.filename().string() : name;
  std::ifstream in(file);
  if (!in) throw Error(where + ": cannot open" + (hint.empty() ? "" : " " + hint));
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

}  // namespace moemesh
