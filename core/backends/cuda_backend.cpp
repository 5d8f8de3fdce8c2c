#include "core/backends/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <string>
#include <map>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "core/rope.h"
#include "kernels/cpu/kv_int8.h"
#include "kernels/cpu/quant_matrix.h"
#include "kernels/cuda/api.cuh"

namespace moemesh {
namespace {

void check(const cuda::Status& s) {
  if (!s.ok()) throw Error("cuda backend: " + s.message());
}
#define MOEMESH_CUDA_BACKEND_CHECK(call) check(::moemesh::cuda::from_cuda((call), __FILE__, __LINE__, #call))

// One device buffer, freed on destruction. With a stream it is allocated and freed in that
// stream's order (cudaMallocAsync / cudaFreeAsync): no device-wide synchronisation, which a
// cudaFree would impose on every stream, NCCL's pending sends included.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes, cudaStream_t stream = nullptr) : bytes_(bytes), stream_(stream) {
    if (stream_)
      MOEMESH_CUDA_BACKEND_CHECK(cudaMallocAsync(&p_, bytes, stream_));
    else
      MOEMESH_CUDA_BACKEND_CHECK(cudaMalloc(&p_, bytes));
  }
  ~DeviceBuffer() {
    if (p_ && stream_)
      cudaFreeAsync(p_, stream_);
    else if (p_)
      cudaFree(p_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_), stream_(o.stream_) {
    o.p_ = nullptr, o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    std::swap(stream_, o.stream_);
    return *this;
  }
  void* get() const { return p_; }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

// Synchronous copies from pageable host memory return once the bytes are staged, before they
// reach the device; the lanes' non-blocking streams do not wait for the legacy stream that
// carries them, so whoever copies that way waits here before a lane may read the data.
void wait_for_legacy_copies() { MOEMESH_CUDA_BACKEND_CHECK(cudaStreamSynchronize(cudaStreamLegacy)); }

// KV blocks in device memory; KvCache keeps the block tables and lengths on the host.
// Layout per layer: the kernels' [num_blocks, 16, kv_heads, head_dim] for K and for V
// (+ [num_blocks, 16, kv_heads] scales for INT8).
class DeviceKvCache final : public KvCache {
 public:
  DeviceKvCache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks, KvCacheFormat format)
      : KvCache(n_layers, kv_dim, num_blocks, format, /*host_storage=*/false) {
    const size_t values = size_t(num_blocks * kBlockSize * kv_dim);
    value_bytes_ = values * (format.dtype == KvDType::F32 ? sizeof(float) : 1);
    scale_bytes_ = format.dtype == KvDType::F32 ? 0 : size_t(num_blocks * kBlockSize * format.kv_heads) * sizeof(float);
    pool_ = DeviceBuffer(size_t(n_layers) * 2 * (value_bytes_ + scale_bytes_));
    MOEMESH_CUDA_BACKEND_CHECK(cudaMemset(pool_.get(), 0, pool_.bytes()));
    wait_for_legacy_copies();
  }

  // K (value = false) or V values of one layer; scales follow the values of each (layer, K|V).
  char* values(int64_t layer, bool value) const {
    return static_cast<char*>(pool_.get()) + (size_t(layer) * 2 + (value ? 1 : 0)) * (value_bytes_ + scale_bytes_);
  }
  float* scales(int64_t layer, bool value) const {
    return reinterpret_cast<float*>(values(layer, value) + value_bytes_);
  }
  cuda::Int8KvCache int8(int64_t layer) const {
    return {reinterpret_cast<int8_t*>(values(layer, false)), reinterpret_cast<int8_t*>(values(layer, true)),
            scales(layer, false), scales(layer, true)};
  }

  // The prefix cache's f32 frames: [n_layers, 2, kBlockSize, kv_dim].
  void read_block(SeqId seq, int64_t index, float* out) const override {
    const int32_t block = block_of(seq, index);
    const size_t rows = size_t(kBlockSize), slab = rows * size_t(kv_dim());
    for (int64_t l = 0; l < n_layers(); ++l)
      for (int kv = 0; kv < 2; ++kv) {
        float* dst = out + (size_t(l) * 2 + size_t(kv)) * slab;
        if (dtype() == KvDType::F32) {
          MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpy(dst, values(l, kv) + size_t(block) * slab * sizeof(float),
                                                slab * sizeof(float), cudaMemcpyDeviceToHost));
        } else {
          std::vector<int8_t> q(slab);
          std::vector<float> s(rows * size_t(format().kv_heads));
          MOEMESH_CUDA_BACKEND_CHECK(
              cudaMemcpy(q.data(), values(l, kv) + size_t(block) * slab, slab, cudaMemcpyDeviceToHost));
          MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpy(s.data(), scales(l, kv) + size_t(block) * s.size(),
                                                s.size() * sizeof(float), cudaMemcpyDeviceToHost));
          cpu::dequantize_kv_int8(q.data(), s.data(), kBlockSize, format().kv_heads, kv_dim() / format().kv_heads, dst);
        }
      }
  }

  void write_block(SeqId seq, int64_t index, const float* in) override {
    const int32_t block = block_of(seq, index);
    const size_t rows = size_t(kBlockSize), slab = rows * size_t(kv_dim());
    for (int64_t l = 0; l < n_layers(); ++l)
      for (int kv = 0; kv < 2; ++kv) {
        const float* src = in + (size_t(l) * 2 + size_t(kv)) * slab;
        if (dtype() == KvDType::F32) {
          MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpy(values(l, kv) + size_t(block) * slab * sizeof(float), src,
                                                slab * sizeof(float), cudaMemcpyHostToDevice));
        } else {
          std::vector<int8_t> q(slab);
          std::vector<float> s(rows * size_t(format().kv_heads));
          cpu::quantize_kv_int8(src, kBlockSize, format().kv_heads, kv_dim() / format().kv_heads, q.data(), s.data());
          MOEMESH_CUDA_BACKEND_CHECK(
              cudaMemcpy(values(l, kv) + size_t(block) * slab, q.data(), slab, cudaMemcpyHostToDevice));
          MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpy(scales(l, kv) + size_t(block) * s.size(), s.data(),
                                                s.size() * sizeof(float), cudaMemcpyHostToDevice));
        }
      }
    wait_for_legacy_copies();
  }

 private:
  size_t value_bytes_ = 0, scale_bytes_ = 0;
  DeviceBuffer pool_;
};

