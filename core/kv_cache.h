// Paged KV cache: a preallocated pool of fixed-size blocks (16 tokens each) shared by all
// sequences. A sequence owns a block table; one block id covers every layer (as in vLLM), so
// growing a sequence by a token takes at most one block from the pool. K and V are f32.
#pragma once
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "kernels/cpu/attention.h"

namespace moemesh {

using SeqId = int64_t;

class KvCache {
 public:
  static constexpr int64_t kBlockSize = 16;

  // kv_dim = num_key_value_heads * head_dim. Throws moemesh::Error on bad sizes.
  KvCache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks);

  SeqId create_sequence();
  void free_sequence(SeqId seq);  // returns its blocks to the pool; unknown id -> Error
  bool has_sequence(SeqId seq) const { return seqs_.count(seq) > 0; }

  // Tokens whose K/V are stored.
  int64_t length(SeqId seq) const;
  // Blocks needed to grow seq to new_len tokens (0 if it already has room).
  int64_t blocks_needed(SeqId seq, int64_t new_len) const;
  // Ensures room for new_len tokens; throws moemesh::Error when the pool runs out (taking nothing).
  void reserve(SeqId seq, int64_t new_len);
  // Marks positions [length, new_len) as written (after every layer stored them).
  void set_length(SeqId seq, int64_t new_len);

  // Row of K (or V) for (layer, seq, position): kv_dim floats. The position must be reserved.
  float* k_row(int64_t layer, SeqId seq, int64_t pos);
  float* v_row(int64_t layer, SeqId seq, int64_t pos);
  // Block pointers of one sequence in one layer, for the attention kernel. Valid until the
  // next reserve/free.
  cpu::PagedKV view(int64_t layer, SeqId seq, std::vector<const float*>& k_ptrs,
                    std::vector<const float*>& v_ptrs) const;

  // Whole blocks, for the prefix cache: block `index` of a sequence across every layer, laid out
  // [n_layers, 2 (K, V), kBlockSize, kv_dim] f32 (block_floats() floats). read_block needs the
  // block reserved; write_block fills a reserved block (set_length then marks it written).
  int64_t block_floats() const { return n_layers_ * 2 * kBlockSize * kv_dim_; }
  void read_block(SeqId seq, int64_t index, float* out) const;
  void write_block(SeqId seq, int64_t index, const float* in);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  int64_t kv_dim() const { return kv_dim_; }
  int64_t n_layers() const { return n_layers_; }

 private:
  struct Sequence {
    int64_t length = 0;
    std::vector<int32_t> blocks;
  };
  const Sequence& seq(SeqId id) const;
  Sequence& seq(SeqId id);
  float* block_ptr(int64_t layer, int32_t block, bool value) const;

  int64_t n_layers_, kv_dim_, num_blocks_;
  // [layer][block][k|v][kBlockSize][kv_dim]
  mutable std::vector<float> pool_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::unordered_map<SeqId, Sequence> seqs_;
  SeqId next_id_ = 1;
};

}  // namespace moemesh
