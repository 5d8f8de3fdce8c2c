// The router's scheduler against fake attention workers: plain ROUTER sockets on loopback, driven
// by the test thread, that speak the step protocol (wire header + pb::StepRequest/StepResponse)
// and "sample" a token that is a hash of the sequence's context, so any resend of the wrong
// context changes the output. Chunked prefill under the step budget with decode first, stop
// conditions, token-fair and priority admission, waiting for KV room, refusals, resumption on
// another worker when one fails, cancellation.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <zmq_addon.hpp>

#include "actors/dispatch_frames.h"
#include "actors/scheduler.h"
#include "actors/step_server.h"
#include "core/wire.h"
#include "proto/dataplane.pb.h"
#include "tests/support/actor_config.h"
#include "tests/support/eventually.h"
#include "tests/support/metrics_text.h"

using namespace moemesh;
using namespace moemesh::actors;
using namespace std::chrono_literals;

namespace {

using moemesh::testing::eventually;
using moemesh::testing::series_value;
using moemesh::testing::two_thread_config;

// What a fake worker holds of one sequence.
struct FakeSeq {
  std::vector<int32_t> prompt;   // as the first chunk declared it
  std::vector<int32_t> context;  // every token it was sent since its first chunk
  int sampled = 0;
};
using TokenFn = std::function<int32_t(const FakeSeq&)>;

// The default "model": a hash of the context, in [10, 90) (clear of the EOS ids the tests use).
int32_t context_hash(const FakeSeq& s) {
  uint32_t h = 2166136261u;
  for (int32_t t : s.context) h = (h ^ uint32_t(t)) * 16777619u;
  return int32_t(10 + h % 80);
}

// What context_hash gives a healthy worker for `prompt`, token by token.
std::vector<int32_t> expected_tokens(const std::vector<int32_t>& prompt, int n) {
  FakeSeq s{prompt, prompt};
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) s.context.push_back(out.emplace_back(context_hash(s)));
  return out;
}

struct Step {
  std::string peer;  // the scheduler's routing id
  uint64_t id = 0;
  pb::StepRequest req;
};

// An attention worker's step socket, driven by the test thread.
class FakeAttentionWorker {
 public:
  explicit FakeAttentionWorker(std::string instance, int64_t kv_blocks = 0)
      : instance_(std::move(instance)), kv_blocks_(kv_blocks) {
    router_.set(zmq::sockopt::linger, 0);
    router_.bind("tcp://127.0.0.1:*");
    endpoint_ = router_.get(zmq::sockopt::last_endpoint);
  }

  AttentionWorker info() const { return {instance_, endpoint_, kv_blocks_, kv_blocks_, true}; }

  // The next StepRequest within `limit` (free-only ones included); none when nothing came.
  std::optional<Step> next_step(std::chrono::milliseconds limit = 5s) {
    router_.set(zmq::sockopt::rcvtimeo, int(limit.count()));
    Frames frames;
    if (!zmq::recv_multipart(router_, std::back_inserter(frames))) return std::nullopt;
    EXPECT_EQ(frames.size(), 2u) << "[routing id, header]";
    const wire::Header h = wire::decode(frame_views(frames, 1));
    EXPECT_EQ(h.kind, wire::Kind::StepRequest);
    Step s{frames[0].to_string(), h.request_id, {}};
    EXPECT_TRUE(s.req.ParseFromString(h.meta));
    EXPECT_EQ(s.req.step(), s.id);
    log.push_back(s.req);
    return s;
  }

  // Runs the step as a worker would: creates, extends and frees sequences, samples with `fn`.
  void answer(const Step& step, const TokenFn& fn = context_hash) {
    pb::StepResponse resp;
    resp.set_step(step.id);
    for (uint64_t id : step.req.free()) {
      seqs.erase(id);
      freed.insert(id);
    }
    for (const auto& w : step.req.work()) {
      FakeSeq& s = seqs[w.seq()];
      if (w.is_first()) s = {{w.prompt().begin(), w.prompt().end()}, {}, 0};
      s.context.insert(s.context.end(), w.tokens().begin(), w.tokens().end());
      auto* r = resp.add_results();
      r->set_seq(w.seq());
      r->set_logits_tensor(-1);
      r->set_token(w.sample() ? fn(s) : -1);
      if (w.sample()) ++s.sampled;
    }
    send(message_frames(step.peer, wire::Kind::StepResponse, step.id, resp.SerializeAsString(), {}));
  }

