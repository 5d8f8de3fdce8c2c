#include "core/lora.h"
#include "core/lora_train.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "core/lora_train_ops.h"
#include "core/rope.h"
#include "core/safetensors.h"
#include "core/tool_calls.h"

// OpenBLAS's own threads would fight the example threads of train_lora for the cores; weak so
// that another BLAS links too.
extern "C" void openblas_set_num_threads(int) __attribute__((weak));

namespace moemesh {

using json = nlohmann::json;
namespace ops = lora_ops;

namespace {

// The modules each architecture accepts in --target-modules.
const std::vector<std::string>& accepted_modules(Arch arch) {
  static const std::vector<std::string> mixtral = {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"};
  static const std::vector<std::string> deepseek = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};
  return arch == Arch::Mixtral ? mixtral : deepseek;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : " ") + x;
  return s;
}

std::string strip_weight(const std::string& tensor) {
  const std::string suffix = ".weight";
  return tensor.ends_with(suffix) ? tensor.substr(0, tensor.size() - suffix.size()) : tensor;
}

std::string peft_name(const LoraTrainModule& m, const char* which) {
  return "base_model.model." + m.module + ".lora_" + which + ".weight";
}

}  // namespace

std::vector<std::string> parse_target_modules(Arch arch, const std::string& list) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= list.size()) {
    const size_t end = std::min(list.find(',', at), list.size());
    std::string name = list.substr(at, end - at);
    name.erase(0, name.find_first_not_of(' '));
    name.erase(name.find_last_not_of(' ') + 1);
    at = end + 1;
    if (name.empty()) continue;
    const auto& ok = accepted_modules(arch);
    if (name == "gate")
      throw Error("--target-modules: the router gate is trained with --train-router, not as a target module");
    if (std::find(ok.begin(), ok.end(), name) == ok.end())
      throw Error("--target-modules: unknown module \"" + name + "\" for a " +
                  (arch == Arch::Mixtral ? "Mixtral" : "DeepSeek") + " model (accepted: " + joined(ok) + ")");
    if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
  }
  if (out.empty()) throw Error("--target-modules: no module named");
  return out;
}

std::vector<std::string> peft_target_modules(const LoraTrainConfig& lc) {
  std::vector<std::string> t = lc.target_modules;
  if (lc.train_router) t.push_back("gate");
  return t;
}

template <typename T>
struct LoraTrainModel<T>::Impl {
  struct Lin {
    std::vector<T> w;
    int64_t out = 0, in = 0;
    int lora = -1;  // index into modules_
  };
  struct Mlp {
    Lin gate, up, down;
  };
  struct Layer {
    std::vector<T> input_norm, post_norm;
    Lin q, k, v, o;
    bool moe = false;
    Lin router;
    std::vector<Mlp> experts;
    std::optional<Mlp> shared, dense;
  };
  // What a layer's backward pass needs of its forward pass.
  struct MlpTape {
    std::vector<T> x, g, up, act, ug, uu, ud;
  };
  struct ExpertTape {
    std::vector<int32_t> rows, slots;
    MlpTape m;
    std::vector<T> out;
    int32_t expert = 0;
  };
  struct LayerTape {
    std::vector<T> x0, h1, inv1, q, k, v, att, p, uq, uk, uv, uo, x1, h2, inv2, logits, ur;
    ops::Gating<T> gate;
    std::vector<ExpertTape> experts;
    MlpTape shared, dense;
  };

  const LoraTrainModel& m;
  std::vector<T> embed, final_norm, lm_head;
  std::vector<Layer> layers;
  RopeTable rope;
  ops::AttentionDims dims;

  explicit Impl(const LoraTrainModel& model) : m(model) {}

  static std::vector<T> widen(const Weight& w) {
    if (w.empty()) throw Error("lora: weight " + w.name + " is not loaded");
    if (w.quant || (w.dtype != DType::F32 && w.dtype != DType::F16 && w.dtype != DType::BF16))
      throw Error("lora: " + w.name + " is not a float tensor (GPTQ checkpoints cannot be fine-tuned)");
    std::vector<float> f(size_t(w.numel()));
    to_f32(w.dtype, w.data, f.data(), f.size());
    return std::vector<T>(f.begin(), f.end());
  }

