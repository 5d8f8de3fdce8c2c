#include "core/kv_cache.h"

#include <algorithm>
#include <string>

#include "core/error.h"
#include "kernels/cpu/kv_int8.h"

namespace moemesh {

KvDType parse_kv_dtype(std::string_view s) {
  if (s == "f32") return KvDType::F32;
  if (s == "int8") return KvDType::Int8;
  throw Error("unknown KV cache dtype \"" + std::string(s) + "\" (expected f32 or int8)");
}

std::string_view kv_dtype_name(KvDType t) { return t == KvDType::Int8 ? "int8" : "f32"; }

int64_t kv_blocks_held(int64_t tokens, int64_t new_tokens, int64_t sliding_window) {
  if (tokens <= 0) return 0;
  const int64_t all = (tokens + KvCache::kBlockSize - 1) / KvCache::kBlockSize;
  if (sliding_window <= 0) return all;
  const int64_t first_pos = std::max<int64_t>(0, tokens - std::max<int64_t>(new_tokens, 1) - sliding_window + 1);
  return all - first_pos / KvCache::kBlockSize;
}

KvCache::KvCache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks, KvCacheFormat format)
    : KvCache(n_layers, kv_dim, num_blocks, format, true) {}

KvCache::KvCache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks, KvCacheFormat format, bool host_storage)
    : n_layers_(n_layers), kv_dim_(kv_dim), num_blocks_(num_blocks), format_(format), host_storage_(host_storage) {
  if (n_layers <= 0 || kv_dim <= 0 || num_blocks <= 0)
    throw Error("kv cache: layers, kv_dim and blocks must be positive (got " + std::to_string(n_layers) + ", " +
                std::to_string(kv_dim) + ", " + std::to_string(num_blocks) + ")");
  if (format.sliding_window < 0)
    throw Error("kv cache: sliding window must be >= 0 (0: none), got " + std::to_string(format.sliding_window));
  if (format.kv_heads <= 0 || kv_dim % format.kv_heads != 0)
    throw Error("kv cache: kv_dim " + std::to_string(kv_dim) + " is not a multiple of kv_heads " +
                std::to_string(format.kv_heads));
  if (host_storage) {
    const size_t values = size_t(n_layers * num_blocks * 2 * kBlockSize * kv_dim);
    if (format.dtype == KvDType::F32) {
      pool_.assign(values, 0.0f);
    } else {
      qpool_.assign(values, 0);
      scales_.assign(size_t(n_layers * num_blocks * 2 * kBlockSize * format.kv_heads), 0.0f);
    }
  }
  free_.reserve(size_t(num_blocks));
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(int32_t(b));
}

SeqId KvCache::create_sequence() {
  const SeqId id = next_id_++;
  seqs_.emplace(id, Sequence{});
  return id;
}

const KvCache::Sequence& KvCache::seq(SeqId id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw Error("kv cache: unknown sequence " + std::to_string(id));
  return it->second;
}

KvCache::Sequence& KvCache::seq(SeqId id) {
  return const_cast<Sequence&>(static_cast<const KvCache*>(this)->seq(id));
}

void KvCache::free_sequence(SeqId id) {
  Sequence& s = seq(id);
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it)
    if (*it >= 0) free_.push_back(*it);
  seqs_.erase(id);
}

int64_t KvCache::length(SeqId id) const { return seq(id).length; }

const std::vector<int32_t>& KvCache::block_table(SeqId id) const { return seq(id).blocks; }

int64_t KvCache::blocks_needed(SeqId id, int64_t new_len) const {
  const int64_t have = int64_t(seq(id).blocks.size());
  const int64_t want = (new_len + kBlockSize - 1) / kBlockSize;
  return want > have ? want - have : 0;
}

void KvCache::reserve(SeqId id, int64_t new_len) {
  const int64_t need = blocks_needed(id, new_len);
  if (need > free_blocks())
    throw Error("kv cache: out of blocks (sequence " + std::to_string(id) + " needs " + std::to_string(need) +
                " more for " + std::to_string(new_len) + " tokens, " + std::to_string(free_blocks()) + " of " +
                std::to_string(num_blocks_) + " free)");
  Sequence& s = seq(id);
  for (int64_t i = 0; i < need; ++i) {
    s.blocks.push_back(free_.back());
    free_.pop_back();
  }
}