  void answer_error(const Step& step, const std::string& message) {
    send(error_frames(step.peer, step.id, "internal", message));
  }

  // Answers every step until `done` holds; false if it did not within `limit`.
  template <class Done>
  bool serve_until(Done done, std::chrono::milliseconds limit = 5s) {
    return eventually(
        [&] {
          if (auto s = next_step(5ms)) answer(*s);
          return done();
        },
        limit);
  }

  std::vector<pb::StepRequest> log;  // every StepRequest received, in order
  std::map<uint64_t, FakeSeq> seqs;  // sequences it holds
  std::set<uint64_t> freed;          // sequences the scheduler freed

 private:
  void send(const FramesPtr& frames) {
    for (size_t i = 0; i < frames->size(); ++i)
      router_.send((*frames)[i], i + 1 < frames->size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
  }

  std::string instance_;
  int64_t kv_blocks_;
  zmq::context_t ctx_{1};
  zmq::socket_t router_{ctx_, zmq::socket_type::router};
  std::string endpoint_;
};

// Where `seq` is in a step's work; -1 when absent.
int index_of(const pb::StepRequest& req, uint64_t seq) {
  for (int i = 0; i < req.work_size(); ++i)
    if (req.work(i).seq() == seq) return i;
  return -1;
}

int64_t step_tokens(const pb::StepRequest& req) {
  int64_t n = 0;
  for (const auto& w : req.work()) n += w.tokens_size();
  return n;
}

bool ready(const std::future<GenerationResultPtr>& f) { return f.wait_for(0s) == std::future_status::ready; }

bool all_ready(const std::vector<std::future<GenerationResultPtr>>& fs) {
  return std::all_of(fs.begin(), fs.end(), [](const auto& f) { return ready(f); });
}

constexpr int32_t kBlockerTag = 999;

// The tags (first prompt token) of the requests a worker was sent, in admission order, but for
// the blocker of occupy_the_only_slot.
std::vector<int32_t> admission_order(const FakeAttentionWorker& w) {
  std::vector<int32_t> tags;
  for (const auto& req : w.log)
    for (const auto& wk : req.work())
      if (wk.is_first() && wk.prompt(0) != kBlockerTag) tags.push_back(wk.prompt(0));
  return tags;
}

// What a listener was streamed, by request index.
struct Streamed {
  std::mutex mu;
  std::map<int, std::vector<int32_t>> tokens;
  std::vector<int32_t> of(int index) {
    std::lock_guard<std::mutex> lk(mu);
    return tokens[index];
  }
  // The listener is another actor than the one the result goes to, so its last tokens may still be
  // in its mailbox when the result arrives: wait for `n` of them (or 5 s) before reading.
  std::vector<int32_t> once_it_has(int index, size_t n) {
    eventually([&] { return of(index).size() >= n; }, std::chrono::seconds(5));
    return of(index);
  }
};

GenerationRequest request(std::vector<int32_t> prompt, int64_t max_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.sampling.seed = 7;
  return r;
}

// A prompt of `n` tokens whose first one names the request (the fake sees only sequence ids).
std::vector<int32_t> tagged_prompt(int32_t tag, size_t n) {
  std::vector<int32_t> p(n);
  for (size_t i = 0; i < n; ++i) p[i] = i == 0 ? tag : int32_t(i);
  return p;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void TearDown() override {
    for (const auto& a : helpers_) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
    if (sched_) caf::anon_send_exit(sched_, caf::exit_reason::user_shutdown);
    bridge_.stop();
  }

  // The scheduler, told of `workers` when there are any.
  void start(SchedulerConfig cfg, const std::vector<const FakeAttentionWorker*>& workers) {
    cfg.instance = "router-test";
    metrics_ = cfg.metrics = std::make_shared<prometheus::Registry>();
    bridge_.start();
    sched_ = spawn_scheduler(sys_, bridge_, std::move(cfg));
    if (!workers.empty()) announce(workers);
  }

  // The coordinator's list of ready workers; processed when this returns.
  void announce(const std::vector<const FakeAttentionWorker*>& workers) {
    auto list = std::make_shared<std::vector<AttentionWorker>>();
    for (const auto* w : workers) list->push_back(w->info());
    caf::scoped_actor self{sys_};
    self->send(sched_, workers_atom::value, WorkerList(std::move(list)));
    stats_from(self);  // same sender: answered after the list was applied
  }

  void cancel(const caf::actor& listener, int index) {
    caf::scoped_actor self{sys_};
    self->send(sched_, gen_cancel_atom::value, listener, index);
    stats_from(self);
  }

  // Sends the request from an actor of its own; the future holds the result when it ends.
  std::future<GenerationResultPtr> submit(GenerationRequest r) {
    auto done = std::make_shared<std::promise<GenerationResultPtr>>();
    auto req = std::make_shared<const GenerationRequest>(std::move(r));
    // State as spawn arguments, not captures: CAF 0.17 trips UBSan on argument-less function actors.
    helpers_.push_back(sys_.spawn(
        [](caf::event_based_actor* self, std::shared_ptr<std::promise<GenerationResultPtr>> done,
           GenerationRequestPtr req, caf::actor sched) {
          self->request(sched, caf::infinite, generate_atom::value, req)
              .then([done](GenerationResultPtr res) { done->set_value(std::move(res)); },
                    [done, self](caf::error& e) {
                      auto res = std::make_shared<GenerationResult>();
                      res->finish_reason = "actor error: " + self->system().render(e);
                      done->set_value(std::move(res));
                    });
        },
        done, GenerationRequestPtr(req), sched_));
    return done->get_future();
  }

  // Records the tokens streamed to it.
  caf::actor listener(std::shared_ptr<Streamed> log) {
    auto a = sys_.spawn(
        [](caf::event_based_actor*, std::shared_ptr<Streamed> log) -> caf::behavior {
          return {[log](gen_token_atom, TokenEventPtr ev) {
            std::lock_guard<std::mutex> lk(log->mu);
            log->tokens[ev->index].push_back(ev->token);
          }};
        },
        log);
    helpers_.push_back(a);
    return a;
  }

  nlohmann::json stats() {
    caf::scoped_actor self{sys_};
    return stats_from(self);
  }

  // Waits until the scheduler holds this many waiting and running requests.
  bool holds(size_t waiting, size_t running) {
    return eventually(
        [&] {
          const auto s = stats();
          return s["waiting"] == waiting && s["running"] == running;
        },
        5s);
  }

  // Starts the scheduler with one worker that runs one sequence at a time, kept busy by a first
  // request whose step is returned unanswered: what is submitted next waits in the queue.
  std::optional<Step> occupy_the_only_slot(FakeAttentionWorker& w) {
    SchedulerConfig cfg;
    cfg.max_running_per_worker = 1;
    start(cfg, {&w});
    submit(request({kBlockerTag, 1}, 1));
    return w.next_step();
  }

  double preemptions(const std::string& reason) {
    return series_value(*metrics_, "moemesh_router_preemptions_total", {{"reason", reason}});
  }

  caf::actor_system sys_{two_thread_config()};
  ZmqBridge bridge_{sys_};
  caf::actor sched_;
  std::shared_ptr<prometheus::Registry> metrics_;

 private:
  nlohmann::json stats_from(caf::scoped_actor& self) {
    std::string out = "{}";
    self->request(sched_, 5s, sched_stats_atom::value)
        .receive([&](const std::string& s) { out = s; },
                 [&](caf::error& e) { ADD_FAILURE() << "stats: " << sys_.render(e); });
    return nlohmann::json::parse(out);
  }

  std::vector<caf::actor> helpers_;
};

}  // namespace

