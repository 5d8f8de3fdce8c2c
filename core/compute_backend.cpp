#include "core/compute_backend.h"

#include <algorithm>
#include <charconv>
#include <string>
#include <utility>

#include "core/error.h"
#include "core/moe.h"
#include "core/rope.h"
#include "core/weight_jobs.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"

namespace moemesh {

std::string DeviceSpec::str() const { return kind == Kind::Cpu ? "cpu" : "cuda:" + std::to_string(index); }

DeviceSpec parse_device(std::string_view s) {
  if (s == "cpu") return {};
  if (s == "cuda") return {DeviceSpec::Kind::Cuda, 0};
  if (s.starts_with("cuda:")) {
    const std::string_view n = s.substr(5);
    int index = -1;
    const auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), index);
    if (ec == std::errc() && end == n.data() + n.size() && !n.empty() && index >= 0)
      return {DeviceSpec::Kind::Cuda, index};
  }
  throw Error("unknown device \"" + std::string(s) + "\" (expected cpu, cuda or cuda:N)");
}

void ComputeBackend::check_expert_rows(int64_t x_rows, std::span<const ExpertRows> experts) {
  for (const ExpertRows& e : experts) {
    if (!e.weights || !e.out) throw Error("grouped mlp: an expert without weights or output");
    for (int32_t r : e.rows)
      if (r < 0 || r >= x_rows)
        throw Error("grouped mlp: row " + std::to_string(r) + " outside the " + std::to_string(x_rows) + " rows of x");
    if (!e.lora.empty() && e.lora.size() != e.rows.size())
      throw Error("grouped mlp: " + std::to_string(e.lora.size()) + " LoRA entries for " +
                  std::to_string(e.rows.size()) + " rows");
  }
}

void ComputeBackend::refuse_lora(const BatchLayout& layout) const {
  for (const auto& sp : layout.spans)
    if (sp.adapter)
      throw Error("LoRA adapter " + sp.adapter->name() + ": the " + name() +
                  " backend does not apply adapters (serve them on --device cpu)");
}

void ComputeBackend::refuse_lora(std::span<const ExpertRows> experts) const {
  for (const ExpertRows& e : experts)
    for (const MlpLora* m : e.lora)
      if (m)
        throw Error("LoRA: the " + name() + " backend does not apply adapters to experts (serve them on --device cpu)");
}

void ComputeBackend::check_logits_requests(int64_t rows, std::span<const LogitsRequest> requests) {
  if (int64_t(requests.size()) != rows)
    throw Error("logits summaries: " + std::to_string(requests.size()) + " requests for " + std::to_string(rows) +
                " rows");
  for (const LogitsRequest& r : requests) check_logits_request(r);
}

void ComputeBackend::grouped_mlp(const float* x, int64_t x_rows, int64_t hidden, std::span<const ExpertRows> experts) {
  check_expert_rows(x_rows, experts);
  refuse_lora(experts);
  std::vector<float> gathered;
  for (const ExpertRows& e : experts) {
    if (e.rows.empty()) continue;
    gather_rows(x, hidden, e.rows, gathered);
    mlp(*e.weights, gathered.data(), int64_t(e.rows.size()), hidden, e.out);
  }
}

std::vector<LogitsSummary> ComputeBackend::logits_summaries(const float* x, int64_t rows, const Weight& lm_head,
                                                            std::span<const LogitsRequest> requests) {
  check_logits_requests(rows, requests);
  const int64_t vocab = lm_head.rows();
  std::vector<float> logits(size_t(rows * vocab));
  matmul(x, rows, lm_head, logits.data());
  // Rows apart on the compute threads (requests checked above, so none throws).
  std::vector<LogitsSummary> out(static_cast<size_t>(rows));
  cpu::parallel_for(rows, [&](int64_t r) {
    out[size_t(r)] = summarise_logits(std::span(logits).subspan(size_t(r * vocab), size_t(vocab)), requests[size_t(r)]);
  });
  return out;
}

