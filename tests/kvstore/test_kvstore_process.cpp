// The real moemesh-kvstore binary on loopback, driven over ZeroMQ like an attention worker
// would: put/get/evict, garbage of every kind (random bytes, truncated frames, wrong version,
// wrong kind, bad metadata, missing tensor frames) answered with error replies while the
// process stays up and keeps answering correctly, metrics on /metrics, and SIGTERM -> exit 0;
// with a disk tier, blocks kept across a restart and a corrupt file counted, never served.
#include <gtest/gtest.h>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <thread>

#include <zmq.hpp>

#include "core/prefix_hash.h"
#include "proto/control.pb.h"
#include "core/wire.h"
#include "proto/dataplane.pb.h"
#include "tests/support/http_client.h"

extern char** environ;

using namespace moemesh;

namespace {

using moemesh::testing::free_port;
using moemesh::testing::http_get;  // on the admin port; status 0 when nothing answers (yet)

struct Reply {
  wire::Header header;
  std::vector<zmq::message_t> tensors;
};

class KvStoreProcess : public ::testing::Test {
 protected:
  static constexpr uint64_t kBlockBytes = 80 << 10;  // over the store's zero-copy threshold
  static constexpr uint64_t kBudget = 4 * kBlockBytes;

  void SetUp() override {
    kv_port_ = free_port();
    admin_port_ = free_port();
    endpoint_ = "tcp://127.0.0.1:" + std::to_string(kv_port_);
    start();
    sock_.set(zmq::sockopt::linger, 0);
    sock_.set(zmq::sockopt::rcvtimeo, 10000);
    sock_.connect(endpoint_);
  }

  void TearDown() override { stop(); }

  // Starts the store on the ports picked in SetUp and waits until it is ready.
  void start() {
    std::vector<std::string> args = {MOEMESH_KVSTORE,
                                     "--listen", endpoint_,
                                     "--admin-address", "127.0.0.1",
                                     "--admin-port", std::to_string(admin_port_),
                                     "--budget-bytes", std::to_string(kBudget),
                                     "--log-level", "warn",
                                     "--instance", "kv-test"};
    for (auto& a : extra_args()) args.push_back(a);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ASSERT_EQ(posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ), 0) << "cannot start " << argv[0];