// A long prompt goes out in chunks that fill what the step budget leaves after the decode tokens
// of running sequences, which come first; only the last chunk samples. Tokens are appended and the
// finished sequence is freed on the worker.
TEST_F(SchedulerTest, PrefillIsChunkedUnderTheStepBudgetAndDecodeGoesFirst) {
  FakeAttentionWorker w("attn-0");
  SchedulerConfig cfg;
  cfg.step_token_budget = 8;
  start(cfg, {&w});

  GenerationRequest short_req = request({1001, 1, 2, 3}, 3);
  auto a = submit(short_req);
  auto step = w.next_step();
  ASSERT_TRUE(step);
  ASSERT_EQ(step->req.work_size(), 1);
  const uint64_t seq_a = step->req.work(0).seq();

  GenerationRequest long_req = request(tagged_prompt(2002, 20), 2);
  long_req.cache_salt = "tenant-salt";
  long_req.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  auto b = submit(long_req);
  ASSERT_TRUE(holds(0, 2));  // placed while the first step is in flight
  w.answer(*step);
  ASSERT_TRUE(w.serve_until([&] { return ready(a) && ready(b) && w.freed.size() == 2; }));

  std::vector<int> chunks;  // the long prompt's chunk sizes
  std::vector<int32_t> sent;
  uint64_t seq_b = 0;
  for (const auto& req : w.log) {
    EXPECT_LE(step_tokens(req), 8) << "step " << req.step();
    for (int i = 0; i < req.work_size(); ++i) {
      const auto& wk = req.work(i);
      if (wk.seq() == seq_a) continue;
      seq_b = wk.seq();
      if (wk.sample() && int(sent.size()) == 20) continue;  // decode
      EXPECT_LT(index_of(req, seq_a), i) << "a decode token after a prefill chunk";
      EXPECT_EQ(wk.is_first(), sent.empty());
      EXPECT_EQ(wk.prompt_size(), sent.empty() ? 20 : 0) << "the whole prompt with the first chunk only";
      EXPECT_EQ(wk.cache_salt(), sent.empty() ? "tenant-salt" : "");
      EXPECT_EQ(wk.traceparent(), sent.empty() ? long_req.traceparent : "");
      if (wk.is_first()) {
        EXPECT_EQ(wk.sampling().seed(), 7u);
      }
      chunks.push_back(wk.tokens_size());
      sent.insert(sent.end(), wk.tokens().begin(), wk.tokens().end());
      EXPECT_EQ(wk.sample(), sent.size() == 20) << "only the last chunk samples";
    }
  }
  EXPECT_EQ(sent, long_req.prompt);
  EXPECT_EQ(chunks, (std::vector<int>{7, 7, 6})) << "8 minus the other sequence's decode token, then the rest";

  const auto ra = a.get(), rb = b.get();
  EXPECT_EQ(ra->tokens, expected_tokens(short_req.prompt, 3));
  EXPECT_EQ(ra->finish_reason, "length");
  EXPECT_EQ(ra->worker, "attn-0");
  EXPECT_EQ(ra->logprobs.size(), 3u);
  EXPECT_EQ(rb->tokens, expected_tokens(long_req.prompt, 2));
  EXPECT_EQ(rb->finish_reason, "length");
  EXPECT_EQ(w.freed, (std::set<uint64_t>{seq_a, seq_b}));
  EXPECT_TRUE(w.seqs.empty());
}

