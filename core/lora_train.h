// LoRA fine-tuning on the CPU (`moemesh finetune`, docs/finetune.md): the model's forward pass
// as the inference engine computes it (core/engine.cpp), in f32 (or f64 for gradient checks),
// with LoRA adapters on chosen Linears, its backward pass by hand (core/lora_train_ops.h), AdamW,
// and the adapter written the way PEFT saves it (adapter_config.json, adapter_model.safetensors).
//
// Only the adapters' A and B get gradients: base weights, embeddings, norms, lm_head are frozen.
// Serving computes y = W·x + (alpha / r)·B·(A·x) with the same names.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/model_config.h"
#include "core/tokenizer.h"

namespace moemesh {

struct LoraTrainConfig {
  int64_t rank = 8;
  double alpha = 16;  // scale = alpha / rank
  // HF module short names (q_proj k_proj v_proj o_proj; w1 w2 w3 for Mixtral experts;
  // gate_proj up_proj down_proj for DeepSeek experts, shared experts and dense MLPs).
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  bool train_router = false;  // adds block_sparse_moe.gate (Mixtral) / mlp.gate (DeepSeek)
  uint64_t seed = 0;          // of the A matrices' initial values
};

// Parses "a,b,c" and checks each name against the architecture; throws moemesh::Error naming
// an unknown or misplaced one.
std::vector<std::string> parse_target_modules(Arch arch, const std::string& list);
// The short names as adapter_config.json lists them (the router's "gate" added when trained).
std::vector<std::string> peft_target_modules(const LoraTrainConfig& lc);

// One adapted Linear: its HF module path ("model.layers.0.self_attn.q_proj") and where its A
// [rank, in] and B [out, rank] live in the flat parameter vector.
struct LoraTrainModule {
  std::string module;
  int64_t in = 0, out = 0;
  size_t a = 0, b = 0;  // offsets
};

template <typename T>
class LoraTrainModel {
 public:
  // Copies the base weights as T (F32/F16/BF16 checkpoints; GPTQ-quantized Linears refused) and
  // makes the adapters: A uniform in ±1/sqrt(in) (PEFT's kaiming_uniform(a=√5)), B zero.
  LoraTrainModel(const ModelConfig& cfg, const ModelWeights& weights, const LoraTrainConfig& lc);
  ~LoraTrainModel();
  LoraTrainModel(const LoraTrainModel&) = delete;
  LoraTrainModel& operator=(const LoraTrainModel&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const LoraTrainConfig& lora() const { return lc_; }
  const std::vector<LoraTrainModule>& modules() const { return modules_; }
  std::vector<T>& params() { return params_; }
  const std::vector<T>& params() const { return params_; }

  // Σ over positions i with targets[i] >= 0 of -log p(targets[i] | tokens[0..i]). With grad:
  // grad (size params().size()) += grad_scale · d(that sum)/d(params). Thread-safe (reads only).
  double loss(std::span<const int32_t> tokens, std::span<const int32_t> targets, T grad_scale,
              std::vector<T>* grad) const;
  // Logits of every position, [tokens.size(), vocab].
  std::vector<T> logits(std::span<const int32_t> tokens) const;
  // Greedy continuation of prompt until eos (included) or max_new tokens.
  std::vector<int32_t> greedy(std::vector<int32_t> prompt, int64_t max_new, int32_t eos) const;

  // adapter_config.json + adapter_model.safetensors (f32) in dir (created).
  void save(const std::filesystem::path& dir, const std::string& base_model) const;
  // Reads adapter_model.safetensors of dir into params(); every module must be there with its shape.
  void load_adapter(const std::filesystem::path& dir);

 private:
  struct Impl;
  ModelConfig cfg_;
  LoraTrainConfig lc_;
  std::vector<LoraTrainModule> modules_;
  std::vector<T> params_;
  std::unique_ptr<Impl> impl_;
};

// One training example: the rendered prompt's tokens then the completion's (its EOS last);
// targets[i] is the token position i must predict (a completion token), -1 elsewhere.
struct TrainExample {
  std::vector<int32_t> tokens, targets;
  int64_t prompt_tokens = 0;
};

// Reads JSONL: {"messages": [..., {"role": "assistant", "content": ...}]} or
// {"prompt": ..., "completion": ...}, rendered and tokenized exactly as the server's chat
// completions do (actors/openai_frontend.cpp). Throws moemesh::Error naming the line.
std::vector<TrainExample> load_train_data(const std::filesystem::path& jsonl, const Tokenizer& tok,
                                          int64_t max_seq_len);

struct TrainOptions {
  int64_t batch_size = 8, epochs = 3;
  // As transformers' Trainer defaults: the rate decays linearly to 0 over the run, the gradient's
  // global norm is clipped to max_grad_norm (0: no clipping).
  double lr = 1e-3, weight_decay = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, max_grad_norm = 1.0;
  bool linear_decay = true;
  uint64_t seed = 0;  // of the shuffling
  int threads = 1;    // examples of a batch computed in parallel
};

struct StepReport {
  int64_t step = 0, epoch = 0;     // from 1
  int64_t batch = 0, batches = 0;  // batch within the epoch (from 1), batches per epoch
  double loss = 0;                 // mean over the batch's completion tokens
  double tokens_per_s = 0;         // all tokens of the batch (prompt and completion)
};

// AdamW over shuffled mini-batches; the loss of a batch is the mean cross-entropy of its
// completion tokens. on_step after every optimizer step, on_epoch after every epoch.
void train_lora(LoraTrainModel<float>& model, const std::vector<TrainExample>& data, const TrainOptions& opts,
                const std::function<void(const StepReport&)>& on_step,
                const std::function<void(int64_t epoch)>& on_epoch);

}  // namespace moemesh