  ops::Linear<T> view(const Lin& l, const std::vector<T>& params) const {
    ops::Linear<T> v{l.w.data(), l.out, l.in};
    if (l.lora >= 0) {
      const LoraTrainModule& mod = m.modules_[size_t(l.lora)];
      v.a = params.data() + mod.a;
      v.b = params.data() + mod.b;
      v.r = m.lc_.rank;
      v.scale = T(m.lc_.alpha / double(m.lc_.rank));
    }
    return v;
  }
  T* grad_a(const Lin& l, T* grad) const { return l.lora >= 0 && grad ? grad + m.modules_[size_t(l.lora)].a : nullptr; }
  T* grad_b(const Lin& l, T* grad) const { return l.lora >= 0 && grad ? grad + m.modules_[size_t(l.lora)].b : nullptr; }

  void lin_fwd(const Lin& l, const T* x, int64_t n, std::vector<T>& y, std::vector<T>& u) const {
    y.resize(size_t(n * l.out));
    ops::linear_forward(view(l, m.params_), x, n, y.data(), u);
  }
  void lin_bwd(const Lin& l, const T* x, const std::vector<T>& u, const T* dy, int64_t n, T* dx, T* grad) const {
    ops::linear_backward(view(l, m.params_), x, u.data(), dy, n, dx, grad_a(l, grad), grad_b(l, grad));
  }

  void mlp_fwd(const Mlp& w, const T* x, int64_t n, T* out, MlpTape& t) const {
    const int64_t hidden = w.gate.in;
    t.x.assign(x, x + n * hidden);
    lin_fwd(w.gate, x, n, t.g, t.ug);
    lin_fwd(w.up, x, n, t.up, t.uu);
    t.act.resize(t.g.size());
    ops::swiglu_forward(t.g.data(), t.up.data(), int64_t(t.g.size()), t.act.data());
    std::vector<T> y;
    lin_fwd(w.down, t.act.data(), n, y, t.ud);
    std::copy(y.begin(), y.end(), out);
  }
  // dx [n, hidden] += the input gradient.
  void mlp_bwd(const Mlp& w, const MlpTape& t, const T* dout, int64_t n, T* dx, T* grad) const {
    std::vector<T> dact(t.act.size(), T(0)), dg(t.act.size()), du(t.act.size());
    lin_bwd(w.down, t.act.data(), t.ud, dout, n, dact.data(), grad);
    ops::swiglu_backward(t.g.data(), t.up.data(), dact.data(), int64_t(dact.size()), dg.data(), du.data());
    lin_bwd(w.gate, t.x.data(), t.ug, dg.data(), n, dx, grad);
    lin_bwd(w.up, t.x.data(), t.uu, du.data(), n, dx, grad);
  }

  // The residual stream after the last layer, [n, hidden].
  std::vector<T> forward(std::span<const int32_t> tokens, std::vector<LayerTape>* tapes) const {
    const ModelConfig& c = m.cfg_;
    const int64_t n = int64_t(tokens.size()), hidden = c.hidden_size, hd = c.head_dim;
    std::vector<T> x(size_t(n * hidden));
    for (int64_t i = 0; i < n; ++i) {
      const int32_t t = tokens[size_t(i)];
      if (t < 0 || t >= c.vocab_size) throw Error("lora: token id " + std::to_string(t) + " outside the vocabulary");
      std::copy_n(embed.begin() + t * hidden, hidden, x.begin() + i * hidden);
    }
    const RopeTable rt = rope_depends_on_length(c) ? rope_table(c, n) : rope;
    if (tapes) tapes->assign(layers.size(), LayerTape{});
    LayerTape scratch;
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& lw = layers[l];
      LayerTape& t = tapes ? (*tapes)[l] : scratch;
      // Attention: x += o(attention(rope(q(h)), rope(k(h)), v(h))), h = rmsnorm(x).
      t.x0 = x;
      t.h1.resize(x.size());
      t.inv1.resize(size_t(n));
      ops::rmsnorm_forward(x.data(), lw.input_norm.data(), n, hidden, c.rms_norm_eps, t.h1.data(), t.inv1.data());
      lin_fwd(lw.q, t.h1.data(), n, t.q, t.uq);
      lin_fwd(lw.k, t.h1.data(), n, t.k, t.uk);
      lin_fwd(lw.v, t.h1.data(), n, t.v, t.uv);
      ops::rope(t.q.data(), n, c.num_attention_heads, hd, rt.inv_freq.data(), rt.attention_factor, false);
      ops::rope(t.k.data(), n, c.num_key_value_heads, hd, rt.inv_freq.data(), rt.attention_factor, false);
      t.att.resize(t.q.size());
      ops::attention_forward(dims, t.q.data(), t.k.data(), t.v.data(), n, t.att.data(), t.p);
      std::vector<T> y;
      lin_fwd(lw.o, t.att.data(), n, y, t.uo);
      for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];

