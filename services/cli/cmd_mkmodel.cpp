// placeholder until the mkmodel command lands
#include "services/cli/commands.h"
namespace moemesh::cli {
void add_mkmodel(CLI::App& app) { app.add_subcommand("mkmodel", "(not yet implemented)"); }
}  // namespace moemesh::cli
