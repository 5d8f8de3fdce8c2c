// `moemesh generate`: one-off generation with the in-process reference engine.
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/lora.h"
#include "core/moe.h"
#include "core/sampler.h"
#include "core/text_stream.h"
#include "core/tokenizer.h"
#include "services/cli/commands.h"
#include "services/cli/int_list.h"

namespace moemesh::cli {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::optional<uint64_t> seed;
  std::optional<double> gating_temperature;
  std::string router_bias;
  std::string lora;
  bool json = false;
  bool logits = false;
};

std::vector<int32_t> parse_ids(const std::string& s) {
  const auto v = parse_int_list(s, "--prompt-ids", 0, INT32_MAX, "a token id", "e.g. 1,2,3");
  return std::vector<int32_t>(v.begin(), v.end());
}

void run_generate(GenerateArgs& a) {
  auto ckpt = Checkpoint::open(a.model);
  if (a.gating_temperature) {
    if (!(*a.gating_temperature > 0.0)) throw Error("--gating-temperature must be > 0");
    ckpt->mutable_config().gating_temperature = *a.gating_temperature;
  }
  if (!a.router_bias.empty())
    ckpt->mutable_config().router_bias = parse_router_bias(a.router_bias, ckpt->config().num_experts);
  const ModelConfig& cfg = ckpt->config();

  // The tokenizer is needed for --prompt, and used for the text when the model folder has one.
  std::shared_ptr<Tokenizer> tok;
  if (!a.prompt.empty() || std::filesystem::exists(std::filesystem::path(a.model) / "tokenizer.json"))
    tok = Tokenizer::from_dir(a.model);
  const std::vector<int32_t> prompt = a.prompt.empty() ? parse_ids(a.prompt_ids) : tok->encode(a.prompt);
  if (prompt.empty()) throw Error("the prompt is empty");
  if (a.max_tokens < 0) throw Error("--max-tokens must be >= 0");
  if (int64_t(prompt.size()) > cfg.max_context())
    throw Error("the prompt has " + std::to_string(prompt.size()) + " tokens, more than the model's " +
                std::to_string(cfg.max_context()) + " positions");

  a.sampling.seed = a.seed;
  std::vector<int32_t> eos(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end());
  if (eos.empty() && tok && tok->eos_id()) eos.push_back(*tok->eos_id());
  Sampler sampler(a.sampling, prompt, eos);

  EngineOptions opts;
  opts.kv_blocks = (int64_t(prompt.size()) + a.max_tokens + 1) / KvCache::kBlockSize + 1;
  Engine engine(ckpt, opts);
  const SeqId seq = engine.create_sequence();
  const std::shared_ptr<const LoraAdapter> adapter =
      a.lora.empty() ? nullptr : LoraAdapter::load(a.lora, cfg, WeightSelection::all(), {}, {}, lora_dtype_for(*ckpt));

  std::unique_ptr<TextStream> stream;
  if (!a.json && tok) stream = std::make_unique<TextStream>(tok, std::vector<std::string>{});

  nlohmann::json logits_rows = nlohmann::json::array();
  auto run = [&](std::vector<int32_t> tokens) {
    StepInput in{seq, std::move(tokens), false};
    in.adapter = adapter;
    StepOutput out = std::move(engine.step(std::span<const StepInput>(&in, 1)).front());
    if (a.logits) logits_rows.push_back(out.logits);
    return out.logits;
  };

  std::vector<float> logits = run(prompt);
  std::string finish = "length";
  for (int64_t i = 0; i < a.max_tokens; ++i) {
    const SampledToken t = sampler.sample(logits);
    if (stream) std::cout << stream->push(t.id) << std::flush;
    if (sampler.is_stop(t.id)) {
      finish = "stop";
      break;
    }
    const int64_t pos = int64_t(prompt.size()) + i;  // position of the token just generated
    // The last generated token gets logits only when --logits asks for them.
    if (i + 1 == a.max_tokens && !a.logits) break;
    if (pos >= cfg.max_context()) break;
    logits = run({t.id});
  }
  // A stop token's own position gets its logits row too, so every generated position has one.
  if (a.logits && finish == "stop") run({sampler.output().back()});

  const std::vector<int32_t>& output = sampler.output();
  if (a.json) {
    nlohmann::json j;
    j["prompt_ids"] = prompt;
    j["output_ids"] = output;
    j["text"] = tok ? nlohmann::json(tok->decode(output, /*skip_special_tokens=*/true)) : nlohmann::json(nullptr);
    j["finish_reason"] = finish;
    if (a.logits) j["logits"] = std::move(logits_rows);
    std::cout << j.dump() << "\n";
  } else if (stream) {
    std::cout << stream->finish() << "\n";
  } else {  // no tokenizer: print the ids
    for (size_t i = 0; i < output.size(); ++i) std::cout << (i ? " " : "") << output[i];
    std::cout << "\n";
  }
}

}  // namespace

void add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  a->sampling.temperature = 0.0;  // the CLI is greedy unless asked
  auto* cmd = app.add_subcommand("generate", "Generate from a prompt with the in-process reference engine");
  cmd->add_option("--model", a->model, "Hugging Face checkpoint folder")->required();
  auto* p = cmd->add_option("--prompt", a->prompt, "prompt text (needs the model's tokenizer.json)");
  auto* pi = cmd->add_option("--prompt-ids", a->prompt_ids, "prompt token ids, comma-separated (e.g. 1,2,3)");
  p->excludes(pi);
  pi->excludes(p);
  cmd->add_option("--max-tokens", a->max_tokens, "tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", a->sampling.temperature, "0: greedy")->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p)->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "0: off")->capture_default_str();
  cmd->add_option("--min-p", a->sampling.min_p)->capture_default_str();
  cmd->add_option("--repetition-penalty", a->sampling.repetition_penalty)->capture_default_str();
  cmd->add_option("--presence-penalty", a->sampling.presence_penalty)->capture_default_str();
  cmd->add_option("--frequency-penalty", a->sampling.frequency_penalty)->capture_default_str();
  cmd->add_option("--seed", a->seed, "RNG seed (same seed, same output)");
  cmd->add_flag("--ignore-eos", a->sampling.ignore_eos, "keep generating past EOS");
  cmd->add_option("--gating-temperature", a->gating_temperature, "divide gate logits by this before softmax");
  cmd->add_option("--lora", a->lora, "a PEFT LoRA adapter folder to generate with (applied unmerged)");
  cmd->add_option("--router-bias", a->router_bias,
                  "EXPERT=BIAS,... added to those experts' gate logits (as moemesh-attention --router-bias)");
  cmd->add_flag("--json", a->json, "print one JSON object (prompt_ids, output_ids, text, finish_reason)");
  cmd->add_flag("--logits", a->logits,
                "with --json: add logits of the last prompt position and of every generated position");
  cmd->callback([a] {
    if (a->prompt.empty() && a->prompt_ids.empty()) throw Error("generate: give --prompt or --prompt-ids");
    run_generate(*a);
  });
}

}  // namespace moemesh::cli
