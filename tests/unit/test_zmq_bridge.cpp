// Two bridges over real loopback TCP: actors send and receive multipart messages through
// them, and the frames arrive intact and in order.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>

#include "actors/zmq_bridge.h"
#include "core/error.h"
#include "tests/support/actor_config.h"

using namespace moemesh::actors;

namespace {

caf::behavior echo(caf::event_based_actor*, caf::actor bridge) {
  // ROUTER delivers [peer id, payload...]; sending the same frames back replies to that peer.
  return {[bridge](zmq_recv_atom, int socket, FramesPtr frames) {
    caf::anon_send(bridge, zmq_send_atom::value, socket, frames);
  }};
}

using moemesh::testing::two_thread_config;

}  // namespace

TEST(ZmqBridge, RequestReplyOverLoopback) {
  caf::actor_system sys{two_thread_config()};
  ZmqBridge server(sys), client(sys);
  int srv = server.add({.name = "server", .type = zmq::socket_type::router, .endpoint = "tcp://127.0.0.1:*", .bind = true});
  int cli = client.add({.name = "client", .type = zmq::socket_type::dealer, .endpoint = server.endpoint(srv)});
  server.route(srv, sys.spawn(echo, server.actor()));
  caf::scoped_actor self{sys};
  client.route(cli, caf::actor_cast<caf::actor>(self));
  server.start();
  client.start();

  const int n = 200;
  for (int i = 0; i < n; ++i) {
    auto frames = std::make_shared<Frames>();
    frames->emplace_back(std::to_string(i));
    frames->push_back(frame_of(std::vector<float>(1000, float(i))));
    self->send(client.actor(), zmq_send_atom::value, cli, frames);
  }
  for (int i = 0; i < n; ++i) {
    bool got = false;
    self->receive(
        [&](zmq_recv_atom, int socket, FramesPtr frames) {
          EXPECT_EQ(socket, cli);
          ASSERT_EQ(frames->size(), 2u);
          EXPECT_EQ((*frames)[0].to_string(), std::to_string(i));  // in order
          ASSERT_EQ((*frames)[1].size(), 4000u);
          float last;  // a received frame may be unaligned: copy, never cast
          std::memcpy(&last, static_cast<const char*>((*frames)[1].data()) + 999 * sizeof(float), sizeof last);
          EXPECT_EQ(last, float(i));
          got = true;
        },
        caf::after(std::chrono::seconds(10)) >> [&] { FAIL() << "no reply for message " << i; });
    if (!got) break;
  }
  EXPECT_EQ(client.stats().sent.load(), uint64_t(n));
  EXPECT_EQ(server.stats().received.load(), uint64_t(n));
  client.stop();
  server.stop();
}

TEST(ZmqBridge, BadEndpointIsAReadableError) {
  caf::actor_system sys{two_thread_config()};
  ZmqBridge b(sys);
  EXPECT_THROW(b.add({.name = "bad", .type = zmq::socket_type::router, .endpoint = "tcp://no-such-host-xyz:1", .bind = true}), moemesh::Error);
}

TEST(ZmqBridge, SocketsOpenedAfterStartWithIdentity) {
  caf::actor_system sys{two_thread_config()};
  ZmqBridge server(sys), client(sys);
  caf::scoped_actor self{sys};
  server.start();
  client.start();
  int srv = server.add({.name = "server", .type = zmq::socket_type::router, .endpoint = "tcp://127.0.0.1:*", .bind = true});
  server.route(srv, caf::actor_cast<caf::actor>(self));
  int cli = client.add({.name = "late", .type = zmq::socket_type::dealer, .endpoint = server.endpoint(srv),
                        .identity = "worker-7"});
  auto frames = std::make_shared<Frames>();
  frames->emplace_back(std::string("hello"));
  self->send(client.actor(), zmq_send_atom::value, cli, frames);
  self->receive(
      [&](zmq_recv_atom, int socket, FramesPtr f) {
        EXPECT_EQ(socket, srv);
        ASSERT_EQ(f->size(), 2u);
        EXPECT_EQ((*f)[0].to_string(), "worker-7");  // the ROUTER sees the dealer's identity
        EXPECT_EQ((*f)[1].to_string(), "hello");
      },
      caf::after(std::chrono::seconds(10)) >> [&] { FAIL() << "nothing arrived"; });
  EXPECT_THROW(client.add({.name = "bad", .type = zmq::socket_type::dealer, .endpoint = "nonsense"}), moemesh::Error);
  client.stop();
  server.stop();
}