    bool ready = false;
    for (int i = 0; i < 400 && !ready; ++i) {
      ready = http_get(admin_port_, "/readyz").first == 200;
      if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(25));
      ASSERT_TRUE(alive()) << "moemesh-kvstore exited during startup";
    }
    ASSERT_TRUE(ready) << "moemesh-kvstore never became ready";
  }

  // SIGTERM, and expects a clean exit within 10 s.
  void stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    int status = 0;
    bool exited = false;
    for (int i = 0; i < 1000 && !exited; ++i) {
      exited = waitpid(pid_, &status, WNOHANG) == pid_;
      if (!exited) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (!exited) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      ADD_FAILURE() << "moemesh-kvstore ignored SIGTERM";
      return;
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "exit status " << status;
    pid_ = -1;
  }

  virtual std::vector<std::string> extra_args() { return {}; }
  bool alive() { return waitpid(pid_, nullptr, WNOHANG) == 0; }

  void send(std::vector<std::string> frames) {
    for (size_t i = 0; i < frames.size(); ++i)
      sock_.send(zmq::buffer(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
  }

  Reply recv() {
    std::vector<zmq::message_t> frames;
    do {
      zmq::message_t m;
      if (!sock_.recv(m)) throw std::runtime_error("no reply from moemesh-kvstore within 10 s");
      frames.push_back(std::move(m));
    } while (frames.back().more());
    std::vector<wire::Frame> spans;
    for (auto& f : frames) spans.emplace_back(static_cast<const uint8_t*>(f.data()), f.size());
    Reply r{wire::decode(spans), {}};
    for (size_t i = 1; i < frames.size(); ++i) r.tensors.push_back(std::move(frames[i]));
    return r;
  }

  static std::string header(wire::Kind kind, uint64_t id, const std::string& meta,
                            std::vector<wire::TensorDesc> tensors = {}) {
    wire::Header h;
    h.kind = kind;
    h.request_id = id;
    h.meta = meta;
    h.tensors = std::move(tensors);
    auto bytes = wire::encode_header(h);
    return {bytes.begin(), bytes.end()};
  }

  static std::vector<BlockKey> keys(size_t n, int32_t start = 0) {
    std::vector<int32_t> t(n * kBlockTokens);
    std::iota(t.begin(), t.end(), start);
    return prefix_block_keys("test-model", t);
  }

  static std::string block_bytes(size_t i) { return std::string(kBlockBytes, char('a' + i)); }

  Reply put(uint64_t id, const std::vector<BlockKey>& ks, size_t first_fill = 0) {
    pb::KvPut meta;
    meta.set_model_id("test-model");
    std::vector<wire::TensorDesc> descs;
    std::vector<std::string> frames = {""};
    for (size_t i = 0; i < ks.size(); ++i) {
      *meta.add_keys() = ks[i].to_bytes();
      descs.push_back({DType::F32, {2, 2, 16, int64_t(kBlockBytes / 4 / 64)}});
      frames.push_back(block_bytes(first_fill + i));
    }
    frames[0] = header(wire::Kind::KvPut, id, meta.SerializeAsString(), descs);
    send(frames);
    return recv();
  }

  Reply get(uint64_t id, const std::vector<BlockKey>& ks) {
    pb::KvGet meta;
    meta.set_model_id("test-model");
    for (const auto& k : ks) *meta.add_keys() = k.to_bytes();
    send({header(wire::Kind::KvGet, id, meta.SerializeAsString())});
    return recv();
  }

  // Expects an Error reply with this request id and code.
  void expect_error(const Reply& r, uint64_t id, const std::string& code) {
    ASSERT_EQ(r.header.kind, wire::Kind::Error);
    EXPECT_EQ(r.header.request_id, id);
    pb::ErrorReply err;
    ASSERT_TRUE(err.ParseFromString(r.header.meta));
    EXPECT_EQ(err.code(), code) << err.message();
    EXPECT_FALSE(err.message().empty());
    EXPECT_TRUE(r.tensors.empty());
  }

  std::string metrics() { return http_get(admin_port_, "/metrics").second; }

  pid_t pid_ = -1;
  uint16_t kv_port_ = 0, admin_port_ = 0;
  std::string endpoint_;
  zmq::context_t ctx_{1};
  zmq::socket_t sock_{ctx_, zmq::socket_type::dealer};
};

}  // namespace

TEST_F(KvStoreProcess, PutThenGetTheLongestPrefix) {
  auto ks = keys(5);
  Reply ack = put(11, {ks[0], ks[1], ks[2]});
  ASSERT_EQ(ack.header.kind, wire::Kind::KvPut);
  EXPECT_EQ(ack.header.request_id, 11u);
  EXPECT_TRUE(ack.tensors.empty());
  pb::KvPut acked;
  ASSERT_TRUE(acked.ParseFromString(ack.header.meta));
  EXPECT_EQ(acked.keys_size(), 3);

  Reply r = get(12, ks);  // blocks 3 and 4 were never stored
  ASSERT_EQ(r.header.kind, wire::Kind::KvGetReply);
  EXPECT_EQ(r.header.request_id, 12u);
  pb::KvGetReply meta;
  ASSERT_TRUE(meta.ParseFromString(r.header.meta));
  EXPECT_EQ(meta.found(), 3);
  ASSERT_EQ(r.tensors.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(r.tensors[i].to_string(), block_bytes(i)) << i;
    EXPECT_EQ(r.header.tensors[i].dtype, DType::F32);
    EXPECT_EQ(r.header.tensors[i].shape, (std::vector<int64_t>{2, 2, 16, int64_t(kBlockBytes / 4 / 64)}));
  }
  // A chain that starts with an absent block finds nothing.
  Reply none = get(13, {ks[3], ks[0]});
  ASSERT_TRUE(meta.ParseFromString(none.header.meta));
  EXPECT_EQ(meta.found(), 0);
  EXPECT_TRUE(none.tensors.empty());

  std::string m = metrics();
  EXPECT_NE(m.find("moemesh_kvstore_blocks{tier=\"memory\"} 3"), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_bytes{tier=\"memory\"} " + std::to_string(3 * kBlockBytes)), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_hits_total{tier=\"memory\"} 3"), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_misses_total 4"), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_get_duration_seconds_count 2"), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_put_duration_seconds_count 1"), std::string::npos) << m;
}