      // FFN: x += moe(h) or dense(h), h = rmsnorm(x).
      t.x1 = x;
      t.h2.resize(x.size());
      t.inv2.resize(size_t(n));
      ops::rmsnorm_forward(x.data(), lw.post_norm.data(), n, hidden, c.rms_norm_eps, t.h2.data(), t.inv2.data());
      y.assign(x.size(), T(0));
      if (lw.moe) {
        lin_fwd(lw.router, t.h2.data(), n, t.logits, t.ur);
        ops::gating_forward(c, t.logits.data(), n, t.gate);
        const int64_t k = t.gate.k;
        // Experts in id order, rows ascending (core/moe.cpp group_by_expert).
        t.experts.clear();
        for (int32_t e = 0; e < int32_t(c.num_experts); ++e) {
          ExpertTape et;
          et.expert = e;
          for (int64_t r = 0; r < n; ++r)
            for (int64_t j = 0; j < k; ++j)
              if (t.gate.ids[size_t(r * k + j)] == e) et.rows.push_back(int32_t(r)), et.slots.push_back(int32_t(j));
          if (et.rows.empty()) continue;
          const int64_t rows = int64_t(et.rows.size());
          std::vector<T> xin(size_t(rows * hidden));
          for (int64_t i = 0; i < rows; ++i)
            std::copy_n(t.h2.begin() + et.rows[size_t(i)] * hidden, hidden, xin.begin() + i * hidden);
          et.out.resize(xin.size());
          mlp_fwd(lw.experts[size_t(e)], xin.data(), rows, et.out.data(), et.m);
          for (int64_t i = 0; i < rows; ++i) {
            const T w = t.gate.w[size_t(et.rows[size_t(i)] * k + et.slots[size_t(i)])];
            T* dst = y.data() + et.rows[size_t(i)] * hidden;
            for (int64_t d = 0; d < hidden; ++d) dst[d] += w * et.out[size_t(i * hidden + d)];
          }
          t.experts.push_back(std::move(et));
        }
        if (lw.shared) {
          std::vector<T> s(x.size());
          mlp_fwd(*lw.shared, t.h2.data(), n, s.data(), t.shared);
          for (size_t i = 0; i < s.size(); ++i) y[i] += s[i];
        }
      } else {
        mlp_fwd(*lw.dense, t.h2.data(), n, y.data(), t.dense);
      }
      for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
    }
    return x;
  }

  // dx: the gradient of the last layer's output; on return, of the embeddings (unused).
  void backward(const std::vector<LayerTape>& tapes, std::vector<T>& dx, int64_t n, T* grad) const {
    const ModelConfig& c = m.cfg_;
    const int64_t hidden = c.hidden_size;
    for (size_t l = layers.size(); l-- > 0;) {
      const Layer& lw = layers[l];
      const LayerTape& t = tapes[l];
      std::vector<T> dh(size_t(n * hidden), T(0));
      if (lw.moe) {
        const int64_t k = t.gate.k;
        std::vector<T> dw(size_t(n * k), T(0));
        for (const ExpertTape& et : t.experts) {
          const int64_t rows = int64_t(et.rows.size());
          std::vector<T> dout(size_t(rows * hidden)), dxe(size_t(rows * hidden), T(0));
          for (int64_t i = 0; i < rows; ++i) {
            const size_t wi = size_t(et.rows[size_t(i)] * k + et.slots[size_t(i)]);
            const T* g = dx.data() + et.rows[size_t(i)] * hidden;
            const T* o = et.out.data() + i * hidden;
            T dot = 0;
            for (int64_t d = 0; d < hidden; ++d) {
              dot += g[d] * o[d];
              dout[size_t(i * hidden + d)] = t.gate.w[wi] * g[d];
            }
            dw[wi] = dot;
          }
          mlp_bwd(lw.experts[size_t(et.expert)], et.m, dout.data(), rows, dxe.data(), grad);
          for (int64_t i = 0; i < rows; ++i) {
            T* dst = dh.data() + et.rows[size_t(i)] * hidden;
            for (int64_t d = 0; d < hidden; ++d) dst[d] += dxe[size_t(i * hidden + d)];
          }
        }
        if (lw.shared) mlp_bwd(*lw.shared, t.shared, dx.data(), n, dh.data(), grad);
        std::vector<T> dlogits(size_t(n * c.num_experts));
        ops::gating_backward(c, t.gate, dw.data(), dlogits.data());
        lin_bwd(lw.router, t.h2.data(), t.ur, dlogits.data(), n, dh.data(), grad);
      } else {
        mlp_bwd(*lw.dense, t.dense, dx.data(), n, dh.data(), grad);
      }
      ops::rmsnorm_backward(t.x1.data(), lw.post_norm.data(), t.inv2.data(), dh.data(), n, hidden, dx.data());

      std::vector<T> datt(t.att.size(), T(0));
      lin_bwd(lw.o, t.att.data(), t.uo, dx.data(), n, datt.data(), grad);
      std::vector<T> dq(t.q.size()), dk(t.k.size()), dv(t.v.size());
      ops::attention_backward(dims, t.q.data(), t.k.data(), t.v.data(), t.p.data(), datt.data(), n, dq.data(),
                              dk.data(), dv.data());
      const RopeTable rt = rope_depends_on_length(c) ? rope_table(c, n) : rope;
      ops::rope(dq.data(), n, c.num_attention_heads, c.head_dim, rt.inv_freq.data(), rt.attention_factor, true);
      ops::rope(dk.data(), n, c.num_key_value_heads, c.head_dim, rt.inv_freq.data(), rt.attention_factor, true);
      std::fill(dh.begin(), dh.end(), T(0));
      lin_bwd(lw.q, t.h1.data(), t.uq, dq.data(), n, dh.data(), grad);
      lin_bwd(lw.k, t.h1.data(), t.uk, dk.data(), n, dh.data(), grad);
      lin_bwd(lw.v, t.h1.data(), t.uv, dv.data(), n, dh.data(), grad);
      ops::rmsnorm_backward(t.x0.data(), lw.input_norm.data(), t.inv1.data(), dh.data(), n, hidden, dx.data());
    }
  }

  // Final norm and lm_head of the given rows of x: [rows.size(), vocab]; normed rows and their
  // 1 / rms kept for the backward pass.
  std::vector<T> head(const std::vector<T>& x, const std::vector<int64_t>& rows, std::vector<T>& xs, std::vector<T>& hn,
                      std::vector<T>& inv) const {
    const ModelConfig& c = m.cfg_;
    const int64_t hidden = c.hidden_size, r = int64_t(rows.size());
    xs.resize(size_t(r * hidden));
    for (int64_t i = 0; i < r; ++i) std::copy_n(x.begin() + rows[size_t(i)] * hidden, hidden, xs.begin() + i * hidden);
    hn.resize(xs.size());
    inv.resize(size_t(r));
    ops::rmsnorm_forward(xs.data(), final_norm.data(), r, hidden, c.rms_norm_eps, hn.data(), inv.data());
    std::vector<T> logits(size_t(r * c.vocab_size));
    ops::gemm<T>(false, true, r, c.vocab_size, hidden, T(1), hn.data(), lm_head.data(), T(0), logits.data());
    return logits;
  }
};

