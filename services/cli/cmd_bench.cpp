// `moemesh bench`: open-loop (Poisson arrivals) or closed-loop (fixed concurrency) load against any
// OpenAI-compatible endpoint. Requests run as Asio coroutines on a few threads, so hundreds of
// concurrent streams need no thread each. Statistics and the report are core/bench_stats.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <mutex>
#include <thread>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "core/bench_stats.h"
#include "core/error.h"
#include "services/cli/commands.h"

namespace moemesh::cli {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct BenchArgs {
  std::string url = "http://127.0.0.1:8000";
  std::string model;
  bool chat = false;
  int64_t requests = 0;  // 0: not given
  double duration_s = 0;
  double rate = 0;
  int concurrency = 0;
  std::string prompt_len = "128", output_len = "128";
  int64_t vocab = 32000;
  bool text_prompts = false;
  std::vector<std::string> tenants;
  uint64_t seed = 0;
  bool stream = true;
  bool ignore_eos = true;
  std::string json_path;
  std::string per_request_path;
  double timeout_s = 600;
  double temperature = 0;
  int threads = 2;
};

struct Target {
  std::string host, port, prefix;  // prefix: a path before /v1 ("" or e.g. "/openai")
};

Target parse_url(const std::string& url) {
  const std::string scheme = "http://";
  if (url.rfind(scheme, 0) != 0)
    throw Error("--url '" + url + "': expected http://HOST[:PORT][/PATH] (https is not supported)");
  std::string rest = url.substr(scheme.size());
  Target t;
  const size_t slash = rest.find('/');
  std::string authority = rest.substr(0, slash);
  t.prefix = slash == std::string::npos ? "" : rest.substr(slash);
  while (!t.prefix.empty() && t.prefix.back() == '/') t.prefix.pop_back();
  // Both http://h:8000 and http://h:8000/v1 (how OpenAI clients spell a base URL) mean the same.
  if (t.prefix.size() >= 3 && t.prefix.compare(t.prefix.size() - 3, 3, "/v1") == 0)
    t.prefix.resize(t.prefix.size() - 3);
  const size_t colon = authority.rfind(':');
  if (colon != std::string::npos && authority.find(']', colon) == std::string::npos) {
    t.host = authority.substr(0, colon);
    t.port = authority.substr(colon + 1);
  } else {
    t.host = authority;
    t.port = "80";
  }
  if (!t.host.empty() && t.host.front() == '[' && t.host.back() == ']') t.host = t.host.substr(1, t.host.size() - 2);
  if (t.host.empty()) throw Error("--url '" + url + "': no host");
  if (t.port.empty() || t.port.find_first_not_of("0123456789") != std::string::npos)
    throw Error("--url '" + url + "': the port '" + t.port + "' is not a number");
  return t;
}

// What a transport error is called in the report's failure counts.
std::string failure_kind(const beast::error_code& ec) {
  if (ec == beast::error::timeout) return "timeout";
  if (ec == net::error::connection_refused) return "connection_refused";
  if (ec == net::error::connection_reset || ec == net::error::eof || ec == bhttp::error::end_of_stream ||
      ec == bhttp::error::partial_message)
    return "connection_closed";
  return "transport_error";
}

// The HTTP side of one request: the status, or why there was none.
struct Reply {
  int status = 0;
  bool event_stream = false;  // Content-Type text/event-stream
  std::string failure, error;
};

// Sends `req` and passes the response body to `on_body` piece by piece as it arrives; everything
// (connect included) must finish by `deadline`. Parameters are by value where a caller may pass a
// temporary: a coroutine outlives its caller's full expression when co_spawned.
net::awaitable<void> exchange(const tcp::resolver::results_type& endpoints, bhttp::request<bhttp::string_body> req,
                              Clock::time_point deadline, Reply& reply, std::function<void(std::string_view)> on_body) {
  beast::tcp_stream stream(co_await net::this_coro::executor);
  beast::error_code ec;
  auto tok = net::redirect_error(net::use_awaitable, ec);
  const auto failed = [&] {
    reply.failure = failure_kind(ec);
    reply.error = ec.message();
  };
  stream.expires_at(deadline);
  co_await stream.async_connect(endpoints, tok);
  if (ec) co_return failed();
  co_await bhttp::async_write(stream, req, tok);
  if (ec) co_return failed();
  beast::flat_buffer buffer;
  bhttp::response_parser<bhttp::string_body> parser;
  parser.body_limit(boost::none);
  co_await bhttp::async_read_header(stream, buffer, parser, tok);
  if (ec) co_return failed();
  reply.status = int(parser.get().result_int());
  reply.event_stream = parser.get()[bhttp::field::content_type].starts_with("text/event-stream");
  while (!parser.is_done()) {
    co_await bhttp::async_read_some(stream, buffer, parser, tok);
    // The string body only appends, so handing it on and clearing it streams the body.
    auto& body = parser.get().body();
    if (!body.empty()) {
      on_body(body);
      body.clear();
    }
    if (ec) co_return failed();
  }
  stream.socket().shutdown(tcp::socket::shutdown_both, ec);
}

// The server's message in an OpenAI error body, else the body itself (shortened).
std::string error_message(const std::string& body) {
  const json j = json::parse(body, nullptr, false);
  if (j.is_object() && j.contains("error")) {
    const json& e = j["error"];
    if (e.is_object() && e.contains("message") && e["message"].is_string()) return e["message"];
    if (e.is_string()) return e;
  }
  return body.substr(0, 300);
}

// Token counts from an OpenAI `usage` object, when the answer has one.
void read_usage(const json& j, std::optional<int64_t>& prompt, std::optional<int64_t>& completion) {
  if (!j.contains("usage") || !j["usage"].is_object()) return;
  const json& u = j["usage"];
  if (u.contains("prompt_tokens") && u["prompt_tokens"].is_number_integer()) prompt = u["prompt_tokens"].get<int64_t>();
  if (u.contains("completion_tokens") && u["completion_tokens"].is_number_integer())
    completion = u["completion_tokens"].get<int64_t>();
}

// Follows one SSE response: a token per chunk with non-empty text (completions `text`, chat
// `delta.content` or `delta.reasoning_content`), with its arrival time; the usage chunk, when the
// server sends one, has the exact counts.
class StreamAccount {
 public:
  explicit StreamAccount(Clock::time_point start) : start_(start) {}