namespace {

thread_local const AttentionObserver* attention_observer = nullptr;

// dst[r] += src[r] for each listed row r of dim floats.
void add_rows(const float* src, float* dst, int64_t dim, std::span<const int32_t> rows) {
  for (int32_t r : rows)
    for (int64_t c = 0; c < dim; ++c) dst[int64_t(r) * dim + c] += src[int64_t(r) * dim + c];
}

class CpuBackend final : public ComputeBackend {
 public:
  std::string name() const override { return "cpu"; }

  std::unique_ptr<KvCache> make_kv_cache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks,
                                         KvCacheFormat format) override {
    return std::make_unique<KvCache>(n_layers, kv_dim, num_blocks, format);
  }

  void embedding(const Weight& table, const int32_t* ids, int64_t n, float* out) override {
    cpu::embedding(table.data, table.dtype, table.cols(), ids, n, out);
  }

  void rmsnorm(const float* x, const Weight& w, int64_t rows, double eps, float* y) override {
    cpu::rmsnorm(x, w.data, w.dtype, rows, w.rows(), eps, y);
  }

  void matmul(const float* x, int64_t rows, const Weight& w, float* y) override {
    const cpu::MatmulJob j = projection_job(x, rows, w, y);
    cpu::matmul(std::span(&j, 1));
  }

