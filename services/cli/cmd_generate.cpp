// placeholder until the generate command lands
#include "services/cli/commands.h"
namespace moemesh::cli {
void add_generate(CLI::App& app) { app.add_subcommand("generate", "(not yet implemented)"); }
}  // namespace moemesh::cli