// Scratch buffers by role; each grows to the largest request and is then reused.
enum Slot {
  kX,
  kH,
  kQ,
  kK,
  kV,
  kAttn,
  kOut,
  kIds,
  kPos,
  kRowSeq,
  kSlots,
  kTables,
  kGemmWork,
  kPointers,
  kLogits,
  kSplitWork,
  kSlotCount
};

// What one call computes with: its stream, cuBLAS handle, scratch and host index buffers. Calls
// from different threads (the engine's two micro-batches) take different lanes, so one's copies
// overlap the other's kernels on the device; a lane is reused by later calls.
struct Lane {
  // Declared first, so destroyed last: the handle and the stream-ordered frees below use it.
  struct OwnedStream {
    cudaStream_t s = nullptr;
    ~OwnedStream() {
      if (s) cudaStreamDestroy(s);
    }
  } owned;
  cudaStream_t stream = nullptr;
  cuda::Blas blas;
  DeviceBuffer scratch[kSlotCount];
  std::vector<int32_t> row_seq, slots, tables, gather_index;
};

class CudaBackend final : public ComputeBackend {
 public:
  explicit CudaBackend(int index) : index_(index) {
    cudaDeviceProp prop{};
    MOEMESH_CUDA_BACKEND_CHECK(cudaGetDeviceProperties(&prop, index));
    name_ = "cuda:" + std::to_string(index) + " (" + prop.name + ")";
    sm_count_ = prop.multiProcessorCount;
    // nvidia-smi's form: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx.
    char uuid[64];
    const auto* b = reinterpret_cast<const unsigned char*>(prop.uuid.bytes);
    std::snprintf(uuid, sizeof uuid, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                  b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
    device_id_ = uuid;
    MOEMESH_CUDA_BACKEND_CHECK(cudaSetDevice(index));
  }

  std::string name() const override { return name_; }
  std::string device_id() const override { return device_id_; }

  std::unique_ptr<KvCache> make_kv_cache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks,
                                         KvCacheFormat format) override {
    select();
    return std::make_unique<DeviceKvCache>(n_layers, kv_dim, num_blocks, format);
  }