  void feed(std::string_view bytes, Clock::time_point now) {
    pending_.append(bytes);
    size_t begin = 0;
    for (size_t nl; (nl = pending_.find('\n', begin)) != std::string::npos; begin = nl + 1) {
      std::string_view line(pending_.data() + begin, nl - begin);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      on_line(line, now);
    }
    pending_.erase(0, begin);
  }

  bool done = false;  // saw data: [DONE]
  std::string error;  // an error event, or a chunk that is not JSON
  int64_t chunks_with_text = 0;
  std::optional<int64_t> usage_prompt, usage_completion;
  std::optional<double> ttft_s;
  std::vector<double> itl_s;

 private:
  static bool has_text(const json& choice) {
    const auto nonempty = [](const json& o, const char* k) {
      return o.is_object() && o.contains(k) && o[k].is_string() && !o[k].get_ref<const std::string&>().empty();
    };
    return nonempty(choice, "text") || (choice.contains("delta") && (nonempty(choice["delta"], "content") ||
                                                                     nonempty(choice["delta"], "reasoning_content")));
  }

  void on_line(std::string_view line, Clock::time_point now) {
    if (!line.starts_with("data:")) return;  // comments, event:, id:, blank separators
    line.remove_prefix(5);
    if (!line.empty() && line.front() == ' ') line.remove_prefix(1);
    if (line == "[DONE]") {
      done = true;
      return;
    }
    const json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      if (error.empty()) error = "a stream chunk is not a JSON object: " + std::string(line.substr(0, 200));
      return;
    }
    if (j.contains("error")) {
      if (error.empty()) error = error_message(std::string(line));
      return;
    }
    read_usage(j, usage_prompt, usage_completion);
    bool text = false;
    if (j.contains("choices") && j["choices"].is_array())
      for (const auto& c : j["choices"]) text = text || has_text(c);
    if (!text) return;
    ++chunks_with_text;
    if (!ttft_s)
      ttft_s = std::chrono::duration<double>(now - start_).count();
    else
      itl_s.push_back(std::chrono::duration<double>(now - last_).count());
    last_ = now;
  }

  Clock::time_point start_, last_;
  std::string pending_;
};