template <typename T>
LoraTrainModel<T>::LoraTrainModel(const ModelConfig& cfg, const ModelWeights& w, const LoraTrainConfig& lc)
    : cfg_(cfg), lc_(lc), impl_(std::make_unique<Impl>(*this)) {
  if (lc.rank <= 0) throw Error("lora: rank must be positive");
  if (cfg.num_attention_heads % cfg.num_key_value_heads != 0 || cfg.head_dim % 2 != 0)
    throw Error("lora: unsupported attention shape");
  if (int64_t(w.layers.size()) != cfg.num_hidden_layers) throw Error("lora: not every layer is loaded");
  const bool mixtral = cfg.arch == Arch::Mixtral;
  auto targeted = [&](const std::string& s) {
    return std::find(lc.target_modules.begin(), lc.target_modules.end(), s) != lc.target_modules.end();
  };
  Impl& im = *impl_;
  auto lin = [&](const Weight& wt, bool adapt) {
    typename Impl::Lin l;
    l.w = Impl::widen(wt);
    l.out = wt.rows();
    l.in = wt.cols();
    if (adapt) {
      l.lora = int(modules_.size());
      modules_.push_back({strip_weight(wt.name), l.in, l.out, 0, 0});
    }
    return l;
  };
  auto mlp = [&](const MlpWeights& m, const char* gate, const char* up, const char* down) {
    return typename Impl::Mlp{lin(m.gate, targeted(gate)), lin(m.up, targeted(up)), lin(m.down, targeted(down))};
  };
  const char* g = mixtral ? "w1" : "gate_proj";
  const char* u = mixtral ? "w3" : "up_proj";
  const char* d = mixtral ? "w2" : "down_proj";
  im.embed = Impl::widen(w.embed);
  im.final_norm = Impl::widen(w.final_norm);
  im.lm_head = Impl::widen(w.lm_head);
  for (const LayerWeights& lw : w.layers) {
    typename Impl::Layer L;
    L.input_norm = Impl::widen(lw.input_norm);
    L.post_norm = Impl::widen(lw.post_attention_norm);
    L.q = lin(lw.q, targeted("q_proj"));
    L.k = lin(lw.k, targeted("k_proj"));
    L.v = lin(lw.v, targeted("v_proj"));
    L.o = lin(lw.o, targeted("o_proj"));
    L.moe = lw.moe;
    if (lw.moe) {
      L.router = lin(lw.router, lc.train_router);
      for (const auto& e : lw.experts) {
        if (!e) throw Error("lora: a routed expert is not loaded");
        L.experts.push_back(mlp(*e, g, u, d));
      }
      if (lw.shared) L.shared = mlp(*lw.shared, g, u, d);
    } else {
      if (!lw.dense) throw Error("lora: a dense layer's MLP is not loaded");
      L.dense = mlp(*lw.dense, g, u, d);
    }
    im.layers.push_back(std::move(L));
  }
  // Flat parameters: A then B per module; A uniform in ±1/sqrt(in), B zero.
  std::mt19937_64 rng(lc.seed);
  for (LoraTrainModule& mod : modules_) {
    mod.a = params_.size();
    const double bound = 1.0 / std::sqrt(double(mod.in));
    std::uniform_real_distribution<double> dist(-bound, bound);
    for (int64_t i = 0; i < lc.rank * mod.in; ++i) params_.push_back(T(dist(rng)));
    mod.b = params_.size();
    params_.resize(params_.size() + size_t(mod.out * lc.rank), T(0));
  }
  im.rope = rope_table(cfg, 0);
  im.dims = {cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window.value_or(0),
             attention_score_scale(cfg)};
}

