// placeholder until the tokenize command lands
#include "services/cli/commands.h"
namespace moemesh::cli {
void add_tokenize(CLI::App& app) { app.add_subcommand("tokenize", "(not yet implemented)"); }
}  // namespace moemesh::cli
