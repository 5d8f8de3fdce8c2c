// W3C traceparent parsing and formatting (actors/trace_span.h), with the spec's examples.
#include <gtest/gtest.h>

#include "actors/trace_span.h"
#include "core/dispatch_codec.h"
#include "core/error.h"
#include "proto/dataplane.pb.h"

using namespace moemesh;
using namespace moemesh::actors;

TEST(TraceParent, ParsesTheSpecExampleAndStartsAChildSpan) {
  auto c = trace::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  ASSERT_TRUE(c);
  EXPECT_EQ(trace::hex(c->trace_id.data(), 16), "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_EQ(c->parent_span_id, 0x00f067aa0ba902b7ull);
  EXPECT_NE(c->span_id, 0u);
  EXPECT_NE(c->span_id, c->parent_span_id);
  const std::string out = trace::traceparent(*c);
  // Same trace, our span as the next hop's parent, flags kept.
  EXPECT_EQ(out.substr(0, 36), "00-4bf92f3577b34da6a3ce929d0e0e4736-");
  EXPECT_EQ(out.substr(52), "-01");
  auto next = trace::parse_traceparent(out);
  ASSERT_TRUE(next);
  EXPECT_EQ(next->parent_span_id, c->span_id);
}

TEST(TraceParent, RejectsMalformedAndInvalidValues) {
  for (const char* bad : {
           "",                                                           // absent
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",       // no flags
           "00-00000000000000000000000000000000-00f067aa0ba902b7-01",    // zero trace id
           "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",    // zero parent id
           "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",    // uppercase hex
           "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    // forbidden version
           "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  // version 00 has no extra fields
           "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    // separators
       })
    EXPECT_FALSE(trace::parse_traceparent(bad)) << bad;
  // A later version may append fields.
  EXPECT_TRUE(trace::parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever"));
}

TEST(TraceParent, AMissingOrBadHeaderStartsANewRootTrace) {
  auto a = trace::from_header("garbage"), b = trace::from_header("");
  EXPECT_EQ(a.parent_span_id, 0u);
  EXPECT_NE(trace::hex(a.trace_id.data(), 16), std::string(32, '0'));
  EXPECT_NE(trace::hex(a.trace_id.data(), 16), trace::hex(b.trace_id.data(), 16));
  EXPECT_TRUE(trace::parse_traceparent(trace::traceparent(a)));
}

TEST(TraceParent, AHeadersSampledFlagIsKeptAndNewRootsAreSampledAtTheRatio) {
  EXPECT_TRUE(trace::from_header("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", 0.0).sampled());
  const auto unsampled = trace::from_header("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", 1.0);
  EXPECT_FALSE(unsampled.sampled());
  EXPECT_EQ(trace::traceparent(unsampled).substr(52), "-00");  // the next hop is told too
  int sampled_all = 0, sampled_none = 0, sampled_quarter = 0;
  const int n = 4000;
  for (int i = 0; i < n; ++i) {
    sampled_all += trace::from_header("", 1.0).sampled();
    sampled_none += trace::from_header("", 0.0).sampled();
    sampled_quarter += trace::from_header("garbage", 0.25).sampled();
  }
  EXPECT_EQ(sampled_all, n);
  EXPECT_EQ(sampled_none, 0);
  EXPECT_NEAR(sampled_quarter, n / 4, 150);  // 5.5 standard deviations
}

TEST(TraceSpan, AnUnsampledSpanLogsNothing) {
  trace::Context c = trace::new_trace(1.0);
  const auto now = std::chrono::system_clock::now();
  testing::internal::CaptureStderr();
  trace::log_span("router", "completion", c, now, std::chrono::milliseconds(1));
  EXPECT_NE(testing::internal::GetCapturedStderr().find("\"span\":\"completion\""), std::string::npos);
  c.flags = 0;
  testing::internal::CaptureStderr();
  trace::log_span("router", "completion", c, now, std::chrono::milliseconds(1));
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
}

TEST(TraceRef, TheNextHopsSpanIsAChildOfThisOne) {
  auto c = trace::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
  ASSERT_TRUE(c);
  const TraceRef ref = trace::ref_of(*c);
  EXPECT_TRUE(ref.valid());
  EXPECT_EQ(ref.span_id, c->span_id);
  const trace::Context child = trace::child_of(ref);
  EXPECT_EQ(child.trace_id, c->trace_id);
  EXPECT_EQ(child.parent_span_id, c->span_id);
  EXPECT_NE(child.span_id, c->span_id);
  EXPECT_EQ(trace::link(ref)["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
  EXPECT_FALSE(TraceRef{}.valid());
}

TEST(TraceRef, OnTheWireOnlyWellFormedRefsComeBack) {
  const TraceRef ref = trace::ref_of(trace::new_trace());
  pb::TraceRef msg;
  trace_to_proto(ref, &msg);
  auto back = trace_from_proto(msg);
  ASSERT_TRUE(back);
  EXPECT_EQ(*back, ref);
  EXPECT_FALSE(trace_from_proto(pb::TraceRef{}));  // unset
  pb::TraceRef short_id = msg;
  short_id.set_trace_id(msg.trace_id().substr(0, 8));
  EXPECT_FALSE(trace_from_proto(short_id));
  pb::TraceRef zero_span = msg;
  zero_span.set_span_id(0);
  EXPECT_FALSE(trace_from_proto(zero_span));
}

TEST(TraceRef, ADispatchRequestCarriesAtMostEightTracesAndDropsBadOnes) {
  std::vector<TraceRef> refs;
  for (int i = 0; i < 8; ++i) refs.push_back(trace::ref_of(trace::new_trace()));
  const dispatch::Group g{3, 1};
  auto msg = dispatch::encode_request(9, 1, std::span(&g, 1), 4, std::vector<float>(4, 1.0f), 1, refs);
  std::vector<wire::Frame> frames{wire::Frame(msg.header.data(), msg.header.size()),
                                  wire::Frame(reinterpret_cast<const uint8_t*>(msg.tensors[0].data()), 16)};
  EXPECT_EQ(dispatch::decode_request(frames).traces, refs);
  refs.push_back(refs[0]);
  EXPECT_THROW(dispatch::encode_request(9, 1, std::span(&g, 1), 4, std::vector<float>(4, 1.0f), 1, refs), Error);

  // A malformed trace in an otherwise good request is dropped; the request is still served.
  wire::Header h = wire::decode_header(frames[0]);
  pb::DispatchRequest meta;
  ASSERT_TRUE(meta.ParseFromString(h.meta));
  meta.mutable_traces(0)->set_trace_id("short");
  h.meta = meta.SerializeAsString();
  const auto header = wire::encode_header(h);
  frames[0] = wire::Frame(header.data(), header.size());
  const auto r = dispatch::decode_request(frames);
  EXPECT_EQ(r.traces.size(), 7u);
  EXPECT_EQ(r.total_rows, 1);
}

TEST(TraceSpan, APeerIsNamedByItsRoutingIdOrItsHex) {
  EXPECT_EQ(trace::peer_name("attention-0"), "attention-0");
  EXPECT_EQ(trace::peer_name(std::string("\0\x80\x01", 3)), "0x008001");
}