  void attention_block(const ModelConfig& cfg, const LayerWeights& lw, int64_t layer, KvCache& kv,
                       const BatchLayout& layout, float* x) override {
    const int64_t rows = layout.rows, hidden = cfg.hidden_size, hd = cfg.head_dim;
    const int64_t q_dim = cfg.num_attention_heads * hd, kv_dim = cfg.num_key_value_heads * hd;
    std::vector<float> h(size_t(rows * hidden)), q(size_t(rows * q_dim)), k(size_t(rows * kv_dim)),
        v(size_t(rows * kv_dim)), attn(size_t(rows * q_dim));
    cpu::rmsnorm(x, lw.input_norm.data, lw.input_norm.dtype, rows, hidden, cfg.rms_norm_eps, h.data());
    const cpu::MatmulJob qkv[] = {projection_job(h.data(), rows, lw.q, q.data()),
                                  projection_job(h.data(), rows, lw.k, k.data()),
                                  projection_job(h.data(), rows, lw.v, v.data())};
    // Each adapter's q/k/v deltas on its sequences' rows, in the projections' parallel section
    // but into buffers of their own (the products store q, k and v), added before RoPE (they are
    // part of the projections); o's likewise below.
    std::vector<std::pair<const LoraAdapter*, std::vector<int32_t>>> by_adapter;
    for (const auto& sp : layout.spans) {
      if (!sp.adapter || sp.adapter->layer(layer).attention_empty()) continue;
      auto it =
          std::find_if(by_adapter.begin(), by_adapter.end(), [&](const auto& p) { return p.first == sp.adapter; });
      if (it == by_adapter.end()) it = by_adapter.insert(by_adapter.end(), {sp.adapter, {}});
      for (int64_t i = 0; i < sp.n; ++i) it->second.push_back(int32_t(sp.row0 + i));
    }
    std::vector<LoraTask> deltas;
    std::vector<float> dq, dk, dv;
    if (!by_adapter.empty()) dq.resize(q.size()), dk.resize(k.size()), dv.resize(v.size());
    for (const auto& [a, r] : by_adapter) {
      const LayerLora& ll = a->layer(layer);
      const int64_t n = int64_t(r.size());
      deltas.push_back({&ll.q, h.data(), r.data(), hidden, dq.data(), r.data(), q_dim, n, false});
      deltas.push_back({&ll.k, h.data(), r.data(), hidden, dk.data(), r.data(), kv_dim, n, false});
      deltas.push_back({&ll.v, h.data(), r.data(), hidden, dv.data(), r.data(), kv_dim, n, false});
    }
    cpu::matmul(qkv, lora_jobs(deltas));
    for (const auto& [a, r] : by_adapter) {
      const LayerLora& ll = a->layer(layer);
      if (!ll.q.empty()) add_rows(dq.data(), q.data(), q_dim, r);
      if (!ll.k.empty()) add_rows(dk.data(), k.data(), kv_dim, r);
      if (!ll.v.empty()) add_rows(dv.data(), v.data(), kv_dim, r);
    }
    // One frequency table for the batch, or (dynamic scaling) one per sequence.
    auto rotate = [&](int64_t row0, int64_t n, int64_t seq_len) {
      const RopeTable t = rope_table(cfg, seq_len);
      const int32_t* pos = layout.positions.data() + row0;
      cpu::rope(q.data() + row0 * q_dim, n, cfg.num_attention_heads, hd, pos, t.inv_freq.data(), t.attention_factor);
      cpu::rope(k.data() + row0 * kv_dim, n, cfg.num_key_value_heads, hd, pos, t.inv_freq.data(), t.attention_factor);
    };
    if (rope_depends_on_length(cfg)) {
      for (const auto& sp : layout.spans) rotate(sp.row0, sp.n, sp.pos0 + sp.n);
    } else {
      rotate(0, rows, 0);
    }

    const cpu::AttentionShape shape{cfg.num_attention_heads, cfg.num_key_value_heads, hd,
                                    cfg.sliding_window.value_or(0), attention_score_scale(cfg)};
    KvViewScratch scratch;
    for (const auto& sp : layout.spans) {
      for (int64_t i = 0; i < sp.n; ++i) {
        const int64_t row = sp.row0 + i;
        kv.write_row(layer, sp.seq, sp.pos0 + i, k.data() + row * kv_dim, v.data() + row * kv_dim);
      }
      const cpu::PagedKV view = kv.view(layer, sp.seq, scratch);
      cpu::paged_attention(q.data() + sp.row0 * q_dim, sp.n, layout.positions.data() + sp.row0, shape, view,
                           attn.data() + sp.row0 * q_dim);
    }
    if (attention_observer) (*attention_observer)(layer, attn.data(), rows, q_dim);
    // x += o_proj(attn): the residual add is the product's epilogue.
    cpu::MatmulJob o = projection_job(attn.data(), rows, lw.o, x);
    o.epilogue = cpu::MatmulJob::Epilogue::Add;
    deltas.clear();
    std::vector<float> dx;
    if (!by_adapter.empty()) dx.resize(size_t(rows * hidden));
    for (const auto& [a, r] : by_adapter)
      deltas.push_back(
          {&a->layer(layer).o, attn.data(), r.data(), q_dim, dx.data(), r.data(), hidden, int64_t(r.size()), false});
    cpu::matmul(std::span(&o, 1), lora_jobs(deltas));
    for (const auto& [a, r] : by_adapter)
      if (!a->layer(layer).o.empty()) add_rows(dx.data(), x, hidden, r);
  }

  void mlp(const MlpWeights& w, const float* x, int64_t rows, int64_t hidden, float* out) override {
    mlp_forward(w, x, rows, hidden, out);
  }

