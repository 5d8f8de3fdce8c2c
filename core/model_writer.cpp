#include "core/model_writer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <numbers>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/chat_templates.h"
#include "core/checkpoint.h"
#include "core/error.h"
#include "core/tokenizer.h"
#include "core/safetensors.h"

#ifndef MOEMESH_DEFAULT_CACHE_DIR
#define MOEMESH_DEFAULT_CACHE_DIR ""
#endif

namespace moemesh {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error(p.string() + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw Error(p.string() + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) throw Error(p.string() + ": write failed");
}

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fnv1a64(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}


}  // namespace

// ---------------------------------------------------------------------------------------------
// Tokenizer files

TokenizerFiles read_tokenizer_files(const fs::path& file_or_dir) {
  TokenizerFiles t;
  if (fs::is_directory(file_or_dir)) {
    t.tokenizer_json = file_or_dir / "tokenizer.json";
  } else {
    t.tokenizer_json = file_or_dir;
  }
  if (!fs::is_regular_file(t.tokenizer_json))
    throw Error(t.tokenizer_json.string() + ": not found (--tokenizer takes a tokenizer.json or its folder)");
  if (fs::path cfg = t.tokenizer_json.parent_path() / "tokenizer_config.json"; fs::is_regular_file(cfg))
    t.tokenizer_config = cfg;

  json tj = read_json(t.tokenizer_json);
  const std::string where = t.tokenizer_json.string();
  if (!tj.is_object() || !tj.contains("model") || !tj["model"].is_object() || !tj["model"].contains("vocab"))
    throw Error(where + ": no model.vocab (not a Hugging Face tokenizer.json)");
  const json& vocab = tj["model"]["vocab"];
  int64_t max_id = -1;
  auto id_of = [&](const std::string& content) -> std::optional<int64_t> {
    if (tj.contains("added_tokens") && tj["added_tokens"].is_array())
      for (const json& a : tj["added_tokens"])
        if (a.value("content", "") == content && a.contains("id") && a["id"].is_number_integer())
          return a["id"].get<int64_t>();
    if (vocab.is_object() && vocab.contains(content) && vocab[content].is_number_integer())
      return vocab[content].get<int64_t>();
    return std::nullopt;
  };
  if (vocab.is_object()) {  // BPE / WordPiece / WordLevel: token -> id
    for (const auto& [tok, id] : vocab.items())
      if (id.is_number_integer()) max_id = std::max(max_id, id.get<int64_t>());
  } else if (vocab.is_array()) {  // Unigram: [[piece, score], ...], id = position
    max_id = int64_t(vocab.size()) - 1;
  } else {
    throw Error(where + ": model.vocab is neither an object nor a list");
  }
  if (tj.contains("added_tokens") && tj["added_tokens"].is_array())
    for (const json& a : tj["added_tokens"])
      if (a.contains("id") && a["id"].is_number_integer()) max_id = std::max(max_id, a["id"].get<int64_t>());
  if (max_id < 0) throw Error(where + ": empty vocabulary");
  t.vocab_size = max_id + 1;

  if (!t.tokenizer_config.empty()) {
    json cfg = read_json(t.tokenizer_config);
    if (auto b = config_token_content(cfg, "bos_token")) t.bos_id = id_of(*b);
    if (auto e = config_token_content(cfg, "eos_token")) t.eos_id = id_of(*e);
    t.has_chat_template = cfg.contains("chat_template") && !cfg["chat_template"].is_null();
  }
  return t;
}

fs::path default_tokenizer_dir(Arch arch) {
  const std::string sub = arch == Arch::Mixtral ? "tokenizer-llama2/models" : "tokenizer-deepseek_v3/models";
  std::vector<fs::path> tried;
  if (const char* env = std::getenv("MOEMESH_CACHE"); env && *env) tried.push_back(fs::path(env) / sub);
  if (*MOEMESH_DEFAULT_CACHE_DIR) tried.push_back(fs::path(MOEMESH_DEFAULT_CACHE_DIR) / sub);
  for (const fs::path& p : tried)
    if (fs::is_regular_file(p / "tokenizer.json")) return p;
  std::string where;
  for (const fs::path& p : tried) where += (where.empty() ? "" : ", ") + p.string();
  throw Error("no default tokenizer for " + std::string(arch == Arch::Mixtral ? "mixtral" : "deepseek") +
              " (looked in " + (where.empty() ? std::string("nowhere: MOEMESH_CACHE is unset") : where) +
              "); run scripts/bootstrap or pass --tokenizer FILE_OR_DIR");
}

