// The adaptive dispatch deadline (core/adaptive_deadline.h): max until enough round trips are
// known, then a multiple of their p99 within [min, max]; it follows a change of latency.
#include <gtest/gtest.h>

#include <chrono>

#include "core/adaptive_deadline.h"
#include "core/error.h"

using namespace moemesh;
using std::chrono::microseconds;
using std::chrono::milliseconds;

TEST(AdaptiveDeadline, IsTheMaximumUntilEnoughRoundTripsAreKnown) {
  AdaptiveDeadline d({milliseconds(100), milliseconds(5000), 4.0, 64, 8});
  EXPECT_EQ(d.current(), milliseconds(5000));
  for (int i = 0; i < 7; ++i) d.observe(milliseconds(1));
  EXPECT_EQ(d.current(), milliseconds(5000));
  d.observe(milliseconds(1));
  EXPECT_EQ(d.current(), milliseconds(100)) << "4 x 1 ms is below the minimum";
}

TEST(AdaptiveDeadline, IsAMultipleOfTheP99WithinTheBounds) {
  AdaptiveDeadline d({milliseconds(10), milliseconds(1000), 4.0, 100, 10});
  for (int i = 0; i < 98; ++i) d.observe(milliseconds(5));
  d.observe(milliseconds(40));  // the p99 of 100 samples is the second largest
  d.observe(milliseconds(900));
  EXPECT_EQ(d.p99(), milliseconds(40));
  EXPECT_EQ(d.current(), milliseconds(160));
  for (int i = 0; i < 100; ++i) d.observe(milliseconds(400));
  EXPECT_EQ(d.current(), milliseconds(1000)) << "4 x 400 ms is above the maximum";
}

TEST(AdaptiveDeadline, FollowsTheRecentWindowOnly) {
  AdaptiveDeadline d({milliseconds(1), milliseconds(10000), 2.0, 32, 4});
  for (int i = 0; i < 32; ++i) d.observe(milliseconds(300));
  EXPECT_EQ(d.current(), milliseconds(600));
  for (int i = 0; i < 32; ++i) d.observe(microseconds(2500));
  EXPECT_EQ(d.current(), milliseconds(5)) << "the slow round trips left the window";
}

TEST(AdaptiveDeadline, RejectsBoundsThatMakeNoSense) {
  EXPECT_THROW(AdaptiveDeadline({milliseconds(200), milliseconds(100)}), Error);
  EXPECT_THROW(AdaptiveDeadline({milliseconds(0), milliseconds(100)}), Error);
  EXPECT_THROW(AdaptiveDeadline({milliseconds(1), milliseconds(100), 0.5}), Error);
  EXPECT_THROW(AdaptiveDeadline({milliseconds(1), milliseconds(100), 2.0, 0}), Error);
}
