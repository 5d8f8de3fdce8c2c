// `moemesh`: the command-line front end. Subcommands register in commands.h.
#include <spdlog/spdlog.h>

#include <iostream>

#include "core/allocator_tuning.h"
#include "core/error.h"
#include "services/cli/commands.h"

int main(int argc, char** argv) {
  moemesh::keep_freed_memory();
  CLI::App app{"moemesh: a Mixture-of-Experts serving cluster"};
  app.require_subcommand(1);
  moemesh::cli::add_mkmodel(app);
  moemesh::cli::add_inspect(app);
  moemesh::cli::add_generate(app);
  moemesh::cli::add_tokenize(app);
  moemesh::cli::add_up(app);
  moemesh::cli::add_status(app);
  moemesh::cli::add_hash_key(app);
  moemesh::cli::add_bench(app);
  moemesh::cli::add_bench_engine(app);
  moemesh::cli::add_export_gguf(app);
  moemesh::cli::add_quantize(app);
  moemesh::cli::add_plan(app);
  moemesh::cli::add_finetune(app);
  moemesh::cli::add_mklora(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moemesh::Error& e) {
    std::cerr << "moemesh: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "moemesh: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
