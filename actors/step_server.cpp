#include "actors/step_server.h"

#include <chrono>

#include "actors/metrics_util.h"

#include <cstring>

#include <spdlog/spdlog.h>

#include "actors/dispatch_frames.h"
#include "actors/expert_compute.h"
#include "core/wire.h"

namespace moemesh::actors {

FramesPtr message_frames(const std::string& peer, wire::Kind kind, uint64_t request_id, const std::string& meta,
                         std::vector<std::vector<float>> tensors, const uint8_t* trace_id) {
  wire::Header h;
  h.kind = kind;
  h.request_id = request_id;
  if (trace_id) std::memcpy(h.trace_id, trace_id, sizeof h.trace_id);
  h.meta = meta;
  for (const auto& t : tensors) h.tensors.push_back({DType::F32, {int64_t(t.size())}});
  auto frames = std::make_shared<Frames>();
  if (!peer.empty()) frames->emplace_back(peer.data(), peer.size());
  frames->push_back(frame_of(wire::encode_header(h)));
  for (auto& t : tensors) frames->push_back(frame_of(std::move(t)));
  return frames;
}

FramesPtr error_frames(const std::string& peer, uint64_t request_id, const std::string& code,
                       const std::string& message) {
  pb::ErrorReply e;
  e.set_code(code);
  e.set_message(message);
  return message_frames(peer, wire::Kind::Error, request_id, e.SerializeAsString(), {});
}

namespace {

prometheus::Counter& counter(prometheus::Registry& r, const std::string& name, const std::string& help,
                             const prometheus::Labels& labels = {}) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add(labels);
}

prometheus::Histogram& phase_histogram(prometheus::Registry& r, const std::string& phase) {
  return metrics::histogram_family(r, "moemesh_attention_step_phase_seconds",
                                   "Wall time of one step by phase: expert_wait (no lane computing, awaiting expert "
                                   "hosts), sampling, prefix_lookup (awaiting the KV store for new sequences' "
                                   "prefixes), attention (the rest); the phases add up to the step.")
      .Add({{"phase", phase}}, metrics::rpc_latency_buckets());
}

}  // namespace