template <typename T>
LoraTrainModel<T>::~LoraTrainModel() = default;

template <typename T>
double LoraTrainModel<T>::loss(std::span<const int32_t> tokens, std::span<const int32_t> targets, T grad_scale,
                               std::vector<T>* grad) const {
  if (tokens.size() != targets.size()) throw Error("lora: tokens and targets differ in length");
  if (grad && grad->size() != params_.size()) throw Error("lora: gradient buffer of the wrong size");
  std::vector<int64_t> rows;
  std::vector<int32_t> tgt;
  for (size_t i = 0; i < targets.size(); ++i)
    if (targets[i] >= 0) rows.push_back(int64_t(i)), tgt.push_back(targets[i]);
  if (rows.empty()) return 0.0;
  const int64_t n = int64_t(tokens.size()), hidden = cfg_.hidden_size, r = int64_t(rows.size());
  std::vector<typename Impl::LayerTape> tapes;
  const std::vector<T> x = impl_->forward(tokens, grad ? &tapes : nullptr);
  std::vector<T> xs, hn, inv;
  const std::vector<T> logits = impl_->head(x, rows, xs, hn, inv);
  std::vector<T> dlogits(grad ? logits.size() : 0);
  const double sum =
      ops::cross_entropy(logits.data(), tgt.data(), r, cfg_.vocab_size, grad_scale, grad ? dlogits.data() : nullptr);
  if (!grad) return sum;
  std::vector<T> dhn(size_t(r * hidden)), dxs(size_t(r * hidden), T(0)), dx(size_t(n * hidden), T(0));
  ops::gemm<T>(false, false, r, hidden, cfg_.vocab_size, T(1), dlogits.data(), impl_->lm_head.data(), T(0), dhn.data());
  ops::rmsnorm_backward(xs.data(), impl_->final_norm.data(), inv.data(), dhn.data(), r, hidden, dxs.data());
  for (int64_t i = 0; i < r; ++i) std::copy_n(dxs.begin() + i * hidden, hidden, dx.begin() + rows[size_t(i)] * hidden);
  impl_->backward(tapes, dx, n, grad->data());
  return sum;
}

