// A weight-only quantized Linear weight [out, in] as the CPU kernels read it: INT4 or INT8 values
// with a scale and a zero point per (output row, group of input channels), dequantized inside the
// kernels' inner loop (kernels/cpu/gemm.h). core/gptq.h builds one from a GPTQ checkpoint.
//
// The kernel's order of a row: the input channels group by group (a GPTQ desc_act checkpoint's
// g_idx scatters a group's channels; here they are gathered), every group padded with zeros to a
// multiple of 32 values, so a 32-value block never straddles two groups. `source` maps each
// position of that order to its input channel (-1 for padding); the kernels gather x the same
// way once per call. INT4 blocks of 32 values are 16 bytes: byte j holds value j in its low
// nibble and value j + 16 in its high nibble (one widening load gives 16 lanes of indices).
#pragma once
#include <cstdint>
#include <vector>

namespace moemesh::cpu {

struct QuantMatrix {
  static constexpr int64_t kBlock = 32;  // values per block; groups are padded to whole blocks
  int bits = 4;                          // 4 or 8
  int64_t out = 0, in = 0;
  int64_t padded_in = 0;                  // the length of a row in the kernel's order
  std::vector<int64_t> group_start;       // groups() + 1 offsets into a row, multiples of kBlock
  std::vector<int32_t> source;            // padded_in entries: the input channel, or -1
  std::vector<uint8_t> q;                 // out rows of row_bytes()
  std::vector<float> scale, scaled_zero;  // [out, groups()]: value = q · scale - scaled_zero

  int64_t groups() const { return int64_t(group_start.size()) - 1; }
  int64_t row_bytes() const { return padded_in * bits / 8; }
  // The quantized integer at (row o, position k of the kernel's order).
  int quant(int64_t o, int64_t k) const {
    const uint8_t* row = q.data() + o * row_bytes();
    if (bits == 8) return row[k];
    const uint8_t b = row[(k / kBlock) * (kBlock / 2) + (k % kBlock) % (kBlock / 2)];
    return (k % kBlock) < kBlock / 2 ? (b & 0x0F) : (b >> 4);  // value j + 16: the high nibble
  }
  void set_quant(int64_t o, int64_t k, int v) {
    uint8_t* row = q.data() + o * row_bytes();
    if (bits == 8) {
      row[k] = uint8_t(v);
      return;
    }
    uint8_t& b = row[(k / kBlock) * (kBlock / 2) + (k % kBlock) % (kBlock / 2)];
    b = (k % kBlock) < kBlock / 2 ? uint8_t((b & 0xF0) | (v & 0x0F)) : uint8_t((b & 0x0F) | ((v & 0x0F) << 4));
  }
  // Allocates an all-zero matrix whose groups hold the given numbers of input channels, in order.
  void shape(int bits_, int64_t out_, int64_t in_, const std::vector<int64_t>& group_sizes);
  // The dequantized weight [out, in] in f32 (tests, and backends without INT kernels).
  std::vector<float> dequantize() const;
};

}  // namespace moemesh::cpu
