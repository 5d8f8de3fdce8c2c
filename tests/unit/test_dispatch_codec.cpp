// DispatchRequest / DispatchResponse / Error codec: round trips, and every bad input becomes
// a DecodeError with a bounded code and the request id whenever the header was readable.
#include <gtest/gtest.h>

#include <random>

#include "core/dispatch_codec.h"
#include "proto/dataplane.pb.h"

using namespace moemesh;
using namespace moemesh::dispatch;

namespace {

// A message's frames as the receiver sees them (owning copies + views).
struct Received {
  explicit Received(Message m) {
    bytes.push_back(std::move(m.header));
    for (auto& t : m.tensors) {
      const auto* p = reinterpret_cast<const uint8_t*>(t.data());
      bytes.emplace_back(p, p + t.size() * sizeof(float));
    }
  }
  Received() = default;
  std::vector<wire::Frame> frames() const {
    std::vector<wire::Frame> f;
    for (const auto& b : bytes) f.emplace_back(b.data(), b.size());
    return f;
  }
  std::vector<std::vector<uint8_t>> bytes;
};

std::vector<float> iota_floats(size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = float(i) * 0.5f - 3.0f;
  return v;
}

// Hand-built header (to forge what encode_* would never produce).
Received forged(wire::Kind kind, uint64_t id, const std::string& meta, std::vector<wire::TensorDesc> tensors,
                std::vector<size_t> frame_bytes) {
  wire::Header h;
  h.kind = kind;
  h.request_id = id;
  h.meta = meta;
  h.tensors = std::move(tensors);
  Received r;
  r.bytes.push_back(wire::encode_header(h));
  for (size_t n : frame_bytes) r.bytes.emplace_back(n, 0);
  return r;
}

std::string request_meta(int32_t layer, std::vector<Group> groups) {
  pb::DispatchRequest m;
  m.set_layer(layer);
  for (auto g : groups) {
    auto* e = m.add_groups();
    e->set_expert(g.expert);
    e->set_rows(g.rows);
  }
  return m.SerializeAsString();
}

// Expects decode_request to fail with `code` and `id`.
void expect_bad_request(const Received& r, const std::string& code, uint64_t id) {
  try {
    decode_request(r.frames());
    ADD_FAILURE() << "decoded a bad request (expected " << code << ")";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_EQ(e.request_id(), id) << e.what();
  }
}

}  // namespace

TEST(DispatchCodec, RequestRoundTrip) {
  const std::vector<Group> groups{{5, 2}, {1, 3}};
  const auto rows = iota_floats(5 * 4);
  Received r(encode_request(77, 3, groups, 4, rows, 9));
  ASSERT_EQ(r.bytes.size(), 2u);
  Request q = decode_request(r.frames());
  EXPECT_EQ(q.request_id, 77u);
  EXPECT_EQ(q.layer, 3);
  EXPECT_EQ(q.placement_version, 9u);
  ASSERT_EQ(q.groups.size(), 2u);
  EXPECT_EQ(q.groups[0].expert, 5);
  EXPECT_EQ(q.groups[0].rows, 2);
  EXPECT_EQ(q.groups[1].expert, 1);
  EXPECT_EQ(q.total_rows, 5);
  EXPECT_EQ(q.hidden, 4);
  std::vector<float> back(rows.size());
  copy_floats(q.rows, 0, back.size(), back.data());
  EXPECT_EQ(back, rows);
  std::vector<float> tail(4);
  copy_floats(q.rows, 16, 4, tail.data());  // the last row
  EXPECT_EQ(tail, std::vector<float>(rows.end() - 4, rows.end()));
  EXPECT_THROW(copy_floats(q.rows, 17, 4, tail.data()), Error);
}