TEST_F(KvStoreProcess, EvictsLeastRecentlyUsedBeyondTheBudget) {
  auto ks = keys(6);
  put(1, {ks[0], ks[1], ks[2], ks[3]});  // the budget holds exactly four
  get(2, {ks[0]});                         // ks[0] is now the most recently used
  put(3, {ks[4], ks[5]}, 4);               // evicts ks[1] and ks[2]
  pb::KvGetReply meta;
  auto found = [&](const BlockKey& k) {
    Reply r = get(9, {k});
    EXPECT_TRUE(meta.ParseFromString(r.header.meta));
    return meta.found() == 1;
  };
  EXPECT_TRUE(found(ks[0]));
  EXPECT_FALSE(found(ks[1]));
  EXPECT_FALSE(found(ks[2]));
  EXPECT_TRUE(found(ks[3]));
  EXPECT_TRUE(found(ks[5]));
  Reply r = get(10, {ks[4]});
  ASSERT_EQ(r.tensors.size(), 1u);
  EXPECT_EQ(r.tensors[0].to_string(), block_bytes(4));
  std::string m = metrics();
  EXPECT_NE(m.find("moemesh_kvstore_evictions_total{tier=\"memory\"} 2"), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_bytes{tier=\"memory\"} " + std::to_string(kBudget)), std::string::npos) << m;
}

TEST_F(KvStoreProcess, GarbageGetsErrorRepliesAndTheStoreStaysUp) {
  auto ks = keys(2);
  put(1, {ks[0]});
  const std::string valid_get = [&] {
    pb::KvGet g;
    *g.add_keys() = ks[0].to_bytes();
    return header(wire::Kind::KvGet, 77, g.SerializeAsString());
  }();

  send({""});  // an empty frame
  expect_error(recv(), 0, "truncated");
  send({"random bytes, not a moemesh frame at all......"});
  expect_error(recv(), 0, "bad_magic");
  send({valid_get.substr(0, 20)});  // truncated inside the fixed prefix
  expect_error(recv(), 0, "truncated");
  send({valid_get.substr(0, valid_get.size() - 3)});  // metadata cut short
  expect_error(recv(), 0, "truncated");
  std::string wrong_version = valid_get;
  wrong_version[4] = 9;
  send({wrong_version});
  expect_error(recv(), 0, "bad_version");
  std::string wrong_kind = valid_get;
  wrong_kind[6] = 99;
  send({wrong_kind});
  expect_error(recv(), 0, "bad_kind");

  // Readable headers: the error carries the request id.
  send({header(wire::Kind::KvGet, 21, "\xff\xff\xff not protobuf")});
  expect_error(recv(), 21, "bad_meta");
  send({header(wire::Kind::StepRequest, 22, "")});
  expect_error(recv(), 22, "bad_request");
  pb::KvPut two_keys;
  *two_keys.add_keys() = ks[0].to_bytes();
  *two_keys.add_keys() = ks[1].to_bytes();
  send({header(wire::Kind::KvPut, 23, two_keys.SerializeAsString(), {{DType::F32, {4}}}), std::string(16, 'x')});
  expect_error(recv(), 23, "bad_request");  // two keys, one tensor
  send({header(wire::Kind::KvPut, 24, two_keys.SerializeAsString(), {{DType::F32, {4}}, {DType::F32, {4}}}),
        std::string(16, 'x')});
  expect_error(recv(), 24, "bad_frame_count");  // a declared tensor frame is missing
  send({header(wire::Kind::KvPut, 25, two_keys.SerializeAsString(), {{DType::F32, {4}}, {DType::F32, {4}}}),
        std::string(16, 'x'), std::string(15, 'x')});
  expect_error(recv(), 25, "truncated");  // a frame shorter than its shape says
  pb::KvGet short_key;
  short_key.add_keys("abc");
  send({header(wire::Kind::KvGet, 26, short_key.SerializeAsString())});
  expect_error(recv(), 26, "bad_key");

  // Random messages: every one gets an error reply.
  std::mt19937 rng(1234);
  for (int i = 0; i < 200; ++i) {
    std::vector<std::string> frames(1 + rng() % 3);
    for (auto& f : frames) {
      f.resize(rng() % 120);
      for (auto& c : f) c = char(rng());
    }
    send(frames);
    EXPECT_EQ(recv().header.kind, wire::Kind::Error) << i;
  }
  // Valid prefix, random rest: whatever the reply, there is one, and the process lives.
  for (int i = 0; i < 200; ++i) {
    std::string f = valid_get;
    for (size_t j = 8; j < f.size(); ++j)
      if (rng() % 4 == 0) f[j] = char(rng());
    send({f});
    (void)recv();
  }
  ASSERT_TRUE(alive());

  // Still answering correctly.
  send({valid_get});
  Reply r = recv();
  ASSERT_EQ(r.header.kind, wire::Kind::KvGetReply);
  EXPECT_EQ(r.header.request_id, 77u);
  ASSERT_EQ(r.tensors.size(), 1u);
  EXPECT_EQ(r.tensors[0].to_string(), block_bytes(0));

  std::string m = metrics();
  EXPECT_NE(m.find("moemesh_kvstore_bad_frames_total{reason=\"bad_version\"} 1"), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_bad_frames_total{reason=\"bad_key\"} 1"), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_bad_frames_total{reason=\"bad_magic\"}"), std::string::npos) << m;
}

