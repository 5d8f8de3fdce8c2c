// The dispatch payload transports: ZeroMQ frames (everywhere), the per-pair choice, and NCCL
// send/recv between two ranks, in one process and in two (built where NCCL is; runs only with
// two CUDA devices).
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "actors/dispatch_frames.h"
#include "actors/transport.h"
#include "core/dispatch_codec.h"
#include "core/error.h"
#ifdef MOEMESH_TEST_NCCL
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "kernels/cuda/api.cuh"
#include "actors/nccl_transport.h"
#endif

using namespace moemesh;
using namespace moemesh::actors;

namespace {

// The received frames' bytes, as the bridge would hand them over.
std::vector<PayloadFrame> bytes_of(const std::vector<std::vector<float>>& frames) {
  std::vector<PayloadFrame> out;
  for (const auto& f : frames) out.emplace_back(reinterpret_cast<const uint8_t*>(f.data()), f.size() * sizeof(float));
  return out;
}

}  // namespace

TEST(Transport, ZmqCarriesPayloadsAsFramesAndChecksTheHeader) {
  ZmqTransport t;
  EXPECT_EQ(t.kind(), TransportKind::Zmq);
  EXPECT_TRUE(t.payload_in_frames());
  std::vector<std::vector<float>> tensors = {{1, 2, 3}, {4}};
  const float* first = tensors[0].data();
  auto frames = t.send(std::move(tensors));
  ASSERT_EQ(frames.size(), 2u);
  EXPECT_EQ(frames[0].data(), first) << "moved into the frames, not copied";
  const std::vector<size_t> sizes = {3, 1};
  auto back = t.receive(sizes, bytes_of(frames));
  EXPECT_EQ(back, (std::vector<std::vector<float>>{{1, 2, 3}, {4}}));
  const std::vector<size_t> wrong = {3, 2};
  EXPECT_THROW(t.receive(wrong, bytes_of(frames)), Error);
  EXPECT_THROW(t.receive(sizes, bytes_of({{1, 2, 3}})), Error);
  // A frame whose length is not whole floats.
  const uint8_t odd[5] = {};
  const std::vector<PayloadFrame> ragged = {PayloadFrame(odd, 5)};
  const std::vector<size_t> one = {1};
  EXPECT_THROW(t.receive(one, ragged), Error);
}

// What goes on the wire does not change with the Transport layer: the ZeroMQ transport's frames
// are, byte for byte, the plain encoding (header, then each tensor as one frame).
TEST(Transport, ZmqFramesAreByteIdenticalToThePlainEncoding) {
  const std::vector<dispatch::Group> groups{{2, 1}, {6, 2}};
  std::vector<float> rows(3 * 4);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = float(i) - 5.5f;
  ZmqTransport zmq;
  auto via = to_frames(dispatch::encode_request(9, 1, groups, 4, rows, 3), zmq, "peer-1");
  auto plain = to_frames(dispatch::encode_request(9, 1, groups, 4, rows, 3), "peer-1");
  ASSERT_EQ(via->size(), 3u);
  ASSERT_EQ(via->size(), plain->size());
  for (size_t i = 0; i < via->size(); ++i) EXPECT_EQ((*via)[i].to_string(), (*plain)[i].to_string()) << "frame " << i;
  // And back: the receiver's tensor is the rows sent.
  auto views = frame_views(*via, 1);
  const dispatch::Request r = dispatch::decode_request(views, payload_of(zmq));
  EXPECT_EQ(receive_tensor(zmq, rows.size(), r.rows), rows);
}

// A stand-in for a pair transport (what NCCL is to PeerTransports).
class FakePairTransport final : public Transport {
 public:
  TransportKind kind() const override { return TransportKind::Nccl; }
  std::vector<std::vector<float>> send(std::vector<std::vector<float>>&&) override { return {}; }
  std::vector<std::vector<float>> receive(std::span<const size_t>, std::span<const PayloadFrame>) override {
    return {};
  }
};

TEST(Transport, PeersUseZeroMqUntilAPairTransportIsSet) {
  PeerTransports peers;
  EXPECT_EQ(peers.of("worker-a")->kind(), TransportKind::Zmq);
  auto pair = std::make_shared<FakePairTransport>();
  peers.set("worker-a", pair);
  EXPECT_EQ(peers.of("worker-a"), pair);
  EXPECT_FALSE(peers.of("worker-a")->payload_in_frames());
  EXPECT_EQ(peers.of("worker-b")->kind(), TransportKind::Zmq) << "other peers keep ZeroMQ";
  peers.set("worker-a", nullptr);
  EXPECT_EQ(peers.of("worker-a")->kind(), TransportKind::Zmq);
}

TEST(Transport, NcclOnlyBetweenTwoGpuPeersWithNccl) {
  const TransportCaps cpu{}, gpu{true, true}, gpu_no_nccl{true, false};
  EXPECT_EQ(choose_transport(gpu, gpu), TransportKind::Nccl);
  EXPECT_EQ(choose_transport(gpu, cpu), TransportKind::Zmq);
  EXPECT_EQ(choose_transport(cpu, gpu), TransportKind::Zmq);
  EXPECT_EQ(choose_transport(gpu, gpu_no_nccl), TransportKind::Zmq);
  // Two processes on one GPU (NCCL cannot put both ranks there) keep ZeroMQ; unknown ids pair.
  const TransportCaps on_a{true, true, "GPU-a"}, also_on_a{true, true, "GPU-a"}, on_b{true, true, "GPU-b"};
  EXPECT_EQ(choose_transport(on_a, also_on_a), TransportKind::Zmq);
  EXPECT_EQ(choose_transport(on_a, on_b), TransportKind::Nccl);
  EXPECT_EQ(choose_transport(on_a, gpu), TransportKind::Nccl);
  EXPECT_EQ(transport_name(TransportKind::Nccl), "nccl");
}