  void embedding(const Weight& table, const int32_t* ids, int64_t n, float* out) override {
    Lease lease = take_lane();
    Lane& L = *lease.lane;
    const int64_t dim = table.cols();
    int32_t* d_ids = upload(L, kIds, ids, size_t(n));
    float* d_out = scratch<float>(L, kOut, size_t(n * dim));
    check(cuda::embedding(weight(table), table.dtype, table.rows(), dim, d_ids, n, d_out, L.stream));
    download(L, out, d_out, size_t(n * dim));
  }

  void rmsnorm(const float* x, const Weight& w, int64_t rows, double eps, float* y) override {
    Lease lease = take_lane();
    Lane& L = *lease.lane;
    const size_t n = size_t(rows * w.rows());
    float* d_x = upload(L, kX, x, n);
    float* d_y = scratch<float>(L, kOut, n);
    check(cuda::rmsnorm(d_x, weight(w), w.dtype, rows, w.rows(), eps, d_y, L.stream));
    download(L, y, d_y, n);
  }

  void matmul(const float* x, int64_t rows, const Weight& w, float* y) override {
    Lease lease = take_lane();
    Lane& L = *lease.lane;
    float* d_x = upload(L, kX, x, size_t(rows * w.cols()));
    float* d_y = scratch<float>(L, kOut, size_t(rows * w.rows()));
    gemm(L, d_x, rows, w, d_y);
    download(L, y, d_y, size_t(rows * w.rows()));
  }

