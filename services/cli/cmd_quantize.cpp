// `moemesh quantize`: reads a float checkpoint (F32/F16/BF16) and writes a GPTQ v1 checkpoint
// folder (docs/quantization.md): every quantized Linear's `.weight` becomes qweight / qzeros /
// scales / g_idx with AutoGPTQ's names, dtypes and shapes; the rest (embeddings, norms, router
// gates, lm_head, attention with --skip-attention) stays `.weight` in --dtype.
//
// --method rtn rounds to nearest per group (core/gptq_quantizer.h: the convention of
// tests/reference/gptq_reference.py's pack_gptq, g_idx[i] = i / G). --method gptq first runs the
// calibration text through the model layer by layer (core/gptq_calibrate.h) and keeps every
// module's packed tensors in memory. The output tensors are then streamed one by one into a
// temporary folder next to --out, renamed into place when complete: a failed run leaves nothing.
//
// `moemesh quantize-eval` compares quantized checkpoints' next-token distributions with their
// float original's on held-out text (core/gptq_eval.h): mean KL(p_ref || p_quant), top-1 agreement.
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/gptq.h"
#include "core/gptq_calibrate.h"
#include "core/gptq_eval.h"
#include "core/gptq_quantizer.h"
#include "core/model_writer.h"
#include "core/safetensors.h"
#include "core/tokenizer.h"
#include "services/cli/commands.h"

namespace moemesh::cli {

namespace {

namespace fs = std::filesystem;
using safetensors::shape_str;

struct QuantizeArgs {
  std::string model, out, bits = "4", group_size = "128", method = "rtn", dtype = "f16";
  bool sym = false, asym = false, skip_attention = false, desc_act = false, lm_head = false;
  std::string calibration, calibration_text, calib_tokens = "4096", samples = "0", seq_len = "512", damp = "0.01",
                                             min_expert_rows = "0";
};

struct Settings {
  bool gptq = false;
  QuantOptions quant;  // bits, group size, sym; GPTQ: desc_act, damp
  bool skip_attention = false;
  bool lm_head = false;                       // GPTQModel's lm_head=True: the output projection too
  DType dtype = DType::F16;                   // of the tensors left unquantized
  std::string calibration, calibration_text;  // GPTQ: one of them
  int64_t calib_tokens = 4096, samples = 0, seq_len = 512, min_expert_rows = 0;
  int pack() const { return 32 / quant.bits; }
  int64_t groups(int64_t in) const { return quant.groups(in); }
};

int64_t parse_int(const std::string& flag, const std::string& s) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty())
    throw Error(flag + ": \"" + s + "\" is not an integer");
  return v;
}

int64_t parse_count(const std::string& flag, const std::string& s) {
  const int64_t v = parse_int(flag, s);
  if (v < 0) throw Error(flag + ": " + s + " is negative");
  return v;
}