template <typename T>
std::vector<T> LoraTrainModel<T>::logits(std::span<const int32_t> tokens) const {
  const std::vector<T> x = impl_->forward(tokens, nullptr);
  std::vector<int64_t> rows(tokens.size());
  std::iota(rows.begin(), rows.end(), int64_t(0));
  std::vector<T> xs, hn, inv;
  return impl_->head(x, rows, xs, hn, inv);
}

template <typename T>
std::vector<int32_t> LoraTrainModel<T>::greedy(std::vector<int32_t> seq, int64_t max_new, int32_t eos) const {
  std::vector<int32_t> out;
  for (int64_t i = 0; i < max_new; ++i) {
    const std::vector<T> x = impl_->forward(seq, nullptr);
    std::vector<T> xs, hn, inv;
    const std::vector<T> lg = impl_->head(x, {int64_t(seq.size()) - 1}, xs, hn, inv);
    const int32_t t = int32_t(std::max_element(lg.begin(), lg.end()) - lg.begin());  // first maximum
    out.push_back(t);
    seq.push_back(t);
    if (t == eos) break;
  }
  return out;
}

template <typename T>
void LoraTrainModel<T>::save(const std::filesystem::path& dir, const std::string& base_model) const {
  LoraConfig c;
  c.r = lc_.rank;
  c.lora_alpha = lc_.alpha;
  c.target_modules = peft_target_modules(lc_);
  c.base_model_name_or_path = base_model;
  std::vector<LoraModuleFile> files;
  for (const LoraTrainModule& mod : modules_) {
    auto span = [&](size_t at, int64_t n) {
      return std::vector<float>(params_.begin() + ptrdiff_t(at), params_.begin() + ptrdiff_t(at + size_t(n)));
    };
    files.push_back(
        {mod.module, lc_.rank, mod.in, mod.out, span(mod.a, lc_.rank * mod.in), span(mod.b, lc_.rank * mod.out)});
  }
  write_lora_adapter(dir, c, files);
}

template <typename T>
void LoraTrainModel<T>::load_adapter(const std::filesystem::path& dir) {
  const auto file = dir / "adapter_model.safetensors";
  const safetensors::Header h = safetensors::read_header(file);
  auto read = [&](const std::string& name, const std::vector<int64_t>& shape, size_t at) {
    const safetensors::Entry* e = h.find(name);
    if (!e) throw Error(file.string() + ": no tensor " + name);
    if (e->shape != shape)
      throw Error(file.string() + ": " + name + " has shape " + safetensors::shape_str(e->shape) + ", expected " +
                  safetensors::shape_str(shape));
    const std::vector<float> f = safetensors::read_f32(h, *e);
    std::copy(f.begin(), f.end(), params_.begin() + ptrdiff_t(at));
  };
  for (const LoraTrainModule& mod : modules_) {
    read(peft_name(mod, "A"), {lc_.rank, mod.in}, mod.a);
    read(peft_name(mod, "B"), {mod.out, lc_.rank}, mod.b);
  }
}

