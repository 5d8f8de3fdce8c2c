#include "core/checkpoint.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_file.h"
#include "core/safetensors.h"

namespace moemesh {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using safetensors::shape_str;

int64_t product(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

// The MLP sub-module names of one layer: "mlp" for DeepSeek, "block_sparse_moe" for Mixtral.
std::string mlp_tensor(const std::string& prefix, const ModelConfig& c, const char* which) {
  std::string w = which;
  if (c.arch == Arch::Mixtral) {
    const char* m = w == "gate" ? "w1" : w == "up" ? "w3" : "w2";
    return prefix + m + ".weight";
  }
  return prefix + w + "_proj.weight";
}

std::string router_tensor(const ModelConfig& c, int64_t layer) {
  return layer_prefix(layer) + (c.arch == Arch::Mixtral ? "block_sparse_moe.gate.weight" : "mlp.gate.weight");
}

std::string shared_prefix(int64_t layer) { return layer_prefix(layer) + "mlp.shared_experts."; }
std::string dense_prefix(int64_t layer) { return layer_prefix(layer) + "mlp."; }

// A mapping of part of a weight file: [start, start + length) of the file at base.
struct FileRange {
  void* base = nullptr;
  size_t length = 0;
  uint64_t start = 0;
};

// Maps bytes [offset, offset + nbytes) of a file of file_size bytes, read-only. A tensor of a huge
// page or more gets the 2 MiB-aligned file range around it, at a 2 MiB-aligned address: the page
// cache keeps such files in huge folios, and only a whole folio at a matching address maps as one
// huge page. Mapped exactly, a tensor's first and last partial 2 MiB went through 4 KiB pages; on
// our VMs those page walks halved bf16 decode (docs/performance.md). The extra bytes belong to
// neighbouring tensors and are never read.
FileRange map_file_range(int fd, uint64_t offset, uint64_t nbytes, uint64_t file_size) {
  constexpr uint64_t kHuge = uint64_t(2) << 20;
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
  FileRange r;
  if (nbytes < kHuge) {
    r.start = offset / page * page;
    r.length = size_t(offset + nbytes - r.start);
    r.base = ::mmap(nullptr, r.length, PROT_READ, MAP_PRIVATE, fd, off_t(r.start));
    return r;
  }
  r.start = offset / kHuge * kHuge;
  const uint64_t end = std::min((offset + nbytes + kHuge - 1) / kHuge * kHuge, (file_size + page - 1) / page * page);
  r.length = size_t(end - r.start);
  // Reserve room to align the address, map the file over the aligned part, return the rest.
  char* room = static_cast<char*>(
      ::mmap(nullptr, r.length + kHuge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (room == MAP_FAILED) {
    r.base = MAP_FAILED;
    return r;
  }
  char* at = reinterpret_cast<char*>((uintptr_t(room) + kHuge - 1) & ~uintptr_t(kHuge - 1));
  r.base = ::mmap(at, r.length, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, off_t(r.start));
  const int err = errno;
  if (r.base == MAP_FAILED) {
    ::munmap(room, r.length + kHuge);
    errno = err;
    return r;
  }
  if (at > room) ::munmap(room, size_t(at - room));
  if (char* tail = at + r.length; tail < room + r.length + kHuge)
    ::munmap(tail, size_t(room + r.length + kHuge - tail));
  ::madvise(r.base, r.length, MADV_HUGEPAGE);  // a hint: without it, a THP "madvise" system maps 4 KiB pages
  return r;
}

}  // namespace

int64_t TensorInfo::numel() const { return product(shape); }
int64_t Weight::numel() const { return product(shape); }

struct Checkpoint::Mapping {
  void* base = nullptr;
  size_t length = 0;
  Weight weight;
  ~Mapping() {
    if (base) ::munmap(base, length);
  }
};

Checkpoint::~Checkpoint() = default;

std::string Checkpoint::expert_tensor(const ModelConfig& c, int64_t layer, int64_t expert, const char* which) {
  std::string prefix = layer_prefix(layer) + (c.arch == Arch::Mixtral ? "block_sparse_moe" : "mlp") + ".experts." +
                       std::to_string(expert) + ".";
  return mlp_tensor(prefix, c, which);
}

std::vector<Checkpoint::ExpectedTensor> Checkpoint::expected_tensors(const ModelConfig& c) {
  std::vector<ExpectedTensor> out;
  const int64_t h = c.hidden_size;
  const int64_t qd = c.num_attention_heads * c.head_dim;
  const int64_t kvd = c.num_key_value_heads * c.head_dim;
  auto mlp = [&](const std::string& prefix, int64_t width) {
    out.push_back({mlp_tensor(prefix, c, "gate"), {width, h}});
    out.push_back({mlp_tensor(prefix, c, "up"), {width, h}});
    out.push_back({mlp_tensor(prefix, c, "down"), {h, width}});
  };
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    std::string p = layer_prefix(l);
    out.push_back({p + "self_attn.q_proj.weight", {qd, h}});
    out.push_back({p + "self_attn.k_proj.weight", {kvd, h}});
    out.push_back({p + "self_attn.v_proj.weight", {kvd, h}});
    out.push_back({p + "self_attn.o_proj.weight", {h, qd}});
    if (c.is_moe_layer(l)) {
      out.push_back({router_tensor(c, l), {c.num_experts, h}});
      for (int64_t e = 0; e < c.num_experts; ++e) {
        for (const char* which : {"gate", "up", "down"}) {
          int64_t w = c.moe_intermediate_size;
          out.push_back({expert_tensor(c, l, e, which),
                         std::string(which) == "down" ? std::vector<int64_t>{h, w} : std::vector<int64_t>{w, h}});
        }
      }
      if (c.arch == Arch::DeepSeek && c.n_shared_experts > 0) mlp(shared_prefix(l), c.shared_intermediate_size());
    } else {
      mlp(dense_prefix(l), c.intermediate_size);
    }
    out.push_back({p + "input_layernorm.weight", {h}});
    out.push_back({p + "post_attention_layernorm.weight", {h}});
  }
  out.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  return out;
}

std::shared_ptr<Checkpoint> Checkpoint::open(const fs::path& dir) {
  if (!fs::is_directory(dir)) throw Error(dir.string() + ": no such checkpoint folder");
  if (!fs::exists(dir / "config.json")) throw Error(dir.string() + ": no config.json (not a Hugging Face checkpoint)");
  std::shared_ptr<Checkpoint> ck(new Checkpoint());
  ck->dir_ = dir;
  ck->config_ = ModelConfig::load(dir / "config.json");
  ck->gptq_ = read_gptq_config(read_json_file(dir / "config.json"), dir);

  // Where each tensor lives, and the file to blame for a missing one.
  std::string missing_blame;
  auto add = [&](const safetensors::Header& hdr, const safetensors::Entry& e) {
    TensorInfo t;
    t.name = e.name;
    t.dtype = e.dtype;
    t.shape = e.shape;
    t.file = hdr.file;
    t.offset = hdr.data_offset + e.begin;
    t.nbytes = e.nbytes();
    ck->tensors_[e.name] = std::move(t);
  };
  const fs::path index_path = dir / safetensors::kIndexFile;
  const fs::path single_path = dir / safetensors::kSingleFile;
  // transformers prefers the single file when both exist; so do we.
  if (fs::exists(single_path)) {
    safetensors::Header hdr = safetensors::read_header(single_path);
    for (const auto& e : hdr.tensors) add(hdr, e);
    missing_blame = std::string(safetensors::kSingleFile) + ": tensor %s is missing";
  } else if (fs::exists(index_path)) {
    const std::string iname = safetensors::kIndexFile;
    json index = read_json_file(index_path);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      throw Error(iname + ": no \"weight_map\" object");
    std::map<std::string, std::vector<std::string>> by_file;  // shard -> tensors
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string()) throw Error(iname + ": weight_map entry for " + it.key() + " is not a file name");
      std::string f = it.value().get<std::string>();
      // A shard must sit in the checkpoint folder; refuse paths that would escape it.
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
        throw Error(iname + ": weight_map entry for " + it.key() + " names a bad file \"" + f + "\"");
      by_file[f].push_back(it.key());
    }
    for (const auto& [f, names] : by_file) {
      if (!fs::exists(dir / f)) throw Error(f + ": not found (listed in " + iname + ")");
      safetensors::Header hdr = safetensors::read_header(dir / f);
      std::unordered_map<std::string, const safetensors::Entry*> entries;
      for (const auto& e : hdr.tensors) entries[e.name] = &e;
      for (const std::string& n : names) {
        auto it = entries.find(n);
        if (it == entries.end()) throw Error(f + ": tensor " + n + " is missing (" + iname + " places it here)");
        add(hdr, *it->second);
      }
    }
    missing_blame = iname + ": tensor %s is missing from weight_map";
  } else {
    throw Error(dir.string() + ": no " + safetensors::kSingleFile + " or " + safetensors::kIndexFile);
  }

