// `moemesh quantize --method rtn`: reads a float checkpoint (F32/F16/BF16) and writes a GPTQ v1
// checkpoint folder (docs/quantization.md): every quantized Linear's `.weight` becomes qweight /
// qzeros / scales / g_idx with AutoGPTQ's names, dtypes and shapes; the rest (embeddings, norms,
// router gates, lm_head, attention with --skip-attention) stays `.weight` in --dtype.
//
// Round-to-nearest per group of inputs and per output row, the convention of
// tests/reference/gptq_reference.py's pack_gptq: the f16 scale is rounded up before q is computed
// (so no q clips), sym zero = 2^(b-1), asym zero in [1, 2^b - 1] (v1 stores zero - 1, so zero 0
// is avoided), q = clamp(round(w / scale) + zero, 0, 2^b - 1), g_idx[i] = i / G (no desc_act).
// Tensors are streamed one by one: only one module's packed output is held in memory.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/model_writer.h"
#include "core/safetensors.h"
#include "services/cli/commands.h"

namespace moemesh::cli {

namespace {

namespace fs = std::filesystem;
using safetensors::shape_str;

struct QuantizeArgs {
  std::string model, out, bits = "4", group_size = "128", method = "rtn", dtype = "f16";
  bool sym = false, asym = false, skip_attention = false;
};

struct Settings {
  int bits = 4;
  int64_t group_size = 128;  // -1: one group over the whole input
  bool sym = true;
  bool skip_attention = false;
  DType dtype = DType::F16;  // of the tensors left unquantized
  int pack() const { return 32 / bits; }
  int64_t groups(int64_t in) const { return group_size < 0 ? 1 : (in + group_size - 1) / group_size; }
};

int64_t parse_int(const std::string& flag, const std::string& s) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty())
    throw Error(flag + ": \"" + s + "\" is not an integer");
  return v;
}

Settings parse_settings(const QuantizeArgs& a) {
  if (a.method == "gptq")
    throw Error("--method gptq: not built yet (GPTQ with calibration data is future work): use --method rtn");
  if (a.method != "rtn") throw Error("--method: \"" + a.method + "\" is unknown (expected rtn)");
  Settings s;
  const int64_t bits = parse_int("--bits", a.bits);
  if (bits != 4 && bits != 8) throw Error("--bits: " + a.bits + " is not supported (expected 4 or 8)");
  s.bits = int(bits);
  s.group_size = parse_int("--group-size", a.group_size);
  if (s.group_size == 0 || s.group_size < -1)
    throw Error("--group-size: " + a.group_size + " is not a group size (expected -1 or a positive size)");
  if (a.sym && a.asym) throw Error("--sym and --asym exclude each other");
  s.sym = !a.asym;
  s.skip_attention = a.skip_attention;
  if (a.dtype != "f16" && a.dtype != "bf16" && a.dtype != "f32")
    throw Error("--dtype: \"" + a.dtype + "\" is unknown (expected f16, bf16 or f32)");
  s.dtype = parse_float_dtype(a.dtype);
  return s;
}

// Which Linear weights become GPTQ tensors (the HF names, as AutoGPTQ quantizes them): attention
// q/k/v/o, routed experts, DeepSeek shared experts and dense MLPs. Never the router gates
// (`block_sparse_moe.gate`, `mlp.gate`), embeddings, norms or lm_head.
bool quantized(const Checkpoint::ExpectedTensor& t, const Settings& s) {
  const std::string& n = t.name;
  if (t.shape.size() != 2 || !n.ends_with(".weight")) return false;
  if (n.find(".self_attn.") != std::string::npos) return !s.skip_attention;
  if (n.find(".block_sparse_moe.experts.") != std::string::npos) return true;
  return n.find(".mlp.") != std::string::npos && !n.ends_with(".mlp.gate.weight");
}

// The smallest float16 >= max(x, 2^-14) (the smallest normal: a group of zeros still divides).
uint16_t f16_ceil(double x, const std::string& tensor) {
  x = std::max(x, 0x1p-14);
  uint16_t h = f32_to_f16(float(x));
  while (h < 0x7c00 && double(f16_to_f32(h)) < x) ++h;
  while (h > 0 && double(f16_to_f32(uint16_t(h - 1))) >= x) --h;
  if (h >= 0x7c00) throw Error("tensor " + tensor + ": weights too large for float16 scales");
  return h;
}

