#include "actors/expert_batcher.h"

#include <spdlog/spdlog.h>

#include "actors/dispatch_frames.h"
#include "core/error.h"

namespace moemesh::actors {

using flush_atom = caf::atom_constant<caf::atom("flush")>;
using batch_done_atom = caf::atom_constant<caf::atom("batchdone")>;
using rows_in_atom = caf::atom_constant<caf::atom("rowsin")>;

// ---- BatchQueue ----

BatchJobPtr BatchQueue::add(int32_t layer, PendingRequest req, Clock::time_point now) {
  last_seen_[req.peer] = now;
  for (auto it = last_seen_.begin(); it != last_seen_.end();)
    it = now - it->second > opts_.peer_memory ? last_seen_.erase(it) : std::next(it);

  Open& open = open_[layer];
  if (!open.job) {
    open.job = std::make_shared<BatchJob>();
    open.job->layer = layer;
    open.job->queued = now;
  }
  for (const auto& g : req.groups) open.rows += g.rows;
  open.peers.insert(req.peer);
  open.job->requests.push_back(std::move(req));

  bool everyone_in = true;
  for (const auto& [peer, seen] : last_seen_)
    if (!open.peers.count(peer)) everyone_in = false;
  if (!everyone_in && open.rows < opts_.max_batch_rows) return nullptr;
  BatchJobPtr job = std::move(open.job);
  open_.erase(layer);
  return job;
}

std::vector<BatchJobPtr> BatchQueue::take_due(Clock::time_point now) {
  std::vector<BatchJobPtr> due;
  for (auto it = open_.begin(); it != open_.end();) {
    if (now >= it->second.job->queued + opts_.window) {
      due.push_back(std::move(it->second.job));
      it = open_.erase(it);
    } else {
      ++it;
    }
  }
  return due;
}

size_t BatchQueue::queued_requests() const {
  size_t n = 0;
  for (const auto& [layer, open] : open_) n += open.job->requests.size();
  return n;
}

// ---- ExpertLoad ----

void ExpertLoad::add(int32_t layer, int32_t expert, uint64_t rows) {
  std::lock_guard<std::mutex> lk(mu_);
  rows_[{layer, expert}] += rows;
}

std::map<ExpertKey, uint64_t> ExpertLoad::drain() {
  std::lock_guard<std::mutex> lk(mu_);
  return std::exchange(rows_, {});
}

// ---- metrics ----

namespace {

prometheus::Histogram& histogram(prometheus::Registry& reg, const std::string& name, const std::string& help,
                                 prometheus::Histogram::BucketBoundaries buckets) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(reg).Add({}, std::move(buckets));
}

}  // namespace

ExpertHostMetrics::ExpertHostMetrics(prometheus::Registry& reg)
    : bad_requests(prometheus::BuildCounter()
                       .Name("moemesh_expert_bad_requests_total")
                       .Help("Dispatch messages answered with an error reply, by reason")
                       .Register(reg)),
      requests(prometheus::BuildCounter()
                   .Name("moemesh_expert_requests_total")
                   .Help("DispatchRequests accepted")
                   .Register(reg)
                   .Add({})),
      rows(prometheus::BuildCounter()
               .Name("moemesh_expert_rows_total")
               .Help("Rows computed, per layer and expert")
               .Register(reg)),
      batches(prometheus::BuildCounter()
                  .Name("moemesh_expert_batches_total")
                  .Help("Batches computed (requests of one layer merged)")
                  .Register(reg)
                  .Add({})),
      batch_requests(histogram(reg, "moemesh_expert_batch_requests", "Requests merged into one batch",
                               {1, 2, 3, 4, 6, 8, 12, 16, 32})),
      batch_rows(histogram(reg, "moemesh_expert_batch_rows", "Rows in one batch (all experts)",
                           {1, 4, 16, 64, 256, 1024, 4096, 16384})),
      queue_seconds(histogram(reg, "moemesh_expert_queue_wait_seconds",
                              "Time from a batch's first request to the start of its compute",
                              {1e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05})),
      compute_seconds(histogram(reg, "moemesh_expert_compute_seconds", "Compute time of one batch",
                                {1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1})),
      busy_seconds(prometheus::BuildCounter()
                       .Name("moemesh_expert_busy_seconds_total")
                       .Help("Wall time at least one batch was computing (overlapping batches count once); "
                             "its rate is the host's busy fraction, the expert pools' autoscaling signal")
                       .Register(reg)
                       .Add({})),
      queued_requests(prometheus::BuildGauge()
                          .Name("moemesh_expert_queued_requests")
                          .Help("Requests waiting for their batch to start")
                          .Register(reg)
                          .Add({})),
      mapped_weight_bytes(prometheus::BuildGauge()
                              .Name("moemesh_expert_mapped_weight_bytes")
                              .Help("Bytes of expert weights mapped from the checkpoint")
                              .Register(reg)
                              .Add({})),
      received_bytes(prometheus::BuildCounter()
                         .Name("moemesh_expert_received_bytes_total")
                         .Help("Bytes of dispatch messages received (header and tensor frames)")
                         .Register(reg)
                         .Add({})),
      sent_bytes(prometheus::BuildCounter()
                     .Name("moemesh_expert_sent_bytes_total")
                     .Help("Bytes of replies sent (header and tensor frames)")
                     .Register(reg)
                     .Add({})),
      lora(reg, "moemesh_expert") {}