StepServerMetrics::StepServerMetrics(prometheus::Registry& r, std::shared_ptr<const KvClient> kv,
                                     std::shared_ptr<const TieredPrefixStore> tier)
    : kv_(std::move(kv)),
      tier_(std::move(tier)),
      tier_bytes_(metrics::gauge_family(r, "moemesh_attention_prefix_cache_memory_bytes",
                                        "Bytes of KV blocks held in this worker's memory tier of the prefix cache.")
                      .Add({})),
      tier_hits_(counter(r, "moemesh_attention_prefix_cache_memory_hit_blocks_total",
                         "Prefix-cache blocks served from this worker's memory tier (no KV store round trip).")),
      query_tokens_(counter(r, "moemesh_attention_prefix_cache_query_tokens_total",
                            "Prompt tokens of new sequences looked up in the KV store.")),
      hit_tokens_(counter(r, "moemesh_attention_prefix_cache_hit_tokens_total",
                          "Prompt tokens whose KV was restored from the KV store.")),
      computed_(counter(r, "moemesh_attention_prefill_tokens_computed_total",
                        "Prompt tokens run through the model (not restored from the prefix cache).")),
      skipped_(counter(r, "moemesh_attention_prefill_tokens_skipped_total",
                       "Prompt tokens sent in step chunks but not computed: already restored from the prefix cache.")),
      published_(counter(r, "moemesh_attention_prefix_cache_published_blocks_total",
                         "KV blocks of finished sequences offered to the KV store.")),
      fetch_failures_(counter(r, "moemesh_attention_kvstore_failures_total",
                              "KV store requests that failed (timeout, error or bad reply), by operation.",
                              {{"op", "fetch"}})),
      publish_failures_(counter(r, "moemesh_attention_kvstore_failures_total",  // same family (registry merges)
                                "KV store requests that failed (timeout, error or bad reply), by operation.",
                                {{"op", "publish"}})),
      cut_fetches_(counter(r, "moemesh_attention_prefix_cache_cut_lookups_total",
                           "KV store lookups not waited for to their end: the step's wait budget (what computing "
                           "those prompt positions takes here) ran out first; the positions were computed.")),
      sampled_summary_(counter(r, "moemesh_attention_sampled_tokens_total",
                               "Tokens sampled, by what the sampler read: a logits summary (top-k and normalisers "
                               "from the device) or the full logits row.",
                               {{"from", "summary"}})),
      sampled_full_row_(counter(r, "moemesh_attention_sampled_tokens_total",  // same family
                                "Tokens sampled, by what the sampler read: a logits summary (top-k and normalisers "
                                "from the device) or the full logits row.",
                                {{"from", "full_row"}})),
      mb_step_seconds_(counter(r, "moemesh_attention_microbatch_step_seconds_total",
                               "Wall time of steps run as two micro-batches.")),
      mb_overlap_seconds_(counter(r, "moemesh_attention_microbatch_overlap_seconds_total",
                                  "Time in two-micro-batch steps when one half had experts in flight while the other "
                                  "computed.")),
      overlap_ratio_(prometheus::BuildGauge()
                         .Name("moemesh_attention_microbatch_overlap_ratio")
                         .Help("Latest two-micro-batch step: overlap time / step time (0-1).")
                         .Register(r)
                         .Add({})),
      step_seconds_(metrics::histogram_family(r, "moemesh_attention_step_duration_seconds",
                                              "Wall time of one step on the worker.")
                        .Add({}, metrics::rpc_latency_buckets())),
      phase_attention_(phase_histogram(r, "attention")),
      phase_expert_wait_(phase_histogram(r, "expert_wait")),
      phase_sampling_(phase_histogram(r, "sampling")),
      phase_prefix_lookup_(phase_histogram(r, "prefix_lookup")),
      kv_used_(metrics::gauge_family(r, "moemesh_attention_kv_blocks", "KV cache blocks, used and free.")
                   .Add({{"state", "used"}})),
      kv_free_(metrics::gauge_family(r, "moemesh_attention_kv_blocks", "KV cache blocks, used and free.")
                   .Add({{"state", "free"}})),
      kv_usage_(
          metrics::gauge_family(r, "moemesh_attention_kv_usage_ratio", "Used / total KV cache blocks (0-1).").Add({})),
      lora_(r, "moemesh_attention") {}

void StepServerMetrics::observe_step(double seconds, int64_t free_blocks, int64_t total_blocks) {
  step_seconds_.Observe(seconds);
  kv_used_.Set(double(total_blocks - free_blocks));
  kv_free_.Set(double(free_blocks));
  kv_usage_.Set(total_blocks > 0 ? double(total_blocks - free_blocks) / double(total_blocks) : 0.0);
}

void StepServerMetrics::observe_phases(const StepPhases& p) {
  phase_attention_.Observe(p.attention);
  phase_expert_wait_.Observe(p.expert_wait);
  phase_sampling_.Observe(p.sampling);
  phase_prefix_lookup_.Observe(p.prefix_lookup);
}