// Words for --text-prompts (and chat): common, so most tokenizers make one token of each.
constexpr const char* kWords[] = {"the",   "of",    "and",   "to",    "in",    "is",    "for",  "on",    "that",
                                  "with",  "as",    "it",    "was",   "at",    "by",    "from", "this",  "are",
                                  "be",    "or",    "an",    "have",  "not",   "which", "one",  "all",   "new",
                                  "more",  "time",  "year",  "some",  "about", "water", "city", "light", "house",
                                  "world", "music", "table", "river", "green", "small", "great"};

class Bench {
 public:
  Bench(const BenchArgs& a, std::string model, tcp::resolver::results_type endpoints,
        std::vector<bench::TenantSpec> tenants)
      : a_(a),
        model_(std::move(model)),
        endpoints_(std::move(endpoints)),
        tenants_(std::move(tenants)),
        prompt_len_(bench::LengthDist::parse(a.prompt_len)),
        output_len_(bench::LengthDist::parse(a.output_len)),
        target_(parse_url(a.url)),
        path_(target_.prefix + (a.chat ? "/v1/chat/completions" : "/v1/completions")) {}

  std::vector<bench::Outcome> run() {
    net::io_context ioc(a_.threads);
    start_ = Clock::now();
    if (a_.rate > 0) {
      net::co_spawn(ioc, open_loop(ioc), net::detached);
    } else {
      // Each request's coroutine runs on its own strand: a Beast stream's timeout handler and
      // its I/O handlers must not run at once on two of the io_context's threads.
      for (int c = 0; c < a_.concurrency; ++c) net::co_spawn(net::make_strand(ioc), closed_loop(), net::detached);
    }
    std::atomic<int> running{a_.threads};
    std::vector<std::thread> threads;
    for (int t = 0; t < a_.threads; ++t)
      threads.emplace_back([&] {
        ioc.run();
        --running;
      });
    auto last_note = Clock::now();
    while (running > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (Clock::now() - last_note >= std::chrono::seconds(10)) {
        last_note = Clock::now();
        std::lock_guard lock(mu_);
        std::cerr << "moemesh bench: " << outcomes_.size() << " requests done, " << issued_ << " issued\n";
      }
    }
    for (auto& t : threads) t.join();
    return std::move(outcomes_);
  }

  const std::string& path() const { return path_; }

 private:
  struct Plan {
    size_t tenant = 0;
    json body;
    int64_t prompt_tokens = 0;
  };

  // Request i's tenant, prompt and output length depend on the seed and i only, never on timing.
  Plan plan(size_t i) const {
    std::seed_seq seq{uint32_t(a_.seed), uint32_t(a_.seed >> 32), uint32_t(i), uint32_t(uint64_t(i) >> 32)};
    std::mt19937_64 rng(seq);
    Plan p;
    p.tenant = bench::pick_weighted(tenants_, std::uniform_real_distribution<double>(0, 1)(rng));
    p.prompt_tokens = prompt_len_.sample(rng);
    const int64_t max_tokens = output_len_.sample(rng);
    json prompt;
    if (a_.text_prompts || a_.chat) {
      std::string text;
      std::uniform_int_distribution<size_t> word(0, std::size(kWords) - 1);
      for (int64_t k = 0; k < p.prompt_tokens; ++k) text += (k ? " " : "") + std::string(kWords[word(rng)]);
      prompt = text;
    } else {
      std::uniform_int_distribution<int64_t> id(0, a_.vocab - 1);
      prompt = json::array();
      for (int64_t k = 0; k < p.prompt_tokens; ++k) prompt.push_back(id(rng));
    }
    p.body = {{"model", model_}, {"max_tokens", max_tokens}, {"temperature", a_.temperature}, {"stream", a_.stream}};
    if (a_.chat)
      p.body["messages"] = json::array({{{"role", "user"}, {"content", prompt}}});
    else
      p.body["prompt"] = prompt;
    if (a_.stream) p.body["stream_options"] = {{"include_usage", true}};
    if (a_.ignore_eos) p.body["ignore_eos"] = true;  // a vLLM extension: exact output lengths
    return p;
  }