// ---- the actor ----

// A request whose rows were received from a pair transport off the actor thread.
struct BatcherRowsIn {
  FramesPtr frames;  // keeps the request's views alive
  std::string peer;
  dispatch::Request request;
  std::shared_ptr<Transport> carrier;
  std::vector<float> rows;
  std::string error;  // the receive failed
};
using RowsInPtr = std::shared_ptr<BatcherRowsIn>;

}  // namespace moemesh::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::RowsInPtr)

namespace moemesh::actors {

namespace {

// What the host itself can serve (the codec checked the message's own consistency).
void check_servable(const dispatch::Request& r, const HostedExperts& experts) {
  const ModelConfig& c = experts.config();
  if (r.layer < 0 || r.layer >= c.num_hidden_layers || !c.is_moe_layer(r.layer))
    throw dispatch::DecodeError(r.request_id, std::string(dispatch::kBadLayer),
                                "layer " + std::to_string(r.layer) + " has no routed experts in this model (" +
                                    std::to_string(c.num_hidden_layers) + " layers)");
  if (r.hidden != experts.hidden())
    throw dispatch::DecodeError(r.request_id, std::string(dispatch::kBadHidden),
                                "rows of width " + std::to_string(r.hidden) + ", this model's hidden size is " +
                                    std::to_string(experts.hidden()));
  for (const auto& g : r.groups)
    if (!experts.holds(r.layer, g.expert))
      throw dispatch::DecodeError(
          r.request_id, std::string(dispatch::kUnknownExpert),
          "expert " + std::to_string(g.expert) + " of layer " + std::to_string(r.layer) + " is not held by this host");
}

struct BatcherState {
  ExpertBatcherDeps deps;
  PeerTransports zmq_only;  // the transports when deps.transports is null
  const PeerTransports& transports() const { return deps.transports ? *deps.transports : zmq_only; }
  std::unique_ptr<BatchQueue> queue;
  std::map<ExpertKey, prometheus::Counter*> rows_counters;
  std::chrono::steady_clock::time_point busy_until{};  // the end of the busy time counted so far
  // One receiving thread per pair transport (a pool of one: FIFO), so the actor never blocks
  // in a receive and each pair's payloads are taken in the order their headers arrived.
  // Declared last: destroyed first, finishing the receives still queued.
  std::map<const Transport*, std::unique_ptr<ComputePool>> receivers;
  static inline const char* name = "expert_batcher";
};

using Self = caf::stateful_actor<BatcherState>;

// Bytes of a ROUTER message without its routing-id frame.
double payload_bytes(const Frames& frames) {
  size_t n = 0;
  for (size_t i = 1; i < frames.size(); ++i) n += frames[i].size();
  return double(n);
}

void log_dispatch_span(const BatchJob& job, const PendingRequest& req) {
  if (!req.span) return;
  using secs = std::chrono::duration<double>;
  int64_t rows = 0;
  for (const auto& g : req.groups) rows += g.rows;
  nlohmann::json attrs = {{"peer", trace::peer_name(req.peer)},
                          {"layer", job.layer},
                          {"experts", req.groups.size()},
                          {"rows", rows},
                          {"batch_requests", job.requests.size()},
                          {"queue_wait_s", secs(job.started - job.queued).count()},
                          {"compute_s", secs(job.finished - job.started).count()}};
  if (req.traces.size() > 1) {
    attrs["links"] = nlohmann::json::array();
    for (size_t i = 1; i < req.traces.size(); ++i) attrs["links"].push_back(trace::link(req.traces[i]));
  }
  if (!job.error.empty()) attrs["error"] = job.error;
  req.span->finish("expert", "dispatch", std::move(attrs));
}

// Where replies go: the bridge's ROUTER socket. Copied into the pool's completion callbacks, so
// only what outlives the actor (deps.metrics does).
struct ReplySink {
  caf::actor bridge;
  int socket = 0;
  ExpertHostMetrics* metrics = nullptr;

