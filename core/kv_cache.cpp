#include "core/kv_cache.h"

#include <algorithm>
#include <string>

#include "core/error.h"

namespace moemesh {

KvCache::KvCache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks)
    : n_layers_(n_layers), kv_dim_(kv_dim), num_blocks_(num_blocks) {
  if (n_layers <= 0 || kv_dim <= 0 || num_blocks <= 0)
    throw Error("kv cache: layers, kv_dim and blocks must be positive (got " + std::to_string(n_layers) + ", " +
                std::to_string(kv_dim) + ", " + std::to_string(num_blocks) + ")");
  pool_.assign(size_t(n_layers * num_blocks * 2 * kBlockSize * kv_dim), 0.0f);
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
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) free_.push_back(*it);
  seqs_.erase(id);
}

int64_t KvCache::length(SeqId id) const { return seq(id).length; }

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
}

float* KvCache::block_ptr(int64_t layer, int32_t block, bool value) const {
  const size_t block_floats = size_t(kBlockSize * kv_dim_);
  return pool_.data() + ((size_t(layer) * size_t(num_blocks_) + size_t(block)) * 2 + (value ? 1 : 0)) * block_floats;
}

float* KvCache::k_row(int64_t layer, SeqId id, int64_t pos) {
  const Sequence& s = seq(id);
  return block_ptr(layer, s.blocks.at(size_t(pos / kBlockSize)), false) + (pos % kBlockSize) * kv_dim_;
}

float* KvCache::v_row(int64_t layer, SeqId id, int64_t pos) {
  const Sequence& s = seq(id);
  return block_ptr(layer, s.blocks.at(size_t(pos / kBlockSize)), true) + (pos % kBlockSize) * kv_dim_;
}

namespace {
void check_block(int64_t index, size_t blocks, SeqId id) {
  if (index < 0 || size_t(index) >= blocks)
    throw Error("kv cache: block " + std::to_string(index) + " of sequence " + std::to_string(id) + " is not reserved (" +
                std::to_string(blocks) + " are)");
}
}  // namespace

void KvCache::read_block(SeqId id, int64_t index, float* out) const {
  const Sequence& s = seq(id);
  check_block(index, s.blocks.size(), id);
  // K and V of one block in one layer are adjacent in the pool: one copy per layer.
  const size_t per_layer = size_t(2 * kBlockSize * kv_dim_);
  for (int64_t l = 0; l < n_layers_; ++l)
    std::copy_n(block_ptr(l, s.blocks[size_t(index)], false), per_layer, out + size_t(l) * per_layer);
}

void KvCache::write_block(SeqId id, int64_t index, const float* in) {
  const Sequence& s = seq(id);
  check_block(index, s.blocks.size(), id);
  const size_t per_layer = size_t(2 * kBlockSize * kv_dim_);
  for (int64_t l = 0; l < n_layers_; ++l)
    std::copy_n(in + size_t(l) * per_layer, per_layer, block_ptr(l, s.blocks[size_t(index)], false));
}

cpu::PagedKV KvCache::view(int64_t layer, SeqId id, std::vector<const float*>& k_ptrs,
                           std::vector<const float*>& v_ptrs) const {
  const Sequence& s = seq(id);
  k_ptrs.resize(s.blocks.size());
  v_ptrs.resize(s.blocks.size());
  for (size_t i = 0; i < s.blocks.size(); ++i) {
    k_ptrs[i] = block_ptr(layer, s.blocks[i], false);
    v_ptrs[i] = block_ptr(layer, s.blocks[i], true);
  }
  return cpu::PagedKV{k_ptrs.data(), v_ptrs.data(), kBlockSize};
}

}  // namespace moemesh
