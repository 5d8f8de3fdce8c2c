#include "core/gptq_calibrate.h"

#include <chrono>
#include <deque>
#include <fstream>
#include <initializer_list>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/compute_backend.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/kv_cache.h"
#include "core/moe.h"
#include "core/tokenizer.h"
#include "core/weight_jobs.h"
#include "kernels/cpu/gemm.h"

namespace moemesh {
namespace {

std::vector<float> weight_f32(const Weight& w) {
  if (w.quant || (w.dtype != DType::F32 && w.dtype != DType::F16 && w.dtype != DType::BF16))
    throw Error("tensor " + w.name + ": not a float weight (quantize a float checkpoint)");
  std::vector<float> out(size_t(w.numel()));
  to_f32(w.dtype, w.data, out.data(), out.size());
  return out;
}

// One layer's weights as they are being quantized: each quantized Linear is replaced by its
// dequantized f32 values (exactly what the INT4/INT8 kernels compute with).
class LayerQuantizer {
 public:
  LayerQuantizer(const CalibrationOptions& opts, QuantizedModules& out, LayerReport& report)
      : opts_(opts), out_(out), report_(report) {}

  bool selected(const Weight& w) const { return opts_.quantized(w.name); }

  // The selected ones of `ws` (which share an input): GPTQ with the Hessian of that input, or RTN
  // when h is null.
  void quantize(std::initializer_list<Weight*> ws, const Hessian* h) {
    std::optional<GptqSolver> solver;
    for (Weight* w : ws)
      if (selected(*w)) {
        if (h && !solver) solver.emplace(*h, opts_.quant, w->name);
        quantize(*w, solver ? &*solver : nullptr);
      }
  }

 private:
  void quantize(Weight& w, const GptqSolver* solver) {
    const std::vector<float> f = weight_f32(w);
    const QuantizedLinear q = solver ? solver->quantize(f.data(), w.rows(), w.cols(), w.name)
                                     : quantize_rtn(f.data(), w.rows(), w.cols(), opts_.quant, w.name);
    out_[module_of(w.name)] = pack_gptq_v1(q);
    ++(solver ? report_.gptq : report_.rtn);
    dequantized_.push_back(q.dequantize());
    w.dtype = DType::F32;
    w.data = dequantized_.back().data();
    w.quant = nullptr;
  }