  void attention_block(const ModelConfig& cfg, const LayerWeights& lw, int64_t layer, KvCache& kv,
                       const BatchLayout& layout, float* x) override {
    refuse_lora(layout);
    auto* dkv = dynamic_cast<DeviceKvCache*>(&kv);
    if (!dkv) throw Error("cuda backend: the KV cache was not made by this backend (make_kv_cache)");
    Lease lease = take_lane();
    Lane& L = *lease.lane;
    const int64_t rows = layout.rows, hidden = cfg.hidden_size, hd = cfg.head_dim;
    const int64_t q_dim = cfg.num_attention_heads * hd, kv_dim = cfg.num_key_value_heads * hd;

    // Host-side indices: row -> sequence (its span), positions, cache slots, block tables.
    int64_t max_blocks = 1;
    for (const auto& sp : layout.spans)
      max_blocks = std::max<int64_t>(max_blocks, int64_t(kv.block_table(sp.seq).size()));
    L.row_seq.assign(size_t(rows), 0);
    L.slots.assign(size_t(rows), -1);
    L.tables.assign(layout.spans.size() * size_t(max_blocks), 0);
    for (size_t s = 0; s < layout.spans.size(); ++s) {
      const auto& sp = layout.spans[s];
      const auto& table = kv.block_table(sp.seq);
      std::copy(table.begin(), table.end(), L.tables.begin() + ptrdiff_t(s * size_t(max_blocks)));
      for (int64_t i = 0; i < sp.n; ++i) {
        const int64_t pos = sp.pos0 + i;
        L.row_seq[size_t(sp.row0 + i)] = int32_t(s);
        L.slots[size_t(sp.row0 + i)] = table.at(size_t(pos / KvCache::kBlockSize)) * int32_t(KvCache::kBlockSize) +
                                       int32_t(pos % KvCache::kBlockSize);
      }
    }
    int32_t* d_pos = upload(L, kPos, layout.positions.data(), size_t(rows));
    int32_t* d_row_seq = upload(L, kRowSeq, L.row_seq.data(), size_t(rows));
    int32_t* d_slots = upload(L, kSlots, L.slots.data(), size_t(rows));
    int32_t* d_tables = upload(L, kTables, L.tables.data(), L.tables.size());
    float* d_x = upload(L, kX, x, size_t(rows * hidden));
    float* d_h = scratch<float>(L, kH, size_t(rows * hidden));
    float* d_q = scratch<float>(L, kQ, size_t(rows * q_dim));
    float* d_k = scratch<float>(L, kK, size_t(rows * kv_dim));
    float* d_v = scratch<float>(L, kV, size_t(rows * kv_dim));
    float* d_attn = scratch<float>(L, kAttn, size_t(rows * q_dim));
    float* d_o = scratch<float>(L, kOut, size_t(rows * hidden));

    check(
        cuda::rmsnorm(d_x, weight(lw.input_norm), lw.input_norm.dtype, rows, hidden, cfg.rms_norm_eps, d_h, L.stream));
    gemm(L, d_h, rows, lw.q, d_q);
    gemm(L, d_h, rows, lw.k, d_k);
    gemm(L, d_h, rows, lw.v, d_v);
    // RoPE with the model's (scaled) frequencies: one table for the batch, or one per sequence
    // under dynamic scaling (its length picks the base).
    auto rotate = [&](int64_t row0, int64_t n, int64_t seq_len) {
      const RopeTable t = rope_table(cfg, seq_len);
      if (int64_t(t.inv_freq.size()) > cuda::kMaxRopePairs)
        throw Error("cuda backend: head_dim " + std::to_string(hd) + " exceeds the RoPE kernel's " +
                    std::to_string(2 * cuda::kMaxRopePairs));
      cuda::RopeFrequencies f;
      std::copy(t.inv_freq.begin(), t.inv_freq.end(), f.inv_freq);
      f.attention_factor = t.attention_factor;
      check(cuda::rope(d_q + row0 * q_dim, n, cfg.num_attention_heads, hd, d_pos + row0, f, L.stream));
      check(cuda::rope(d_k + row0 * kv_dim, n, cfg.num_key_value_heads, hd, d_pos + row0, f, L.stream));
    };
    if (rope_depends_on_length(cfg)) {
      for (const auto& sp : layout.spans) rotate(sp.row0, sp.n, sp.pos0 + sp.n);
    } else {
      rotate(0, rows, 0);
    }

    cuda::PagedAttentionConfig ac;
    ac.n_heads = cfg.num_attention_heads;
    ac.n_kv_heads = cfg.num_key_value_heads;
    ac.head_dim = hd;
    ac.num_blocks = kv.num_blocks();
    ac.max_blocks_per_seq = max_blocks;
    ac.scale = float(attention_score_scale(cfg));
    ac.sliding_window = cfg.sliding_window.value_or(0);
    const int64_t n_seqs = int64_t(layout.spans.size());
    // Split-K when few rows attend over long contexts (decode): the most tokens a row sees.
    int64_t longest = 1;
    for (const auto& sp : layout.spans) longest = std::max(longest, sp.pos0 + sp.n);
    if (ac.sliding_window > 0) longest = std::min(longest, ac.sliding_window);
    ac.kv_splits = cuda::kv_splits_for(rows, ac.n_heads, longest, sm_count_);
    float* d_split =
        ac.kv_splits > 1 ? scratch<float>(L, kSplitWork, ac.split_workspace_bytes(rows) / sizeof(float)) : nullptr;
    if (kv.dtype() == KvDType::F32) {
      auto* k_cache = reinterpret_cast<float*>(dkv->values(layer, false));
      auto* v_cache = reinterpret_cast<float*>(dkv->values(layer, true));
      check(cuda::paged_kv_write(ac, d_k, d_v, rows, d_slots, k_cache, v_cache, L.stream));
      check(cuda::paged_attention(ac, d_q, rows, d_row_seq, d_pos, d_tables, n_seqs, k_cache, v_cache, d_attn, L.stream,
                                  d_split));
    } else {
      const cuda::Int8KvCache cache = dkv->int8(layer);
      check(cuda::paged_kv_write_int8(ac, d_k, d_v, rows, d_slots, cache, L.stream));
      check(cuda::paged_attention_int8(ac, d_q, rows, d_row_seq, d_pos, d_tables, n_seqs, cache, d_attn, L.stream,
                                       d_split));
    }
    gemm(L, d_attn, rows, lw.o, d_o);
    check(cuda::add_inplace(d_x, d_o, rows * hidden, L.stream));
    download(L, x, d_x, size_t(rows * hidden));
  }

