#include "actors/http_server.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <deque>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <spdlog/spdlog.h>

#include "core/error.h"

namespace moemesh::actors::http {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;

namespace {
// A client that reads slower than a stream produces is cut off rather than buffered forever.
constexpr size_t kMaxQueuedBytes = 64u << 20;

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}
}  // namespace

std::string Request::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (iequals(k, name)) return v;
  return {};
}

struct Route {
  std::string method, path;
  Handler handler;
};

class Session;

struct HttpServer::Core {
  // Declared before ioc: sessions (destroyed with the io_context) still read them.
  ServerOptions opts;
  std::vector<Route> routes;
  net::io_context ioc;
  std::optional<tcp::acceptor> acceptor;
  std::vector<std::thread> threads;
  uint16_t port = 0;
  bool started = false, stopped = false;
  std::weak_ptr<Core> self;  // handed to sessions, which give it to their responders

  explicit Core(ServerOptions o) : opts(std::move(o)), ioc(std::max(1, opts.threads)) {}
  void accept();
};

namespace detail {
struct ResponderState {
  // core first: it must outlive the session (its socket belongs to core's io_context).
  std::shared_ptr<HttpServer::Core> core;
  std::shared_ptr<Session> session;
  std::atomic<bool> keep_alive{true};
  unsigned version = 11;
  std::atomic<int> phase{0};  // 0 unanswered, 1 streaming, 2 complete
  std::atomic<bool> closed{false};
  std::mutex mu;
  std::function<void()> on_close;

  ~ResponderState();
  void post(std::string bytes, bool last);
  void notify_closed();
};
}  // namespace detail

