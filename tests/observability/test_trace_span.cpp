// W3C traceparent parsing and formatting (actors/trace_span.h), with the spec's examples.
#include <gtest/gtest.h>

#include "actors/trace_span.h"

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