// A sequence ends at a model EOS id (unless ignore_eos) or at one of its own stop ids, the token
// included, and otherwise at max_tokens.
TEST_F(SchedulerTest, FinishesAtEosAStopIdOrMaxTokens) {
  FakeAttentionWorker w("attn-0");
  SchedulerConfig cfg;
  cfg.eos_ids = {2, 3};
  start(cfg, {&w});
  const std::vector<int32_t> script = {50, 51, 3, 52, 53, 54};
  const TokenFn scripted = [&](const FakeSeq& s) { return script.at(size_t(s.sampled)); };

  auto eos = submit(request({1, 9, 9}, 10));
  GenerationRequest ignore = request({2, 9, 9}, 5);
  ignore.sampling.ignore_eos = true;
  auto ignored = submit(ignore);
  GenerationRequest stop = request({3, 9, 9}, 10);
  stop.sampling.stop_token_ids = {51};
  auto stopped = submit(stop);
  ASSERT_TRUE(eventually(
      [&] {
        if (auto s = w.next_step(5ms)) w.answer(*s, scripted);
        return ready(eos) && ready(ignored) && ready(stopped);
      },
      5s));

  const auto re = eos.get(), ri = ignored.get(), rs = stopped.get();
  EXPECT_EQ(re->tokens, (std::vector<int32_t>{50, 51, 3}));
  EXPECT_EQ(re->finish_reason, "stop");
  EXPECT_EQ(ri->tokens, (std::vector<int32_t>{50, 51, 3, 52, 53}));
  EXPECT_EQ(ri->finish_reason, "length");
  EXPECT_EQ(rs->tokens, (std::vector<int32_t>{50, 51}));
  EXPECT_EQ(rs->finish_reason, "stop");
  for (const auto& r : {re, ri, rs}) EXPECT_TRUE(r->error.empty()) << r->error;
}

