// HttpServer over real loopback TCP: routing, keep-alive, answers from another thread,
// streaming (SSE), and the limits (413, 400, 404/405, request timeout) without the server
// going down.
#include <gtest/gtest.h>

#include <future>
#include <thread>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "actors/http_server.h"

using namespace moemesh::actors::http;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;

namespace {

// A blocking HTTP client on one connection.
struct Client {
  net::io_context ioc;
  tcp::socket sock{ioc};
  beast::flat_buffer buf;

  explicit Client(uint16_t port) { sock.connect({net::ip::make_address("127.0.0.1"), port}); }

  bhttp::response<bhttp::string_body> call(bhttp::verb verb, const std::string& target, std::string body = {},
                                           bool keep_alive = true) {
    bhttp::request<bhttp::string_body> req{verb, target, 11};
    req.set(bhttp::field::host, "localhost");
    req.keep_alive(keep_alive);
    req.body() = std::move(body);
    req.prepare_payload();
    bhttp::write(sock, req);
    return read();
  }
  bhttp::response<bhttp::string_body> read() {
    bhttp::response<bhttp::string_body> res;
    bhttp::read(sock, buf, res);
    return res;
  }
  void send_raw(const std::string& bytes) { net::write(sock, net::buffer(bytes)); }
  // Everything until the server closes the connection.
  std::string read_until_close() {
    std::string out(static_cast<const char*>(buf.data().data()), buf.size());
    beast::error_code ec;
    char tmp[4096];
    for (;;) {
      size_t n = sock.read_some(net::buffer(tmp), ec);
      if (ec) break;
      out.append(tmp, n);
    }
    return out;
  }
};

ServerOptions small_limits() {
  ServerOptions o;
  o.threads = 2;
  o.max_body_bytes = 1024;
  return o;
}

}  // namespace

TEST(HttpServer, RoutesAndKeepsTheConnectionAlive) {
  HttpServer srv(small_limits());
  srv.route("GET", "/hello", [](const Request& req, Responder r) {
    r.send(200, "text/plain", "hello " + req.query);
  });
  srv.route("POST", "/echo", [](const Request& req, Responder r) {
    r.send({201, "application/json", req.body, {{"X-Test", req.header("x-in")}}});
  });
  srv.start();
  ASSERT_NE(srv.port(), 0);

  Client c(srv.port());
  for (int i = 0; i < 3; ++i) {  // same connection each time
    auto res = c.call(bhttp::verb::get, "/hello?n=" + std::to_string(i));
    EXPECT_EQ(res.result_int(), 200u);
    EXPECT_EQ(res.body(), "hello n=" + std::to_string(i));
    EXPECT_TRUE(res.keep_alive());
  }
  bhttp::request<bhttp::string_body> req{bhttp::verb::post, "/echo", 11};
  req.set("X-In", "abc");
  req.body() = "{\"a\":1}";
  req.prepare_payload();
  bhttp::write(c.sock, req);
  auto res = c.read();
  EXPECT_EQ(res.result_int(), 201u);
  EXPECT_EQ(res.body(), "{\"a\":1}");
  EXPECT_EQ(res[bhttp::field::content_type], "application/json");
  EXPECT_EQ(res["X-Test"], "abc");

  EXPECT_EQ(c.call(bhttp::verb::get, "/nope").result_int(), 404u);
  auto not_allowed = c.call(bhttp::verb::delete_, "/echo");
  EXPECT_EQ(not_allowed.result_int(), 405u);
  EXPECT_EQ(not_allowed[bhttp::field::allow], "POST");
  EXPECT_EQ(c.call(bhttp::verb::get, "/hello").result_int(), 200u);  // still the same connection
}

TEST(HttpServer, AnswersFromAnotherThreadLater) {
  HttpServer srv(small_limits());
  std::promise<Responder> handed;
  srv.route("GET", "/slow", [&](const Request&, Responder r) { handed.set_value(r); });
  srv.start();
  Client c(srv.port());
  bhttp::request<bhttp::string_body> req{bhttp::verb::get, "/slow", 11};
  bhttp::write(c.sock, req);
  // The handler has returned; the answer comes from a thread of ours.
  Responder r = handed.get_future().get();
  std::thread([r]() mutable {
    r.send(200, "text/plain", "done later");
    r.send(500, "text/plain", "ignored: already answered");
  }).join();
  auto res = c.read();
  EXPECT_EQ(res.result_int(), 200u);
  EXPECT_EQ(res.body(), "done later");
}

TEST(HttpServer, DroppedResponderAnswers500AndThrowingHandlerToo) {
  HttpServer srv(small_limits());
  srv.route("GET", "/forget", [](const Request&, Responder) {});
  srv.route("GET", "/throw", [](const Request&, Responder) { throw std::runtime_error("boom"); });
  srv.start();
  Client c(srv.port());
  EXPECT_EQ(c.call(bhttp::verb::get, "/forget").result_int(), 500u);
  auto res = c.call(bhttp::verb::get, "/throw");
  EXPECT_EQ(res.result_int(), 500u);
  EXPECT_NE(res.body().find("boom"), std::string::npos);
}