TEST_F(KvStoreProcess, AdminEndpoints) {
  EXPECT_EQ(http_get(admin_port_, "/healthz").first, 200u);
  EXPECT_EQ(http_get(admin_port_, "/readyz").first, 200u);
  std::string m = metrics();
  EXPECT_NE(m.find("moemesh_build_info{"), std::string::npos);
  EXPECT_NE(m.find("moemesh_kvstore_budget_bytes{tier=\"memory\"} " + std::to_string(kBudget)), std::string::npos) << m;
  EXPECT_NE(m.find("process_resident_memory_bytes"), std::string::npos);
  EXPECT_EQ(m.find("tier=\"disk\""), std::string::npos) << "no disk tier, no disk series\n" << m;
}

namespace {
// With --router the store registers with the coordinator (a ROUTER of the test) and heartbeats.
class KvStoreWithCoordinator : public KvStoreProcess {
 protected:
  KvStoreWithCoordinator() {
    coord_.set(zmq::sockopt::linger, 0);
    coord_.set(zmq::sockopt::rcvtimeo, 10000);
    coord_.bind("tcp://127.0.0.1:*");
  }
  std::vector<std::string> extra_args() override {
    return {"--router", coord_.get(zmq::sockopt::last_endpoint), "--heartbeat-ms", "20"};
  }
  pb::ControlMessage next(std::string& peer) {
    zmq::message_t id, body;
    if (!coord_.recv(id)) throw std::runtime_error("nothing from the store within 10 s");
    (void)coord_.recv(body);
    peer = id.to_string();
    pb::ControlMessage m;
    EXPECT_TRUE(m.ParseFromArray(body.data(), int(body.size())));
    return m;
  }
  zmq::context_t coord_ctx_{1};
  zmq::socket_t coord_{coord_ctx_, zmq::socket_type::router};
};
}  // namespace