Settings parse_settings(const QuantizeArgs& a) {
  if (a.method != "rtn" && a.method != "gptq")
    throw Error("--method: \"" + a.method + "\" is unknown (expected rtn or gptq)");
  Settings s;
  s.gptq = a.method == "gptq";
  const int64_t bits = parse_int("--bits", a.bits);
  if (bits != 4 && bits != 8) throw Error("--bits: " + a.bits + " is not supported (expected 4 or 8)");
  s.quant.bits = int(bits);
  s.quant.group_size = parse_int("--group-size", a.group_size);
  if (s.quant.group_size == 0 || s.quant.group_size < -1)
    throw Error("--group-size: " + a.group_size + " is not a group size (expected -1 or a positive size)");
  if (a.sym && a.asym) throw Error("--sym and --asym exclude each other");
  s.quant.sym = !a.asym;
  s.skip_attention = a.skip_attention;
  s.lm_head = a.lm_head;
  if (a.dtype != "f16" && a.dtype != "bf16" && a.dtype != "f32")
    throw Error("--dtype: \"" + a.dtype + "\" is unknown (expected f16, bf16 or f32)");
  s.dtype = parse_float_dtype(a.dtype);
  if (!s.gptq) {
    if (!a.calibration.empty() || !a.calibration_text.empty())
      throw Error("--calibration/--calibration-text: only --method gptq uses calibration data");
    if (a.desc_act) throw Error("--desc-act: only --method gptq orders the columns (by its Hessian)");
    return s;
  }
  if (a.calibration.empty() && a.calibration_text.empty())
    throw Error(
        "--method gptq needs calibration data: --calibration FILE (.jsonl, or plain text) or "
        "--calibration-text TEXT");
  if (!a.calibration.empty() && !a.calibration_text.empty())
    throw Error("--calibration and --calibration-text exclude each other");
  s.calibration = a.calibration;
  s.calibration_text = a.calibration_text;
  s.quant.desc_act = a.desc_act;
  char* end = nullptr;
  s.quant.damp = std::strtod(a.damp.c_str(), &end);
  if (a.damp.empty() || *end != '\0' || !(s.quant.damp >= 0 && s.quant.damp <= 1))
    throw Error("--damp: \"" + a.damp + "\" is not a fraction in [0, 1] (AutoGPTQ's damp_percent, e.g. 0.01)");
  s.calib_tokens = parse_count("--calib-tokens", a.calib_tokens);
  s.samples = parse_count("--samples", a.samples);
  s.seq_len = parse_count("--seq-len", a.seq_len);
  if (s.seq_len == 0) throw Error("--seq-len: 0 is not a sequence length");
  s.min_expert_rows = parse_count("--min-expert-rows", a.min_expert_rows);
  return s;
}

// Which Linear weights become GPTQ tensors (the HF names, as AutoGPTQ quantizes them): attention
// q/k/v/o, routed experts, DeepSeek shared experts and dense MLPs. Never the router gates
// (`block_sparse_moe.gate`, `mlp.gate`), embeddings or norms; lm_head with --lm-head.
bool quantized(const std::string& n, const Settings& s) {
  if (n == "lm_head.weight") return s.lm_head;
  if (!n.ends_with(".weight")) return false;
  if (n.find(".self_attn.") != std::string::npos) return !s.skip_attention;
  if (n.find(".block_sparse_moe.experts.") != std::string::npos) return true;
  return n.find(".mlp.") != std::string::npos && !n.ends_with(".mlp.gate.weight");
}

// Where one output tensor's bytes come from.
struct Source {
  std::string tensor;  // in the input checkpoint
  enum Kind { kConvert, kVerbatim, kQuant } kind = kConvert;
  std::string part;  // kQuant: qweight, qzeros, scales or g_idx
};

nlohmann::ordered_json read_json(const fs::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(file.string() + ": cannot open");
  try {
    return nlohmann::ordered_json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(file.string() + ": not valid JSON: " + e.what());
  }
}

void write_json(const fs::path& file, const nlohmann::ordered_json& j) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) throw Error(file.string() + ": write failed");
}

std::string mb(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MB", double(bytes) / 1e6);
  return buf;
}

// The files of a checkpoint folder that are not weights or configs we rewrite (tokenizer files,
// generation_config.json, chat templates, README...).
bool copied_as_is(const fs::path& f) {
  static const std::set<std::string> rewritten = {"config.json", "quantize_config.json", safetensors::kIndexFile};
  static const std::set<std::string> weights = {".safetensors", ".bin",     ".pt",   ".pth",  ".ckpt",
                                                ".h5",          ".msgpack", ".gguf", ".onnx", ".tmp"};
  return !rewritten.count(f.filename().string()) && !weights.count(f.extension().string());
}

// "model.layers.12." for a layer's tensors, "" for the others.
std::string layer_of(const std::string& name) {
  static const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return "";
  const size_t dot = name.find('.', prefix.size());
  return dot == std::string::npos ? "" : name.substr(0, dot + 1);
}

class Quantizer {
 public:
  // `ready`: the modules quantized already (GPTQ); the others are rounded to nearest as written.
  Quantizer(const Checkpoint& ck, const Settings& s, QuantizedModules ready)
      : ck_(ck), s_(s), ready_(std::move(ready)) {}