// With one slot on one worker, a backlog of two tenants is admitted by token-fair shares: weight
// 3 against weight 1 gets three admissions for each of the other's.
TEST_F(SchedulerTest, TenantsAreAdmittedInProportionToTheirWeights) {
  FakeAttentionWorker w("attn-0");
  const auto first = occupy_the_only_slot(w);
  ASSERT_TRUE(first);
  std::vector<std::future<GenerationResultPtr>> all;
  for (int i = 0; i < 8; ++i) {
    GenerationRequest heavy = request({1, 5}, 1), light = request({2, 5}, 1);
    heavy.tenant = "heavy";
    heavy.weight = 3;
    light.tenant = "light";
    all.push_back(submit(heavy));
    all.push_back(submit(light));
  }
  ASSERT_TRUE(holds(16, 1));  // the whole backlog is queued before anything finishes
  w.answer(*first);
  ASSERT_TRUE(w.serve_until([&] { return all_ready(all); }));

  const auto order = admission_order(w);
  ASSERT_EQ(order.size(), 16u);
  EXPECT_EQ(std::count(order.begin(), order.begin() + 8, 1), 6) << "of the first 8 admitted";
  for (auto& f : all) EXPECT_EQ(f.get()->finish_reason, "length");
}

// Waiting requests are admitted by priority, whatever their arrival order.
TEST_F(SchedulerTest, HigherPriorityIsAdmittedFirst) {
  FakeAttentionWorker w("attn-0");
  const auto first = occupy_the_only_slot(w);
  ASSERT_TRUE(first);
  std::vector<std::future<GenerationResultPtr>> all;
  for (auto [tag, prio] : {std::pair{3, Priority::Low}, {2, Priority::Normal}, {1, Priority::High}}) {
    GenerationRequest r = request({tag, 5}, 1);
    r.priority = prio;
    all.push_back(submit(r));
  }
  ASSERT_TRUE(holds(3, 1));
  w.answer(*first);
  ASSERT_TRUE(w.serve_until([&] { return all_ready(all); }));
  EXPECT_EQ(admission_order(w), (std::vector<int32_t>{1, 2, 3})) << "high, normal, low";
}

// A request whose context does not fit the free KV blocks now waits (in the queue, not failed)
// until the running one finishes; one that no worker could ever hold is refused at once, as are
// requests without a worker, empty ones and those beyond the queue's bound.
TEST_F(SchedulerTest, ARequestWaitsForKvRoomAndImpossibleOnesAreRefused) {
  FakeAttentionWorker w("attn-0", /*kv_blocks=*/4);  // 64 tokens
  SchedulerConfig cfg;
  cfg.max_waiting = 1;
  start(cfg, {});

  const auto no_worker = submit(request({1, 2}, 2)).get();
  EXPECT_EQ(no_worker->refused_status, 503);
  EXPECT_EQ(no_worker->finish_reason, "error");
  announce({&w});
  EXPECT_EQ(submit(request({}, 2)).get()->refused_status, 400);
  EXPECT_EQ(submit(request({1}, 0)).get()->refused_status, 400);
  const auto too_big = submit(request(tagged_prompt(3, 60), 8)).get();
  EXPECT_EQ(too_big->refused_status, 400);
  EXPECT_NE(too_big->error.find("holds 64"), std::string::npos) << too_big->error;

  auto a = submit(request(tagged_prompt(1, 40), 8));  // 3 blocks
  auto first = w.next_step();
  ASSERT_TRUE(first);
  auto b = submit(request(tagged_prompt(2, 30), 4));  // 2 more blocks: 5 > 4
  ASSERT_TRUE(holds(1, 1));
  const auto overloaded = submit(request({4, 1}, 1)).get();
  EXPECT_EQ(overloaded->refused_status, 503);
  EXPECT_NE(overloaded->error.find("overloaded"), std::string::npos) << overloaded->error;

  w.answer(*first);
  ASSERT_TRUE(w.serve_until([&] { return ready(a); }));
  for (const auto& req : w.log) EXPECT_EQ(req.work_size(), 1) << "the second request ran beside the first";
  ASSERT_TRUE(w.serve_until([&] { return ready(b); }));
  EXPECT_EQ(a.get()->tokens.size(), 8u);
  const auto rb = b.get();
  EXPECT_EQ(rb->finish_reason, "length");
  EXPECT_EQ(rb->tokens, expected_tokens(tagged_prompt(2, 30), 4));
}