  const TensorLookup find = [&](const std::string& n) -> const TensorInfo* {
    auto it = ck->tensors_.find(n);
    return it == ck->tensors_.end() ? nullptr : &it->second;
  };
  for (const ExpectedTensor& x : expected_tensors(ck->config_)) {
    auto it = ck->tensors_.find(x.name);
    const std::string module = module_of(x.name);
    if (it == ck->tensors_.end() && x.shape.size() == 2 && find(module + ".qweight")) {
      if (!ck->gptq_)
        throw Error("tensor " + x.name + " is missing; " + module +
                    ".qweight suggests a GPTQ checkpoint, but config.json has no quantization_config");
      check_gptq_tensors(*ck->gptq_, module, x.shape[0], x.shape[1], find);
      continue;
    }
    if (it != ck->tensors_.end() && x.name == "lm_head.weight" && ck->gptq_ && ck->gptq_->lm_head)
      throw Error(
          "tensor lm_head.weight: quantization_config has \"lm_head\": true, but lm_head is stored as "
          "lm_head.weight, not lm_head.qweight");
    if (it == ck->tensors_.end()) {
      std::string msg = missing_blame;
      msg.replace(msg.find("%s"), 2, x.name);
      throw Error(msg);
    }
    const TensorInfo& t = it->second;
    const std::string where = t.file.filename().string() + ": tensor " + x.name;
    if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
      throw Error(where + " has dtype " + std::string(dtype_name(t.dtype)) + ", expected F32, F16 or BF16");
    if (t.shape != x.shape)
      throw Error(where + " has shape " + shape_str(t.shape) + ", expected " + shape_str(x.shape) +
                  " (from config.json)");
  }
  return ck;
}