// One Linear's GPTQ v1 tensors.
struct Packed {
  std::vector<int32_t> qweight;  // [in / p, out]
  std::vector<int32_t> qzeros;   // [groups, out / p]
  std::vector<uint16_t> scales;  // [groups, out], f16
  std::vector<int32_t> g_idx;    // [in]
  int parts_left = 4;            // written tensors left before it can go
};

Packed quantize_rtn(const Weight& w, const Settings& s) {
  const int64_t out = w.rows(), in = w.cols(), p = s.pack(), ng = s.groups(in);
  const int64_t G = s.group_size < 0 ? in : s.group_size;
  const int64_t maxq = (int64_t(1) << s.bits) - 1, half = int64_t(1) << (s.bits - 1);
  Packed r;
  r.qweight.assign(size_t(in / p * out), 0);
  r.qzeros.assign(size_t(ng * (out / p)), 0);
  r.scales.assign(size_t(ng * out), 0);
  r.g_idx.resize(size_t(in));
  for (int64_t i = 0; i < in; ++i) r.g_idx[size_t(i)] = int32_t(i / G);
  auto* qw = reinterpret_cast<uint32_t*>(r.qweight.data());
  auto* qz = reinterpret_cast<uint32_t*>(r.qzeros.data());

  std::vector<float> row(static_cast<size_t>(in));
  const size_t row_bytes = size_t(in) * dtype_size(w.dtype);
  for (int64_t j = 0; j < out; ++j) {
    to_f32(w.dtype, static_cast<const char*>(w.data) + size_t(j) * row_bytes, row.data(), row.size());
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t begin = g * G, end = std::min(in, begin + G);
      double lo = 0, hi = 0, absmax = 0;  // GPTQ's asym range always holds 0
      for (int64_t i = begin; i < end; ++i) {
        const double v = row[size_t(i)];
        if (!std::isfinite(v))
          throw Error("tensor " + w.name + " holds a non-finite value at [" + std::to_string(j) + ", " +
                      std::to_string(i) + "]");
        lo = std::min(lo, v);
        hi = std::max(hi, v);
        absmax = std::max(absmax, std::fabs(v));
      }
      uint16_t scale;
      int64_t zero;
      if (s.sym) {
        scale = f16_ceil(absmax / double(half - 1), w.name);
        zero = half;
      } else {
        scale = f16_ceil((hi - lo) / double(maxq), w.name);
        zero = int64_t(std::nearbyint(-lo / double(f16_to_f32(scale))));  // ties to even, as NumPy
        if (zero < 1) {  // stored as zero - 1: keep zero >= 1 and stretch the scale so hi still fits
          scale = f16_ceil(hi / double(maxq - 1), w.name);
          zero = 1;
        }
      }
      const double sd = f16_to_f32(scale);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t q = std::clamp(int64_t(std::nearbyint(double(row[size_t(i)]) / sd)) + zero, int64_t(0), maxq);
        qw[size_t((i / p) * out + j)] |= uint32_t(q) << (s.bits * (i % p));
      }
      r.scales[size_t(g * out + j)] = scale;
      qz[size_t(g * (out / p) + j / p)] |= uint32_t((zero - 1) & maxq) << (s.bits * (j % p));
    }
  }
  return r;
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
  Quantizer(const Checkpoint& ck, const Settings& s) : ck_(ck), s_(s) {}

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
      if (!quantized(t, s_)) {
        specs.push_back({t.name, s_.dtype, t.shape});
        sources_[t.name] = {t.name, Source::kConvert, ""};
        continue;
      }
      const int64_t out = t.shape[0], in = t.shape[1];
      for (const auto& [what, n] : {std::pair{"in", in}, std::pair{"out", out}})
        if (n % p)
          throw Error("tensor " + t.name + " " + shape_str(t.shape) + ": " + what + " " + std::to_string(n) +
                      " is not a multiple of " + std::to_string(p) + " (" + std::to_string(s_.bits) +
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
      const Weight x = ck_.map(src.tensor);
      layer_in_ += ck_.info(src.tensor).nbytes;
      it = packed_.emplace(module, quantize_rtn(x, s_)).first;
      ++layer_modules_;
    }
    Packed& pk = it->second;
    if (src.part == "qweight") w.write(pk.qweight.data(), pk.qweight.size() * 4);
    if (src.part == "qzeros") w.write(pk.qzeros.data(), pk.qzeros.size() * 4);
    if (src.part == "scales") w.write(pk.scales.data(), pk.scales.size() * 2);
    if (src.part == "g_idx") w.write(pk.g_idx.data(), pk.g_idx.size() * 4);
    if (--pk.parts_left == 0) packed_.erase(it);
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
  std::map<std::string, Packed> packed_;  // modules with parts still to write
  std::vector<float> buf_;
  uint64_t bytes_in_ = 0, bytes_out_ = 0, layer_in_ = 0, layer_out_ = 0;
  int64_t modules_ = 0, layer_modules_ = 0;
  std::string layer_;
};