  // The output tensors, each with its source; throws before anything is written for a module
  // whose shape cannot be packed.
  std::vector<safetensors::TensorSpec> plan() {
    std::vector<safetensors::TensorSpec> specs;
    std::set<std::string> expected;
    const int64_t p = s_.pack();
    for (const auto& t : Checkpoint::expected_tensors(ck_.config())) {
      expected.insert(t.name);
      const TensorInfo& info = ck_.info(t.name);
      bytes_in_ += info.nbytes;
      if (t.shape.size() != 2 || !quantized(t.name, s_)) {
        specs.push_back({t.name, s_.dtype, t.shape});
        sources_[t.name] = {t.name, Source::kConvert, ""};
        continue;
      }
      const int64_t out = t.shape[0], in = t.shape[1];
      for (const auto& [what, n] : {std::pair{"in", in}, std::pair{"out", out}})
        if (n % p)
          throw Error("tensor " + t.name + " " + shape_str(t.shape) + ": " + what + " " + std::to_string(n) +
                      " is not a multiple of " + std::to_string(p) + " (" + std::to_string(s_.quant.bits) +
                      "-bit values packed " + std::to_string(p) + " to an int32)");
      const std::string module = module_of(t.name);
      const int64_t ng = s_.groups(in);
      specs.push_back({module + ".qweight", DType::I32, {in / p, out}});
      specs.push_back({module + ".qzeros", DType::I32, {ng, out / p}});
      specs.push_back({module + ".scales", DType::F16, {ng, out}});
      specs.push_back({module + ".g_idx", DType::I32, {in}});
      for (const char* part : {"qweight", "qzeros", "scales", "g_idx"})
        sources_[module + "." + part] = {t.name, Source::kQuant, part};
      ++modules_;
    }
    // Anything else in the files (buffers a converter kept) travels unchanged.
    for (const auto& [name, info] : ck_.tensors()) {
      if (expected.count(name)) continue;
      if (sources_.count(name)) throw Error("tensor " + name + " is in the checkpoint and would also be written");
      specs.push_back({name, info.dtype, info.shape});
      sources_[name] = {name, Source::kVerbatim, ""};
      bytes_in_ += info.nbytes;
    }
    std::sort(specs.begin(), specs.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
    for (const auto& sp : specs) bytes_out_ += sp.nbytes();
    return specs;
  }

  // Streams one shard's tensors (in the writer's order).
  void write(safetensors::Writer& w) {
    for (const auto& spec : w.order()) {
      const Source& src = sources_.at(spec.name);
      const std::string layer = layer_of(spec.name);
      if (layer != layer_) {
        report_layer();
        layer_ = layer;
      }
      layer_out_ += spec.nbytes();
      if (src.kind == Source::kQuant) {
        write_part(w, src);
        continue;
      }
      const Weight x = ck_.map(src.tensor);
      layer_in_ += ck_.info(src.tensor).nbytes;
      if (src.kind == Source::kVerbatim || x.dtype == spec.dtype) {
        w.write(x.data, size_t(ck_.info(src.tensor).nbytes));
        continue;
      }
      const size_t n = size_t(x.numel()), chunk = size_t(1) << 20, es = dtype_size(x.dtype);
      buf_.resize(std::min(n, chunk));
      for (size_t at = 0; at < n; at += chunk) {
        const size_t k = std::min(chunk, n - at);
        to_f32(x.dtype, static_cast<const char*>(x.data) + at * es, buf_.data(), k);
        w.write_f32(buf_.data(), k);
      }
    }
  }

  void finish() { report_layer(); }

  uint64_t bytes_in() const { return bytes_in_; }
  uint64_t bytes_out() const { return bytes_out_; }
  int64_t modules() const { return modules_; }

 private:
  void write_part(safetensors::Writer& w, const Source& src) {
    const std::string module = module_of(src.tensor);
    auto it = packed_.find(module);
    if (it == packed_.end()) {
      layer_in_ += ck_.info(src.tensor).nbytes;
      auto done = ready_.find(module);
      if (done != ready_.end()) {
        it = packed_.emplace(module, Pending{std::move(done->second)}).first;
        ready_.erase(done);
      } else {
        const Weight x = ck_.map(src.tensor);
        std::vector<float> f(size_t(x.numel()));
        to_f32(x.dtype, x.data, f.data(), f.size());
        it =
            packed_.emplace(module, Pending{pack_gptq_v1(quantize_rtn(f.data(), x.rows(), x.cols(), s_.quant, x.name))})
                .first;
      }
      ++layer_modules_;
    }
    Pending& pending = it->second;
    const PackedLinear& pk = pending.tensors;
    if (src.part == "qweight") w.write(pk.qweight.data(), pk.qweight.size() * 4);
    if (src.part == "qzeros") w.write(pk.qzeros.data(), pk.qzeros.size() * 4);
    if (src.part == "scales") w.write(pk.scales.data(), pk.scales.size() * 2);
    if (src.part == "g_idx") w.write(pk.g_idx.data(), pk.g_idx.size() * 4);
    if (--pending.parts_left == 0) packed_.erase(it);
  }

  void report_layer() {
    if (!layer_.empty())
      std::cout << "quantize: " << layer_.substr(0, layer_.size() - 1) << ": " << layer_modules_
                << " Linear quantized, " << mb(layer_in_) << " -> " << mb(layer_out_) << std::endl;
    layer_in_ = layer_out_ = 0;
    layer_modules_ = 0;
  }

  const Checkpoint& ck_;
  const Settings& s_;
  std::map<std::string, Source> sources_;
  struct Pending {
    PackedLinear tensors;
    int parts_left = 4;  // written tensors left before it can go
  };
  QuantizedModules ready_;
  std::map<std::string, Pending> packed_;  // modules with parts still to write
  std::vector<float> buf_;
  uint64_t bytes_in_ = 0, bytes_out_ = 0, layer_in_ = 0, layer_out_ = 0;
  int64_t modules_ = 0, layer_modules_ = 0;
  std::string layer_;
};

std::string seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", s);
  return buf;
}

