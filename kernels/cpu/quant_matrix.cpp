#include "kernels/cpu/quant_matrix.h"

#include "core/error.h"

namespace moemesh::cpu {

void QuantMatrix::shape(int bits_, int64_t out_, int64_t in_, const std::vector<int64_t>& group_sizes) {
  if (bits_ != 4 && bits_ != 8) throw Error("quantized weights must have 4 or 8 bits, not " + std::to_string(bits_));
  bits = bits_, out = out_, in = in_;
  group_start.assign(1, 0);
  for (int64_t n : group_sizes) group_start.push_back(group_start.back() + (n + kBlock - 1) / kBlock * kBlock);
  padded_in = group_start.back();
  source.assign(size_t(padded_in), -1);
  q.assign(size_t(out * row_bytes()), 0);
  scale.assign(size_t(out * groups()), 0.0f);
  scaled_zero.assign(size_t(out * groups()), 0.0f);
}

std::vector<float> QuantMatrix::dequantize() const {
  std::vector<float> w(size_t(out * in), 0.0f);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t g = 0; g < groups(); ++g) {
      const float s = scale[size_t(o * groups() + g)], zs = scaled_zero[size_t(o * groups() + g)];
      for (int64_t k = group_start[size_t(g)]; k < group_start[size_t(g + 1)]; ++k)
        if (source[size_t(k)] >= 0) w[size_t(o * in + source[size_t(k)])] = float(quant(o, k)) * s - zs;
    }
  return w;
}

}  // namespace moemesh::cpu
