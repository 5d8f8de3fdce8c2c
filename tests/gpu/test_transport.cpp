// The dispatch payload transports: ZeroMQ frames (everywhere), the per-pair choice, and NCCL
// send/recv between two ranks (built where NCCL is; runs only with two CUDA devices).
#include <gtest/gtest.h>

#include <future>
#include <string>
#include <vector>

#include "actors/transport.h"
#include "core/error.h"
#ifdef MOEMESH_TEST_NCCL
#include "kernels/cuda/api.cuh"
#include "kernels/cuda/nccl_transport.h"
#endif

using namespace moemesh;
using namespace moemesh::actors;

TEST(Transport, ZmqCarriesPayloadsAsFramesAndChecksTheHeader) {
  ZmqTransport t;
  EXPECT_EQ(t.kind(), TransportKind::Zmq);
  std::vector<std::vector<float>> tensors = {{1, 2, 3}, {4}};
  auto frames = t.send(std::move(tensors));
  ASSERT_EQ(frames.size(), 2u);
  const std::vector<size_t> sizes = {3, 1};
  auto back = t.receive(sizes, std::move(frames));
  EXPECT_EQ(back, (std::vector<std::vector<float>>{{1, 2, 3}, {4}}));
  const std::vector<size_t> wrong = {3, 2};
  EXPECT_THROW(t.receive(wrong, {{1, 2, 3}, {4}}), Error);
  EXPECT_THROW(t.receive(sizes, {{1, 2, 3}}), Error);
}

TEST(Transport, NcclOnlyBetweenTwoGpuPeersWithNccl) {
  const TransportCaps cpu{}, gpu{true, true}, gpu_no_nccl{true, false};
  EXPECT_EQ(choose_transport(gpu, gpu), TransportKind::Nccl);
  EXPECT_EQ(choose_transport(gpu, cpu), TransportKind::Zmq);
  EXPECT_EQ(choose_transport(cpu, gpu), TransportKind::Zmq);
  EXPECT_EQ(choose_transport(gpu, gpu_no_nccl), TransportKind::Zmq);
  EXPECT_EQ(transport_name(TransportKind::Nccl), "nccl");
}

#ifdef MOEMESH_TEST_NCCL
// Two ranks in one process (one thread and one device each): rows one way, results back.
TEST(TransportNccl, TwoRanksExchangePayloads) {
  if (cuda::device_count() < 2)
    GTEST_SKIP() << "no CUDA device: the NCCL pair test needs two devices (" << cuda::device_count() << " here) "
                 << cuda::device_error();
  const std::string id = nccl_unique_id();
  auto peer = std::async(std::launch::async, [&] {
    auto t = make_nccl_transport(id, 1, 1);
    const std::vector<size_t> sizes = {4, 2};
    auto rows = t->receive(sizes, {});
    for (auto& r : rows)
      for (auto& x : r) x *= 2;
    EXPECT_TRUE(t->send(std::move(rows)).empty());
  });
  auto t = make_nccl_transport(id, 0, 0);
  EXPECT_EQ(t->kind(), TransportKind::Nccl);
  EXPECT_TRUE(t->send({{1, 2, 3, 4}, {5, 6}}).empty()) << "NCCL payloads never go as ZeroMQ frames";
  const std::vector<size_t> sizes = {4, 2};
  EXPECT_EQ(t->receive(sizes, {}), (std::vector<std::vector<float>>{{2, 4, 6, 8}, {10, 12}}));
  peer.get();
}
#endif