// One connection: reads a request, hands it to its handler, writes the answer (possibly in
// pieces), then reads the next request on the same connection (keep-alive). Every member is
// touched only on the connection's strand.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const HttpServer::Core& core, std::weak_ptr<HttpServer::Core> core_ref, std::string peer)
      : stream_(std::move(socket)),
        read_timer_(stream_.get_executor()),
        core_(core),
        core_ref_(std::move(core_ref)),
        peer_(std::move(peer)) {}

  void run() { read_next(); }

  // Queues bytes of the current response; `last` marks its end, after which the connection
  // reads the next request or, without keep-alive, closes.
  void write(std::string bytes, bool last, bool keep_alive = false) {
    if (closed_) return;
    if (last) keep_alive_ = keep_alive;
    queued_ += bytes.size();
    outq_.push_back({std::move(bytes), last});
    if (queued_ > kMaxQueuedBytes) {
      spdlog::warn("{}: client {} reads too slowly, closing", core_.opts.name, peer_);
      return close();
    }
    if (!writing_) write_next();
  }

  auto executor() { return stream_.get_executor(); }

 private:
  struct Out {
    std::string bytes;
    bool last;
  };

  void read_next() {
    parser_.emplace();
    parser_->body_limit(core_.opts.max_body_bytes);
    // Our own timer rather than tcp_stream's expiry, which closes the socket: a late request
    // still gets its 408.
    stream_.expires_never();
    timed_out_ = false;
    read_timer_.expires_after(core_.opts.request_timeout);
    read_timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec) return;  // cancelled: the request arrived in time
      self->timed_out_ = true;
      beast::error_code ignored;
      self->stream_.socket().cancel(ignored);
    });
    bhttp::async_read(stream_, buf_, *parser_,
                      [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    read_timer_.cancel();
    if (timed_out_) {
      if (parser_->got_some()) return fail_fast(408, "request not received within the timeout");
      return close();  // an idle keep-alive connection: just close it
    }
    if (ec == bhttp::error::end_of_stream || ec == net::error::eof) return close();
    if (ec == bhttp::error::body_limit)
      return fail_fast(413, "request body over " + std::to_string(core_.opts.max_body_bytes) + " bytes");
    if (ec && ec.category() == bhttp::make_error_code(bhttp::error::bad_target).category())
      return fail_fast(400, "malformed HTTP request: " + ec.message());
    if (ec) return close();  // reset, aborted: nothing to answer

    auto msg = parser_->release();
    Request req;
    req.method = std::string(msg.method_string());
    req.target = std::string(msg.target());
    auto q = req.target.find('?');
    req.path = req.target.substr(0, q);
    if (q != std::string::npos) req.query = req.target.substr(q + 1);
    for (const auto& f : msg) req.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
    req.body = std::move(msg.body());
    req.peer = peer_;
    stream_.expires_never();  // the handler may take its time; writes set their own deadline

    auto state = std::make_shared<detail::ResponderState>();
    state->core = core_ref_.lock();
    state->session = shared_from_this();
    state->keep_alive = msg.keep_alive();
    state->version = msg.version();
    current_ = state;
    Responder responder(state);
    state.reset();
    dispatch(req, responder);
  }

  void dispatch(const Request& req, Responder& responder) {
    const Route* match = nullptr;
    std::string allow;
    for (const auto& r : core_.routes) {
      // "/prefix/*" matches every path below the prefix (resources named in the path).
      const bool prefix = !r.path.empty() && r.path.back() == '*';
      if (prefix ? req.path.compare(0, r.path.size() - 1, r.path, 0, r.path.size() - 1) != 0 ||
                       req.path.size() < r.path.size()
                 : r.path != req.path)
        continue;
      if (r.method == req.method) match = &r;
      allow += (allow.empty() ? "" : ", ") + r.method;
    }
    if (!match) {
      if (allow.empty()) return responder.send(404, "text/plain; charset=utf-8", "no route for " + req.path + "\n");
      return responder.send(
          {405, "text/plain; charset=utf-8", req.method + " not allowed on " + req.path + "\n", {{"Allow", allow}}});
    }
    try {
      match->handler(req, responder);
    } catch (const std::exception& e) {
      spdlog::error("{}: handler for {} {} threw: {}", core_.opts.name, req.method, req.path, e.what());
      responder.send(500, "text/plain; charset=utf-8", std::string("internal error: ") + e.what() + "\n");
    }
  }

  // Answers a request that could not be read, then closes the connection.
  void fail_fast(int status, const std::string& why) {
    spdlog::debug("{}: {} from {}: {}", core_.opts.name, status, peer_, why);
    bhttp::response<bhttp::string_body> res{bhttp::status(status), 11};
    res.set(bhttp::field::server, "moemesh");
    res.set(bhttp::field::content_type, "text/plain; charset=utf-8");
    res.keep_alive(false);
    res.body() = why + "\n";
    res.prepare_payload();
    std::ostringstream os;
    os << res;
    close_after_ = true;
    write(os.str(), true);
  }

  void write_next() {
    writing_ = true;
    stream_.expires_after(core_.opts.write_timeout);
    net::async_write(stream_, net::buffer(outq_.front().bytes),
                     [self = shared_from_this()](beast::error_code ec, size_t) { self->on_write(ec); });
  }

  void on_write(beast::error_code ec) {
    writing_ = false;
    if (ec) return close();
    Out done = std::move(outq_.front());
    outq_.pop_front();
    queued_ -= done.bytes.size();
    if (!outq_.empty()) return write_next();
    if (!done.last) return stream_.expires_never();  // a stream waiting for its next chunk
    current_.reset();
    if (close_after_ || !keep_alive_) return close();
    read_next();
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    read_timer_.cancel();
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    stream_.close();  // a write in flight completes with an error; its buffer stays until then
    if (auto s = current_.lock()) s->notify_closed();
  }

  beast::tcp_stream stream_;
  net::steady_timer read_timer_;
  const HttpServer::Core& core_;
  std::weak_ptr<HttpServer::Core> core_ref_;  // for responders, which keep the io_context alive
  std::string peer_;
  beast::flat_buffer buf_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  std::deque<Out> outq_;
  size_t queued_ = 0;
  bool writing_ = false, closed_ = false, close_after_ = false, timed_out_ = false, keep_alive_ = false;
  std::weak_ptr<detail::ResponderState> current_;
};

namespace detail {

ResponderState::~ResponderState() {
  // Nobody answered (or a stream was left open): finish it so the client is not left waiting.
  int p = phase.load();
  if (p == 0) {
    std::string body = "handler returned no response\n";
    std::ostringstream os;
    bhttp::response<bhttp::string_body> res{bhttp::status::internal_server_error, version};
    res.keep_alive(keep_alive);
    res.body() = body;
    res.prepare_payload();
    os << res;
    post(os.str(), true);
  } else if (p == 1) {
    post(version >= 11 ? "0\r\n\r\n" : "", true);
  }
}

void ResponderState::post(std::string bytes, bool last) {
  bool ka = keep_alive;
  net::post(session->executor(),
            [s = session, b = std::move(bytes), last, ka]() mutable { s->write(std::move(b), last, ka); });
}

void ResponderState::notify_closed() {
  closed = true;
  std::function<void()> fn;
  {
    std::lock_guard<std::mutex> lk(mu);
    fn = std::move(on_close);
  }
  if (fn && phase.load() != 2) fn();
}

}  // namespace detail

namespace {
std::string serialize(Response r, bool keep_alive, unsigned version) {
  bhttp::response<bhttp::string_body> res;
  res.version(version);
  res.result(unsigned(r.status));
  res.set(bhttp::field::server, "moemesh");
  res.set(bhttp::field::content_type, r.content_type);
  for (const auto& [k, v] : r.headers) res.set(k, v);
  res.keep_alive(keep_alive);
  res.body() = std::move(r.body);
  res.prepare_payload();
  std::ostringstream os;
  os << res;
  return os.str();
}
}  // namespace