std::string Checkpoint::name() const {
  fs::path p = dir_.lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  if (p.filename().empty() || p.filename() == ".") p = fs::absolute(dir_).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string();
}

bool Checkpoint::has(const std::string& tensor) const { return tensors_.count(tensor) > 0; }

const TensorInfo& Checkpoint::info(const std::string& tensor) const {
  auto it = tensors_.find(tensor);
  if (it == tensors_.end()) throw Error(name() + ": no tensor " + tensor + " in the checkpoint");
  return it->second;
}

Weight Checkpoint::map(const std::string& tensor) const {
  const TensorInfo& t = info(tensor);
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = mappings_.find(tensor); it != mappings_.end()) return it->second->weight;

  auto m = std::make_unique<Mapping>();
  m->weight.name = t.name;
  m->weight.dtype = t.dtype;
  m->weight.shape = t.shape;
  const std::string fname = t.file.filename().string();
  if (t.nbytes == 0) {
    static const char kEmpty[16] = {};
    m->weight.data = kEmpty;  // a view must be non-null to count as loaded
  } else {
    int fd = ::open(t.file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(fname + ": cannot open to map tensor " + tensor + ": " + std::strerror(errno));
    struct stat st {};
    // The file may have changed since open(); touching pages past its end would be SIGBUS.
    if (::fstat(fd, &st) != 0 || uint64_t(st.st_size) < t.offset + t.nbytes) {
      ::close(fd);
      throw Error(fname + ": file shrank since the checkpoint was opened; tensor " + tensor + " is cut off");
    }
    const FileRange r = map_file_range(fd, t.offset, t.nbytes, uint64_t(st.st_size));
    int err = errno;
    ::close(fd);  // the mapping keeps the file alive
    if (r.base == MAP_FAILED) throw Error(fname + ": cannot map tensor " + tensor + ": " + std::strerror(err));
    m->base = r.base;
    m->length = r.length;
    m->weight.data = static_cast<const char*>(r.base) + (t.offset - r.start);
  }
  Weight w = m->weight;
  mappings_[tensor] = std::move(m);
  return w;
}

Weight Checkpoint::map_linear(const std::string& weight_tensor) const {
  if (has(weight_tensor) || !gptq_) return map(weight_tensor);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = quantized_.find(weight_tensor); it != quantized_.end()) return it->second;
  }
  const std::string module = module_of(weight_tensor);
  const Weight qweight = map(module + ".qweight"), qzeros = map(module + ".qzeros"), scales = map(module + ".scales");
  const Weight g_idx = has(module + ".g_idx") ? map(module + ".g_idx") : Weight{};
  const int64_t in = qweight.rows() * gptq_->pack(), out = qweight.cols();
  GptqTensors t;
  t.qweight = static_cast<const int32_t*>(qweight.data);
  t.qzeros = static_cast<const int32_t*>(qzeros.data);
  t.scales = scales.data;
  t.scales_dtype = scales.dtype;
  t.g_idx = static_cast<const int32_t*>(g_idx.data);
  Weight w;
  w.name = weight_tensor;
  w.dtype = DType::I32;
  w.shape = {out, in};
  w.data = qweight.data;
  w.quant = std::make_shared<const cpu::QuantMatrix>(repack_gptq(*gptq_, module, out, in, t));
  std::lock_guard<std::mutex> lock(mu_);
  // The kernels read the repacked copy: the checkpoint's pages can go (they stay mapped, so the
  // tensors still count as this process's share, and would be read again from the file).
  for (const char* suffix : {".qweight", ".qzeros", ".scales", ".g_idx"})
    if (auto it = mappings_.find(module + suffix); it != mappings_.end() && it->second->base)
      ::madvise(it->second->base, it->second->length, MADV_DONTNEED);
  return quantized_.emplace(weight_tensor, w).first->second;
}