// Rows of LoRA adapters: each group's per-row index into the request's adapters travels intact;
// an index past them, or a count other than the group's rows, is refused.
TEST(DispatchCodec, AdapterRowsRoundTripAndBadIndexesAreRefused) {
  const std::vector<LoraRef> adapters{{"a", "/x/a", "k1"}, {"b", "/x/b", "k2"}};
  const std::vector<Group> groups{{5, 2, {0, 2}}, {1, 3, {1, 1, 0}}};
  Received r(encode_request(7, 1, groups, 4, iota_floats(5 * 4), 0, {}, adapters));
  const Request q = decode_request(r.frames());
  EXPECT_EQ(q.adapters, adapters);
  ASSERT_EQ(q.groups.size(), 2u);
  EXPECT_EQ(q.groups[0].adapter, (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(q.groups[1].adapter, (std::vector<int32_t>{1, 1, 0}));
  EXPECT_THROW(encode_request(7, 1, std::vector<Group>{{5, 2, {1}}}, 4, iota_floats(8), 0, {}, adapters), Error);
  Received bad(encode_request(7, 1, std::vector<Group>{{5, 2, {0, 3}}}, 4, iota_floats(8), 0, {}, adapters));
  try {
    decode_request(bad.frames());
    FAIL() << "an adapter index past the request's adapters was accepted";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.code(), "bad_meta");
    EXPECT_NE(std::string(e.what()).find("adapter index 3"), std::string::npos) << e.what();
  }
}

TEST(DispatchCodec, ResponseAndErrorRoundTrip) {
  const auto out = iota_floats(6 * 8);
  Received r(encode_response(12, 1, 8, out));
  Reply p = decode_reply(r.frames());
  EXPECT_TRUE(p.ok);
  EXPECT_EQ(p.request_id, 12u);
  EXPECT_EQ(p.layer, 1);
  EXPECT_EQ(p.rows, 6);
  EXPECT_EQ(p.hidden, 8);
  std::vector<float> back(out.size());
  copy_floats(p.outputs, 0, back.size(), back.data());
  EXPECT_EQ(back, out);

  Received e(encode_error(12, kUnknownExpert, "expert 3 of layer 0 is not held by this host"));
  ASSERT_EQ(e.bytes.size(), 1u);
  Reply q = decode_reply(e.frames());
  EXPECT_FALSE(q.ok);
  EXPECT_EQ(q.request_id, 12u);
  EXPECT_EQ(q.error_code, "unknown_expert");
  EXPECT_EQ(q.error_message, "expert 3 of layer 0 is not held by this host");
}

TEST(DispatchCodec, EncoderRejectsInconsistentSizes) {
  const std::vector<Group> groups{{0, 2}};
  EXPECT_THROW(encode_request(1, 0, groups, 4, iota_floats(7), 0), Error);
  EXPECT_THROW(encode_response(1, 0, 4, iota_floats(7)), Error);
  EXPECT_THROW(encode_response(1, 0, 0, iota_floats(8)), Error);
}

TEST(DispatchCodec, BadRequestsNameTheirReason) {
  using wire::Kind;
  const std::string meta = request_meta(0, {{1, 2}});
  const wire::TensorDesc rows2x4{DType::F32, {2, 4}};
  // Sanity: the forged good one decodes.
  EXPECT_NO_THROW(decode_request(forged(Kind::DispatchRequest, 5, meta, {rows2x4}, {32}).frames()));

  expect_bad_request(Received{}, "bad_frame_count", 0);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {rows2x4}, {}), "bad_frame_count", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {rows2x4}, {32, 4}), "bad_frame_count", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {rows2x4}, {31}), "truncated", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {rows2x4}, {36}), "bad_tensor", 5);
  expect_bad_request(forged(Kind::StepRequest, 5, meta, {rows2x4}, {32}), "bad_request", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, "\xff\xff\xff", {rows2x4}, {32}), "bad_meta", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, request_meta(0, {}), {rows2x4}, {32}), "bad_meta", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, request_meta(0, {{1, 0}}), {rows2x4}, {32}), "bad_meta", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, request_meta(0, {{-1, 2}}), {rows2x4}, {32}), "bad_meta", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, request_meta(0, {{1, 1}, {1, 1}}), {rows2x4}, {32}), "bad_meta",
                     5);
  // The groups say 3 rows, the tensor holds 2.
  expect_bad_request(forged(Kind::DispatchRequest, 5, request_meta(0, {{1, 3}}), {rows2x4}, {32}), "bad_tensor", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {{DType::F16, {2, 4}}}, {16}), "bad_tensor", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {{DType::F32, {8}}}, {32}), "bad_tensor", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {{DType::F32, {2, 0}}}, {0}), "bad_tensor", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {}, {}), "bad_frame_count", 5);
  expect_bad_request(forged(Kind::DispatchRequest, 5, meta, {rows2x4, rows2x4}, {32, 32}), "bad_frame_count", 5);

  // Wrong version / magic / truncated header: unreadable, so request id 0.
  Received good(encode_request(9, 0, std::vector<Group>{{1, 2}}, 4, iota_floats(8)));
  Received v = good;
  v.bytes[0][4] = 2;  // version u16 after the u32 magic
  expect_bad_request(v, "bad_version", 0);
  Received m = good;
  m.bytes[0][0] ^= 0xff;
  expect_bad_request(m, "bad_magic", 0);
  Received t = good;
  t.bytes[0].resize(10);
  expect_bad_request(t, "truncated", 0);
}