TEST(HttpServer, StreamsServerSentEventsChunkByChunk) {
  HttpServer srv(small_limits());
  std::promise<Responder> handed;
  srv.route("GET", "/events", [&](const Request&, Responder r) {
    r.start_stream(200, "text/event-stream");
    r.write("data: one\n\n");
    handed.set_value(r);
  });
  srv.route("GET", "/after", [](const Request&, Responder r) { r.send(200, "text/plain", "after"); });
  srv.start();

  Client c(srv.port());
  bhttp::request<bhttp::string_body> req{bhttp::verb::get, "/events", 11};
  bhttp::write(c.sock, req);
  bhttp::response_parser<bhttp::string_body> p;
  bhttp::read_header(c.sock, c.buf, p);
  EXPECT_EQ(p.get().result_int(), 200u);
  EXPECT_EQ(p.get()[bhttp::field::content_type], "text/event-stream");
  EXPECT_TRUE(p.get().chunked());
  // The first event arrives before the second is even produced.
  while (p.get().body().find("data: one\n\n") == std::string::npos && !p.is_done()) bhttp::read_some(c.sock, c.buf, p);
  EXPECT_EQ(p.get().body(), "data: one\n\n");
  EXPECT_FALSE(p.is_done());

  Responder r = handed.get_future().get();
  std::thread([r]() mutable {
    r.write("data: two\n\n");
    r.write("data: [DONE]\n\n");
    r.end();
    r.write("data: too late\n\n");  // ignored after end
  }).join();
  bhttp::read(c.sock, c.buf, p);
  EXPECT_TRUE(p.is_done());
  EXPECT_EQ(p.get().body(), "data: one\n\ndata: two\n\ndata: [DONE]\n\n");
  EXPECT_FALSE(r.closed());
  // The connection is reusable after the stream ended.
  EXPECT_EQ(c.call(bhttp::verb::get, "/after").body(), "after");
}

TEST(HttpServer, StreamNoticesAClientThatLeft) {
  HttpServer srv(small_limits());
  std::promise<Responder> handed;
  std::promise<void> closed;
  srv.route("GET", "/events", [&](const Request&, Responder r) {
    r.on_close([&] { closed.set_value(); });
    r.start_stream();
    handed.set_value(r);
  });
  srv.start();
  {
    Client c(srv.port());
    bhttp::request<bhttp::string_body> req{bhttp::verb::get, "/events", 11};
    bhttp::write(c.sock, req);
    bhttp::response_parser<bhttp::string_body> p;
    bhttp::read_header(c.sock, c.buf, p);
  }  // the client hangs up mid-stream
  Responder r = handed.get_future().get();
  auto gone = closed.get_future();
  // Keep producing until a write fails; the server then reports the client as gone.
  while (gone.wait_for(std::chrono::milliseconds(10)) != std::future_status::ready) r.write(std::string(4096, 'x'));
  EXPECT_TRUE(r.closed());
}

TEST(HttpServer, OversizedBodyGets413AndServerStaysUp) {
  HttpServer srv(small_limits());
  srv.route("POST", "/echo", [](const Request& req, Responder r) { r.send(200, "text/plain", req.body); });
  srv.start();
  {
    Client c(srv.port());
    c.send_raw("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n");
    auto res = c.read();
    EXPECT_EQ(res.result_int(), 413u);
    EXPECT_FALSE(res.keep_alive());
  }
  Client c(srv.port());
  EXPECT_EQ(c.call(bhttp::verb::post, "/echo", std::string(1024, 'a')).result_int(), 200u);  // at the limit
}

TEST(HttpServer, GarbageGets400AndServerStaysUp) {
  HttpServer srv(small_limits());
  srv.route("GET", "/ok", [](const Request&, Responder r) { r.send(200, "text/plain", "ok"); });
  srv.start();
  for (const std::string garbage : {"NOT HTTP AT ALL\r\n\r\n", "GET /ok HTTP/1.1\r\nBad Header Line\r\n\r\n",
                                    "POST /ok HTTP/1.1\r\nContent-Length: nope\r\n\r\n"}) {
    Client c(srv.port());
    c.send_raw(garbage);
    std::string raw = c.read_until_close();
    EXPECT_EQ(raw.rfind("HTTP/1.1 400", 0), 0u) << garbage << " -> " << raw;
  }
  {  // a client that connects and leaves without a word
    Client c(srv.port());
  }
  Client c(srv.port());
  EXPECT_EQ(c.call(bhttp::verb::get, "/ok").body(), "ok");
}

TEST(HttpServer, IncompleteRequestTimesOut) {
  auto opts = small_limits();
  opts.request_timeout = std::chrono::milliseconds(200);
  HttpServer srv(opts);
  srv.route("GET", "/ok", [](const Request&, Responder r) { r.send(200, "text/plain", "ok"); });
  srv.start();
  Client c(srv.port());
  c.send_raw("GET /ok HTTP/1.1\r\nHost: x\r\n");  // never finished
  std::string raw = c.read_until_close();          // the server gives up and closes
  EXPECT_EQ(raw.rfind("HTTP/1.1 408", 0), 0u) << raw;
  Client again(srv.port());
  EXPECT_EQ(again.call(bhttp::verb::get, "/ok").body(), "ok");
}

TEST(HttpServer, BindFailureIsAReadableError) {
  HttpServer a(small_limits());
  a.start();
  auto opts = small_limits();
  opts.port = a.port();
  HttpServer b(opts);
  try {
    b.start();
    // SO_REUSEADDR does not allow two listeners on one port on Linux.
    FAIL() << "second bind succeeded";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(a.port())), std::string::npos) << e.what();
  }
}
