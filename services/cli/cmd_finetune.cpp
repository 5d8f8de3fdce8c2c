// `moemesh finetune`: trains a LoRA adapter on this machine's CPU (core/lora_train.h) from chat
// JSONL and writes it in PEFT's format for `moemesh up --lora-modules` (docs/finetune.md):
// --output-dir/{adapter_config.json, adapter_model.safetensors}, one checkpoint-epoch-N/ per
// epoch, loss.csv and loss.png.
//
// --eval-only (hidden, for tests) reads the adapter in --output-dir back and greedy-decodes every
// training prompt with the training forward pass, reporting how many completions come out exactly.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/error.h"
#include "core/lora_train.h"
#include "core/tokenizer.h"
#include "services/cli/commands.h"
#include "services/cli/plot.h"

namespace moemesh::cli {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct FinetuneArgs {
  std::string model, train_data, output_dir;
  std::string target_modules = "q_proj,k_proj,v_proj,o_proj";
  int64_t batch_size = 8, epochs = 3, rank = 8, max_seq_len = 1024;
  double lr = 1e-3, alpha = 0, weight_decay = 0.0, max_grad_norm = 1.0;
  std::string lr_schedule = "linear";
  bool train_router = false, eval_only = false;
  uint64_t seed = 0;
  int threads = 0;
};

// The loss curve as a PNG.
void plot_loss(const fs::path& csv, const fs::path& png) {
  cli::plot_csv(R"PY(step = [int(r["step"]) for r in rows]
fig, ax = plt.subplots(figsize=(8, 4.5))
ax.plot(step, [float(r["loss"]) for r in rows], label="batch loss")
ax.set_yscale("log"); ax.set_xlabel("optimizer step"); ax.set_ylabel("cross-entropy (completion tokens)")
ax.set_title("moemesh finetune: training loss"); ax.grid(True, which="both", alpha=0.3)
)PY",
                csv, png);
}

// "epoch 2/10 [########------------] 4/7 loss 1.2345 812 tok/s", redrawn in place on stderr.
void draw_progress(const StepReport& r, int64_t epochs, double epoch_loss) {
  constexpr int kWidth = 24;
  const int done = int(kWidth * r.batch / r.batches);
  std::fprintf(stderr, "\repoch %lld/%lld [%s%s] %lld/%lld loss %.4f %.0f tok/s ", (long long)r.epoch,
               (long long)epochs, std::string(size_t(done), '#').c_str(),
               std::string(size_t(kWidth - done), '-').c_str(), (long long)r.batch, (long long)r.batches, epoch_loss,
               r.tokens_per_s);
  if (r.batch == r.batches) std::fputc('\n', stderr);
  std::fflush(stderr);
}

LoraTrainConfig lora_config(const FinetuneArgs& a, Arch arch) {
  LoraTrainConfig lc;
  if (a.rank <= 0) throw Error("--rank must be positive");
  lc.rank = a.rank;
  lc.alpha = a.alpha > 0 ? a.alpha : 2.0 * double(a.rank);
  lc.target_modules = parse_target_modules(arch, a.target_modules);
  lc.train_router = a.train_router;
  lc.seed = a.seed;
  return lc;
}

// The adapter's settings from its adapter_config.json (--eval-only).
LoraTrainConfig read_adapter_config(const fs::path& dir, Arch arch) {
  std::ifstream f(dir / "adapter_config.json");
  if (!f) throw Error((dir / "adapter_config.json").string() + ": cannot read");
  try {
    const json j = json::parse(f);
    LoraTrainConfig lc;
    lc.rank = j.at("r").get<int64_t>();
    lc.alpha = j.at("lora_alpha").get<double>();
    std::string targets;
    for (const auto& t : j.at("target_modules")) {
      if (t == "gate")
        lc.train_router = true;
      else
        targets += (targets.empty() ? "" : ",") + t.get<std::string>();
    }
    lc.target_modules = parse_target_modules(arch, targets);
    return lc;
  } catch (const json::exception& e) {
    throw Error((dir / "adapter_config.json").string() + ": " + e.what());
  }
}

