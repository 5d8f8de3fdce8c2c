// `moemesh mklora`: a random PEFT LoRA adapter for a checkpoint (tests, benchmarks, trying out
// --lora-modules); `moemesh finetune` makes trained ones.
#include <filesystem>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/lora.h"
#include "services/cli/commands.h"

namespace moemesh::cli {

void add_mklora(CLI::App& app) {
  struct Args {
    std::string model, out, targets = "q_proj,k_proj,v_proj,o_proj";
    int64_t rank = 8;
    double alpha = 16, strength = 0.2;
    uint64_t seed = 1;
    bool rslora = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("mklora", "Write a random PEFT LoRA adapter for a checkpoint (tests, benchmarks)");
  cmd->add_option("--model", a->model, "the base checkpoint folder")->required();
  cmd->add_option("--out", a->out, "the adapter folder to write")->required();
  cmd->add_option("--targets", a->targets, "PEFT target_modules, comma-separated (e.g. q_proj,v_proj,w1,w2,w3)")
      ->capture_default_str();
  cmd->add_option("--rank", a->rank, "r")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--alpha", a->alpha, "lora_alpha")->capture_default_str();
  cmd->add_option("--strength", a->strength, "each delta's size relative to a unit weight's")->capture_default_str();
  cmd->add_option("--seed", a->seed)->capture_default_str();
  cmd->add_flag("--rslora", a->rslora, "use_rslora (scale alpha/sqrt(r))");
  cmd->callback([a] {
    const ModelConfig cfg = Checkpoint::open(a->model)->config();
    LoraConfig c;
    c.r = a->rank;
    c.lora_alpha = a->alpha;
    c.use_rslora = a->rslora;
    c.base_model_name_or_path = a->model;
    std::stringstream ss(a->targets);
    for (std::string t; std::getline(ss, t, ',');)
      if (!t.empty()) c.target_modules.push_back(t);
    const auto modules = random_lora_modules(cfg, c, a->seed, a->strength);
    write_lora_adapter(a->out, c, modules);
    std::cout << "wrote " << a->out << ": " << modules.size() << " modules, r " << c.r << "\n";
  });
}

}  // namespace moemesh::cli