TEST_F(KvStoreWithCoordinator, RegistersAsKvStoreAndReportsItsBytes) {
  std::string peer;
  auto reg = next(peer);
  ASSERT_TRUE(reg.has_register_());
  EXPECT_EQ(reg.register_().role(), pb::KVSTORE);
  EXPECT_EQ(reg.register_().instance(), "kv-test");
  EXPECT_EQ(reg.register_().data_endpoint(), endpoint_);
  pb::ControlMessage ok;
  ok.mutable_register_reply()->set_ok(true);
  std::string bytes = ok.SerializeAsString();
  coord_.send(zmq::buffer(peer), zmq::send_flags::sndmore);
  coord_.send(zmq::buffer(bytes), zmq::send_flags::none);

  put(1, keys(2));
  bool reported = false;
  for (int i = 0; i < 500 && !reported; ++i) {
    auto m = next(peer);
    reported = m.has_heartbeat() && m.heartbeat().resident_bytes() == 2 * kBlockBytes;
  }
  EXPECT_TRUE(reported) << "no heartbeat reported the stored bytes";
}

namespace {
// With a disk tier: blocks evicted from memory go to files, and a restart on the same directory
// keeps serving everything put before it (the memory tier is written out on SIGTERM).
class KvStoreWithDisk : public KvStoreProcess {
 protected:
  ~KvStoreWithDisk() override { std::filesystem::remove_all(dir_); }
  std::vector<std::string> extra_args() override {
    return {"--disk-dir", dir_.string(), "--disk-budget-bytes", std::to_string(16 * kBlockBytes)};
  }
  size_t block_files() const {
    size_t n = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) n += e.path().extension() == ".kvb";
    return n;
  }
  const std::filesystem::path dir_ = std::filesystem::temp_directory_path() /
                                     ("moemesh-kvdisk-proc-" + std::to_string(getpid()) + "-" +
                                      std::to_string(std::random_device{}()));
};
}  // namespace

TEST_F(KvStoreWithDisk, ServesEvictedBlocksFromDiskAndKeepsThemAcrossARestart) {
  auto ks = keys(6);
  put(1, ks);  // the memory budget holds four: ks[0] and ks[1] go to disk
  EXPECT_EQ(block_files(), 2u);
  std::string m = metrics();
  EXPECT_NE(m.find("moemesh_kvstore_blocks{tier=\"disk\"} 2"), std::string::npos) << m;
  EXPECT_NE(m.find("moemesh_kvstore_budget_bytes{tier=\"disk\"} " + std::to_string(16 * kBlockBytes)),
            std::string::npos) << m;

  stop();
  EXPECT_EQ(block_files(), 6u) << "the memory tier is written out on SIGTERM";
  start();
  ASSERT_TRUE(alive());

  Reply r = get(2, ks);
  ASSERT_EQ(r.header.kind, wire::Kind::KvGetReply);
  pb::KvGetReply meta;
  ASSERT_TRUE(meta.ParseFromString(r.header.meta));
  ASSERT_EQ(meta.found(), 6);
  ASSERT_EQ(r.tensors.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(r.tensors[i].to_string(), block_bytes(i)) << i;
    EXPECT_EQ(r.header.tensors[i].shape, (std::vector<int64_t>{2, 2, 16, int64_t(kBlockBytes / 4 / 64)}));
  }
  m = metrics();
  EXPECT_NE(m.find("moemesh_kvstore_hits_total{tier=\"disk\"} 6"), std::string::npos) << m;
  EXPECT_EQ(m.find("moemesh_kvstore_disk_errors_total"), std::string::npos) << m;
}

TEST_F(KvStoreWithDisk, ACorruptFileIsCountedAndNotServedAfterARestart) {
  auto ks = keys(2);
  put(1, ks);
  stop();
  ASSERT_EQ(block_files(), 2u);
  {  // flip a payload byte of the first block
    std::fstream io(dir_ / (ks[0].hex() + ".kvb"), std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(-1, std::ios::end);
    io.put('!');
  }
  start();
  Reply r = get(2, ks);
  pb::KvGetReply meta;
  ASSERT_TRUE(meta.ParseFromString(r.header.meta));
  EXPECT_EQ(meta.found(), 0);
  EXPECT_EQ(block_files(), 1u);
  std::string m = metrics();
  EXPECT_NE(m.find("moemesh_kvstore_disk_errors_total{reason=\"checksum\"} 1"), std::string::npos) << m;
}
