// A small HTTP/1.1 server (Boost.Beast over Asio) for the API and admin ports.
//
// A few io_context threads serve every connection (no thread per connection); connections
// are kept alive between requests. Requests are routed by method + exact path to a handler
// that gets the request and a Responder. The Responder may be completed later, from any
// thread (it posts to the connection's strand), so a handler can start asynchronous work,
// e.g. a CAF request, and answer when it is done. A Responder can also stream: headers
// first, then chunks (chunked transfer encoding), then the end — Server-Sent Events use it.
//
// Limits: a request body over max_body_bytes gets 413, a malformed request gets 400, a
// request that does not arrive within request_timeout gets 408 (or the idle connection is
// closed); the connection is then closed and the server carries on.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moemesh::actors::http {

using HeaderList = std::vector<std::pair<std::string, std::string>>;

struct Request {
  std::string method;  // "GET", "POST", ...
  std::string target;  // as sent: path plus query
  std::string path;    // target without the query
  std::string query;   // after '?', undecoded; empty when none
  HeaderList headers;  // as received
  std::string body;
  std::string peer;    // remote address:port, for logs

  // First header of that name (case-insensitive); empty when absent.
  std::string header(std::string_view name) const;
};

struct Response {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  HeaderList headers = {};  // extra headers
};

namespace detail {
struct ResponderState;
}

// Completes one request. Copyable (copies share the request); thread-safe. Exactly one of
// send() or start_stream() ... end() takes effect; later calls are ignored. If every copy is
// dropped without an answer, the client gets 500 so it never waits forever.
class Responder {
 public:
  explicit Responder(std::shared_ptr<detail::ResponderState> s) : s_(std::move(s)) {}

  void send(Response r);
  void send(int status, std::string content_type, std::string body);

  // Streaming: headers now (Transfer-Encoding: chunked), then any number of write()s, then
  // end(). For SSE use content_type "text/event-stream" and write "data: ...\n\n" events.
  void start_stream(int status = 200, std::string content_type = "text/event-stream", HeaderList headers = {});
  void write(std::string chunk);  // empty chunks are skipped (an empty chunk ends the body)
  void end();

  // True once the client is gone (a write failed or the connection closed): stop producing.
  bool closed() const;
  // Called once when the client goes away before the response ended: on the server's thread,
  // or right away if it is already gone.
  void on_close(std::function<void()> fn);

 private:
  std::shared_ptr<detail::ResponderState> s_;
};

using Handler = std::function<void(const Request&, Responder)>;

struct ServerOptions {
  std::string address = "127.0.0.1";
  uint16_t port = 0;  // 0: the kernel picks one; see HttpServer::port()
  int threads = 1;
  uint64_t max_body_bytes = 8u << 20;
  std::chrono::milliseconds request_timeout{30000};  // to receive one whole request (also idle keep-alive)
  std::chrono::milliseconds write_timeout{30000};    // to send one response or chunk
  std::string name = "http";                         // for logs
};

class HttpServer {
 public:
  explicit HttpServer(ServerOptions opts);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Before start(). Method is upper case ("GET"); path is matched exactly, or a path ending in
  // '*' matches the paths that extend it by at least one character.
  void route(std::string method, std::string path, Handler h);

  // Binds, listens and starts the threads. Throws moemesh::Error when it cannot bind.
  void start();
  void stop();  // idempotent; joins the threads
  uint16_t port() const;  // the bound port (after start)

  struct Core;

 private:
  std::shared_ptr<Core> core_;
};

}  // namespace moemesh::actors::http
