// `moemesh mkmodel`: writes a random-weight model in the Hugging Face layout.
// `moemesh inspect`: opens a checkpoint, validates it and prints a summary (operators use it to
// check a download before serving it).
#include <cmath>
#include <cstdio>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/error.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "services/cli/commands.h"

namespace moemesh::cli {

namespace {

std::string human_count(double n) {
  char buf[32];
  if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.1fM", n / 1e6);
  else if (n >= 1e3) std::snprintf(buf, sizeof buf, "%.1fK", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", n);
  return buf;
}

std::string human_bytes(double n) {
  char buf[32];
  if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.1f MB", n / 1e6);
  else if (n >= 1e3) std::snprintf(buf, sizeof buf, "%.1f kB", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f B", n);
  return buf;
}

// "2000000000", "500MB", "1.5GB", "64MiB" (decimal units as transformers' max_shard_size).
uint64_t parse_size(const std::string& s) {
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (...) {
    throw Error("--shard-size: \"" + s + "\" is not a size (e.g. 2000000000, 500MB, 2GB)");
  }
  std::string unit = s.substr(pos);
  for (char& ch : unit) ch = char(std::toupper(static_cast<unsigned char>(ch)));
  double mul = unit.empty() || unit == "B" ? 1
               : unit == "KB"              ? 1e3
               : unit == "MB"              ? 1e6
               : unit == "GB"              ? 1e9
               : unit == "KIB"             ? 1024.0
               : unit == "MIB"             ? 1048576.0
               : unit == "GIB"             ? 1073741824.0
                                           : -1;
  if (mul < 0 || !(v > 0) || !std::isfinite(v))
    throw Error("--shard-size: \"" + s + "\" is not a positive size (e.g. 2000000000, 500MB, 2GB)");
  return uint64_t(v * mul);
}

struct MkmodelArgs {
  std::string arch, preset = "tiny", out, dtype = "bf16", tokenizer, shard_size;
  uint64_t seed = 0;
  int64_t sliding_window = 0;
  int64_t max_position_embeddings = 0;  // 0: the preset's
};

void run_mkmodel(const MkmodelArgs& a) {
  Arch arch = parse_arch(a.arch);
  ModelConfig c = model_preset(arch, a.preset);
  DType dtype = parse_float_dtype(a.dtype);
  TokenizerFiles tok = read_tokenizer_files(a.tokenizer.empty() ? default_tokenizer_dir(arch) : std::filesystem::path(a.tokenizer));
  c.vocab_size = tok.vocab_size;
  c.bos_token_id = tok.bos_id;
  c.eos_token_ids.clear();
  if (tok.eos_id) c.eos_token_ids.push_back(*tok.eos_id);
  if (a.sliding_window > 0) {
    if (arch != Arch::Mixtral) throw Error("--sliding-window applies to mixtral models only");
    c.sliding_window = a.sliding_window;
  }
  if (a.max_position_embeddings > 0) c.max_position_embeddings = a.max_position_embeddings;
  WriteOptions opts;
  opts.dtype = dtype;
  opts.seed = a.seed;
  if (!a.shard_size.empty()) opts.shard_bytes = parse_size(a.shard_size);
  WriteSummary s = write_model(c, a.out, opts, &tok);

  size_t weight_files = 0;
  for (const auto& f : s.files)
    if (f.size() > 12 && f.substr(f.size() - 12) == ".safetensors") ++weight_files;
  std::cout << "mkmodel: " << a.out << ": " << a.arch << "/" << a.preset << " seed " << a.seed << ", "
            << human_count(double(s.params)) << " params, " << human_bytes(double(s.tensor_bytes)) << " of "
            << a.dtype << " weights in " << weight_files << (weight_files == 1 ? " file" : " shards") << ", "
            << s.files.size() << " files in all\n";
}

void run_inspect(const std::string& dir, bool check_values) {
  auto ck = Checkpoint::open(dir);
  const ModelConfig& c = ck->config();
  int64_t params = 0;
  uint64_t bytes = 0;
  std::set<std::string> files, dtypes;
  std::set<std::string> implied;
  int64_t quantized = 0;
  uint64_t quantized_bytes = 0;
  for (const auto& t : Checkpoint::expected_tensors(c)) {
    implied.insert(t.name);
    if (ck->has(t.name)) {
      const TensorInfo& info = ck->info(t.name);
      params += info.numel();
      bytes += info.nbytes;
      files.insert(info.file.filename().string());
      dtypes.insert(std::string(dtype_name(info.dtype)));
      continue;
    }
    // A GPTQ module (Checkpoint::open checked its tensors): its logical shape, its stored bytes.
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    params += n;
    ++quantized;
    quantized_bytes += ck->linear_bytes(t.name);
    bytes += ck->linear_bytes(t.name);
    files.insert(ck->info(module_of(t.name) + ".qweight").file.filename().string());
  }
  if (quantized) dtypes.insert("INT" + std::to_string(ck->quantization()->bits));
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.is_moe_layer(l);
  std::string dt;
  for (const auto& d : dtypes) dt += (dt.empty() ? "" : "+") + d;

  std::cout << "model " << ck->name() << " (" << c.model_type << ")\n"
            << "  layers " << c.num_hidden_layers << " (" << moe_layers << " MoE), hidden " << c.hidden_size
            << ", heads " << c.num_attention_heads << "/" << c.num_key_value_heads << " kv, head_dim " << c.head_dim
            << ", vocab " << c.vocab_size << "\n"
            << "  experts " << c.num_experts << " top-" << c.num_experts_per_tok << ", width "
            << c.moe_intermediate_size;
  if (c.arch == Arch::DeepSeek)
    std::cout << ", shared " << c.n_shared_experts << ", dense width " << c.intermediate_size
              << ", first_k_dense_replace " << c.first_k_dense_replace;
  std::cout << "\n  rope_theta " << c.rope_theta << ", rms_norm_eps " << c.rms_norm_eps << ", sliding_window "
            << (c.sliding_window ? std::to_string(*c.sliding_window) : "none") << ", tied embeddings "
            << (c.tie_word_embeddings ? "yes" : "no") << "\n"
            << "  tensors " << implied.size() << " (" << ck->tensors().size() << " in files), " << human_count(double(params))
            << " params, " << human_bytes(double(bytes)) << " " << dt << " in " << files.size()
            << (files.size() == 1 ? " file" : " files") << "\n";
  if (ck->quantization())
    std::cout << "  quantization " << ck->quantization()->describe() << ": " << quantized << " Linear weights, "
              << human_bytes(double(quantized_bytes)) << "\n";

  if (check_values) {
    // Maps each tensor once and scans it; NaN/Inf weights are the usual sign of a bad export.
    std::vector<float> buf;
    for (const auto& name : implied) {
      if (!ck->has(name)) continue;  // GPTQ: integers, and scales checked when the model loads
      Weight w = ck->map(name);
      const size_t n = size_t(w.numel());
      buf.resize(n);
      to_f32(w.dtype, w.data, buf.data(), n);
      for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(buf[i]))
          throw Error(ck->info(name).file.filename().string() + ": tensor " + name + " holds a non-finite value at element " +
                      std::to_string(i));
    }
    std::cout << "  values: all finite\n";
  }
  std::cout << "ok\n";
}

}  // namespace

void add_mkmodel(CLI::App& app) {
  auto a = std::make_shared<MkmodelArgs>();
  CLI::App* mk = app.add_subcommand("mkmodel", "Write a random-weight Mixtral/DeepSeek-MoE model in Hugging Face layout");
  mk->add_option("--arch", a->arch, "mixtral or deepseek")->required();
  mk->add_option("--preset", a->preset, "tiny, small or medium")->capture_default_str();
  mk->add_option("--seed", a->seed, "weights are a function of the seed alone")->capture_default_str();
  mk->add_option("--out", a->out, "output folder (created; earlier weight files in it are replaced)")->required();
  mk->add_option("--dtype", a->dtype, "f32, f16 or bf16")->capture_default_str();
  mk->add_option("--tokenizer", a->tokenizer,
                 "tokenizer.json or its folder (default: bootstrap's llama2 for mixtral, deepseek_v3 for deepseek)");
  mk->add_option("--shard-size", a->shard_size, "largest weight file, bytes or 500MB/2GB (default 2GB)");
  mk->add_option("--sliding-window", a->sliding_window, "mixtral: attention window in positions (default: none)");
  mk->add_option("--max-position-embeddings", a->max_position_embeddings,
                 "the model's context length in config.json (default: the preset's; e.g. 131072 for 128K)")
      ->check(CLI::PositiveNumber);
  mk->callback([a] { run_mkmodel(*a); });
}

// `inspect` shares this file's checkpoint helpers.
void add_inspect(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  auto check = std::make_shared<bool>(false);
  CLI::App* ins = app.add_subcommand("inspect", "Validate a checkpoint folder and print its shape");
  ins->add_option("--model", *dir, "checkpoint folder")->required();
  ins->add_flag("--check-values", *check, "also map every tensor and check that all values are finite");
  ins->callback([dir, check] { run_inspect(*dir, *check); });
}

}  // namespace moemesh::cli