// The calibration windows: the file's samples or the text, tokenized, cut into --seq-len windows
// up to --calib-tokens tokens.
std::vector<std::vector<int32_t>> calibration_windows(const Checkpoint& ck, const Settings& s) {
  std::shared_ptr<Tokenizer> tok;
  if (fs::exists(ck.dir() / "tokenizer.json")) tok = Tokenizer::from_dir(ck.dir());
  std::vector<std::vector<int32_t>> samples;
  std::string what;
  if (!s.calibration.empty()) {
    samples = read_calibration(s.calibration, tok.get(), s.samples);
    what = s.calibration;
  } else {
    if (!tok) throw Error("--calibration-text: " + ck.dir().string() + " has no tokenizer.json to encode it");
    samples.push_back(tok->encode(s.calibration_text));
    what = "--calibration-text";
  }
  auto windows = token_windows(samples, s.seq_len, s.calib_tokens);
  int64_t tokens = 0;
  for (const auto& w : windows) tokens += int64_t(w.size());
  if (tokens == 0) throw Error(what + ": no calibration tokens");
  std::cout << "quantize: calibration: " << tokens << " tokens from " << samples.size()
            << (samples.size() == 1 ? " sample" : " samples") << " of " << what << ", " << windows.size()
            << (windows.size() == 1 ? " window" : " windows") << " of <= " << s.seq_len << std::endl;
  return windows;
}