TEST(DispatchCodec, BadRepliesAreDecodeErrors) {
  using wire::Kind;
  EXPECT_THROW(decode_reply(forged(Kind::Error, 3, "\xff\xff", {}, {}).frames()), DecodeError);
  EXPECT_THROW(decode_reply(forged(Kind::KvGet, 3, "", {}, {}).frames()), DecodeError);
  EXPECT_THROW(decode_reply(forged(Kind::DispatchResponse, 3, "", {}, {}).frames()), DecodeError);
  EXPECT_THROW(decode_reply(forged(Kind::DispatchResponse, 3, "", {{DType::F32, {2, 4}}}, {8}).frames()), DecodeError);
  // A response that carries an error string is a failed reply.
  pb::DispatchResponse meta;
  meta.set_error("boom");
  Reply r = decode_reply(forged(Kind::DispatchResponse, 3, meta.SerializeAsString(), {{DType::F32, {1, 2}}}, {8}).frames());
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.error_message, "boom");
}

TEST(DispatchCodec, RandomBytesNeverEscapeAsAnythingButDecodeError) {
  std::mt19937_64 rng(7);
  Received good(encode_request(9, 0, std::vector<Group>{{1, 2}, {3, 1}}, 4, iota_floats(12)));
  for (int i = 0; i < 3000; ++i) {
    Received r = good;
    if (i % 3 == 0) {  // pure noise
      r.bytes.resize(1 + rng() % 3);
      for (auto& b : r.bytes) {
        b.resize(rng() % 200);
        for (auto& x : b) x = uint8_t(rng());
      }
    } else {  // flip a few bytes of a good message, sometimes cut it
      auto& b = r.bytes[rng() % r.bytes.size()];
      for (int k = 0; k < 1 + int(rng() % 4) && !b.empty(); ++k) b[rng() % b.size()] = uint8_t(rng());
      if (rng() % 4 == 0 && !b.empty()) b.resize(rng() % b.size());
    }
    try {
      Request q = decode_request(r.frames());
      // Whatever decoded is self-consistent.
      EXPECT_EQ(size_t(q.total_rows * q.hidden) * sizeof(float), q.rows.size());
    } catch (const DecodeError& e) {
      EXPECT_FALSE(e.code().empty());
    }
    try {
      decode_reply(r.frames());
    } catch (const DecodeError&) {
    }
  }
}

// Payloads outside ZeroMQ (a pair transport): the header comes alone and is checked in full;
// a tensor frame beside it is an error, and so is a header whose shape disagrees with its groups.
TEST(DispatchCodec, HeaderAloneWhenThePayloadTravelsElsewhere) {
  const std::vector<Group> groups{{5, 2}, {1, 3}};
  Received r(encode_request(77, 3, groups, 4, iota_floats(5 * 4), 9));
  const auto header_only = std::vector<wire::Frame>{r.frames()[0]};
  Request q = decode_request(header_only, Payload::Elsewhere);
  EXPECT_EQ(q.request_id, 77u);
  EXPECT_EQ(q.total_rows, 5);
  EXPECT_EQ(q.hidden, 4);
  EXPECT_TRUE(q.rows.empty());
  try {
    decode_request(r.frames(), Payload::Elsewhere);
    ADD_FAILURE() << "a tensor frame beside a header whose payload travels elsewhere";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.code(), "bad_frame_count");
    EXPECT_EQ(e.request_id(), 77u);
  }
  EXPECT_THROW(decode_request(header_only), DecodeError) << "in frames (the default), the tensor is missing";
  using wire::Kind;
  const Received bad_shape = forged(Kind::DispatchRequest, 6, request_meta(0, {{1, 3}}), {{DType::F32, {2, 4}}}, {});
  try {
    decode_request(bad_shape.frames(), Payload::Elsewhere);
    ADD_FAILURE() << "a shape that disagrees with the groups";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.code(), "bad_tensor");
  }

  Received resp(encode_response(12, 1, 8, iota_floats(6 * 8)));
  Reply p = decode_reply(std::vector<wire::Frame>{resp.frames()[0]}, Payload::Elsewhere);
  EXPECT_TRUE(p.ok);
  EXPECT_EQ(p.rows, 6);
  EXPECT_TRUE(p.outputs.empty());
  EXPECT_THROW(decode_reply(resp.frames(), Payload::Elsewhere), DecodeError);
  Received err(encode_error(12, kInternal, "boom"));
  EXPECT_EQ(decode_reply(err.frames(), Payload::Elsewhere).error_code, "internal");
}
