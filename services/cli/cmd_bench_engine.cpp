// `moemesh bench-engine`: placeholder, being written.
#include "services/cli/commands.h"

namespace moemesh::cli {

void add_bench_engine(CLI::App& app) { app.add_subcommand("bench-engine", "not built yet"); }

}  // namespace moemesh::cli