// Under a sliding window a sequence holds only the blocks its window sees (core/kv_cache.h): a
// request whose whole context would not fit a worker's cache is accepted and served when its
// window (plus a step's chunk) does, and refused when even that does not fit.
TEST_F(SchedulerTest, ASlidingWindowBoundsTheBlocksARequestNeeds) {
  FakeAttentionWorker w("attn-0", /*kv_blocks=*/4);  // 64 tokens
  SchedulerConfig cfg;
  cfg.sliding_window = 16;
  cfg.step_token_budget = 16;
  start(cfg, {&w});
  // 60 + 40 = 100 tokens: 7 blocks whole, 3 under the window (positions 68..99 of the last step).
  auto r = submit(request(tagged_prompt(1, 60), 40));
  ASSERT_TRUE(w.serve_until([&] { return ready(r); }));
  const auto res = r.get();
  EXPECT_EQ(res->refused_status, 0) << res->error;
  EXPECT_EQ(res->tokens, expected_tokens(tagged_prompt(1, 60), 40));
  for (const auto& req : w.log)
    for (const auto& work : req.work()) EXPECT_LE(work.tokens_size(), 16) << "a chunk over the step budget";
}

TEST_F(SchedulerTest, AWindowWiderThanTheCacheIsStillRefused) {
  FakeAttentionWorker w("attn-0", /*kv_blocks=*/4);  // 64 tokens
  SchedulerConfig cfg;
  cfg.sliding_window = 100;  // the last step sees 100 positions + its chunk: 7 blocks
  cfg.step_token_budget = 16;
  start(cfg, {&w});
  const auto refused = submit(request(tagged_prompt(2, 100), 40)).get();
  EXPECT_EQ(refused->refused_status, 400) << refused->error;
  EXPECT_NE(refused->error.find("holds 64"), std::string::npos) << refused->error;
}

// How the first worker fails while a sequence runs on it.
enum class Failure { StopsAnswering, LeavesTheList, AnswersAnError };

class SchedulerWorkerFailure : public SchedulerTest, public ::testing::WithParamInterface<Failure> {};

// The sequence resumes on the other worker by prefilling prompt + the tokens it had generated (the
// worker's sampler replays them): the output is what one healthy worker gives, and the listener is
// not streamed the first tokens again.
TEST_P(SchedulerWorkerFailure, SequencesResumeOnAnotherWorkerWithTheSameOutput) {
  FakeAttentionWorker a("attn-a", /*kv_blocks=*/64), b("attn-b", /*kv_blocks=*/32);  // a is preferred
  SchedulerConfig cfg;
  cfg.step_timeout = 200ms;
  start(cfg, {&a, &b});

  auto streamed = std::make_shared<Streamed>();
  GenerationRequest req = request({7, 8, 9, 10, 11, 12}, 5);
  req.listener = listener(streamed);
  auto result = submit(req);
  const auto want = expected_tokens(req.prompt, 5);
  for (int i = 0; i < 2; ++i) {  // prefill + first token, one decode step
    auto s = a.next_step();
    ASSERT_TRUE(s);
    a.answer(*s);
  }
  auto stuck = a.next_step();
  ASSERT_TRUE(stuck);
  const char* reason = "step_timeout";
  if (GetParam() == Failure::LeavesTheList) {
    announce({&b});
    reason = "worker_lost";
  } else if (GetParam() == Failure::AnswersAnError) {
    a.answer_error(*stuck, "CUDA error: an illegal memory access was encountered");
    reason = "worker_error";
  }
  ASSERT_TRUE(b.serve_until([&] { return ready(result); }));

  const auto r = result.get();
  EXPECT_EQ(r->finish_reason, "length") << r->error;
  EXPECT_EQ(r->tokens, want);
  EXPECT_EQ(r->worker, "attn-b");
  EXPECT_EQ(streamed->once_it_has(0, want.size()), want) << "each token streamed once";
  ASSERT_FALSE(b.log.empty());
  const auto& resumed = b.log.front().work(0);
  EXPECT_TRUE(resumed.is_first());
  EXPECT_EQ(std::vector<int32_t>(resumed.generated().begin(), resumed.generated().end()),
            std::vector<int32_t>(want.begin(), want.begin() + 2));
  std::vector<int32_t> context = req.prompt;
  context.insert(context.end(), want.begin(), want.begin() + 2);
  EXPECT_EQ(std::vector<int32_t>(resumed.tokens().begin(), resumed.tokens().end()), context);
  EXPECT_EQ(preemptions(reason), 1);
}