  bhttp::request<bhttp::string_body> http_request(const Plan& p) const {
    bhttp::request<bhttp::string_body> req{bhttp::verb::post, path_, 11};
    req.set(bhttp::field::host, target_.host + ":" + target_.port);
    req.set(bhttp::field::content_type, "application/json");
    req.set(bhttp::field::connection, "close");
    if (!tenants_[p.tenant].key.empty()) req.set(bhttp::field::authorization, "Bearer " + tenants_[p.tenant].key);
    req.body() = p.body.dump();
    req.prepare_payload();
    return req;
  }

  bool more(size_t i, double t_s) const {
    return (a_.requests == 0 || int64_t(i) < a_.requests) && (a_.duration_s == 0 || t_s < a_.duration_s);
  }

  double since_start(Clock::time_point t) const { return std::chrono::duration<double>(t - start_).count(); }

  net::awaitable<void> open_loop(net::io_context& ioc) {
    net::steady_timer timer(co_await net::this_coro::executor);
    std::mt19937_64 rng(a_.seed ^ 0x9e3779b97f4a7c15ull);  // arrivals: their own stream
    std::exponential_distribution<double> gap(a_.rate);
    double t = 0;
    for (size_t i = 0; more(i, t); ++i, t += gap(rng)) {
      timer.expires_at(start_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(t)));
      co_await timer.async_wait(net::use_awaitable);
      net::co_spawn(net::make_strand(ioc), run_one(i), net::detached);
    }
  }

  net::awaitable<void> closed_loop() {
    for (;;) {
      const size_t i = next_++;
      if (!more(i, since_start(Clock::now()))) co_return;
      co_await run_one(i);
    }
  }

  net::awaitable<void> run_one(size_t i) {
    bench::Outcome o;
    const auto t0 = Clock::now();
    o.start_s = since_start(t0);
    {
      std::lock_guard lock(mu_);
      ++issued_;
    }
    try {
      const Plan p = plan(i);
      o.tenant = p.tenant;
      o.prompt_tokens = p.prompt_tokens;
      Reply reply;
      StreamAccount sse(t0);
      std::string body;
      const auto deadline =
          t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(a_.timeout_s));
      co_await exchange(endpoints_, http_request(p), deadline, reply, [&](std::string_view piece) {
        if (reply.status == 200 && reply.event_stream)
          sse.feed(piece, Clock::now());
        else if (reply.status == 200 || body.size() < 65536)
          body.append(piece);
      });
      o.end_s = since_start(Clock::now());
      settle(o, reply, sse, body);
    } catch (const std::exception& e) {
      o.end_s = since_start(Clock::now());
      o.failure = "client_error";
      o.error = e.what();
    }
    std::lock_guard lock(mu_);
    outcomes_.push_back(std::move(o));
  }

  // Decides whether the request succeeded and takes its token counts and latencies.
  void settle(bench::Outcome& o, const Reply& reply, const StreamAccount& sse, const std::string& body) {
    const bool streamed = reply.status == 200 && reply.event_stream;
    if (!reply.failure.empty() && !(streamed && sse.done)) {
      // A stream cut short is "incomplete_stream" unless our own deadline cut it.
      o.failure = streamed && reply.failure != "timeout" ? "incomplete_stream" : reply.failure;
      o.error = reply.error;
      return;
    }
    if (reply.status != 200) {
      o.failure = std::to_string(reply.status);
      o.error = error_message(body);
      return;
    }
    std::optional<int64_t> prompt, completion;
    if (streamed) {
      if (!sse.error.empty()) {
        o.failure = "stream_error";
        o.error = sse.error;
        return;
      }
      if (!sse.done) {
        o.failure = "incomplete_stream";
        o.error = "the stream ended without data: [DONE]";
        return;
      }
      prompt = sse.usage_prompt;
      completion = sse.usage_completion;
      if (!completion) completion = sse.chunks_with_text;
      o.ttft_s = sse.ttft_s;
      o.itl_s = sse.itl_s;
    } else {
      const json j = json::parse(body, nullptr, false);
      if (!j.is_object() || !j.contains("choices")) {
        o.failure = "bad_response";
        o.error = "a 200 answer that is not a completion: " + body.substr(0, 200);
        return;
      }
      read_usage(j, prompt, completion);
      if (!completion) ++missing_usage_;
    }
    if (prompt) o.prompt_tokens = *prompt;
    o.output_tokens = completion.value_or(0);
  }

 public:
  std::atomic<int64_t> missing_usage_{0};

 private:
  const BenchArgs& a_;
  const std::string model_;
  const tcp::resolver::results_type endpoints_;
  const std::vector<bench::TenantSpec> tenants_;
  const bench::LengthDist prompt_len_, output_len_;
  const Target target_;
  const std::string path_;
  Clock::time_point start_;
  std::atomic<size_t> next_{0};
  std::mutex mu_;
  size_t issued_ = 0;
  std::vector<bench::Outcome> outcomes_;
};