QuantizedModules run_gptq(const Checkpoint& ck, const Settings& s) {
  const auto windows = calibration_windows(ck, s);
  CalibrationOptions opts;
  opts.quant = s.quant;
  opts.quantized = [&s](const std::string& name) { return quantized(name, s); };
  opts.min_expert_rows = s.min_expert_rows;
  const int64_t min_rows = opts.effective_min_expert_rows();
  return gptq_calibrate(ck, windows, opts, [&](const LayerReport& r) {
    for (const auto& f : r.fallbacks)
      std::cerr << "quantize: warning: model.layers." << r.layer << " expert " << f.expert << ": " << f.rows
                << " calibration rows (< " << min_rows << "): rounded to nearest (RTN)" << std::endl;
    const std::string what =
        r.lm_head ? "lm_head" : "layer " + std::to_string(r.layer + 1) + "/" + std::to_string(r.layers);
    std::cout << "quantize: gptq " << what << ": " << seconds(r.seconds) << ", " << r.gptq + r.rtn << " Linear ("
              << r.gptq << " GPTQ, " << r.rtn << " RTN)" << std::endl;
  });
}

// Writes into `out`; `shown` is the folder named in the summary (where it will end up).
void write_output(const Checkpoint& ck, const Settings& s, const fs::path& out, const std::string& shown,
                  QuantizedModules ready) {
  Quantizer q(ck, s, std::move(ready));
  const auto specs = q.plan();

  nlohmann::ordered_json qc = {
      {"quant_method", "gptq"},       {"bits", s.quant.bits},         {"group_size", s.quant.group_size},
      {"desc_act", s.quant.desc_act}, {"sym", s.quant.sym},           {"checkpoint_format", "gptq"},
      {"true_sequential", true},      {"damp_percent", s.quant.damp}, {"lm_head", s.lm_head}};
  nlohmann::ordered_json config = read_json(ck.dir() / "config.json");
  config["quantization_config"] = qc;
  config["torch_dtype"] = s.dtype == DType::F16 ? "float16" : s.dtype == DType::BF16 ? "bfloat16" : "float32";

  fs::create_directories(out);
  write_json(out / "config.json", config);
  write_json(out / "quantize_config.json", qc);  // older AutoGPTQ reads this one
  std::vector<std::string> copied;
  for (const auto& e : fs::directory_iterator(ck.dir()))
    if (e.is_regular_file() && copied_as_is(e.path())) {
      fs::copy_file(e.path(), out / e.path().filename());
      copied.push_back(e.path().filename().string());
    }

  const auto shards = safetensors::plan_shards(specs, kDefaultShardBytes);
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string file =
        shards.size() == 1 ? safetensors::kSingleFile : safetensors::shard_file_name(i, shards.size());
    safetensors::Writer w(out / file, shards[i]);
    q.write(w);
    w.finish();
  }
  q.finish();
  if (shards.size() > 1) safetensors::write_index(out, shards);

  std::sort(copied.begin(), copied.end());
  std::string files;
  for (const auto& f : copied) files += (files.empty() ? "" : ", ") + f;
  char ratio[32];
  std::snprintf(ratio, sizeof ratio, "%.2fx", q.bytes_out() ? double(q.bytes_in()) / double(q.bytes_out()) : 0.0);
  std::cout << "quantize: " << shown << ": " << (s.gptq ? "GPTQ " : "RTN ") << s.quant.bits << "-bit, group size "
            << (s.quant.group_size < 0 ? std::string("-1 (one group)") : std::to_string(s.quant.group_size))
            << (s.quant.desc_act ? ", desc_act" : "") << (s.quant.sym ? ", sym" : ", asym") << ", " << q.modules()
            << " Linear quantized" << (s.skip_attention ? " (attention left in " : " (others in ")
            << dtype_name(s.dtype) << "), " << shards.size() << (shards.size() == 1 ? " weight file" : " weight shards")
            << "; copied: " << (files.empty() ? "nothing" : files) << "\n"
            << "quantize: bytes in " << q.bytes_in() << " (" << mb(q.bytes_in()) << "), bytes out " << q.bytes_out()
            << " (" << mb(q.bytes_out()) << "), ratio " << ratio << "\n";
}