void write_output(const Checkpoint& ck, const Settings& s, const fs::path& out) {
  Quantizer q(ck, s);
  const auto specs = q.plan();

  nlohmann::ordered_json qc = {{"quant_method", "gptq"},  {"bits", s.bits},      {"group_size", s.group_size},
                               {"desc_act", false},       {"sym", s.sym},        {"checkpoint_format", "gptq"},
                               {"true_sequential", true}, {"damp_percent", 0.01}};
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
  std::cout << "quantize: " << out.string() << ": RTN " << s.bits << "-bit, group size "
            << (s.group_size < 0 ? std::string("-1 (one group)") : std::to_string(s.group_size))
            << (s.sym ? ", sym" : ", asym") << ", " << q.modules() << " Linear quantized"
            << (s.skip_attention ? " (attention left in " : " (others in ") << dtype_name(s.dtype) << "), "
            << shards.size() << (shards.size() == 1 ? " weight file" : " weight shards")
            << "; copied: " << (files.empty() ? "nothing" : files) << "\n"
            << "quantize: bytes in " << q.bytes_in() << " (" << mb(q.bytes_in()) << "), bytes out " << q.bytes_out()
            << " (" << mb(q.bytes_out()) << "), ratio " << ratio << "\n";
}

void run_quantize(const QuantizeArgs& a) {
  const Settings s = parse_settings(a);
  const fs::path out = a.out;
  const bool existed = fs::exists(out);
  if (existed && !fs::is_directory(out)) throw Error("--out " + a.out + ": exists and is not a folder");
  if (existed && !fs::is_empty(out)) throw Error("--out " + a.out + ": exists and is not empty");
  auto ck = Checkpoint::open(a.model);
  if (ck->quantization())
    throw Error(a.model + ": already quantized (" + ck->quantization()->describe() + "); quantize a float checkpoint");
  try {
    write_output(*ck, s, out);
  } catch (...) {  // leave no half-written checkpoint behind
    std::error_code ec;
    if (existed) {
      for (const auto& e : fs::directory_iterator(out, ec)) fs::remove_all(e.path(), ec);
    } else {
      fs::remove_all(out, ec);
    }
    throw;
  }
}

}  // namespace

void add_quantize(CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  auto* cmd = app.add_subcommand("quantize", "Write a float checkpoint as a GPTQ (v1) checkpoint, round-to-nearest");
  cmd->add_option("--model", a->model, "float (F32/F16/BF16) Hugging Face checkpoint folder")->required();
  cmd->add_option("--out", a->out, "output folder (created; must be empty if it exists)")->required();
  cmd->add_option("--bits", a->bits, "4 or 8")->capture_default_str();
  cmd->add_option("--group-size", a->group_size, "inputs per scale/zero group; -1: one group")->capture_default_str();
  cmd->add_flag("--sym", a->sym, "symmetric: zero 2^(bits-1) (the default)");
  cmd->add_flag("--asym", a->asym, "asymmetric: a zero per group and output");
  cmd->add_option("--method", a->method, "rtn (round to nearest); gptq is not built yet")->capture_default_str();
  cmd->add_flag("--skip-attention", a->skip_attention, "leave q/k/v/o_proj unquantized");
  cmd->add_option("--dtype", a->dtype, "f16, bf16 or f32: the tensors left unquantized")->capture_default_str();
  cmd->callback([a] { run_quantize(*a); });
}

}  // namespace moemesh::cli
