// Paged KV cache: a preallocated pool of fixed-size blocks (16 tokens each) shared by all
// sequences. A sequence owns a block table; one block id covers every layer (as in vLLM), so
// growing a sequence by a token takes at most one block from the pool.
//
// Storage is f32, or INT8 with one f32 scale per (token, kv head): symmetric, scale = amax/127
// (docs/gpu.md says why per token-head). The prefix cache always moves whole blocks as f32
// (read_block dequantises, write_block quantises), so the KV store's wire format does not
// depend on a worker's storage.
//
// Sliding window (KvCacheFormat::sliding_window > 0): a query at position p sees keys
// (p - window, p], so once a sequence holds L tokens, its next query (at L) can no longer see a
// block whose positions all lie below L - window + 1. set_length releases such blocks to the
// pool at once: a sequence holds the blocks its window still sees plus the one being written,
// O(window) memory however long the context grows. A released block's entry in the block table
// stays (as -1), so block index = position / kBlockSize throughout.
//
// A backend may keep the storage elsewhere (the CUDA backend's device pool): it derives from
// KvCache with host_storage = false, keeps this class's bookkeeping (block tables, lengths) and
// overrides read_block/write_block.
#pragma once
#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kernels/cpu/attention.h"

namespace moemesh {

using SeqId = int64_t;

enum class KvDType { F32, Int8 };
// "f32" | "int8"; anything else is a moemesh::Error naming the accepted values.
KvDType parse_kv_dtype(std::string_view s);
std::string_view kv_dtype_name(KvDType t);

struct KvCacheFormat {
  KvDType dtype = KvDType::F32;
  int64_t kv_heads = 1;        // INT8 scales are per kv head: kv_dim must be a multiple of it
  int64_t sliding_window = 0;  // > 0: blocks no later query can see are released (see above)
};

// Blocks a sequence holds during a step that takes it from tokens - new_tokens to `tokens`
// positions (its next step's need, as the router's scheduler counts it): every block up to
// `tokens` without a window; under one, only those from the first position the step's earliest
// query sees (the blocks before it were released at the end of the previous step).
int64_t kv_blocks_held(int64_t tokens, int64_t new_tokens, int64_t sliding_window);

// Pointer tables for one (layer, sequence) attention view; reused across calls.
struct KvViewScratch {
  std::vector<const float*> k, v, k_scale, v_scale;
  std::vector<const int8_t*> k_q, v_q;
};

class KvCache {
 public:
  static constexpr int64_t kBlockSize = 16;

  // kv_dim = num_key_value_heads * head_dim. Throws moemesh::Error on bad sizes.
  KvCache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks, KvCacheFormat format = {});
  virtual ~KvCache() = default;
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  SeqId create_sequence();
  void free_sequence(SeqId seq);  // returns its blocks to the pool; unknown id -> Error
  bool has_sequence(SeqId seq) const { return seqs_.count(seq) > 0; }

  // Tokens whose K/V are stored.
  int64_t length(SeqId seq) const;
  // Blocks needed to grow seq to new_len tokens (0 if it already has room).
  int64_t blocks_needed(SeqId seq, int64_t new_len) const;
  // Ensures room for new_len tokens; throws moemesh::Error when the pool runs out (taking nothing).
  void reserve(SeqId seq, int64_t new_len);
  // Marks positions [length, new_len) as written (after every layer stored them). Under a
  // sliding window, then releases the blocks no later query can see.
  void set_length(SeqId seq, int64_t new_len);
  // The sequence's block ids in order, -1 for a block released under the sliding window (valid
  // until the next reserve/free/set_length).
  const std::vector<int32_t>& block_table(SeqId seq) const;
  // Blocks the sequence holds now (reserved, not released), and the index of its first held one.
  int64_t held_blocks(SeqId seq) const;
  int64_t first_held_block(SeqId seq) const;

  // Stores one token's K and V (kv_dim floats each) at (layer, seq, pos): copied, or quantised.
  // The position must be reserved. Host storage only.
  void write_row(int64_t layer, SeqId seq, int64_t pos, const float* k, const float* v);
  // Row of K (or V) for (layer, seq, position): kv_dim floats. F32 host storage only.
  float* k_row(int64_t layer, SeqId seq, int64_t pos);
  float* v_row(int64_t layer, SeqId seq, int64_t pos);
  // Block pointers of one sequence in one layer, for the attention kernel (f32 or INT8 fields
  // set by the dtype). Valid until the next reserve/free. Host storage only.
  cpu::PagedKV view(int64_t layer, SeqId seq, KvViewScratch& scratch) const;

  // Whole blocks, for the prefix cache: block `index` of a sequence across every layer, laid out
  // [n_layers, 2 (K, V), kBlockSize, kv_dim] f32 (block_floats() floats). read_block needs the
  // block reserved; write_block fills a reserved block (set_length then marks it written).
  int64_t block_floats() const { return n_layers_ * 2 * kBlockSize * kv_dim_; }
  virtual void read_block(SeqId seq, int64_t index, float* out) const;
  virtual void write_block(SeqId seq, int64_t index, const float* in);

  // Bytes one block takes in storage, every layer, K and V, scales included.
  int64_t bytes_per_block() const;

  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  int64_t kv_dim() const { return kv_dim_; }
  int64_t n_layers() const { return n_layers_; }
  const KvCacheFormat& format() const { return format_; }
  KvDType dtype() const { return format_.dtype; }

 protected:
  // host_storage = false: bookkeeping only (a backend holds the K/V elsewhere).
  KvCache(int64_t n_layers, int64_t kv_dim, int64_t num_blocks, KvCacheFormat format, bool host_storage);
  // Index of (layer, block, K|V) among the pool's [layer][block][k|v] slabs of kBlockSize rows.
  size_t slab(int64_t layer, int32_t block, bool value) const {
    return (size_t(layer) * size_t(num_blocks_) + size_t(block)) * 2 + (value ? 1 : 0);
  }
  int32_t block_of(SeqId seq, int64_t index) const;  // checked: the block must be reserved and held

 private:
  struct Sequence {
    int64_t length = 0;
    std::vector<int32_t> blocks;  // by index; -1 once released
    int64_t released = 0;         // leading blocks released under the sliding window
  };
  const Sequence& seq(SeqId id) const;
  Sequence& seq(SeqId id);
  void require_host(const char* what) const;
  float* block_ptr(int64_t layer, int32_t block, bool value) const;
  // INT8: quantises / dequantises kBlockSize rows of one slab.
  void quantise_rows(size_t slab_index, int64_t first_row, int64_t n_rows, const float* in);
  void dequantise_rows(size_t slab_index, float* out) const;

  int64_t n_layers_, kv_dim_, num_blocks_;
  KvCacheFormat format_;
  bool host_storage_;
  // [layer][block][k|v][kBlockSize][kv_dim] (f32), or the same in int8 plus
  // [layer][block][k|v][kBlockSize][kv_heads] f32 scales.
  mutable std::vector<float> pool_;
  mutable std::vector<int8_t> qpool_;
  mutable std::vector<float> scales_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::unordered_map<SeqId, Sequence> seqs_;
  SeqId next_id_ = 1;
};

}  // namespace moemesh