void Checkpoint::release_linear(const std::string& weight_tensor) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (mappings_.erase(weight_tensor)) return;
  quantized_.erase(weight_tensor);
  const std::string module = module_of(weight_tensor);
  for (const char* suffix : {".qweight", ".qzeros", ".scales", ".g_idx"}) mappings_.erase(module + suffix);
}

uint64_t Checkpoint::linear_bytes(const std::string& weight_tensor) const {
  if (has(weight_tensor) || !gptq_) return info(weight_tensor).nbytes;
  uint64_t n = 0;
  const std::string module = module_of(weight_tensor);
  for (const char* suffix : {".qweight", ".qzeros", ".scales", ".g_idx"})
    if (has(module + suffix)) n += info(module + suffix).nbytes;
  return n;
}

uint64_t Checkpoint::mapped_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t n = 0;
  for (const auto& [name, m] : mappings_) n += tensors_.at(name).nbytes;
  return n;
}

std::vector<std::string> Checkpoint::mapped_tensors() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& [name, m] : mappings_) out.push_back(name);
  return out;
}

ModelWeights Checkpoint::load(const WeightSelection& sel) const {
  const ModelConfig& c = config_;
  for (const auto& [layer, expert] : sel.experts)
    if (layer < 0 || layer >= c.num_hidden_layers || !c.is_moe_layer(layer) || expert < 0 || expert >= c.num_experts)
      throw Error(name() + ": selection asks for expert " + std::to_string(expert) + " of layer " +
                  std::to_string(layer) + ", which the model does not have");

  // The gate and up projections run as one product (a SwiGLU job): both quantized or neither.
  auto checked = [](MlpWeights m) {
    if (bool(m.gate.quant) != bool(m.up.quant))
      throw Error("tensors " + m.gate.name + " and " + m.up.name +
                  ": one is GPTQ-quantized and the other is not; both or neither are supported");
    return m;
  };
  auto mlp = [&](const std::string& prefix) {
    return checked(MlpWeights{map_linear(mlp_tensor(prefix, c, "gate")), map_linear(mlp_tensor(prefix, c, "up")),
                              map_linear(mlp_tensor(prefix, c, "down"))});
  };
  ModelWeights w;
  if (sel.dense_parts) {
    w.embed = map("model.embed_tokens.weight");
    w.final_norm = map("model.norm.weight");
    w.lm_head = c.tie_word_embeddings ? w.embed : map_linear("lm_head.weight");
  }
  w.layers.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& L = w.layers[size_t(l)];
    L.moe = c.is_moe_layer(l);
    if (L.moe) L.experts.resize(size_t(c.num_experts));
    const std::string p = layer_prefix(l);
    if (sel.dense_parts) {
      L.input_norm = map(p + "input_layernorm.weight");
      L.post_attention_norm = map(p + "post_attention_layernorm.weight");
      L.q = map_linear(p + "self_attn.q_proj.weight");
      L.k = map_linear(p + "self_attn.k_proj.weight");
      L.v = map_linear(p + "self_attn.v_proj.weight");
      L.o = map_linear(p + "self_attn.o_proj.weight");
      if (L.moe) {
        L.router = map_linear(router_tensor(c, l));
        if (c.arch == Arch::DeepSeek && c.n_shared_experts > 0) L.shared = mlp(shared_prefix(l));
      } else {
        L.dense = mlp(dense_prefix(l));
      }
    }
    if (L.moe)
      for (int64_t e = 0; e < c.num_experts; ++e)
        if (sel.wants_expert(l, e))
          L.experts[size_t(e)] =
              checked(MlpWeights{map_linear(expert_tensor(c, l, e, "gate")), map_linear(expert_tensor(c, l, e, "up")),
                                 map_linear(expert_tensor(c, l, e, "down"))});
  }
  return w;
}

}  // namespace moemesh