void run_quantize(const QuantizeArgs& a) {
  const Settings s = parse_settings(a);
  const fs::path out = fs::absolute(a.out).lexically_normal();
  const bool existed = fs::exists(out);
  if (existed && !fs::is_directory(out)) throw Error("--out " + a.out + ": exists and is not a folder");
  if (existed && !fs::is_empty(out)) throw Error("--out " + a.out + ": exists and is not empty");
  auto ck = Checkpoint::open(a.model);
  if (ck->quantization())
    throw Error(a.model + ": already quantized (" + ck->quantization()->describe() + "); quantize a float checkpoint");
  if (!out.has_filename()) throw Error("--out " + a.out + ": not a folder name");
  if (s.lm_head) require_own_lm_head(ck->config(), a.model);
  // Written beside --out and renamed into place at the end: a failed run leaves no half checkpoint.
  const fs::path tmp = out.parent_path() / ("." + out.filename().string() + ".tmp-" + std::to_string(::getpid()));
  try {
    QuantizedModules ready;
    if (s.gptq) ready = run_gptq(*ck, s);
    fs::remove_all(tmp);
    write_output(*ck, s, tmp, a.out, std::move(ready));
    if (existed) fs::remove(out);  // empty, checked above
    fs::rename(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

struct EvalArgs {
  std::string reference, text, text_string, max_tokens = "2048", seq_len = "512";
  std::vector<std::string> quantized;
  bool json = false;
};

void run_quantize_eval(const EvalArgs& a) {
  if (a.text.empty() == a.text_string.empty())
    throw Error("quantize-eval: give one of --text FILE or --text-string TEXT");
  const int64_t max_tokens = parse_count("--max-tokens", a.max_tokens), seq_len = parse_count("--seq-len", a.seq_len);
  if (seq_len < 2) throw Error("--seq-len: " + a.seq_len + " is too short (at least 2)");
  auto ref = Checkpoint::open(a.reference);
  if (ref->quantization()) throw Error("--reference " + a.reference + ": is quantized; give the float checkpoint");
  std::string text = a.text_string;
  if (!a.text.empty()) {
    std::ifstream in(a.text, std::ios::binary);
    if (!in) throw Error("--text " + a.text + ": cannot open");
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  if (!fs::exists(ref->dir() / "tokenizer.json"))
    throw Error("--reference " + a.reference + ": has no tokenizer.json to encode the text");
  const auto tok = Tokenizer::from_dir(ref->dir());
  const std::vector<std::vector<int32_t>> samples = {tok->encode(text)};
  const auto windows = token_windows(samples, seq_len, max_tokens);
  std::vector<std::shared_ptr<const Checkpoint>> models;
  for (const auto& q : a.quantized) {
    auto ck = Checkpoint::open(q);
    if (ck->config().vocab_size != ref->config().vocab_size || ck->config().hidden_size != ref->config().hidden_size)
      throw Error("--quantized " + q + ": not the same model shape as --reference " + a.reference);
    models.push_back(std::move(ck));
  }
  const std::vector<DistributionDiff> diffs = compare_next_token(ref, models, windows);
  int64_t tokens = 0;
  for (const auto& w : windows) tokens += int64_t(w.size());
  const auto describe = [](const Checkpoint& ck) {
    return ck.quantization() ? ck.quantization()->describe() : std::string("float");
  };
  if (a.json) {
    nlohmann::ordered_json j = {{"reference", a.reference},
                                {"tokens", tokens},
                                {"windows", windows.size()},
                                {"seq_len", seq_len},
                                {"results", nlohmann::ordered_json::array()}};
    for (size_t i = 0; i < models.size(); ++i)
      j["results"].push_back({{"model", a.quantized[i]},
                              {"quantization", describe(*models[i])},
                              {"positions", diffs[i].positions},
                              {"mean_kl", diffs[i].mean_kl},
                              {"max_kl", diffs[i].max_kl},
                              {"top1_agreement", diffs[i].top1_agreement},
                              {"nll", diffs[i].nll},
                              {"reference_nll", diffs[i].reference_nll}});
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::cout << "quantize-eval: reference " << a.reference << ", " << tokens << " tokens in " << windows.size()
            << " windows of <= " << seq_len << "; KL(p_ref || p_quant) of next-token distributions\n";
  for (size_t i = 0; i < models.size(); ++i) {
    char line[256];
    std::snprintf(line, sizeof line, "mean KL %.6f  max KL %.4f  top-1 agreement %.2f%%  NLL %.4f (reference %.4f)",
                  diffs[i].mean_kl, diffs[i].max_kl, 100.0 * diffs[i].top1_agreement, diffs[i].nll,
                  diffs[i].reference_nll);
    std::cout << a.quantized[i] << " (" << describe(*models[i]) << "): " << line << "\n";
  }
}

}  // namespace

void add_quantize(CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  auto* cmd =
      app.add_subcommand("quantize", "Write a float checkpoint as a GPTQ (v1) checkpoint: RTN or calibrated GPTQ");
  cmd->add_option("--model", a->model, "float (F32/F16/BF16) Hugging Face checkpoint folder")->required();
  cmd->add_option("--out", a->out, "output folder (created; must be empty if it exists)")->required();
  cmd->add_option("--bits", a->bits, "4 or 8")->capture_default_str();
  cmd->add_option("--group-size", a->group_size, "inputs per scale/zero group; -1: one group")->capture_default_str();
  cmd->add_flag("--sym", a->sym, "symmetric: zero 2^(bits-1) (the default)");
  cmd->add_flag("--asym", a->asym, "asymmetric: a zero per group and output");
  cmd->add_option("--method", a->method, "rtn (round to nearest) or gptq (calibrated)")->capture_default_str();
  cmd->add_flag("--skip-attention", a->skip_attention, "leave q/k/v/o_proj unquantized");
  cmd->add_flag("--lm-head", a->lm_head,
                "quantize lm_head too (GPTQModel's lm_head=True; the largest matrix a decode step reads)");
  cmd->add_option("--dtype", a->dtype, "f16, bf16 or f32: the tensors left unquantized")->capture_default_str();
  cmd->add_option("--calibration", a->calibration,
                  "gptq: calibration data, .jsonl (one sample a line: text, prompt, chat messages or input_ids) "
                  "or any other file as one text");
  cmd->add_option("--calibration-text", a->calibration_text, "gptq: the calibration text itself");
  cmd->add_option("--calib-tokens", a->calib_tokens, "gptq: calibration tokens used at most (0: all)")
      ->capture_default_str();
  cmd->add_option("--samples", a->samples, "gptq: .jsonl lines used at most (0: all)")->capture_default_str();
  cmd->add_option("--seq-len", a->seq_len, "gptq: samples are cut into sequences of at most this many tokens")
      ->capture_default_str();
  cmd->add_option("--damp", a->damp, "gptq: dampening, a fraction of mean(diag H) (damp_percent)")
      ->capture_default_str();
  cmd->add_flag("--desc-act", a->desc_act, "gptq: quantize columns by descending Hessian diagonal (act order)");
  cmd->add_option("--min-expert-rows", a->min_expert_rows,
                  "gptq: a routed expert with fewer calibration rows is rounded to nearest (0: 2 x group size)")
      ->capture_default_str();
  cmd->callback([a] { run_quantize(*a); });

  auto e = std::make_shared<EvalArgs>();
  auto* ev = app.add_subcommand("quantize-eval",
                                "Compare quantized checkpoints with their float original on held-out text: mean "
                                "KL of next-token distributions and top-1 agreement");
  ev->add_option("--reference", e->reference, "the float checkpoint folder")->required();
  ev->add_option("--quantized", e->quantized, "a quantized checkpoint folder (repeatable)")->required();
  ev->add_option("--text", e->text, "held-out text file");
  ev->add_option("--text-string", e->text_string, "held-out text");
  ev->add_option("--max-tokens", e->max_tokens, "tokens evaluated at most (0: all)")->capture_default_str();
  ev->add_option("--seq-len", e->seq_len, "the text is cut into sequences of at most this many tokens")
      ->capture_default_str();
  ev->add_flag("--json", e->json, "one JSON object");
  ev->callback([e] { run_quantize_eval(*e); });
}

}  // namespace moemesh::cli