  void send(FramesPtr frames) const {
    metrics->sent_bytes.Increment(payload_bytes(*frames));
    caf::anon_send(bridge, zmq_send_atom::value, socket, std::move(frames));
  }
};

ReplySink sink_of(Self* self) { return {self->state.deps.bridge, self->state.deps.socket, self->state.deps.metrics}; }

// The replies of a finished batch, sent from the pool thread that finished it: every dispatch
// round trip then crosses one thread hand-off fewer than through the actor, which does the
// bookkeeping afterwards (on_done). Each goes back the way its request came (ZeroMQ frames, or
// the pair transport it came by: send_message keeps headers and payloads in order per pair).
void send_replies(const ReplySink& sink, BatchJob& job, int64_t hidden) {
  static const std::shared_ptr<Transport> zmq = std::make_shared<ZmqTransport>();
  for (size_t i = 0; i < job.requests.size(); ++i) {
    const PendingRequest& req = job.requests[i];
    Transport& via = req.via ? *req.via : *zmq;
    dispatch::Message m = job.error.empty()
                              ? dispatch::encode_response(req.request_id, job.layer, hidden, std::move(job.outputs[i]))
                              : dispatch::encode_error(req.request_id, job.error_code, job.error);
    send_message(std::move(m), via, req.peer, [&sink](FramesPtr frames) { sink.send(std::move(frames)); });
  }
}

void start(Self* self, BatchJobPtr job) {
  auto& st = self->state;
  st.deps.metrics->queued_requests.Set(double(st.queue->queued_requests()));
  run_batch(*st.deps.experts, *st.deps.pool, std::move(job),
            [me = caf::actor_cast<caf::actor>(self), sink = sink_of(self),
             hidden = st.deps.experts->hidden()](BatchJobPtr done) {
              send_replies(sink, *done, hidden);
              caf::anon_send(me, batch_done_atom::value, std::move(done));
            });
}

void bad_request(Self* self, const std::string& peer, const dispatch::DecodeError& e) {
  self->state.deps.metrics->bad_request(e.code());
  spdlog::debug("expert: bad request {} ({}): {}", e.request_id(), e.code(), e.what());
  sink_of(self).send(to_frames(dispatch::encode_error(e.request_id(), e.code(), e.what()), peer));
}

// The request with its rows: checked against what this host serves, then queued for its batch.
void accept(Self* self, const std::string& peer, dispatch::Request&& r, std::vector<float>&& rows,
            std::shared_ptr<Transport> carrier) {
  auto& st = self->state;
  PendingRequest p;
  p.rows = std::move(rows);
  check_servable(r, *st.deps.experts);
  p.peer = peer;
  p.request_id = r.request_id;
  p.via = std::move(carrier);
  p.groups = std::move(r.groups);
  if (!r.traces.empty()) p.span.emplace(trace::child_of(r.traces.front()));
  p.traces = std::move(r.traces);
  p.adapters = std::move(r.adapters);
  st.deps.metrics->requests.Increment();
  const auto now = BatchQueue::Clock::now();
  const size_t open_before = st.queue->open_batches();
  if (BatchJobPtr job = st.queue->add(r.layer, std::move(p), now)) {
    start(self, std::move(job));
  } else {
    st.deps.metrics->queued_requests.Set(double(st.queue->queued_requests()));
    if (st.queue->open_batches() > open_before)  // a new batch opened: wake up when its window ends
      self->delayed_send(self, st.deps.options.window, flush_atom::value);
  }
}

void on_request(Self* self, FramesPtr frames) {
  auto& st = self->state;
  if (!frames || frames->empty()) return;
  const std::string peer = (*frames)[0].to_string();
  st.deps.metrics->received_bytes.Increment(payload_bytes(*frames));
  try {
    auto views = frame_views(*frames, 1);
    auto carrier = st.transports().carrying(peer, views.size());
    dispatch::Request r = dispatch::decode_request(views, payload_of(*carrier));
    const size_t floats = size_t(r.total_rows * r.hidden);
    if (carrier->payload_in_frames()) {
      std::vector<float> rows;
      try {
        rows = receive_tensor(*carrier, floats, r.rows);
      } catch (const Error& e) {
        throw dispatch::DecodeError(r.request_id, std::string(dispatch::kInternal), e.what());
      }
      accept(self, peer, std::move(r), std::move(rows), std::move(carrier));
      return;
    }
    // Received before the host's own checks: a rejected request's rows must still be taken off
    // the pair, or its next payload would be read as this one's.
    auto& pool = st.receivers[carrier.get()];
    if (!pool) pool = std::make_unique<ComputePool>(1);
    auto in = std::make_shared<BatcherRowsIn>(BatcherRowsIn{frames, peer, std::move(r), carrier, {}, {}});
    pool->submit([in, floats, me = caf::actor_cast<caf::actor>(self)] {
      try {
        in->rows = receive_tensor(*in->carrier, floats, {});
      } catch (const std::exception& e) {
        in->error = e.what();
      }
      caf::anon_send(me, rows_in_atom::value, in);
    });
  } catch (const dispatch::DecodeError& e) {
    bad_request(self, peer, e);
  }
}

void on_rows_in(Self* self, const RowsInPtr& in) {
  try {
    if (!in->error.empty())
      throw dispatch::DecodeError(in->request.request_id, std::string(dispatch::kInternal), in->error);
    accept(self, in->peer, std::move(in->request), std::move(in->rows), in->carrier);
  } catch (const dispatch::DecodeError& e) {
    bad_request(self, in->peer, e);
  }
}

void on_done(Self* self, BatchJobPtr job) {
  auto& st = self->state;
  auto& m = *st.deps.metrics;
  using secs = std::chrono::duration<double>;
  m.batches.Increment();
  m.batch_requests.Observe(double(job->requests.size()));
  m.queue_seconds.Observe(secs(job->started - job->queued).count());
  m.compute_seconds.Observe(secs(job->finished - job->started).count());
  m.lora.update(st.deps.experts->lora_stats());
  // Busy time is the union of the batches' compute intervals: only the part after what was counted.
  const auto from = std::max(job->started, st.busy_until);
  if (job->finished > from) m.busy_seconds.Increment(secs(job->finished - from).count());
  st.busy_until = std::max(st.busy_until, job->finished);
  // The replies have gone already (send_replies, on the pool thread).
  int64_t total = 0;
  for (const PendingRequest& req : job->requests) {
    if (!job->error.empty()) {
      m.bad_request(job->error_code);
      log_dispatch_span(*job, req);
      continue;
    }
    for (const auto& g : req.groups) {
      total += g.rows;
      if (st.deps.per_expert_rows) {
        auto& counter = st.rows_counters[{job->layer, g.expert}];
        if (!counter)
          counter = &m.rows.Add({{"layer", std::to_string(job->layer)}, {"expert", std::to_string(g.expert)}});
        counter->Increment(double(g.rows));
      }
      if (st.deps.load) st.deps.load->add(job->layer, g.expert, uint64_t(g.rows));
    }
    log_dispatch_span(*job, req);
  }
  m.batch_rows.Observe(double(total));
  if (!job->error.empty()) spdlog::error("expert: batch of layer {} failed: {}", job->layer, job->error);
}

caf::behavior batcher(Self* self, ExpertBatcherDeps deps) {
  self->state.queue = std::make_unique<BatchQueue>(deps.options);
  self->state.deps = std::move(deps);
  return {
      [self](zmq_recv_atom, int, FramesPtr frames) { on_request(self, std::move(frames)); },
      [self](flush_atom) {
        for (auto& job : self->state.queue->take_due(BatchQueue::Clock::now())) start(self, std::move(job));
        // A batch opened later than this timer's has its own timer still pending.
      },
      [self](batch_done_atom, BatchJobPtr job) { on_done(self, std::move(job)); },
      [self](rows_in_atom, const RowsInPtr& in) { on_rows_in(self, in); },
  };
}

}  // namespace

caf::actor spawn_expert_batcher(caf::actor_system& sys, ExpertBatcherDeps deps) {
  if (!deps.experts || !deps.pool || !deps.metrics || !deps.bridge)
    throw Error("expert batcher: experts, pool, metrics and bridge are required");
  return sys.spawn(batcher, std::move(deps));
}

caf::actor spawn_not_ready_replier(caf::actor_system& sys, caf::actor bridge, int socket) {
  // State as spawn arguments, not captures (CAF 0.17 and UBSan).
  return sys.spawn(
      [](caf::event_based_actor*, caf::actor bridge, int socket) -> caf::behavior {
        return {[bridge, socket](zmq_recv_atom, int, FramesPtr frames) {
          if (!frames || frames->size() < 2) return;  // [peer, header, ...]
          uint64_t id = 0;
          try {
            id = dispatch::decode_request(frame_views(*frames, 1)).request_id;
          } catch (const dispatch::DecodeError& e) {
            id = e.request_id();
          }
          caf::anon_send(
              bridge, zmq_send_atom::value, socket,
              to_frames(dispatch::encode_error(id, dispatch::kNotReady, "the expert host is loading its experts"),
                        (*frames)[0].to_string()));
        }};
      },
      std::move(bridge), socket);
}

void stop_expert_batcher(caf::actor_system& sys, const caf::actor& batcher) {
  if (!batcher) return;
  caf::scoped_actor self{sys};
  self->monitor(batcher);
  self->send_exit(batcher, caf::exit_reason::user_shutdown);
  self->receive([](const caf::down_msg&) {});
}

}  // namespace moemesh::actors