void KvCache::set_length(SeqId id, int64_t new_len) {
  Sequence& s = seq(id);
  if (new_len > int64_t(s.blocks.size()) * kBlockSize)
    throw Error("kv cache: length " + std::to_string(new_len) + " exceeds reserved room of sequence " +
                std::to_string(id));
  s.length = new_len;
  // The next query sits at new_len and sees positions from new_len - window + 1 on.
  if (format_.sliding_window > 0) {
    const int64_t first_seen = std::max<int64_t>(0, new_len - format_.sliding_window + 1);
    const int64_t keep_from = std::min<int64_t>(first_seen / kBlockSize, int64_t(s.blocks.size()));
    for (int64_t b = s.released; b < keep_from; ++b) {
      free_.push_back(s.blocks[size_t(b)]);
      s.blocks[size_t(b)] = -1;
    }
    s.released = std::max(s.released, keep_from);
  }
}

int64_t KvCache::held_blocks(SeqId id) const {
  const Sequence& s = seq(id);
  return int64_t(s.blocks.size()) - s.released;
}

int64_t KvCache::first_held_block(SeqId id) const { return seq(id).released; }

int64_t KvCache::bytes_per_block() const {
  const int64_t rows = n_layers_ * 2 * kBlockSize;
  if (format_.dtype == KvDType::F32) return rows * kv_dim_ * int64_t(sizeof(float));
  return rows * (kv_dim_ + format_.kv_heads * int64_t(sizeof(float)));
}

void KvCache::require_host(const char* what) const {
  if (!host_storage_) throw Error(std::string("kv cache: ") + what + " needs host storage (this cache lives on a device)");
}

float* KvCache::block_ptr(int64_t layer, int32_t block, bool value) const {
  return pool_.data() + slab(layer, block, value) * size_t(kBlockSize * kv_dim_);
}

int32_t KvCache::block_of(SeqId id, int64_t index) const {
  const Sequence& s = seq(id);
  if (index < 0 || size_t(index) >= s.blocks.size())
    throw Error("kv cache: block " + std::to_string(index) + " of sequence " + std::to_string(id) +
                " is not reserved (" + std::to_string(s.blocks.size()) + " are)");
  if (s.blocks[size_t(index)] < 0)
    throw Error("kv cache: block " + std::to_string(index) + " of sequence " + std::to_string(id) +
                " was released (outside the sliding window of " + std::to_string(format_.sliding_window) + ")");
  return s.blocks[size_t(index)];
}

void KvCache::write_row(int64_t layer, SeqId id, int64_t pos, const float* k, const float* v) {
  require_host("write_row");
  const int32_t block = block_of(id, pos / kBlockSize);
  const int64_t row = pos % kBlockSize;
  if (format_.dtype == KvDType::F32) {
    std::copy_n(k, kv_dim_, block_ptr(layer, block, false) + row * kv_dim_);
    std::copy_n(v, kv_dim_, block_ptr(layer, block, true) + row * kv_dim_);
  } else {
    quantise_rows(slab(layer, block, false), row, 1, k);
    quantise_rows(slab(layer, block, true), row, 1, v);
  }
}

float* KvCache::k_row(int64_t layer, SeqId id, int64_t pos) {
  require_host("k_row");
  if (format_.dtype != KvDType::F32) throw Error("kv cache: k_row needs an f32 cache (this one is int8)");
  return block_ptr(layer, block_of(id, pos / kBlockSize), false) + (pos % kBlockSize) * kv_dim_;
}

float* KvCache::v_row(int64_t layer, SeqId id, int64_t pos) {
  require_host("v_row");
  if (format_.dtype != KvDType::F32) throw Error("kv cache: v_row needs an f32 cache (this one is int8)");
  return block_ptr(layer, block_of(id, pos / kBlockSize), true) + (pos % kBlockSize) * kv_dim_;
}