#ifdef MOEMESH_TEST_NCCL
using namespace std::chrono_literals;

// Two ranks in one process (one thread and one device each): rows one way, results back.
TEST(TransportNccl, TwoRanksExchangePayloads) {
  if (cuda::device_count() < 2)
    GTEST_SKIP() << "no CUDA device: the NCCL pair test needs two devices (" << cuda::device_count() << " here) "
                 << cuda::device_error();
  const std::string id = nccl_unique_id();
  auto peer = std::async(std::launch::async, [&] {
    auto t = make_nccl_transport(id, 1, 1, 30s);
    const std::vector<size_t> sizes = {4, 2};
    auto rows = t->receive(sizes, std::span<const PayloadFrame>{});
    for (auto& r : rows)
      for (auto& x : r) x *= 2;
    EXPECT_TRUE(t->send(std::move(rows)).empty());
  });
  auto t = make_nccl_transport(id, 0, 0, 30s);
  EXPECT_EQ(t->kind(), TransportKind::Nccl);
  EXPECT_TRUE(t->send({{1, 2, 3, 4}, {5, 6}}).empty()) << "NCCL payloads never go as ZeroMQ frames";
  const std::vector<size_t> sizes = {4, 2};
  EXPECT_EQ(t->receive(sizes, std::span<const PayloadFrame>{}),
            (std::vector<std::vector<float>>{{2, 4, 6, 8}, {10, 12}}));
  peer.get();
}

// Sends never wait for the receiver: both ranks queue several 16 MB payloads (far above NCCL's
// eager size) before either receives, then each takes them in order.
TEST(TransportNccl, LargeSendsQueueBeforeTheReceiverPosts) {
  if (cuda::device_count() < 2)
    GTEST_SKIP() << "no CUDA device: the NCCL pair test needs two devices (" << cuda::device_count() << " here) "
                 << cuda::device_error();
  const std::string id = nccl_unique_id();
  constexpr size_t kFloats = size_t(4) << 20;
  auto exchange = [&](int rank) {
    auto t = make_nccl_transport(id, rank, rank, 30s);
    for (int m = 0; m < 3; ++m) t->send({std::vector<float>(kFloats, float(rank * 10 + m))});
    const std::vector<size_t> sizes = {kFloats};
    for (int m = 0; m < 3; ++m) {
      auto got = t->receive(sizes, std::span<const PayloadFrame>{});
      EXPECT_EQ(got.at(0).front(), float((1 - rank) * 10 + m));
      EXPECT_EQ(got.at(0).back(), float((1 - rank) * 10 + m));
    }
  };
  auto peer = std::async(std::launch::async, exchange, 1);
  exchange(0);
  peer.get();
}

// Two processes, one device each (tests/gpu/nccl_echo_peer.cpp is rank 1): 1 MiB of rows one
// way, doubled back, then a one-float acknowledgement.
TEST(TransportNccl, TwoProcessesExchangePayloads) {
  if (cuda::device_count() < 2)
    GTEST_SKIP() << "no CUDA device: the NCCL pair test needs two devices (" << cuda::device_count() << " here) "
                 << cuda::device_error();
  const std::string id = nccl_unique_id();
  std::string hex;
  for (unsigned char c : id) {
    char b[3];
    std::snprintf(b, sizeof b, "%02x", c);
    hex += b;
  }
  constexpr size_t kFloats = size_t(1) << 18;
  const std::string n = std::to_string(kFloats);
  // The build's path, unless run from elsewhere (tests/gpu/run-on-device.sh runs a bundled copy).
  const char* moved = std::getenv("MOEMESH_NCCL_ECHO_PEER");
  std::string peer = moved && *moved ? moved : MOEMESH_NCCL_ECHO_PEER;
  char* child_argv[] = {peer.data(), hex.data(), const_cast<char*>(n.c_str()), nullptr};
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, peer.c_str(), nullptr, nullptr, child_argv, environ), 0) << peer;
  std::vector<float> rows(kFloats);
  for (size_t i = 0; i < kFloats; ++i) rows[i] = float(i % 1000);
  {
    auto t = make_nccl_transport(id, 0, 0, 30s);
    t->send({rows});
    const size_t sizes[] = {kFloats};
    const auto back = t->receive(sizes, std::span<const PayloadFrame>{});
    for (float& x : rows) x *= 2;
    EXPECT_EQ(back.at(0), rows);
    t->send({{1.0f}});
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the peer process failed";
  }
}

// A rank whose peer never joins gives up after the timeout (one device is enough).
TEST(TransportNccl, AJoinWithoutPeerTimesOut) {
  if (cuda::device_count() < 1) GTEST_SKIP() << "no CUDA device: " << cuda::device_error();
  try {
    make_nccl_transport(nccl_unique_id(), 0, 0, 2s);
    FAIL() << "joined without a peer";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "transport nccl: the peer did not join within 2 s");
  }
}
#endif