void StepServerMetrics::update(const StepWorkerCounts& c) {
  query_tokens_.Increment(double(c.prefix_query_tokens - seen_.prefix_query_tokens));
  hit_tokens_.Increment(double(c.prefix_hit_tokens - seen_.prefix_hit_tokens));
  computed_.Increment(double(c.prompt_tokens_computed - seen_.prompt_tokens_computed));
  skipped_.Increment(double(c.prompt_tokens_skipped - seen_.prompt_tokens_skipped));
  published_.Increment(double(c.published_blocks - seen_.published_blocks));
  sampled_summary_.Increment(double(c.sampled_from_summary - seen_.sampled_from_summary));
  sampled_full_row_.Increment(double(c.sampled_from_full_row - seen_.sampled_from_full_row));
  mb_step_seconds_.Increment(c.microbatch_step_seconds - seen_.microbatch_step_seconds);
  mb_overlap_seconds_.Increment(c.microbatch_overlap_seconds - seen_.microbatch_overlap_seconds);
  if (c.microbatch_steps != seen_.microbatch_steps) overlap_ratio_.Set(c.last_overlap_ratio);
  lora_.update(c.lora);
  seen_ = c;
  if (tier_) {
    const TieredPrefixStats t = tier_->stats();
    tier_bytes_.Set(double(t.bytes));
    tier_hits_.Increment(double(t.local_hit_blocks - seen_tier_hits_));
    seen_tier_hits_ = t.local_hit_blocks;
  }
  if (kv_) {
    const uint64_t f = kv_->stats().fetch_failures.load(), p = kv_->stats().publish_failures.load();
    fetch_failures_.Increment(double(f - seen_fetch_failures_));
    publish_failures_.Increment(double(p - seen_publish_failures_));
    seen_fetch_failures_ = f;
    seen_publish_failures_ = p;
    const uint64_t c = kv_->stats().cut_fetches.load();
    cut_fetches_.Increment(double(c - seen_cut_fetches_));
    seen_cut_fetches_ = c;
  }
}

namespace {

// Decodes and runs one step; returns the reply frames. Never throws.
FramesPtr handle(const Frames& in, StepWorker& worker, StepServerStats& stats, StepServerMetrics* metrics) {
  std::string peer = in.empty() ? std::string() : in[0].to_string();
  uint64_t request_id = 0;
  try {
    wire::Header h = wire::decode(frame_views(in, 1));
    request_id = h.request_id;
    if (h.kind != wire::Kind::StepRequest)
      return ++stats.bad_frames,
             error_frames(peer, request_id, "bad_request",
                          std::string("attention worker expects StepRequest, got ") + wire::kind_name(h.kind));
    pb::StepRequest req;
    if (!req.ParseFromString(h.meta))
      return ++stats.bad_frames, error_frames(peer, request_id, "bad_meta", "StepRequest metadata does not parse");
    std::vector<std::vector<float>> logits;
    const auto t0 = std::chrono::steady_clock::now();
    pb::StepResponse resp = worker.run(req, logits);
    ++stats.steps;
    stats.kv_free_blocks = worker.free_blocks();
    if (metrics) {
      metrics->update(worker.counts());
      metrics->observe_step(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                            worker.free_blocks(), worker.num_blocks());
      metrics->observe_phases(worker.last_phases());
    }
    return message_frames(peer, wire::Kind::StepResponse, request_id, resp.SerializeAsString(), std::move(logits),
                          h.trace_id);
  } catch (const wire::WireError& e) {
    ++stats.bad_frames;
    spdlog::warn("attention: bad frame from router: {}", e.what());
    return error_frames(peer, request_id, wire::error_code_name(e.code()), e.what());
  } catch (const std::exception& e) {
    spdlog::error("attention: step failed: {}", e.what());
    return error_frames(peer, request_id, "internal", e.what());
  }
}

}  // namespace

void serve_steps(ZmqBridge& bridge, int socket, std::shared_ptr<StepWorker> worker, std::shared_ptr<ComputePool> pool,
                 std::shared_ptr<StepServerStats> stats, std::shared_ptr<StepServerMetrics> metrics) {
  // The pool is held weakly: its last owner closes it, off the bridge's thread.
  std::weak_ptr<ComputePool> weak_pool = pool;
  bridge.route(socket, [=, out = bridge.actor()](int, FramesPtr frames) {
    auto p = weak_pool.lock();
    if (!p) return;
    // Compute off the bridge's thread; the reply goes straight back to the bridge.
    p->submit([=] {
      caf::anon_send(out, zmq_send_atom::value, socket, handle(*frames, *worker, *stats, metrics.get()));
      worker->publish_freed();  // after the answer: not on the step's critical path
    });
  });
}

void stop_serving_steps(ZmqBridge& bridge, int socket) { bridge.route(socket, RecvHandler{}); }

}  // namespace moemesh::actors
