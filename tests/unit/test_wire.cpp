// The data-plane codec: round trips, and every kind of bad frame is refused with the right code.
#include <gtest/gtest.h>

#include <random>

#include "core/wire.h"

using namespace moemesh;
using namespace moemesh::wire;

namespace {

Header sample() {
  Header h;
  h.kind = Kind::DispatchRequest;
  h.request_id = 0x0123456789abcdefULL;
  for (int i = 0; i < 16; ++i) h.trace_id[i] = uint8_t(i + 1);
  h.meta = "layer=3";
  h.tensors = {{DType::F32, {5, 64}}, {DType::I32, {5, 2}}, {DType::BF16, {}}};
  return h;
}

std::vector<std::vector<uint8_t>> frames_for(const Header& h) {
  std::vector<std::vector<uint8_t>> f{encode_header(h)};
  for (const auto& t : h.tensors) f.emplace_back(t.nbytes(), uint8_t(7));
  return f;
}

std::vector<Frame> views(const std::vector<std::vector<uint8_t>>& f) {
  return {f.begin(), f.end()};
}

ErrorCode code_of(const std::vector<std::vector<uint8_t>>& f) {
  try {
    decode(views(f));
  } catch (const WireError& e) {
    return e.code();
  }
  ADD_FAILURE() << "decode accepted a bad message";
  return ErrorCode::BadMeta;
}

}  // namespace

TEST(Wire, RoundTrip) {
  Header h = sample();
  auto f = frames_for(h);
  Header d = decode(views(f));
  EXPECT_EQ(d.kind, h.kind);
  EXPECT_EQ(d.request_id, h.request_id);
  EXPECT_EQ(0, memcmp(d.trace_id, h.trace_id, 16));
  EXPECT_EQ(d.meta, h.meta);
  ASSERT_EQ(d.tensors.size(), 3u);
  EXPECT_EQ(d.tensors[0].shape, (std::vector<int64_t>{5, 64}));
  EXPECT_EQ(d.tensors[1].dtype, DType::I32);
  EXPECT_EQ(d.tensors[2].nbytes(), 2u);  // a scalar
}

TEST(Wire, TruncatedHeaderAtEveryLength) {
  auto f = frames_for(sample());
  const std::vector<uint8_t> full = f[0];
  for (size_t n = 0; n < full.size(); ++n) {
    f[0].assign(full.begin(), full.begin() + n);
    EXPECT_EQ(code_of(f), ErrorCode::Truncated) << "length " << n;
  }
}

TEST(Wire, WrongMagicAndVersion) {
  auto f = frames_for(sample());
  f[0][0] ^= 0xff;
  EXPECT_EQ(code_of(f), ErrorCode::BadMagic);
  f = frames_for(sample());
  f[0][4] = 2;  // version 2
  EXPECT_EQ(code_of(f), ErrorCode::BadVersion);
  f = frames_for(sample());
  f[0][6] = 99;  // kind 99
  EXPECT_EQ(code_of(f), ErrorCode::BadKind);
}

TEST(Wire, TensorFramesMustMatchTheHeader) {
  auto f = frames_for(sample());
  f.pop_back();
  EXPECT_EQ(code_of(f), ErrorCode::BadFrameCount);
  f = frames_for(sample());
  f.emplace_back(4, 0);
  EXPECT_EQ(code_of(f), ErrorCode::BadFrameCount);
  f = frames_for(sample());
  f[1].resize(f[1].size() - 1);
  EXPECT_EQ(code_of(f), ErrorCode::Truncated);
  f = frames_for(sample());
  f[2].push_back(0);
  EXPECT_EQ(code_of(f), ErrorCode::BadTensor);
}

TEST(Wire, OversizedDeclarationsAreRefusedBeforeAllocation) {
  Header h = sample();
  h.tensors = {{DType::F32, {1 << 20, 1 << 20}}};  // 4 TiB
  std::vector<std::vector<uint8_t>> f{encode_header(h), {}};
  EXPECT_EQ(code_of(f), ErrorCode::Oversized);
  h.tensors = {{DType::F32, {-1, 4}}};
  f = {encode_header(h), {}};
  EXPECT_EQ(code_of(f), ErrorCode::BadTensor);
  // meta_len lies: claims more than is there
  f = frames_for(sample());
  f[0][37] = 0xff;  // meta_len sits at bytes 36..39
  EXPECT_EQ(code_of(f), ErrorCode::Truncated);
}

TEST(Wire, RandomBytesNeverCrash) {
  std::mt19937_64 rng(42);
  auto good = frames_for(sample());
  for (int i = 0; i < 20000; ++i) {
    auto f = good;
    // Flip a few random bytes of the header, or send pure noise.
    if (i % 4 == 0) {
      f[0].resize(rng() % 200);
      for (auto& b : f[0]) b = uint8_t(rng());
    } else {
      for (int k = 0; k < 3; ++k) f[0][rng() % f[0].size()] = uint8_t(rng());
    }
    try {
      Header h = decode(views(f));
      // Whatever got through is self-consistent.
      ASSERT_EQ(h.tensors.size() + 1, f.size());
    } catch (const WireError&) {
    }
  }
}