void Responder::send(Response r) {
  int expected = 0;
  if (!s_->phase.compare_exchange_strong(expected, 2)) return;
  s_->post(serialize(std::move(r), s_->keep_alive, s_->version), true);
}

void Responder::send(int status, std::string content_type, std::string body) {
  send(Response{status, std::move(content_type), std::move(body)});
}

void Responder::start_stream(int status, std::string content_type, HeaderList headers) {
  int expected = 0;
  if (!s_->phase.compare_exchange_strong(expected, 1)) return;
  // HTTP/1.0 has no chunked encoding: the body then ends when the connection closes.
  if (s_->version < 11) s_->keep_alive = false;
  bhttp::response<bhttp::empty_body> res;
  res.version(s_->version);
  res.result(unsigned(status));
  res.set(bhttp::field::server, "moemesh");
  res.set(bhttp::field::content_type, content_type);
  res.set(bhttp::field::cache_control, "no-cache");
  for (const auto& [k, v] : headers) res.set(k, v);
  res.keep_alive(s_->keep_alive);
  if (s_->version >= 11) res.chunked(true);
  std::ostringstream os;
  os << res.base();
  s_->post(os.str(), false);
}

void Responder::write(std::string chunk) {
  if (s_->phase.load() != 1 || chunk.empty() || s_->closed) return;
  if (s_->version < 11) return s_->post(std::move(chunk), false);
  char size[20];
  int n = std::snprintf(size, sizeof size, "%zx\r\n", chunk.size());
  std::string framed;
  framed.reserve(size_t(n) + chunk.size() + 2);
  framed.append(size, size_t(n)).append(chunk).append("\r\n");
  s_->post(std::move(framed), false);
}

void Responder::end() {
  int expected = 1;
  if (!s_->phase.compare_exchange_strong(expected, 2)) return;
  s_->post(s_->version >= 11 ? "0\r\n\r\n" : "", true);
}

bool Responder::closed() const { return s_->closed.load(); }

void Responder::on_close(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lk(s_->mu);
    if (!s_->closed) {
      s_->on_close = std::move(fn);
      return;
    }
  }
  if (fn && s_->phase.load() != 2) fn();  // already gone
}

void HttpServer::Core::accept() {
  acceptor->async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (ec == net::error::operation_aborted || !acceptor->is_open()) return;
    if (ec) {
      spdlog::warn("{}: accept failed: {}", opts.name, ec.message());
    } else {
      beast::error_code pec;
      auto ep = socket.remote_endpoint(pec);
      std::string peer = pec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port());
      std::make_shared<Session>(std::move(socket), *this, self, std::move(peer))->run();
    }
    accept();
  });
}

HttpServer::HttpServer(ServerOptions opts) : core_(std::make_shared<Core>(std::move(opts))) { core_->self = core_; }

HttpServer::~HttpServer() { stop(); }

void HttpServer::route(std::string method, std::string path, Handler h) {
  if (core_->started) throw Error("HttpServer::route after start");
  core_->routes.push_back({std::move(method), std::move(path), std::move(h)});
}

void HttpServer::start() {
  if (core_->started) return;
  auto& c = *core_;
  beast::error_code ec;
  auto addr = net::ip::make_address(c.opts.address, ec);
  if (ec) throw Error(c.opts.name + ": bad listen address '" + c.opts.address + "'");
  tcp::endpoint ep(addr, c.opts.port);
  c.acceptor.emplace(c.ioc);
  c.acceptor->open(ep.protocol(), ec);
  if (!ec) c.acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) c.acceptor->bind(ep, ec);
  if (!ec) c.acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec)
    throw Error(c.opts.name + ": cannot listen on " + c.opts.address + ":" + std::to_string(c.opts.port) + ": " +
                ec.message());
  c.port = c.acceptor->local_endpoint().port();
  c.started = true;
  c.accept();
  for (int i = 0; i < std::max(1, c.opts.threads); ++i) c.threads.emplace_back([&c] { c.ioc.run(); });
}

void HttpServer::stop() {
  auto& c = *core_;
  if (!c.started || c.stopped) return;
  c.stopped = true;
  c.ioc.stop();
  for (auto& t : c.threads) t.join();
  c.threads.clear();
  beast::error_code ec;
  c.acceptor->close(ec);  // frees the port now; open connections end with the io_context
}

uint16_t HttpServer::port() const { return core_->port; }

}  // namespace moemesh::actors::http