void evaluate(const LoraTrainModel<float>& m, const std::vector<TrainExample>& data, const Tokenizer& tok,
              int threads) {
  const int32_t eos = *tok.eos_id();
  std::vector<json> results(data.size());
  std::vector<std::thread> pool;
  std::mutex mu;
  std::exception_ptr error;
  auto work = [&](size_t t) {
    try {
      for (size_t i = t; i < data.size(); i += size_t(threads)) {
        const TrainExample& ex = data[i];
        const std::vector<int32_t> prompt(ex.tokens.begin(), ex.tokens.begin() + ex.prompt_tokens);
        const std::vector<int32_t> expected(ex.tokens.begin() + ex.prompt_tokens, ex.tokens.end());
        const std::vector<int32_t> got = m.greedy(prompt, int64_t(expected.size()) + 4, eos);
        results[i] = {{"index", i},
                      {"exact", got == expected},
                      {"expected", tok.decode(expected, true)},
                      {"generated", tok.decode(got, true)}};
      }
    } catch (...) {
      std::lock_guard lock(mu);
      error = std::current_exception();
    }
  };
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, size_t(t));
  work(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  int64_t exact = 0;
  for (const json& r : results) exact += r["exact"].get<bool>() ? 1 : 0;
  const json out = {{"examples", data.size()},
                    {"exact", exact},
                    {"accuracy", double(exact) / double(data.size())},
                    {"results", results}};
  std::cout << out.dump() << "\n";
}

void run_finetune(const FinetuneArgs& a) {
  auto ckpt = Checkpoint::open(a.model);
  if (ckpt->quantization())
    throw Error(a.model + " is a GPTQ-quantized checkpoint: fine-tune its float (F32/F16/BF16) original instead");
  if (!fs::exists(fs::path(a.model) / "tokenizer.json"))
    throw Error(a.model + " has no tokenizer.json: the training data cannot be tokenized");
  const auto tok = Tokenizer::from_dir(a.model);
  if (a.batch_size <= 0) throw Error("--batch-size must be positive");
  if (a.epochs <= 0) throw Error("--epochs must be positive");
  if (!(a.lr > 0)) throw Error("--lr must be positive");
  if (a.max_seq_len <= 1) throw Error("--max-seq-len must be at least 2");
  const int threads = a.threads > 0 ? a.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  const std::vector<TrainExample> data = load_train_data(a.train_data, *tok, a.max_seq_len);
  const ModelConfig& cfg = ckpt->config();
  const fs::path out = a.output_dir;

  if (a.eval_only) {
    LoraTrainModel<float> m(cfg, ckpt->load(), read_adapter_config(out, cfg.arch));
    m.load_adapter(out);
    evaluate(m, data, *tok, threads);
    return;
  }

  const LoraTrainConfig lc = lora_config(a, cfg.arch);
  LoraTrainModel<float> m(cfg, ckpt->load(), lc);
  int64_t tokens = 0;
  for (const auto& ex : data) tokens += int64_t(ex.tokens.size());
  std::cerr << "finetune: " << data.size() << " examples (" << tokens << " tokens), " << m.modules().size()
            << " adapted modules, " << m.params().size() << " trainable parameters, rank " << lc.rank << ", alpha "
            << lc.alpha << ", lr " << a.lr << ", " << threads << " threads\n";

  fs::create_directories(out);
  std::ofstream csv(out / "loss.csv");
  if (!csv) throw Error((out / "loss.csv").string() + ": cannot write");
  csv << "step,epoch,loss,tokens_per_s\n";
  double epoch_sum = 0, first_epoch = 0, last_epoch = 0;
  int64_t epoch_steps = 0;
  TrainOptions opts;
  opts.batch_size = a.batch_size;
  opts.epochs = a.epochs;
  opts.lr = a.lr;
  opts.weight_decay = a.weight_decay;
  opts.max_grad_norm = a.max_grad_norm;
  if (a.lr_schedule != "linear" && a.lr_schedule != "constant")
    throw Error("--lr-schedule: \"" + a.lr_schedule + "\" is not linear or constant");
  opts.linear_decay = a.lr_schedule == "linear";
  opts.seed = a.seed;
  opts.threads = threads;
  const auto t0 = std::chrono::steady_clock::now();
  train_lora(
      m, data, opts,
      [&](const StepReport& r) {
        csv << r.step << "," << r.epoch << "," << r.loss << "," << r.tokens_per_s << "\n" << std::flush;
        epoch_sum += r.loss;
        ++epoch_steps;
        draw_progress(r, a.epochs, epoch_sum / double(epoch_steps));
      },
      [&](int64_t epoch) {
        const double mean = epoch_sum / double(std::max<int64_t>(epoch_steps, 1));
        if (epoch == 1) first_epoch = mean;
        last_epoch = mean;
        epoch_sum = 0;
        epoch_steps = 0;
        m.save(out / ("checkpoint-epoch-" + std::to_string(epoch)), a.model);
      });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  m.save(out, a.model);
  csv.close();
  plot_loss(out / "loss.csv", out / "loss.png");
  std::cerr << "finetune: mean loss epoch 1 " << first_epoch << " -> epoch " << a.epochs << " " << last_epoch << " in "
            << secs << " s; adapter in " << out.string() << "\n";
}

}  // namespace