  const CalibrationOptions& opts_;
  QuantizedModules& out_;
  LayerReport& report_;
  std::deque<std::vector<float>> dequantized_;  // the replaced weights' bytes (stable addresses)
};

// silu(gate(h_r)) ⊙ up(h_r) for the listed rows r of h.
std::vector<float> swiglu_rows(const float* h, int64_t hidden, const MlpWeights& w, std::span<const int32_t> rows) {
  std::vector<float> act(rows.size() * size_t(w.gate.rows()));
  const cpu::MatmulJob j = swiglu_job(h, hidden, rows, w, act.data());
  cpu::matmul(std::span(&j, 1));
  return act;
}

// A dense (shared or non-MoE) MLP: gate/up from all rows of h, then down from their activations.
void quantize_mlp(LayerQuantizer& lq, MlpWeights& m, const float* h, int64_t rows, int64_t hidden) {
  if (!lq.selected(m.gate) && !lq.selected(m.down)) return;
  std::vector<int32_t> all(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) all[size_t(r)] = int32_t(r);
  if (lq.selected(m.gate) || lq.selected(m.up)) {
    Hessian hs(hidden);
    hs.add(h, rows);
    lq.quantize({&m.gate, &m.up}, &hs);
  }
  if (lq.selected(m.down)) {
    const std::vector<float> act = swiglu_rows(h, hidden, m, all);
    Hessian hd(m.down.cols());
    hd.add(act.data(), rows);
    lq.quantize({&m.down}, &hd);
  }
}

}  // namespace

QuantizedModules gptq_calibrate(const Checkpoint& ck, std::span<const std::vector<int32_t>> samples,
                                const CalibrationOptions& opts,
                                const std::function<void(const LayerReport&)>& progress) {
  using Clock = std::chrono::steady_clock;
  const ModelConfig& cfg = ck.config();
  const int64_t hidden = cfg.hidden_size, n_layers = cfg.num_hidden_layers;
  const int64_t kv_dim = cfg.num_key_value_heads * cfg.head_dim;
  if (samples.empty()) throw Error("calibration: no samples");
  const ModelWeights base = ck.load();
  const auto backend = cpu_backend();

  // Every sample a sequence of one batch: its rows, positions and KV room (one layer's K/V is
  // rewritten at the same places by every pass over that layer).
  BatchLayout layout;
  int64_t blocks = 0;
  std::vector<int32_t> ids;
  for (const auto& s : samples) {
    if (s.empty()) continue;
    for (int32_t t : s)
      if (t < 0 || t >= cfg.vocab_size)
        throw Error("calibration: token id " + std::to_string(t) + " is outside the vocabulary of " +
                    std::to_string(cfg.vocab_size));
    layout.spans.push_back({SeqId(layout.spans.size()), layout.rows, int64_t(s.size()), 0});
    for (size_t i = 0; i < s.size(); ++i) layout.positions.push_back(int32_t(i));
    layout.rows += int64_t(s.size());
    blocks += (int64_t(s.size()) + KvCache::kBlockSize - 1) / KvCache::kBlockSize;
    ids.insert(ids.end(), s.begin(), s.end());
  }
  const int64_t rows = layout.rows;
  if (rows == 0) throw Error("calibration: the samples hold no tokens");
  KvCache kv(n_layers, kv_dim, blocks, KvCacheFormat{KvDType::F32, cfg.num_key_value_heads});
  for (auto& sp : layout.spans) {
    sp.seq = kv.create_sequence();
    kv.reserve(sp.seq, sp.n);
  }

  std::vector<float> x(size_t(rows * hidden)), h(size_t(rows * hidden));
  backend->embedding(base.embed, ids.data(), rows, x.data());
  QuantizedModules out;
  const int64_t min_rows = opts.effective_min_expert_rows();
  for (int64_t l = 0; l < n_layers; ++l) {
    const auto t0 = Clock::now();
    LayerReport report;
    report.layer = l, report.layers = n_layers;
    ModelWeights work;  // layer l as quantized so far; LocalExpertExecutor reads it by index
    work.layers.resize(size_t(n_layers));
    LayerWeights& lw = work.layers[size_t(l)];
    lw = base.layers[size_t(l)];
    LayerQuantizer lq(opts, out, report);

    // q, k, v: one Hessian of input_layernorm(x).
    if (lq.selected(lw.q) || lq.selected(lw.k) || lq.selected(lw.v)) {
      backend->rmsnorm(x.data(), lw.input_norm, rows, cfg.rms_norm_eps, h.data());
      Hessian hq(hidden);
      hq.add(h.data(), rows);
      lq.quantize({&lw.q, &lw.k, &lw.v}, &hq);
    }
    std::vector<float> x2(x);  // the residual stream after this layer's attention
    if (lq.selected(lw.o)) {
      Hessian ho(lw.o.cols());
      const AttentionObserver observe = [&](int64_t, const float* attn, int64_t n, int64_t width) {
        if (width != ho.columns()) throw Error("calibration: attention output of width " + std::to_string(width));
        ho.add(attn, n);
      };
      const AttentionObserver* previous = set_attention_observer(&observe);
      try {
        backend->attention_block(cfg, lw, l, kv, layout, x2.data());
      } catch (...) {
        set_attention_observer(previous);
        throw;
      }
      set_attention_observer(previous);
      lq.quantize({&lw.o}, &ho);
      x2 = x;
    }
    backend->attention_block(cfg, lw, l, kv, layout, x2.data());
    backend->rmsnorm(x2.data(), lw.post_attention_norm, rows, cfg.rms_norm_eps, h.data());

    if (lw.moe) {
      const std::vector<ExpertGroup> groups = group_by_expert(route(cfg, lw.router, h.data(), rows));
      std::vector<std::span<const int32_t>> rows_of(lw.experts.size());
      for (const ExpertGroup& g : groups) rows_of.at(size_t(g.expert)) = g.rows;
      for (size_t e = 0; e < lw.experts.size(); ++e) {
        if (!lw.experts[e]) continue;
        MlpWeights& m = *lw.experts[e];
        const auto r = rows_of[e];
        const bool enough = int64_t(r.size()) >= min_rows;
        if (!enough && (lq.selected(m.gate) || lq.selected(m.down)))
          report.fallbacks.push_back({int64_t(e), int64_t(r.size())});
        if (lq.selected(m.gate) || lq.selected(m.up)) {
          std::optional<Hessian> he;
          if (enough) he.emplace(hidden).add_rows(h.data(), hidden, r);
          lq.quantize({&m.gate, &m.up}, he ? &*he : nullptr);
        }
        if (lq.selected(m.down)) {
          std::optional<Hessian> hd;
          if (enough) {
            const std::vector<float> act = swiglu_rows(h.data(), hidden, m, r);
            hd.emplace(m.down.cols()).add(act.data(), int64_t(r.size()));
          }
          lq.quantize({&m.down}, hd ? &*hd : nullptr);
        }
      }
      if (lw.shared) quantize_mlp(lq, *lw.shared, h.data(), rows, hidden);
    } else if (lw.dense) {
      quantize_mlp(lq, *lw.dense, h.data(), rows, hidden);
    }

    // The next layer's input: this layer, quantized, on x.
    LocalExpertExecutor experts(work, backend);
    ffn_block(cfg, lw, l, *backend, experts, x2.data(), rows);
    x.swap(x2);
    report.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (progress) progress(report);
  }
  if (Weight lm_head = base.lm_head; !lm_head.empty() && opts.quantized(lm_head.name)) {
    const auto t0 = Clock::now();
    LayerReport report;
    report.layer = report.layers = n_layers;
    report.lm_head = true;
    LayerQuantizer lq(opts, out, report);
    backend->rmsnorm(x.data(), base.final_norm, rows, cfg.rms_norm_eps, h.data());
    Hessian hs(hidden);
    hs.add(h.data(), rows);
    lq.quantize({&lm_head}, &hs);
    report.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (progress) progress(report);
  }
  return out;
}

std::vector<std::vector<int32_t>> read_calibration(const std::filesystem::path& file, const Tokenizer* tok,
                                                   int64_t max_samples) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(file.string() + ": cannot open");
  const auto need_tokenizer = [&](const std::string& where) {
    if (!tok) throw Error(where + ": text needs the model's tokenizer.json, which the model folder lacks");
  };
  std::vector<std::vector<int32_t>> samples;
  if (file.extension() != ".jsonl") {
    std::stringstream ss;
    ss << in.rdbuf();
    need_tokenizer(file.string());
    samples.push_back(tok->encode(ss.str()));
    return samples;
  }
  std::string line;
  for (int64_t n = 1; std::getline(in, line) && (max_samples <= 0 || int64_t(samples.size()) < max_samples); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = file.string() + ":" + std::to_string(n);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      throw Error(where + ": not a JSON object");
    }
    if (!j.is_object()) throw Error(where + ": not a JSON object");
    if (j.contains("input_ids")) {
      std::vector<int32_t> ids;
      try {
        ids = j["input_ids"].get<std::vector<int32_t>>();
      } catch (const nlohmann::json::exception&) {
        throw Error(where + ": input_ids is not a list of token ids");
      }
      samples.push_back(std::move(ids));
      continue;
    }
    std::string text;
    for (const char* key : {"text", "prompt"})
      if (text.empty() && j.contains(key)) {
        if (!j[key].is_string()) throw Error(where + ": \"" + key + "\" is not a string");
        text = j[key].get<std::string>();
      }
    if (text.empty() && j.contains("messages")) {
      need_tokenizer(where);
      if (!j["messages"].is_array()) throw Error(where + ": \"messages\" is not a list");
      try {
        text = tok->apply_chat_template(j["messages"], false);
      } catch (const Error& e) {
        throw Error(where + ": " + e.what());
      }
      samples.push_back(tok->encode(text, false));  // the template writes BOS itself
      continue;
    }
    if (text.empty()) throw Error(where + ": expected \"text\", \"prompt\", \"messages\" or \"input_ids\"");
    need_tokenizer(where);
    samples.push_back(tok->encode(text));
  }
  return samples;
}

std::vector<std::vector<int32_t>> token_windows(std::span<const std::vector<int32_t>> samples, int64_t seq_len,
                                                int64_t max_tokens) {
  if (seq_len <= 0) throw Error("calibration: sequence length " + std::to_string(seq_len) + " is not positive");
  std::vector<std::vector<int32_t>> out;
  int64_t total = 0;
  for (const auto& s : samples)
    for (size_t at = 0; at < s.size(); at += size_t(seq_len)) {
      int64_t n = std::min<int64_t>(seq_len, int64_t(s.size() - at));
      if (max_tokens > 0) n = std::min(n, max_tokens - total);
      if (n <= 0) return out;
      out.emplace_back(s.begin() + ptrdiff_t(at), s.begin() + ptrdiff_t(at) + n);
      total += n;
    }
  return out;
}

}  // namespace moemesh
