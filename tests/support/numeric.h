// Small helpers shared by tests that compare model outputs.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "core/dtype.h"

namespace moemesh::testing {

// n token ids in [3, vocab), deterministic from the seed (0..2 are left to BOS/EOS/UNK).
inline std::vector<int32_t> random_tokens(size_t n, uint64_t seed, int64_t vocab) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(3, int32_t(vocab - 1));
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

// n samples of N(0, scale^2), deterministic from the seed.
inline std::vector<float> normals(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Stores w as `t` and returns the bytes plus the values as they are after rounding.
inline std::vector<uint16_t> narrow(const std::vector<float>& w, DType t, std::vector<float>& rounded) {
  std::vector<uint16_t> out(w.size());
  rounded.resize(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    out[i] = t == DType::F16 ? f32_to_f16(w[i]) : f32_to_bf16(w[i]);
    rounded[i] = t == DType::F16 ? f16_to_f32(out[i]) : bf16_to_f32(out[i]);
  }
  return out;
}

// ||got - want|| / ||want||, as vectors.
inline double rel_diff(std::span<const float> got, std::span<const float> want) {
  EXPECT_EQ(got.size(), want.size());
  double err = 0, norm = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    err += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    norm += double(want[i]) * want[i];
  }
  return std::sqrt(err / std::max(norm, 1e-30));
}

// max |got - want| / max |want|, over all elements.
inline double max_rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num = std::max(num, std::abs(double(got[i]) - want[i]));
    den = std::max(den, std::abs(want[i]));
  }
  return num / den;
}

}  // namespace moemesh::testing
