// Two bridges over real loopback TCP: actors (or a socket's handler) send and receive multipart
// messages through them, and the frames arrive intact and in order.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

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

// A socket routed to a handler gets its messages on the bridge's own I/O thread, in order; a
// handler that throws loses that message only, and an actor route set later replaces the handler.
TEST(ZmqBridge, HandlerRouteRunsOnTheIoThreadAndSurvivesAThrow) {
  caf::actor_system sys{two_thread_config()};
  ZmqBridge server(sys), client(sys);
  int srv =
      server.add({.name = "server", .type = zmq::socket_type::router, .endpoint = "tcp://127.0.0.1:*", .bind = true});
  int cli = client.add({.name = "client", .type = zmq::socket_type::dealer, .endpoint = server.endpoint(srv)});
  server.route(srv, sys.spawn(echo, server.actor()));

  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> got;
  std::set<std::thread::id> threads;
  client.route(cli, [&](int socket, FramesPtr frames) {
    EXPECT_EQ(socket, cli);
    const std::string text = (*frames)[0].to_string();
    if (text == "throw") throw std::runtime_error("handler failure");
    std::lock_guard<std::mutex> lk(mu);
    got.push_back(text);
    threads.insert(std::this_thread::get_id());
    cv.notify_all();
  });
  server.start();
  client.start();

  caf::scoped_actor self{sys};
  for (std::string text : {"a", "throw", "b", "c"}) {
    auto frames = std::make_shared<Frames>();
    frames->emplace_back(text);
    self->send(client.actor(), zmq_send_atom::value, cli, frames);
  }
  {
    std::unique_lock<std::mutex> lk(mu);
    ASSERT_TRUE(cv.wait_for(lk, std::chrono::seconds(10), [&] { return got.size() == 3; })) << got.size();
    EXPECT_EQ(got, (std::vector<std::string>{"a", "b", "c"}));
    ASSERT_EQ(threads.size(), 1u);  // one thread, the bridge's, not the test's
    EXPECT_NE(*threads.begin(), std::this_thread::get_id());
  }

  client.route(cli, caf::actor_cast<caf::actor>(self));
  auto frames = std::make_shared<Frames>();
  frames->emplace_back(std::string("to the actor"));
  self->send(client.actor(), zmq_send_atom::value, cli, frames);
  self->receive([&](zmq_recv_atom, int, FramesPtr f) { EXPECT_EQ((*f)[0].to_string(), "to the actor"); },
                caf::after(std::chrono::seconds(10)) >> [&] { FAIL() << "the actor route got nothing"; });
  {
    std::lock_guard<std::mutex> lk(mu);
    EXPECT_EQ(got.size(), 3u);  // the handler is no longer called
  }
  client.stop();
  server.stop();
}
