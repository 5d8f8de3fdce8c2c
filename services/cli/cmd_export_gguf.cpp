// `moemesh export-gguf`: placeholder, being written.
#include "services/cli/commands.h"

namespace moemesh::cli {

void add_export_gguf(CLI::App& app) { app.add_subcommand("export-gguf", "not built yet"); }

}  // namespace moemesh::cli
