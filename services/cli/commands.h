// Each `moemesh` subcommand lives in its own cmd_<name>.cpp and registers itself here.
#pragma once
#include <CLI/CLI.hpp>

namespace moemesh::cli {

void add_mkmodel(CLI::App& app);
void add_inspect(CLI::App& app);
void add_generate(CLI::App& app);
void add_tokenize(CLI::App& app);
void add_up(CLI::App& app);
void add_status(CLI::App& app);
void add_hash_key(CLI::App& app);
void add_bench(CLI::App& app);
void add_bench_engine(CLI::App& app);
void add_export_gguf(CLI::App& app);
void add_quantize(CLI::App& app);
void add_plan(CLI::App& app);
void add_finetune(CLI::App& app);
void add_mklora(CLI::App& app);

}  // namespace moemesh::cli