INSTANTIATE_TEST_SUITE_P(Failures, SchedulerWorkerFailure,
                         ::testing::Values(Failure::StopsAnswering, Failure::LeavesTheList, Failure::AnswersAnError),
                         [](const auto& info) {
                           switch (info.param) {
                             case Failure::StopsAnswering:
                               return "StopsAnswering";
                             case Failure::LeavesTheList:
                               return "LeavesTheList";
                             default:
                               return "AnswersAnError";
                           }
                         });

// A worker that fails every step: the request is retried up to max_attempts, then ends with an
// error saying why, instead of looping.
TEST_F(SchedulerTest, ARequestThatFailsEveryAttemptEndsWithAnError) {
  FakeAttentionWorker w("attn-0");
  SchedulerConfig cfg;
  cfg.max_attempts = 2;
  start(cfg, {&w});
  auto result = submit(request({1, 2, 3}, 4));
  ASSERT_TRUE(eventually(
      [&] {
        if (auto s = w.next_step(5ms); s && s->req.work_size() > 0) w.answer_error(*s, "out of memory");
        return ready(result);
      },
      5s));
  const auto r = result.get();
  EXPECT_EQ(r->finish_reason, "error");
  EXPECT_NE(r->error.find("gave up after 2 attempts: worker error: out of memory"), std::string::npos) << r->error;
  EXPECT_TRUE(r->tokens.empty());
}

// Cancelling a listener's request ends it with the tokens so far and frees its KV blocks with the
// worker's next step; a waiting one is dropped from the queue and never reaches a worker.
TEST_F(SchedulerTest, CancellationEndsRequestsAndFreesTheirBlocks) {
  FakeAttentionWorker w("attn-0");
  SchedulerConfig cfg;
  cfg.max_running_per_worker = 1;
  start(cfg, {&w});

  auto streamed = std::make_shared<Streamed>();
  const caf::actor client = listener(streamed);
  GenerationRequest running = request({1, 5, 5}, 100), queued = request({2, 5, 5}, 100);
  running.listener = queued.listener = client;
  queued.index = 1;
  auto r0 = submit(running);
  auto step = w.next_step();
  ASSERT_TRUE(step);
  const uint64_t seq = step->req.work(0).seq();
  auto r1 = submit(queued);
  ASSERT_TRUE(holds(1, 1));
  for (int i = 0; i < 3; ++i) {
    w.answer(*step);
    step = w.next_step();
    ASSERT_TRUE(step);
  }

  cancel(client, 1);  // the queued one
  ASSERT_EQ(r1.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(r1.get()->finish_reason, "cancelled");
  cancel(client, -1);  // all of the listener's: the running one
  ASSERT_EQ(r0.wait_for(5s), std::future_status::ready);
  const auto res = r0.get();
  EXPECT_EQ(res->finish_reason, "cancelled");
  EXPECT_EQ(res->tokens.size(), 3u) << "the tokens of the answered steps";
  EXPECT_EQ(streamed->once_it_has(0, res->tokens.size()), res->tokens);

  w.answer(*step);  // the step in flight when it was cancelled: its token is dropped
  ASSERT_TRUE(w.serve_until([&] { return w.freed.count(seq) > 0; }));
  for (const auto& req : w.log)
    for (const auto& wk : req.work())
      if (wk.is_first()) {
        EXPECT_EQ(wk.prompt(0), 1) << "the cancelled queued request reached the worker";
      }
  EXPECT_TRUE(holds(0, 0));
}
