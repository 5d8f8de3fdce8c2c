// moemesh-expert as a real process on loopback: it maps only its experts, answers every kind
// of garbage with an error reply (and keeps serving), rejects bad flags with one readable
// line, exits 0 on SIGTERM, and a killed host's experts are served by a replica.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <random>
#include <regex>
#include <thread>
#include <zmq.hpp>

#include "actors/remote_experts.h"
#include "core/dispatch_codec.h"
#include "core/expert_set.h"
#include "core/moe.h"
#include "proto/dataplane.pb.h"
#include "tests/support/actor_config.h"
#include "tests/support/tiny_model.h"

using namespace moemesh;

namespace {

// A child process whose stdout+stderr lines are collected.
class Proc {
 public:
  explicit Proc(std::vector<std::string> args) {
    int fds[2];
    if (::pipe(fds) != 0) throw std::runtime_error("pipe");
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fds[1], 1);
      ::dup2(fds[1], 2);
      ::close(fds[0]);
      ::close(fds[1]);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    reader_ = std::thread([this, fd = fds[0]] {
      std::string buf;
      char chunk[4096];
      ssize_t n;
      while ((n = ::read(fd, chunk, sizeof chunk)) > 0) {
        buf.append(chunk, size_t(n));
        size_t nl;
        while ((nl = buf.find('\n')) != std::string::npos) {
          std::lock_guard<std::mutex> lk(mu_);
          lines_.push_back(buf.substr(0, nl));
          buf.erase(0, nl + 1);
          cv_.notify_all();
        }
      }
      std::lock_guard<std::mutex> lk(mu_);
      if (!buf.empty()) lines_.push_back(buf);
      eof_ = true;
      cv_.notify_all();
      ::close(fd);
    });
  }
  ~Proc() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      wait_exit();
    }
    if (reader_.joinable()) reader_.join();
  }

  // The first capture group of the first line matching `re`; empty if the output ends first.
  std::string wait_for(const std::string& re) {
    std::regex r(re);
    std::unique_lock<std::mutex> lk(mu_);
    for (size_t seen = 0;;) {
      for (; seen < lines_.size(); ++seen) {
        std::smatch m;
        if (std::regex_search(lines_[seen], m, r)) return m.size() > 1 ? m[1].str() : m[0].str();
      }
      if (eof_) return "";
      cv_.wait_for(lk, std::chrono::seconds(60));  // a limit, not a timing assertion
      if (seen == lines_.size() && !eof_) return "";
    }
  }
  std::string output() {
    std::lock_guard<std::mutex> lk(mu_);
    std::string s;
    for (auto& l : lines_) s += l + "\n";
    return s;
  }
  bool running() {
    if (exited_) return false;
    int st;
    pid_t r = ::waitpid(pid_, &st, WNOHANG);
    if (r == pid_) exited_ = true, status_ = st;
    return !exited_;
  }
  void signal(int sig) { ::kill(pid_, sig); }
  int wait_exit() {  // exit code, or 128 + signal
    if (!exited_) {
      ::waitpid(pid_, &status_, 0);
      exited_ = true;
    }
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
  }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  int status_ = 0;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> lines_;
  bool eof_ = false;
};

// GET http://127.0.0.1:port/path, the whole response (headers and body).
std::string http_get(int port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(uint16_t(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  (void)!::write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, size_t(n));
  ::close(fd);
  return out;
}

std::unique_ptr<moemesh::testing::TinyModel> tiny;  // hidden 64, 2 layers, 8 experts

class ExpertProcess : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tiny = std::make_unique<moemesh::testing::TinyModel>(Arch::Mixtral, /*seed=*/1, /*vocab=*/64);
  }
  static void TearDownTestSuite() { tiny.reset(); }

  static std::unique_ptr<Proc> start(const std::string& experts) {
    std::vector<std::string> args{MOEMESH_EXPERT_BIN,
                                  "--model",
                                  tiny->path().string(),
                                  "--listen",
                                  "tcp://127.0.0.1:*",
                                  "--compute-threads",
                                  "1",
                                  "--admin-address",
                                  "127.0.0.1",
                                  "--admin-port",
                                  "0"};
    if (!experts.empty()) args.insert(args.end(), {"--experts", experts});
    return std::make_unique<Proc>(args);
  }
};

std::vector<uint8_t> header_bytes(const dispatch::Message& m) { return m.header; }

std::vector<uint8_t> tensor_bytes(const std::vector<float>& v) {
  const auto* p = reinterpret_cast<const uint8_t*>(v.data());
  return {p, p + v.size() * sizeof(float)};
}