  void mlp(const MlpWeights& w, const float* x, int64_t rows, int64_t hidden, float* out) override {
    Lease lease = take_lane();
    Lane& L = *lease.lane;
    const int64_t inter = w.gate.rows();
    float* d_x = upload(L, kX, x, size_t(rows * hidden));
    float* d_gate = scratch<float>(L, kQ, size_t(rows * inter));
    float* d_up = scratch<float>(L, kK, size_t(rows * inter));
    float* d_out = scratch<float>(L, kOut, size_t(rows * hidden));
    gemm(L, d_x, rows, w.gate, d_gate);
    gemm(L, d_x, rows, w.up, d_up);
    check(cuda::silu_mul(d_gate, d_up, rows, inter, d_gate, L.stream));
    gemm(L, d_gate, rows, w.down, d_out);
    download(L, out, d_out, size_t(rows * hidden));
  }

  // Gathers every expert's rows on the device (in the weights' dtype), then gate, up and down are
  // each one grouped GEMM over all the experts; results come back per expert.
  void grouped_mlp(const float* x, int64_t x_rows, int64_t hidden, std::span<const ExpertRows> experts) override {
    check_expert_rows(x_rows, experts);
    refuse_lora(experts);
    std::vector<const ExpertRows*> live;
    for (const ExpertRows& e : experts)
      if (!e.rows.empty()) live.push_back(&e);
    if (live.empty()) return;
    const MlpWeights& first = *live[0]->weights;
    // Quantized experts: one mlp each (cuBLAS's grouped GEMM takes float matrices only).
    for (const ExpertRows* e : live)
      if (e->weights->gate.quant || e->weights->up.quant || e->weights->down.quant)
        return ComputeBackend::grouped_mlp(x, x_rows, hidden, experts);
    const DType t = first.gate.dtype;
    const int64_t inter = first.gate.rows();
    for (const ExpertRows* e : live) {
      const MlpWeights& w = *e->weights;
      if (w.gate.dtype != t || w.up.dtype != t || w.down.dtype != t || w.gate.rows() != inter ||
          w.gate.cols() != hidden)
        return ComputeBackend::grouped_mlp(x, x_rows, hidden, experts);  // mixed experts: one mlp each
    }
    Lease lease = take_lane();
    Lane& L = *lease.lane;
    const int64_t groups = int64_t(live.size());
    std::vector<int64_t> counts, offsets;
    L.gather_index.clear();
    for (const ExpertRows* e : live) {
      offsets.push_back(int64_t(L.gather_index.size()));
      counts.push_back(int64_t(e->rows.size()));
      L.gather_index.insert(L.gather_index.end(), e->rows.begin(), e->rows.end());
    }
    const int64_t total = int64_t(L.gather_index.size());
    const size_t elt = dtype_size(t);
    const float* d_x = upload(L, kX, x, size_t(x_rows * hidden));
    const int32_t* d_index = upload(L, kIds, L.gather_index.data(), L.gather_index.size());
    char* d_xg = scratch<char>(L, kH, size_t(total * hidden) * elt);
    char* d_gate = scratch<char>(L, kQ, size_t(total * inter) * elt);
    char* d_up = scratch<char>(L, kK, size_t(total * inter) * elt);
    char* d_y = scratch<char>(L, kV, size_t(total * hidden) * elt);
    void** d_pointers = scratch<void*>(L, kPointers, size_t(3 * groups));
    check(cuda::gather_rows(d_x, x_rows, hidden, d_index, total, d_xg, t, L.stream));

    // One grouped GEMM: per expert, rows at `in` (width in_dim) times `which` weight into `out`.
    std::vector<const void*> xs(static_cast<size_t>(groups)), ws(static_cast<size_t>(groups));
    std::vector<void*> ys(static_cast<size_t>(groups));
    auto project = [&](const char* in, int64_t in_dim, const Weight MlpWeights::*which, char* out, int64_t out_dim) {
      for (int64_t i = 0; i < groups; ++i) {
        xs[size_t(i)] = in + size_t(offsets[size_t(i)] * in_dim) * elt;
        ws[size_t(i)] = weight(live[size_t(i)]->weights->*which);
        ys[size_t(i)] = out + size_t(offsets[size_t(i)] * out_dim) * elt;
      }
      check(cuda::grouped_matmul(L.blas.get(), groups, counts.data(), in_dim, out_dim, xs.data(), ws.data(), ys.data(),
                                 t, d_pointers, L.stream));
    };
    project(d_xg, hidden, &MlpWeights::gate, d_gate, inter);
    project(d_xg, hidden, &MlpWeights::up, d_up, inter);
    check(cuda::silu_mul_as(d_gate, d_up, total, inter, d_gate, t, L.stream));
    project(d_gate, inter, &MlpWeights::down, d_y, hidden);
    const float* d_out = reinterpret_cast<const float*>(d_y);
    if (t != DType::F32) {
      float* wide = scratch<float>(L, kOut, size_t(total * hidden));
      check(cuda::widen_to_f32(d_y, t, total * hidden, wide, L.stream));
      d_out = wide;
    }
    for (int64_t i = 0; i < groups; ++i)
      MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpyAsync(live[size_t(i)]->out, d_out + offsets[size_t(i)] * hidden,
                                                 size_t(counts[size_t(i)] * hidden) * sizeof(float),
                                                 cudaMemcpyDeviceToHost, L.stream));
    MOEMESH_CUDA_BACKEND_CHECK(cudaStreamSynchronize(L.stream));
    check(cuda::check_last_error());
  }

  // lm_head on the device, then each row summarised there: only k ids and values, two normalisers
  // and the watched logits come back, never the [rows, vocab] logits.
  std::vector<LogitsSummary> logits_summaries(const float* x, int64_t rows, const Weight& lm_head,
                                              std::span<const LogitsRequest> requests) override {
    check_logits_requests(rows, requests);
    const int64_t vocab = lm_head.rows();
    int64_t k = 1;
    std::vector<float> temperatures;
    std::vector<int32_t> watch{0};  // rows + 1 offsets, then the ids
    for (const LogitsRequest& r : requests) {
      k = std::max(k, std::min({r.k, vocab, cuda::kMaxSummaryTopK}));
      temperatures.push_back(float(r.temperature));
      watch.push_back(watch.back() + int32_t(r.watch.size()));
    }
    for (const LogitsRequest& r : requests) watch.insert(watch.end(), r.watch.begin(), r.watch.end());
    const size_t watched = watch.size() - size_t(rows) - 1;

    Lease lease = take_lane();
    Lane& L = *lease.lane;
    const float* d_x = upload(L, kX, x, size_t(rows * lm_head.cols()));
    float* d_logits = scratch<float>(L, kLogits, size_t(rows * vocab));
    gemm(L, d_x, rows, lm_head, d_logits);
    const float* d_temps = upload(L, kH, temperatures.data(), temperatures.size());
    const int32_t* d_watch = upload(L, kIds, watch.data(), watch.size());
    // Results in one float buffer: top values [rows, k], lse [rows], lse_scaled [rows], watched.
    const size_t floats = size_t(rows * k + 2 * rows) + watched;
    float* d_out = scratch<float>(L, kOut, floats);
    int32_t* d_top_ids = scratch<int32_t>(L, kSlots, size_t(rows * k));
    check(cuda::logits_summary(d_logits, rows, vocab, k, d_temps, watched ? d_watch + rows + 1 : nullptr, d_watch,
                               d_top_ids, d_out, d_out + rows * k, d_out + rows * k + rows,
                               watched ? d_out + rows * k + 2 * rows : nullptr, L.stream));
    std::vector<float> out(floats);
    std::vector<int32_t> top_ids(size_t(rows * k));
    MOEMESH_CUDA_BACKEND_CHECK(
        cudaMemcpyAsync(top_ids.data(), d_top_ids, top_ids.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, L.stream));
    download(L, out.data(), d_out, floats);

    std::vector<LogitsSummary> summaries(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      LogitsSummary& s = summaries[size_t(r)];
      const LogitsRequest& req = requests[size_t(r)];
      const size_t n = size_t(std::min({req.k, vocab, k}));
      s.vocab = vocab;
      s.top_ids.assign(top_ids.begin() + r * k, top_ids.begin() + r * k + ptrdiff_t(n));
      s.top_values.assign(out.begin() + r * k, out.begin() + r * k + ptrdiff_t(n));
      s.lse = out[size_t(rows * k + r)];
      const double scaled = out[size_t(rows * k + rows + r)];
      s.lse_scaled = req.temperature > 0 ? scaled : s.lse;
      const auto first = out.begin() + rows * k + 2 * rows + (watch[size_t(r)]);
      s.watch_values.assign(first, first + ptrdiff_t(req.watch.size()));
    }
    return summaries;
  }

  // One grouped call for a batch's experts beats splitting them across threads (the GEMMs would
  // be smaller); separate batches still run side by side on their own lanes.
  int useful_concurrency() const override { return 1; }

 private:
  void select() { MOEMESH_CUDA_BACKEND_CHECK(cudaSetDevice(index_)); }

  // A free lane (made when none is), returned when the call ends.
  struct Lease {
    CudaBackend* owner;
    std::unique_ptr<Lane> lane;
    Lease(CudaBackend* o, std::unique_ptr<Lane> l) : owner(o), lane(std::move(l)) {}
    Lease(const Lease&) = delete;
    ~Lease() {
      std::lock_guard lock(owner->lanes_mu_);
      owner->free_lanes_.push_back(std::move(lane));
    }
  };
  Lease take_lane() {
    select();
    std::unique_ptr<Lane> lane;
    {
      std::lock_guard lock(lanes_mu_);
      if (!free_lanes_.empty()) {
        lane = std::move(free_lanes_.back());
        free_lanes_.pop_back();
      }
    }
    if (!lane) {
      lane = std::make_unique<Lane>();
      MOEMESH_CUDA_BACKEND_CHECK(cudaStreamCreateWithFlags(&lane->owned.s, cudaStreamNonBlocking));
      lane->stream = lane->owned.s;
      check(lane->blas.init());
    }
    return Lease(this, std::move(lane));
  }

  template <class T>
  T* scratch(Lane& L, Slot slot, size_t n) {
    DeviceBuffer& b = L.scratch[slot];
    const size_t bytes = std::max<size_t>(n * sizeof(T), 256);
    if (b.bytes() < bytes)
      b = DeviceBuffer(std::max(bytes, b.bytes() * 2), L.stream);  // the old one freed in stream order
    return static_cast<T*>(b.get());
  }

  template <class T>
  T* upload(Lane& L, Slot slot, const T* host, size_t n) {
    T* d = scratch<T>(L, slot, n);
    MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpyAsync(d, host, n * sizeof(T), cudaMemcpyHostToDevice, L.stream));
    return d;
  }

  void download(Lane& L, float* host, const float* dev, size_t n) {
    MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpyAsync(host, dev, n * sizeof(float), cudaMemcpyDeviceToHost, L.stream));
    MOEMESH_CUDA_BACKEND_CHECK(cudaStreamSynchronize(L.stream));
    check(cuda::check_last_error());
  }

  void release(const Weight& w) override {
    std::lock_guard lock(weights_mu_);
    if (w.quant) quant_weights_.erase(w.quant.get());
    weights_.erase(WeightKey{w.data, w.numel(), w.dtype});
  }

  // The device copy of a weight, uploaded on first use.
  const void* weight(const Weight& w) {
    if (w.empty()) throw Error("cuda backend: weight " + w.name + " is not loaded");
    if (w.quant) throw Error("cuda backend: weight " + w.name + " is quantized: use quant_weight");
    std::lock_guard lock(weights_mu_);
    // Keyed by what the bytes are, not only where: a later tensor mapped at a reused address
    // gets its own copy.
    const WeightKey key{w.data, w.numel(), w.dtype};
    auto it = weights_.find(key);
    if (it == weights_.end()) {
      const size_t bytes = size_t(w.numel()) * dtype_size(w.dtype);
      DeviceBuffer b(bytes);
      MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpy(b.get(), w.data, bytes, cudaMemcpyHostToDevice));
      wait_for_legacy_copies();
      it = weights_.emplace(key, std::move(b)).first;
    }
    return it->second.get();
  }

  // The device copy of an INT4/INT8 weight (kernels/cpu/quant_matrix.h), uploaded on first use.
  const cuda::QuantWeight& quant_weight(const Weight& w) {
    const cpu::QuantMatrix& m = *w.quant;
    std::lock_guard lock(weights_mu_);
    auto it = quant_weights_.find(&m);
    if (it != quant_weights_.end()) return it->second.view;
    std::vector<int32_t> group_of(size_t(m.padded_in));
    for (int64_t g = 0; g < m.groups(); ++g)
      std::fill(group_of.begin() + m.group_start[size_t(g)], group_of.begin() + m.group_start[size_t(g + 1)],
                int32_t(g));
    QuantCopy c;
    auto put = [&](const void* host, size_t bytes) {
      c.buffers.emplace_back(bytes);
      MOEMESH_CUDA_BACKEND_CHECK(cudaMemcpy(c.buffers.back().get(), host, bytes, cudaMemcpyHostToDevice));
      return c.buffers.back().get();
    };
    c.view.bits = m.bits, c.view.out = m.out, c.view.in = m.in, c.view.padded_in = m.padded_in;
    c.view.groups = m.groups();
    c.view.q = static_cast<const uint8_t*>(put(m.q.data(), m.q.size()));
    c.view.scale = static_cast<const float*>(put(m.scale.data(), m.scale.size() * sizeof(float)));
    c.view.scaled_zero = static_cast<const float*>(put(m.scaled_zero.data(), m.scaled_zero.size() * sizeof(float)));
    c.view.group_of = static_cast<const int32_t*>(put(group_of.data(), group_of.size() * sizeof(int32_t)));
    c.view.source = static_cast<const int32_t*>(put(m.source.data(), m.source.size() * sizeof(int32_t)));
    wait_for_legacy_copies();
    return quant_weights_.emplace(&m, std::move(c)).first->second.view;
  }

  void gemm(Lane& L, const float* d_x, int64_t rows, const Weight& w, float* d_y) {
    if (w.quant) {
      const cuda::QuantWeight& m = quant_weight(w);
      const size_t ws = cuda::quant_matmul_workspace_bytes(rows, m);
      void* work = ws ? scratch<char>(L, kGemmWork, ws) : nullptr;
      check(cuda::quant_matmul(L.blas.get(), d_x, rows, m, d_y, work, ws, L.stream));
      return;
    }
    const size_t ws = cuda::matmul_workspace_bytes(rows, w.cols(), w.dtype);
    void* work = ws ? scratch<char>(L, kGemmWork, ws) : nullptr;
    check(cuda::matmul(L.blas.get(), d_x, rows, w.cols(), weight(w), w.dtype, w.rows(), d_y, work, ws, L.stream));
  }

  int index_;
  std::string name_, device_id_;
  int sm_count_ = 1;
  std::mutex weights_mu_;
  using WeightKey = std::tuple<const void*, int64_t, DType>;
  std::map<WeightKey, DeviceBuffer> weights_;
  struct QuantCopy {
    std::vector<DeviceBuffer> buffers;
    cuda::QuantWeight view;  // into buffers
  };
  // Keyed by the matrix: the checkpoint keeps each QuantMatrix alive and in place.
  std::map<const cpu::QuantMatrix*, QuantCopy> quant_weights_;
  std::mutex lanes_mu_;
  std::vector<std::unique_ptr<Lane>> free_lanes_;
};

}  // namespace

std::shared_ptr<ComputeBackend> make_cuda_backend(int index) {
  const int count = cuda::device_count();
  if (count == 0) throw Error(std::string("no CUDA device: ") + cuda::device_error());
  if (index < 0 || index >= count)
    throw Error("no CUDA device: cuda:" + std::to_string(index) + " requested, " + std::to_string(count) +
                " device(s) present");
  return std::make_shared<CudaBackend>(index);
}

}  // namespace moemesh
