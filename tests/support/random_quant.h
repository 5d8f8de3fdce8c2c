// Random INT4/INT8 weights (kernels/cpu/quant_matrix.h) for the kernel tests, CPU and GPU.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/quant_matrix.h"

namespace moemesh::testing {

// A random INT4/INT8 matrix whose groups have the given sizes (some not multiples of 16, so
// padded) and whose input channels are shuffled among the groups (as GPTQ's desc_act does).
inline cpu::QuantMatrix random_quant(int bits, int64_t out, const std::vector<int64_t>& group_sizes, uint64_t seed) {
  int64_t in = 0;
  for (int64_t n : group_sizes) in += n;
  cpu::QuantMatrix m;
  m.shape(bits, out, in, group_sizes);
  std::mt19937_64 rng(seed);
  std::vector<int32_t> channels(static_cast<size_t>(in));
  std::iota(channels.begin(), channels.end(), 0);
  std::shuffle(channels.begin(), channels.end(), rng);
  size_t next = 0;
  for (int64_t g = 0; g < m.groups(); ++g)
    for (int64_t k = 0; k < group_sizes[size_t(g)]; ++k)
      m.source[size_t(m.group_start[size_t(g)] + k)] = channels[next++];
  const int levels = 1 << bits;
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t k = 0; k < m.padded_in; ++k) m.set_quant(o, k, int(rng() % uint64_t(levels)));
    for (int64_t g = 0; g < m.groups(); ++g) {
      const float scale = f16_to_f32(f32_to_f16(0.002f + 0.01f * float(rng() % 1000) / 1000.0f));
      m.scale[size_t(o * m.groups() + g)] = scale;
      m.scaled_zero[size_t(o * m.groups() + g)] = scale * float(rng() % uint64_t(levels));
    }
  }
  return m;
}

}  // namespace moemesh::testing