// A raw DEALER: sends arbitrary frames, reads one reply.
class Client {
 public:
  explicit Client(const std::string& endpoint) : sock_(ctx_, zmq::socket_type::dealer) {
    sock_.set(zmq::sockopt::linger, 0);
    sock_.set(zmq::sockopt::rcvtimeo, 30000);
    sock_.connect(endpoint);
  }
  // Sends the frames and returns the decoded reply (throws on no reply).
  dispatch::Reply exchange(const std::vector<std::vector<uint8_t>>& frames) {
    for (size_t i = 0; i < frames.size(); ++i)
      sock_.send(zmq::buffer(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
    held_.clear();
    do {
      zmq::message_t m;
      if (!sock_.recv(m)) throw std::runtime_error("no reply");
      held_.push_back(std::move(m));
    } while (held_.back().more());
    std::vector<wire::Frame> views;
    for (auto& m : held_) views.emplace_back(static_cast<const uint8_t*>(m.data()), m.size());
    return dispatch::decode_reply(views);
  }

 private:
  zmq::context_t ctx_;
  zmq::socket_t sock_;
  std::vector<zmq::message_t> held_;
};

std::vector<float> random_rows(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

}  // namespace

TEST_F(ExpertProcess, MapsOnlyItsExpertsAndSurvivesGarbage) {
  const std::string spec = "0:0-3,1:*";
  auto p = start(spec);
  const std::string endpoint = p->wait_for(R"(listening on (tcp://\S+))");
  ASSERT_FALSE(endpoint.empty()) << p->output();

  // Mapped bytes = the sum of exactly those experts' tensors, computed here independently.
  auto ckpt = Checkpoint::open(tiny->path());
  const ModelConfig& c = ckpt->config();
  uint64_t want = 0;
  for (const auto& [l, e] : parse_expert_spec(spec, c))
    for (const char* w : {"gate", "up", "down"}) want += ckpt->info(Checkpoint::expert_tensor(c, l, e, w)).nbytes;
  EXPECT_EQ(p->wait_for(R"(mapped_weight_bytes=(\d+))"), std::to_string(want)) << p->output();
  EXPECT_EQ(want, uint64_t(12 * 3 * c.hidden_size * c.moe_intermediate_size * 4));

  const int64_t hidden = c.hidden_size;
  const std::vector<dispatch::Group> groups{{1, 2}, {3, 3}};
  auto rows = random_rows(size_t(5 * hidden), 9);
  auto good = dispatch::encode_request(41, 0, groups, hidden, rows);
  const auto good_header = header_bytes(good), good_tensor = tensor_bytes(rows);

  Client client(endpoint);
  auto expect_error = [&](const std::vector<std::vector<uint8_t>>& frames, const std::string& code, uint64_t id,
                          const std::string& what) {
    SCOPED_TRACE(what);
    dispatch::Reply r = client.exchange(frames);
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.error_code, code) << r.error_message;
    EXPECT_EQ(r.request_id, id);
    EXPECT_FALSE(r.error_message.empty());
  };

  std::mt19937 rng(1);
  for (size_t n : {0, 1, 7, 39, 40, 41, 200, 5000}) {
    std::vector<uint8_t> noise(n);
    for (auto& b : noise) b = uint8_t(rng());
    dispatch::Reply r = client.exchange({noise});
    EXPECT_FALSE(r.ok) << "random frame of " << n << " bytes";
    EXPECT_EQ(r.request_id, 0u);
  }
  auto cut = good_header;
  cut.pop_back();
  expect_error({cut, good_tensor}, "truncated", 0, "header short by one byte");
  auto v2 = good_header;
  v2[4] = 2;
  expect_error({v2, good_tensor}, "bad_version", 0, "wire version 2");
  auto magic = good_header;
  magic[0] = 'X';
  expect_error({magic, good_tensor}, "bad_magic", 0, "bad magic");
  expect_error({good_header}, "bad_frame_count", 41, "tensor frame missing");
  expect_error({good_header, good_tensor, good_tensor}, "bad_frame_count", 41, "extra frame");
  auto short_tensor = good_tensor;
  short_tensor.resize(short_tensor.size() - 4);
  expect_error({good_header, short_tensor}, "truncated", 41, "tensor frame short");

  {  // wrong hidden size: a well-formed request of width 32
    auto narrow = random_rows(5 * 32, 3);
    auto m = dispatch::encode_request(42, 0, groups, 32, narrow);
    expect_error({m.header, tensor_bytes(narrow)}, "bad_hidden", 42, "hidden 32");
  }
  {
    auto m = dispatch::encode_request(43, 7, groups, hidden, rows);
    expect_error({m.header, good_tensor}, "bad_layer", 43, "layer 7");
  }
  {
    const std::vector<dispatch::Group> unknown{{1, 2}, {5, 3}};  // layer 0 holds 0-3 only
    auto m = dispatch::encode_request(44, 0, unknown, hidden, rows);
    expect_error({m.header, good_tensor}, "unknown_expert", 44, "expert 5 of layer 0");
  }
  {
    wire::Header h;
    h.kind = wire::Kind::StepRequest;
    h.request_id = 45;
    expect_error({wire::encode_header(h)}, "bad_request", 45, "a StepRequest");
    h.kind = wire::Kind::DispatchRequest;
    h.request_id = 46;
    h.meta = "\xff\xff\xff\xff";
    h.tensors.push_back({DType::F32, {5, hidden}});
    expect_error({wire::encode_header(h), good_tensor}, "bad_meta", 46, "metadata garbage");
  }
  // 300 frames of noise in one message.
  std::vector<std::vector<uint8_t>> many(300, std::vector<uint8_t>{1, 2, 3});
  EXPECT_FALSE(client.exchange(many).ok);

  // Still up, and still right.
  ASSERT_TRUE(p->running()) << p->output();
  dispatch::Reply r = client.exchange({good_header, good_tensor});
  ASSERT_TRUE(r.ok) << r.error_code << ": " << r.error_message;
  EXPECT_EQ(r.request_id, 41u);
  ASSERT_EQ(r.rows, 5);
  ASSERT_EQ(r.hidden, hidden);
  std::vector<float> got(size_t(5 * hidden));
  dispatch::copy_floats(r.outputs, 0, got.size(), got.data());
  ModelWeights all = ckpt->load();
  int64_t offset = 0;
  for (const auto& g : groups) {
    std::vector<float> want_rows(size_t(g.rows * hidden));
    mlp_forward(*all.layers[0].experts[size_t(g.expert)], rows.data() + offset * hidden, g.rows, hidden,
                want_rows.data());
    for (int64_t i = 0; i < g.rows * hidden; ++i)
      EXPECT_NEAR(got[size_t(offset * hidden + i)], want_rows[size_t(i)],
                  1e-6 * std::max(1.0f, std::abs(want_rows[size_t(i)])));
    offset += g.rows;
  }

  // The same facts on /metrics, and ready.
  const std::string admin = p->wait_for(R"(admin on 127\.0\.0\.1:(\d+))");
  ASSERT_FALSE(admin.empty()) << p->output();
  const std::string metrics = http_get(std::stoi(admin), "/metrics");
  EXPECT_NE(metrics.find("moemesh_expert_mapped_weight_bytes " + std::to_string(want)), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("moemesh_expert_bad_requests_total{reason=\"bad_hidden\"} 1"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("moemesh_expert_bad_requests_total{reason=\"unknown_expert\"} 1"), std::string::npos);
  EXPECT_NE(metrics.find("moemesh_expert_requests_total 1"), std::string::npos);
  EXPECT_NE(http_get(std::stoi(admin), "/readyz").find("200 OK"), std::string::npos);

  p->signal(SIGTERM);
  EXPECT_EQ(p->wait_exit(), 0) << p->output();
}

TEST_F(ExpertProcess, BadFlagsFailWithOneReadableLine) {
  auto p = start("0:9");
  EXPECT_EQ(p->wait_exit(), 1);
  EXPECT_NE(p->output().find("moemesh-expert: --experts: bad item \"0:9\": expert 9 is out of range"),
            std::string::npos)
      << p->output();
  auto q = start("");
  EXPECT_EQ(q->wait_exit(), 1);
  EXPECT_NE(q->output().find("--experts is required"), std::string::npos) << q->output();
}

TEST_F(ExpertProcess, AKilledHostsExpertsAreServedByItsReplica) {
  auto a = start("all"), b = start("all");
  const std::string ea = a->wait_for(R"(listening on (tcp://\S+))"), eb = b->wait_for(R"(listening on (tcp://\S+))");
  ASSERT_FALSE(ea.empty()) << a->output();
  ASSERT_FALSE(eb.empty()) << b->output();
  auto ckpt = Checkpoint::open(tiny->path());
  const ModelConfig& c = ckpt->config();
  ModelWeights all = ckpt->load();
  LocalExpertExecutor local(all);

  caf::actor_system sys{moemesh::testing::two_thread_config()};
  actors::RemoteExpertsOptions o;
  o.deadline = std::chrono::milliseconds(2000);
  actors::RemoteExpertExecutor remote(sys, o);
  const ExpertSet every = all_experts(c);
  remote.set_placement({1, {{"a", ea, every}, {"b", eb, every}}});

  std::mt19937 rng(8);
  auto check = [&](int64_t layer) {
    const int64_t rows = 24;
    auto h = random_rows(size_t(rows * c.hidden_size), uint32_t(rng()));
    auto logits = random_rows(size_t(rows * c.num_experts), uint32_t(rng()));
    Routing routing = route_from_logits(c, logits.data(), rows);
    auto groups = group_by_expert(routing);
    std::vector<std::vector<float>> got, want;
    remote.run(layer, h.data(), c.hidden_size, groups, got);
    local.run(layer, h.data(), c.hidden_size, groups, want);
    ASSERT_EQ(got.size(), want.size());
    for (size_t g = 0; g < got.size(); ++g) {
      ASSERT_EQ(got[g].size(), want[g].size());
      for (size_t i = 0; i < got[g].size(); ++i)
        ASSERT_NEAR(got[g][i], want[g][i], 1e-6 * std::max(1.0f, std::abs(want[g][i]))) << "group " << g;
    }
  };
  check(0);
  b->signal(SIGKILL);
  b->wait_exit();
  const auto t0 = std::chrono::steady_clock::now();
  check(1);  // b's connection dropped: its share goes to a at once, not after the 2 s deadline
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(1000));
  check(0);
  // At most the request in flight when the drop was seen failed; then b is known down.
  EXPECT_LE(remote.stats().host_failures.load(), 1u);
  EXPECT_TRUE(remote.disconnected(eb));
  EXPECT_TRUE(a->running());
}