void add_finetune(CLI::App& app) {
  auto a = std::make_shared<FinetuneArgs>();
  auto* cmd = app.add_subcommand("finetune", "Train a LoRA adapter on the CPU from chat JSONL (PEFT format output)");
  cmd->add_option("--model", a->model, "float (F32/F16/BF16) Hugging Face checkpoint folder")->required();
  cmd->add_option("--train-data", a->train_data,
                  "JSONL: {\"messages\": [..., assistant]} or {\"prompt\": ..., \"completion\": ...} per line")
      ->required();
  cmd->add_option("--output-dir", a->output_dir, "adapter, checkpoint-epoch-N/, loss.csv, loss.png")->required();
  cmd->add_option("--batch-size", a->batch_size, "examples per optimizer step")->capture_default_str();
  cmd->add_option("--lr", a->lr, "AdamW learning rate")->capture_default_str();
  cmd->add_option("--epochs", a->epochs, "passes over the data")->capture_default_str();
  cmd->add_option("--rank", a->rank, "LoRA rank r")->capture_default_str();
  cmd->add_option("--alpha", a->alpha, "LoRA alpha (scale alpha / r; default 2 x rank)");
  cmd->add_option("--target-modules", a->target_modules,
                  "comma list: q_proj k_proj v_proj o_proj, w1 w2 w3 (Mixtral experts), gate_proj up_proj "
                  "down_proj (DeepSeek experts, shared experts, dense MLP)")
      ->capture_default_str();
  cmd->add_flag("--train-router", a->train_router, "also adapt the MoE router gate");
  cmd->add_option("--lr-schedule", a->lr_schedule, "linear (decays to 0 over the run) or constant")
      ->capture_default_str();
  cmd->add_option("--max-grad-norm", a->max_grad_norm, "clip the gradient's global norm (0: off)")
      ->capture_default_str();
  cmd->add_option("--weight-decay", a->weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  cmd->add_option("--seed", a->seed, "adapter initialisation and shuffling")->capture_default_str();
  cmd->add_option("--max-seq-len", a->max_seq_len, "longest example in tokens (longer ones are refused)")
      ->capture_default_str();
  cmd->add_option("--threads", a->threads, "examples computed in parallel (0: one per core)")->capture_default_str();
  cmd->add_flag("--eval-only", a->eval_only, "greedy-decode the training prompts with --output-dir's adapter")
      ->group("");
  cmd->callback([a] { run_finetune(*a); });
}

}  // namespace moemesh::cli