// GET /v1/models and the first model's id.
std::string first_model(const BenchArgs& a, const tcp::resolver::results_type& endpoints, const std::string& key) {
  const Target t = parse_url(a.url);
  bhttp::request<bhttp::string_body> req{bhttp::verb::get, t.prefix + "/v1/models", 11};
  req.set(bhttp::field::host, t.host + ":" + t.port);
  req.set(bhttp::field::connection, "close");
  if (!key.empty()) req.set(bhttp::field::authorization, "Bearer " + key);
  net::io_context ioc;
  Reply reply;
  std::string body;
  const auto deadline =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(a.timeout_s));
  net::co_spawn(ioc, exchange(endpoints, req, deadline, reply, [&](std::string_view piece) { body.append(piece); }),
                net::detached);
  ioc.run();
  const std::string where = "GET " + a.url + " /v1/models (pass --model to skip it)";
  if (!reply.failure.empty()) throw Error(where + ": " + reply.error);
  if (reply.status != 200) throw Error(where + ": HTTP " + std::to_string(reply.status) + ": " + error_message(body));
  const json j = json::parse(body, nullptr, false);
  if (!j.is_object() || !j.contains("data") || !j["data"].is_array() || j["data"].empty() ||
      !j["data"][0].is_object() || !j["data"][0].contains("id") || !j["data"][0]["id"].is_string())
    throw Error(where + ": no model in the answer: " + body.substr(0, 200));
  return j["data"][0]["id"];
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

void check(const BenchArgs& a) {
  if ((a.rate > 0) == (a.concurrency > 0)) throw Error("give exactly one of --rate R (open loop) or --concurrency C");
  if (a.rate < 0) throw Error("--rate must be > 0");
  if (a.concurrency < 0) throw Error("--concurrency must be >= 1");
  if (a.requests < 0) throw Error("--requests must be >= 1");
  if (a.duration_s < 0) throw Error("--duration-s must be > 0");
  if (!(a.timeout_s > 0)) throw Error("--timeout-s must be > 0");
  if (a.vocab < 1) throw Error("--vocab must be >= 1");
  if (a.threads < 1) throw Error("--threads must be >= 1");
  if (a.temperature < 0) throw Error("--temperature must be >= 0");
}

// One JSON line per request, in the order they finished: what the summary's percentiles are
// made of, for analyses the summary cannot answer (a gap's cause, latency over the run).
void write_per_request(const std::string& path, const std::vector<bench::Outcome>& outcomes) {
  std::ofstream f(path);
  for (const auto& o : outcomes) f << bench::outcome_json(o).dump() << "\n";
  if (!f) throw Error("--per-request: cannot write " + path);
}

