// `moemesh hash-key KEY`: the SHA-256 a tenants file stores instead of the key itself.
#include <iostream>

#include "core/tenants.h"
#include "services/cli/commands.h"

namespace moemesh::cli {

void add_hash_key(CLI::App& app) {
  auto key = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("hash-key", "Print the SHA-256 of an API key, for the tenants file");
  cmd->add_option("key", *key, "the API key")->required();
  cmd->callback([key] { std::cout << sha256_hex(*key) << "\n"; });
}

}  // namespace moemesh::cli