template class LoraTrainModel<float>;
template class LoraTrainModel<double>;

std::vector<TrainExample> load_train_data(const std::filesystem::path& path, const Tokenizer& tok,
                                          int64_t max_seq_len) {
  std::ifstream in(path);
  if (!in) throw Error(path.string() + ": cannot read");
  const std::string& tmpl = tok.chat_template();
  if (tmpl.empty()) throw Error("the model's tokenizer has no chat_template: training data cannot be rendered");
  const auto eos = tok.eos_id();
  if (!eos) throw Error("the model's tokenizer has no EOS token");
  std::vector<TrainExample> out;
  std::string line;
  for (int64_t no = 1; std::getline(in, line); ++no) {
    const std::string where = path.string() + ":" + std::to_string(no) + ": ";
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw Error(where + "not JSON (" + e.what() + ")");
    }
    if (!j.is_object()) throw Error(where + "expected an object with \"messages\" or \"prompt\" and \"completion\"");
    json messages = json::array();
    std::string completion;
    if (j.contains("messages")) {
      const json& ms = j["messages"];
      if (!ms.is_array() || ms.size() < 2)
        throw Error(where + "\"messages\" must be an array of at least two messages (the last the assistant's)");
      for (size_t i = 0; i < ms.size(); ++i) {
        const json& m = ms[i];
        if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
            !m["content"].is_string())
          throw Error(where + "messages[" + std::to_string(i) + "] must have string \"role\" and \"content\"");
        if (i + 1 < ms.size()) messages.push_back({{"role", m["role"]}, {"content", m["content"]}});
      }
      if (ms.back()["role"] != "assistant")
        throw Error(where + "the last message must have role \"assistant\" (it is the completion), not " +
                    ms.back()["role"].dump());
      completion = ms.back()["content"].get<std::string>();
    } else if (j.contains("prompt") || j.contains("completion")) {
      if (!j.contains("prompt") || !j["prompt"].is_string()) throw Error(where + "\"prompt\" must be a string");
      if (!j.contains("completion") || !j["completion"].is_string())
        throw Error(where + "\"completion\" must be a string");
      messages.push_back({{"role", "user"}, {"content", j["prompt"]}});
      completion = j["completion"].get<std::string>();
    } else {
      throw Error(where + "expected \"messages\" or \"prompt\" and \"completion\"");
    }
    // As actors/openai_frontend.cpp prompt_tokens: the template writes the BOS itself.
    std::string text;
    try {
      const json msgs = messages_for_template(messages, json(), tmpl, tool_call_format_for(tmpl));
      const json extra = json::object();
      text = tok.apply_chat_template(msgs, /*add_generation_prompt=*/true, &extra);
    } catch (const Error& e) {
      throw Error(where + "the chat template refused these messages: " + e.what());
    }
    TrainExample ex;
    ex.tokens = tok.encode(text, false);
    ex.prompt_tokens = int64_t(ex.tokens.size());
    if (ex.tokens.empty()) throw Error(where + "the prompt renders to no tokens");
    std::vector<int32_t> c = tok.encode(completion, false);
    c.push_back(*eos);
    ex.tokens.insert(ex.tokens.end(), c.begin(), c.end());
    if (int64_t(ex.tokens.size()) > max_seq_len)
      throw Error(where + std::to_string(ex.tokens.size()) + " tokens (prompt " + std::to_string(ex.prompt_tokens) +
                  "), more than --max-seq-len " + std::to_string(max_seq_len));
    ex.targets.assign(ex.tokens.size(), -1);
    for (size_t i = size_t(ex.prompt_tokens) - 1; i + 1 < ex.tokens.size(); ++i) ex.targets[i] = ex.tokens[i + 1];
    out.push_back(std::move(ex));
  }
  if (out.empty()) throw Error(path.string() + ": no training examples");
  return out;
}

