// HTTP on loopback for tests that drive admin and API ports: a free port to hand to a server,
// and one request on a fresh connection.
#pragma once
#include <cstdint>
#include <string>
#include <utility>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace moemesh::testing {

// A port nobody listens on right now (someone else can still take it before the caller binds it).
inline uint16_t free_port() {
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::acceptor a(ioc, {boost::asio::ip::make_address("127.0.0.1"), 0});
  return a.local_endpoint().port();
}

// One request to 127.0.0.1:port on its own connection; a non-empty body is sent as JSON. Throws
// when nothing answers.
inline boost::beast::http::response<boost::beast::http::string_body> http_request(uint16_t port,
                                                                                 boost::beast::http::verb verb,
                                                                                 const std::string& target,
                                                                                 const std::string& body = {}) {
  namespace bhttp = boost::beast::http;
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::socket sock(ioc);
  sock.connect({boost::asio::ip::make_address("127.0.0.1"), port});
  bhttp::request<bhttp::string_body> req{verb, target, 11};
  req.set(bhttp::field::host, "localhost");
  if (!body.empty()) {
    req.set(bhttp::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
  }
  bhttp::write(sock, req);
  boost::beast::flat_buffer buf;
  bhttp::response<bhttp::string_body> res;
  bhttp::read(sock, buf, res);
  return res;
}

// The status and body of http_request; status 0 when nothing answers (yet), as while a server starts.
inline std::pair<unsigned, std::string> http_status_body(uint16_t port, boost::beast::http::verb verb,
                                                         const std::string& target, const std::string& body = {}) {
  try {
    auto res = http_request(port, verb, target, body);
    return {res.result_int(), res.body()};
  } catch (const std::exception&) {
    return {0, ""};
  }
}

// A GET as http_status_body.
inline std::pair<unsigned, std::string> http_get(uint16_t port, const std::string& target) {
  return http_status_body(port, boost::beast::http::verb::get, target);
}

}  // namespace moemesh::testing