void KvCache::quantise_rows(size_t slab_index, int64_t first_row, int64_t n_rows, const float* in) {
  const int64_t heads = format_.kv_heads;
  cpu::quantize_kv_int8(in, n_rows, heads, kv_dim_ / heads,
                        qpool_.data() + slab_index * size_t(kBlockSize * kv_dim_) + size_t(first_row * kv_dim_),
                        scales_.data() + slab_index * size_t(kBlockSize * heads) + size_t(first_row * heads));
}

void KvCache::dequantise_rows(size_t slab_index, float* out) const {
  const int64_t heads = format_.kv_heads;
  cpu::dequantize_kv_int8(qpool_.data() + slab_index * size_t(kBlockSize * kv_dim_),
                          scales_.data() + slab_index * size_t(kBlockSize * heads), kBlockSize, heads,
                          kv_dim_ / heads, out);
}

void KvCache::read_block(SeqId id, int64_t index, float* out) const {
  require_host("read_block");
  const int32_t block = block_of(id, index);
  const size_t slab_floats = size_t(kBlockSize * kv_dim_);
  for (int64_t l = 0; l < n_layers_; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      float* dst = out + (size_t(l) * 2 + size_t(kv)) * slab_floats;
      if (format_.dtype == KvDType::F32)
        std::copy_n(block_ptr(l, block, kv == 1), slab_floats, dst);
      else
        dequantise_rows(slab(l, block, kv == 1), dst);
    }
}

void KvCache::write_block(SeqId id, int64_t index, const float* in) {
  require_host("write_block");
  const int32_t block = block_of(id, index);
  const size_t slab_floats = size_t(kBlockSize * kv_dim_);
  for (int64_t l = 0; l < n_layers_; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      const float* src = in + (size_t(l) * 2 + size_t(kv)) * slab_floats;
      if (format_.dtype == KvDType::F32)
        std::copy_n(src, slab_floats, block_ptr(l, block, kv == 1));
      else
        quantise_rows(slab(l, block, kv == 1), 0, kBlockSize, src);
    }
}

cpu::PagedKV KvCache::view(int64_t layer, SeqId id, KvViewScratch& sc) const {
  require_host("view");
  const Sequence& s = seq(id);
  const size_t n = s.blocks.size();
  cpu::PagedKV out;
  out.block_size = kBlockSize;
  if (format_.dtype == KvDType::F32) {
    sc.k.resize(n);
    sc.v.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const bool held = s.blocks[i] >= 0;  // released blocks: null (the window never reads them)
      sc.k[i] = held ? block_ptr(layer, s.blocks[i], false) : nullptr;
      sc.v[i] = held ? block_ptr(layer, s.blocks[i], true) : nullptr;
    }
    out.k_blocks = sc.k.data();
    out.v_blocks = sc.v.data();
    return out;
  }
  sc.k_q.resize(n);
  sc.v_q.resize(n);
  sc.k_scale.resize(n);
  sc.v_scale.resize(n);
  const size_t slab_values = size_t(kBlockSize * kv_dim_), slab_scales = size_t(kBlockSize * format_.kv_heads);
  for (size_t i = 0; i < n; ++i) {
    if (s.blocks[i] < 0) {
      sc.k_q[i] = sc.v_q[i] = nullptr;
      sc.k_scale[i] = sc.v_scale[i] = nullptr;
      continue;
    }
    const size_t ks = slab(layer, s.blocks[i], false), vs = slab(layer, s.blocks[i], true);
    sc.k_q[i] = qpool_.data() + ks * slab_values;
    sc.v_q[i] = qpool_.data() + vs * slab_values;
    sc.k_scale[i] = scales_.data() + ks * slab_scales;
    sc.v_scale[i] = scales_.data() + vs * slab_scales;
  }
  out.k_q = sc.k_q.data();
  out.v_q = sc.v_q.data();
  out.k_scale = sc.k_scale.data();
  out.v_scale = sc.v_scale.data();
  return out;
}

}  // namespace moemesh