void train_lora(LoraTrainModel<float>& model, const std::vector<TrainExample>& data, const TrainOptions& opts,
                const std::function<void(const StepReport&)>& on_step,
                const std::function<void(int64_t epoch)>& on_epoch) {
  if (data.empty()) throw Error("finetune: no training examples");
  if (opts.batch_size <= 0 || opts.epochs <= 0) throw Error("finetune: batch size and epochs must be positive");
  std::vector<float>& p = model.params();
  std::vector<double> m1(p.size(), 0.0), m2(p.size(), 0.0);
  std::mt19937_64 rng(opts.seed);
  std::vector<size_t> order(data.size());
  std::iota(order.begin(), order.end(), size_t(0));
  const int64_t batches = (int64_t(data.size()) + opts.batch_size - 1) / opts.batch_size;
  const int threads = std::max(1, std::min<int>(opts.threads, int(opts.batch_size)));
  if (threads > 1 && openblas_set_num_threads) openblas_set_num_threads(1);
  const int64_t total_steps = batches * opts.epochs;
  int64_t step = 0;
  for (int64_t epoch = 1; epoch <= opts.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t b = 0; b < batches; ++b) {
      const auto t0 = std::chrono::steady_clock::now();
      const size_t lo = size_t(b * opts.batch_size), hi = std::min(order.size(), lo + size_t(opts.batch_size));
      int64_t targets = 0, tokens = 0;
      for (size_t i = lo; i < hi; ++i) {
        const TrainExample& ex = data[order[i]];
        tokens += int64_t(ex.tokens.size());
        targets += int64_t(std::count_if(ex.targets.begin(), ex.targets.end(), [](int32_t t) { return t >= 0; }));
      }
      const float scale = 1.0f / float(std::max<int64_t>(targets, 1));
      const int nt = std::min<int>(threads, int(hi - lo));
      std::vector<std::vector<float>> grads(size_t(nt), std::vector<float>(p.size(), 0.0f));
      std::vector<double> sums(size_t(nt), 0.0);
      std::vector<std::exception_ptr> errors(static_cast<size_t>(nt));
      auto work = [&](int t) {
        try {
          for (size_t i = lo + size_t(t); i < hi; i += size_t(nt)) {
            const TrainExample& ex = data[order[i]];
            sums[size_t(t)] += model.loss(ex.tokens, ex.targets, scale, &grads[size_t(t)]);
          }
        } catch (...) {
          errors[size_t(t)] = std::current_exception();
        }
      };
      std::vector<std::thread> pool;
      for (int t = 1; t < nt; ++t) pool.emplace_back(work, t);
      work(0);
      for (auto& th : pool) th.join();
      for (auto& e : errors)
        if (e) std::rethrow_exception(e);
      double loss = 0.0;
      for (int t = 0; t < nt; ++t) loss += sums[size_t(t)];
      for (int t = 1; t < nt; ++t)
        for (size_t i = 0; i < p.size(); ++i) grads[0][i] += grads[size_t(t)][i];
      double norm = 0.0;
      for (float g : grads[0]) norm += double(g) * double(g);
      norm = std::sqrt(norm);
      const double clip = opts.max_grad_norm > 0 && norm > opts.max_grad_norm ? opts.max_grad_norm / norm : 1.0;
      // AdamW (decoupled weight decay, bias-corrected moments), as torch.optim.AdamW.
      const double lr = opts.linear_decay ? opts.lr * (1.0 - double(step) / double(total_steps)) : opts.lr;
      ++step;
      const double c1 = 1.0 - std::pow(opts.beta1, double(step)), c2 = 1.0 - std::pow(opts.beta2, double(step));
      for (size_t i = 0; i < p.size(); ++i) {
        const double g = grads[0][i] * clip;
        m1[i] = opts.beta1 * m1[i] + (1.0 - opts.beta1) * g;
        m2[i] = opts.beta2 * m2[i] + (1.0 - opts.beta2) * g * g;
        double v = double(p[i]) * (1.0 - lr * opts.weight_decay);
        v -= lr * (m1[i] / c1) / (std::sqrt(m2[i] / c2) + opts.eps);
        p[i] = float(v);
      }
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (on_step)
        on_step({step, epoch, b + 1, batches, loss / double(std::max<int64_t>(targets, 1)),
                 secs > 0 ? double(tokens) / secs : 0.0});
    }
    if (on_epoch) on_epoch(epoch);
  }
}

}  // namespace moemesh