void run_bench(BenchArgs a) {
  check(a);
  if (a.requests == 0 && a.duration_s == 0) a.requests = 100;
  std::vector<bench::TenantSpec> tenants;
  for (const auto& s : a.tenants) tenants.push_back(bench::parse_tenant(s));
  if (tenants.empty()) tenants.push_back({"", 1});
  (void)bench::LengthDist::parse(a.prompt_len);  // bad distributions fail before any request
  (void)bench::LengthDist::parse(a.output_len);
  const Target t = parse_url(a.url);
  net::io_context resolve_ctx;
  beast::error_code ec;
  auto endpoints = tcp::resolver(resolve_ctx).resolve(t.host, t.port, ec);
  if (ec) throw Error("--url " + a.url + ": cannot resolve " + t.host + ": " + ec.message());
  const std::string model = a.model.empty() ? first_model(a, endpoints, tenants.front().key) : a.model;

  Bench bench(a, model, endpoints, tenants);
  std::cerr << "moemesh bench: POST http://" << t.host << ":" << t.port << bench.path() << " model " << model << ", "
            << (a.rate > 0 ? "rate " + number(a.rate) + "/s (Poisson)" : "concurrency " + std::to_string(a.concurrency))
            << ", " << (a.requests ? std::to_string(a.requests) + " requests" : "no request limit")
            << (a.duration_s > 0 ? ", at most " + number(a.duration_s) + " s" : "") << "\n";
  const auto outcomes = bench.run();
  json report = bench::make_report(outcomes, tenants);
  report["config"] = {{"url", a.url},
                      {"path", bench.path()},
                      {"model", model},
                      {"mode", a.rate > 0 ? "rate" : "concurrency"},
                      {"rate", a.rate},
                      {"concurrency", a.concurrency},
                      {"requests", a.requests},
                      {"duration_s", a.duration_s},
                      {"prompt_len", bench::LengthDist::parse(a.prompt_len).describe()},
                      {"output_len", bench::LengthDist::parse(a.output_len).describe()},
                      {"prompts", a.text_prompts || a.chat ? "text" : "token_ids"},
                      {"stream", a.stream},
                      {"ignore_eos", a.ignore_eos},
                      {"temperature", a.temperature},
                      {"seed", a.seed}};
  std::cout << bench::format_report(report);
  if (bench.missing_usage_ > 0)
    std::cerr << "moemesh bench: warning: " << bench.missing_usage_
              << " answers had no usage; their output tokens count as 0\n";
  if (!a.json_path.empty()) {
    std::ofstream f(a.json_path);
    f << report.dump(2) << "\n";
    if (!f) throw Error("--json: cannot write " + a.json_path);
  }
  if (!a.per_request_path.empty()) write_per_request(a.per_request_path, outcomes);
  if (report["requests"]["ok"] == 0) throw Error("every request failed");
}

}  // namespace

void add_bench(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand(
      "bench", "Load an OpenAI-compatible endpoint: throughput and TTFT / inter-token / end-to-end latency");
  cmd->add_option("--url", a->url, "base URL; requests go to <url>/v1/completions")->capture_default_str();
  cmd->add_option("--model", a->model, "model name (default: the first of GET /v1/models)");
  cmd->add_flag("--chat", a->chat, "use /v1/chat/completions (text prompts)");
  cmd->add_option("--requests", a->requests, "number of requests (default 100 unless --duration-s)");
  cmd->add_option("--duration-s", a->duration_s, "stop issuing requests after this many seconds");
  auto* rate = cmd->add_option("--rate", a->rate, "open loop: Poisson arrivals per second");
  auto* conc = cmd->add_option("--concurrency", a->concurrency, "closed loop: requests in flight");
  rate->excludes(conc);
  cmd->add_option("--prompt-len", a->prompt_len, "prompt tokens: N, uniform:A:B or normal:MEAN:SD")
      ->capture_default_str();
  cmd->add_option("--output-len", a->output_len, "max_tokens: N, uniform:A:B or normal:MEAN:SD")->capture_default_str();
  cmd->add_option("--vocab", a->vocab, "token ids in random prompts are below this")->capture_default_str();
  cmd->add_flag("--text-prompts", a->text_prompts, "send random words instead of token-id arrays");
  cmd->add_option("--tenant", a->tenants, "API key with an optional weight, KEY[:WEIGHT]; repeatable");
  cmd->add_option("--seed", a->seed, "seed for prompts, lengths, tenants and arrivals")->capture_default_str();
  cmd->add_flag("--stream,!--no-stream", a->stream, "stream, the default (TTFT and inter-token latency need it)");
  cmd->add_flag("--ignore-eos,!--no-ignore-eos", a->ignore_eos,
                "send ignore_eos: true, the default (exact output lengths; a vLLM extension)");
  cmd->add_option("--json", a->json_path, "also write the report as JSON to this file");
  cmd->add_option("--per-request", a->per_request_path,
                  "also write one JSON line per request to this file: start, end, TTFT and inter-token gaps (seconds)");
  cmd->add_option("--timeout-s", a->timeout_s, "per-request deadline")->capture_default_str();
  cmd->add_option("--temperature", a->temperature, "sampling temperature")->capture_default_str();
  cmd->add_option("--threads", a->threads, "client I/O threads")->capture_default_str();
  cmd->callback([a] { run_bench(*a); });
}

}  // namespace moemesh::cli