  // Every expert's gate and up projections in one parallel section (reading each expert's rows
  // of x in place), then every down projection in another. An expert whose rows use LoRA
  // adapters computes gate and up apart (still over all its rows: its weights are read once);
  // each adapter's deltas run in the same sections, into buffers of their own that are added to
  // that adapter's rows after each section; SiLU·up is applied here (as the fused epilogue
  // computes it, so a base row gets the same bits either way). Every row's result depends only
  // on its own adapter.
  void grouped_mlp(const float* x, int64_t x_rows, int64_t hidden, std::span<const ExpertRows> experts) override {
    check_expert_rows(x_rows, experts);
    struct Adapted {
      std::vector<std::pair<const MlpLora*, std::vector<int32_t>>> groups;  // positions in e.rows
      std::vector<std::vector<int32_t>> x_rows;                             // e.rows at those positions
      std::vector<float> gate, up, dgate, dup, ddown;
    };
    std::vector<Adapted> adapted(experts.size());
    std::vector<std::vector<float>> act(experts.size());
    std::vector<cpu::MatmulJob> jobs;
    std::vector<LoraTask> deltas;
    for (size_t i = 0; i < experts.size(); ++i) {
      const ExpertRows& e = experts[i];
      const MlpWeights& w = *e.weights;
      const int64_t n = int64_t(e.rows.size());
      act[i].resize(size_t(n * w.gate.rows()));
      std::vector<const MlpLora*> row_lora(e.rows.size(), nullptr);
      for (size_t r = 0; r < e.lora.size(); ++r)
        if (e.lora[r] && !e.lora[r]->empty()) row_lora[r] = e.lora[r];
      Adapted& a = adapted[i];
      a.groups = rows_by_adapter<MlpLora>(row_lora);
      if (a.groups.empty()) {
        jobs.push_back(swiglu_job(x, hidden, e.rows, w, act[i].data()));
        continue;
      }
      for (auto* buf : {&a.gate, &a.up, &a.dgate, &a.dup}) buf->resize(act[i].size());
      a.ddown.resize(size_t(n * hidden));
      cpu::MatmulJob g = projection_job(x, n, w.gate, a.gate.data()), u = projection_job(x, n, w.up, a.up.data());
      g.x_rows = u.x_rows = e.rows.data();
      jobs.push_back(g);
      jobs.push_back(u);
      for (const auto& [m, pos] : a.groups) {
        auto& xr = a.x_rows.emplace_back();
        for (int32_t p : pos) xr.push_back(e.rows[size_t(p)]);
        const int64_t k = int64_t(pos.size()), inter = w.gate.rows();
        deltas.push_back({&m->gate, x, xr.data(), hidden, a.dgate.data(), pos.data(), inter, k, false});
        deltas.push_back({&m->up, x, xr.data(), hidden, a.dup.data(), pos.data(), inter, k, false});
      }
    }
    cpu::matmul(jobs, lora_jobs(deltas));
    jobs.clear();
    deltas.clear();
    for (size_t i = 0; i < experts.size(); ++i) {
      const ExpertRows& e = experts[i];
      Adapted& a = adapted[i];
      const int64_t n = int64_t(e.rows.size()), inter = e.weights->gate.rows();
      for (const auto& [m, pos] : a.groups) {
        if (!m->gate.empty()) add_rows(a.dgate.data(), a.gate.data(), inter, pos);
        if (!m->up.empty()) add_rows(a.dup.data(), a.up.data(), inter, pos);
      }
      for (size_t k = 0; k < a.gate.size(); ++k) act[i][k] = cpu::silu(a.gate[k]) * a.up[k];
      jobs.push_back(projection_job(act[i].data(), n, e.weights->down, e.out));
      for (const auto& [m, pos] : a.groups)
        deltas.push_back({&m->down, act[i].data(), pos.data(), inter, a.ddown.data(), pos.data(), hidden,
                          int64_t(pos.size()), false});
    }
    cpu::matmul(jobs, lora_jobs(deltas));
    for (size_t i = 0; i < experts.size(); ++i)
      for (const auto& [m, pos] : adapted[i].groups)
        if (!m->down.empty()) add_rows(adapted[i].ddown.data(), experts[i].out, hidden, pos);
  }

  // The CPU kernels spread one call over the compute pool; more calls at once only share it.
  int useful_concurrency() const override { return 1; }
};

}  // namespace

const AttentionObserver* set_attention_observer(const AttentionObserver* observer) {
  return std::exchange(attention_observer, observer);
}

std::shared_ptr<ComputeBackend> cpu_backend() {
  static const auto backend = std::make_shared<CpuBackend>();
  return backend;
}

}  // namespace moemesh