// ---------------------------------------------------------------------------------------------
// Random numbers

TensorRng::TensorRng(uint64_t seed, std::string_view tensor_name, uint64_t block) {
  uint64_t sm = seed;
  uint64_t mixed = (splitmix64(sm) ^ fnv1a64(tensor_name)) + block * 0xd1b54a32d192ed03ull;
  for (uint64_t& s : s_) s = splitmix64(mixed);
}

uint64_t TensorRng::next_u64() {  // xoshiro256**
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double TensorRng::next_normal() {  // Box-Muller, both outputs used
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  const double u1 = double((next_u64() >> 11) + 1) * 0x1.0p-53;  // (0, 1]: log is finite
  const double u2 = double(next_u64() >> 11) * 0x1.0p-53;
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double a = 2.0 * std::numbers::pi * u2;
  spare_ = r * std::sin(a);
  has_spare_ = true;
  return r * std::cos(a);
}

TensorInit::TensorInit(uint64_t seed, std::string name, const std::vector<int64_t>& shape)
    : seed_(seed), name_(std::move(name)) {
  const double fan_in = shape.size() >= 2 ? double(shape[1]) : 1.0;
  if (shape.size() == 1 && ends_with(name_, "norm.weight")) {
    mean_ = 1.0;  // RMSNorm scales near 1, a little noise so a wrong norm is noticed
    std_ = 0.05;
  } else if (name_ == "model.embed_tokens.weight") {
    std_ = 0.1;  // the first RMSNorm rescales; small keeps tied lm_head logits moderate
  } else if (ends_with(name_, "block_sparse_moe.gate.weight") || ends_with(name_, "mlp.gate.weight")) {
    std_ = 2.0 / std::sqrt(fan_in);  // router: logits of std ~2 so routing is decisive, not uniform
  } else {
    std_ = 1.0 / std::sqrt(fan_in);  // Linear: keeps activations at unit scale
  }
}

void TensorInit::fill(uint64_t start, float* out, size_t n) const {
  uint64_t i = start;
  const uint64_t end = start + n;
  while (i < end) {
    const uint64_t block = i / kBlock;
    const uint64_t block_end = std::min(end, (block + 1) * kBlock);
    TensorRng rng(seed_, name_, block);
    for (uint64_t skip = block * kBlock; skip < i; ++skip) rng.next_normal();  // unaligned start
    for (; i < block_end; ++i) *out++ = float(mean_ + std_ * rng.next_normal());
  }
}

namespace {

// Generates a shard's tensors in parallel pieces and writes them in file order.
void write_shard(safetensors::Writer& w, uint64_t seed, unsigned threads) {
  struct Piece {
    const safetensors::TensorSpec* spec;
    uint64_t start, count;
  };
  constexpr uint64_t kPiece = 16 * TensorInit::kBlock;  // 1M values, block aligned
  std::vector<Piece> pieces;
  for (const auto& s : w.order()) {
    const uint64_t numel = s.nbytes() / dtype_size(s.dtype);
    for (uint64_t at = 0; at < numel; at += kPiece) pieces.push_back({&s, at, std::min(kPiece, numel - at)});
  }
  std::vector<std::vector<char>> out(threads);
  std::vector<std::vector<float>> tmp(threads);
  std::vector<std::exception_ptr> failed(threads);
  auto make = [&](size_t slot, const Piece& p) {
    try {
      tmp[slot].resize(p.count);
      TensorInit(seed, p.spec->name, p.spec->shape).fill(p.start, tmp[slot].data(), p.count);
      out[slot].resize(p.count * dtype_size(p.spec->dtype));
      from_f32(p.spec->dtype, tmp[slot].data(), out[slot].data(), p.count);
    } catch (...) {
      failed[slot] = std::current_exception();
    }
  };
  for (size_t i = 0; i < pieces.size(); i += threads) {
    const size_t n = std::min<size_t>(threads, pieces.size() - i);
    std::vector<std::thread> pool;
    for (size_t k = 1; k < n; ++k) pool.emplace_back(make, k, pieces[i + k]);
    make(0, pieces[i]);
    for (auto& t : pool) t.join();
    for (auto& e : failed)
      if (e) std::rethrow_exception(e);
    for (size_t k = 0; k < n; ++k) w.write(out[k].data(), out[k].size());
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The model folder

WriteSummary write_model(const ModelConfig& config, const fs::path& dir, const WriteOptions& opts,
                         const TokenizerFiles* tok) {
  if (opts.dtype != DType::F32 && opts.dtype != DType::F16 && opts.dtype != DType::BF16)
    throw Error("model weights must be f32, f16 or bf16");
  if (opts.shard_bytes == 0) throw Error("shard size must be positive");
  ModelConfig c = config;
  c.torch_dtype = opts.dtype == DType::F32 ? "float32" : opts.dtype == DType::F16 ? "float16" : "bfloat16";
  // Round-trip through the parser: a preset or flag combination that makes no sense fails
  // here, before anything is written.
  c = ModelConfig::from_json(c.to_json(), "config.json");

  fs::create_directories(dir);
  // Files of an earlier run with another sharding would be picked up instead of ours.
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string n = entry.path().filename().string();
    if (n == safetensors::kSingleFile || n == safetensors::kIndexFile ||
        (n.rfind("model-", 0) == 0 && ends_with(n, ".safetensors")))
      fs::remove(entry.path());
  }

  WriteSummary sum;
  write_text(dir / "config.json", c.to_json().dump(2) + "\n");
  sum.files.push_back("config.json");
  json gen = {{"_from_model_config", true}, {"transformers_version", "4.46.3"}};
  if (c.bos_token_id) gen["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_ids.size() == 1) gen["eos_token_id"] = c.eos_token_ids[0];
  if (c.eos_token_ids.size() > 1) gen["eos_token_id"] = c.eos_token_ids;
  write_text(dir / "generation_config.json", gen.dump(2) + "\n");
  sum.files.push_back("generation_config.json");

  std::vector<safetensors::TensorSpec> specs;
  for (const auto& t : Checkpoint::expected_tensors(c)) {
    specs.push_back({t.name, opts.dtype, t.shape});
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    sum.params += n;
    sum.tensor_bytes += specs.back().nbytes();
  }
  auto shards = safetensors::plan_shards(specs, opts.shard_bytes);
  const unsigned threads =
      opts.threads ? opts.threads : std::clamp(std::thread::hardware_concurrency(), 1u, 16u);
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string fname = shards.size() == 1 ? safetensors::kSingleFile : safetensors::shard_file_name(i, shards.size());
    safetensors::Writer w(dir / fname, shards[i]);
    write_shard(w, opts.seed, threads);
    w.finish();
    sum.files.push_back(fname);
  }
  if (shards.size() > 1) {
    safetensors::write_index(dir, shards);
    sum.files.push_back(safetensors::kIndexFile);
  }

  if (tok) {
    fs::copy_file(tok->tokenizer_json, dir / "tokenizer.json", fs::copy_options::overwrite_existing);
    sum.files.push_back("tokenizer.json");
    // The llama2 tokenizer ships no chat template; Mixtral-Instruct's is the one users expect.
    const bool add_template = c.arch == Arch::Mixtral && !tok->has_chat_template;
    if (!tok->tokenizer_config.empty() && !add_template) {
      fs::copy_file(tok->tokenizer_config, dir / "tokenizer_config.json", fs::copy_options::overwrite_existing);
    } else {
      json cfg = tok->tokenizer_config.empty() ? json{{"tokenizer_class", "PreTrainedTokenizerFast"}}
                                               : read_json(tok->tokenizer_config);
      if (add_template) cfg["chat_template"] = kMixtralChatTemplate;
      write_text(dir / "tokenizer_config.json", cfg.dump(2) + "\n");
    }
    sum.files.push_back("tokenizer_config.json");
  }
  return sum;
}

}  // namespace moemesh
