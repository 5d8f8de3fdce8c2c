// The capacity planner's simulator against what queueing theory and the scheduler's rules say.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

#include "core/error.h"
#include "core/planner_measure.h"
#include "core/planner_search.h"
#include "core/planner_sim.h"

namespace moemesh::planner {
namespace {

// A small MoE on made-up hardware: every cost is a round number, links are free unless set.
CostProfile toy_profile() {
  CostProfile p;
  p.name = "toy";
  p.kind = "measured";
  p.model.arch = Arch::Mixtral;
  p.model.hidden_size = 64;
  p.model.num_hidden_layers = 2;
  p.model.num_attention_heads = 4;
  p.model.num_key_value_heads = 2;
  p.model.head_dim = 16;
  p.model.vocab_size = 1000;
  p.model.num_experts = 8;
  p.model.num_experts_per_tok = 2;
  p.model.intermediate_size = p.model.moe_intermediate_size = 128;
  p.attn_fixed_s = 1e-3;
  p.attn_per_row_s = p.attn_per_prefill_row_s = 1e-5;
  p.step_fixed_s = 1e-3;
  p.expert_fixed_s = 0.5e-3;
  p.expert_per_row_s = 2e-5;
  p.zmq_local = p.zmq_remote = p.nccl_local = p.nccl_remote = {1e-5, 1e10, 0};
  p.kv_tokens_per_worker = 1 << 20;
  p.gpus_per_node = 8;
  return p;
}

// The toy model on a CPU machine: every process on the node's two shared cores.
CostProfile shared_cores_profile() {
  CostProfile p = toy_profile();
  p.shared_node_compute = true;
  p.node_cores = 2;
  return p;
}

TrafficSpec fixed_traffic(const std::string& kind, int64_t prompt, int64_t output, int64_t requests) {
  TrafficSpec t = TrafficSpec::parse(kind);
  t.prompt_len = bench::LengthDist::parse(std::to_string(prompt));
  t.output_len = bench::LengthDist::parse(std::to_string(output));
  t.requests = requests;
  return t;
}

// Exactly these requests (arrival time, prompt and output lengths).
TrafficSpec trace_traffic(std::vector<SimRequest> requests) {
  TrafficSpec t;
  t.kind = TrafficSpec::Kind::trace;
  t.requests = int64_t(requests.size());
  t.trace = std::move(requests);
  return t;
}

TEST(PlannerSim, OneAtATimeQueueMatchesPollaczekKhinchine) {
  // One sequence at a time, one step per request (1 output token): an M/D/1 queue whose
  // service is the step time. Mean wait = rho * S / (2 (1 - rho)).
  const CostProfile p = toy_profile();
  Deployment d;
  d.micro_batches = 1;
  d.max_running_per_worker = 1;
  const auto load = ExpertLoad::uniform(8);
  const SimResult alone = simulate(p, d, fixed_traffic("closed:1", 8, 1, 5), load);
  const double service = alone.e2e.mean;
  ASSERT_GT(service, 0);
  EXPECT_NEAR(alone.queue.mean, 0, 1e-9);
  const double rho = 0.6;
  TrafficSpec t = fixed_traffic("poisson:" + std::to_string(rho / service), 8, 1, 40000);
  const SimResult r = simulate(p, d, t, load);
  const double expected = rho * service / (2 * (1 - rho));
  EXPECT_EQ(r.completed, 40000);
  EXPECT_NEAR(r.queue.mean, expected, 0.08 * expected) << "service " << service;
  EXPECT_NEAR(r.e2e.mean, expected + service, 0.08 * (expected + service));
}

TEST(PlannerSim, MoreExpertHostsLowerTheBusiestHostsUtilisation) {
  const CostProfile p = toy_profile();
  const auto load = ExpertLoad::uniform(8);
  const TrafficSpec t = fixed_traffic("closed:32", 32, 32, 200);
  Deployment few, many;
  few.expert_hosts = 1;
  many.expert_hosts = 8;
  const SimResult a = simulate(p, few, t, load), b = simulate(p, many, t, load);
  EXPECT_GT(a.expert_util_max, 1.5 * b.expert_util_max);
  EXPECT_GT(b.output_tok_s, a.output_tok_s);  // the single host was the bottleneck
}

TEST(PlannerSim, SkewedLoadIsWorseWithoutReplicas) {
  const CostProfile p = toy_profile();
  const auto skew = ExpertLoad::zipf(8, 1.5);
  const TrafficSpec t = fixed_traffic("closed:32", 32, 32, 200);
  Deployment one, two;
  one.expert_hosts = two.expert_hosts = 4;
  two.replicas = 2;
  const SimResult a = simulate(p, one, t, skew), b = simulate(p, two, t, skew);
  EXPECT_LT(b.expert_util_max, a.expert_util_max);
}

TEST(PlannerSim, ReplicasTakeEachExpertsRowsAsOneGroupToTheLeastGivenHost) {
  // One row at a time, top-2 of 8 experts, every expert on both hosts: the two distinct experts'
  // groups go one to each host (the second to the host given no rows yet), every layer.
  const CostProfile p = toy_profile();
  Deployment d;
  d.expert_hosts = 2;
  d.replicas = 2;
  d.micro_batches = 1;
  const SimResult r = simulate(p, d, fixed_traffic("closed:1", 1, 16, 8), ExpertLoad::uniform(8));
  EXPECT_DOUBLE_EQ(r.hosts_per_dispatch, 2.0);
  // Without replicas the two experts share a host in 3 of 7 draws (4 experts each of 8).
  d.replicas = 1;
  const SimResult one = simulate(p, d, fixed_traffic("closed:1", 1, 64, 32), ExpertLoad::uniform(8));
  EXPECT_NEAR(one.hosts_per_dispatch, 2 - 3.0 / 7, 0.03);  // 1.5 if a row could draw one expert twice
}

TEST(PlannerSim, KvExhaustionPreempts) {
  const CostProfile p = toy_profile();
  Deployment d;
  d.max_running_per_worker = 16;
  const TrafficSpec t = fixed_traffic("closed:16", 64, 128, 64);
  d.kv_tokens_per_worker = 16 * 40;  // 40 blocks: 16 sequences of 192 tokens need 192
  const SimResult tight = simulate(p, d, t, ExpertLoad::uniform(8));
  d.kv_tokens_per_worker = 1 << 20;
  const SimResult roomy = simulate(p, d, t, ExpertLoad::uniform(8));
  EXPECT_GT(tight.preemptions, 0);
  EXPECT_EQ(roomy.preemptions, 0);
  EXPECT_EQ(tight.completed, 64);  // preempted sequences resume and finish
}

TEST(PlannerSim, PrefixHitsCutTimeToFirstToken) {
  const CostProfile p = [] {
    CostProfile q = toy_profile();
    q.attn_per_prefill_row_s = 2e-4;  // prefill-heavy
    return q;
  }();
  Deployment d;
  TrafficSpec t = fixed_traffic("closed:1", 1024, 4, 10);
  const SimResult cold = simulate(p, d, t, ExpertLoad::uniform(8));
  t.prefix_hit_rate = 0.9;
  const SimResult warm = simulate(p, d, t, ExpertLoad::uniform(8));
  EXPECT_LT(warm.ttft.p50, 0.5 * cold.ttft.p50);
}

TEST(PlannerSim, FastModeAgreesWithPerLayerOnThroughput) {
  const CostProfile p = toy_profile();
  Deployment d;
  d.attention_workers = 2;
  d.expert_hosts = 2;
  const TrafficSpec t = fixed_traffic("closed:16", 64, 32, 200);
  SimOptions exact, fast;
  exact.layers_per_event = 1;
  fast.layers_per_event = 2;
  const SimResult a = simulate(p, d, t, ExpertLoad::uniform(8), exact);
  const SimResult b = simulate(p, d, t, ExpertLoad::uniform(8), fast);
  EXPECT_EQ(b.layers_per_event, 2);
  EXPECT_NEAR(b.output_tok_s, a.output_tok_s, 0.25 * a.output_tok_s);
}

TEST(PlannerSim, FastModeMergesDispatchesOfManyWorkers) {
  // 32 workers dispatch every layer to 2 hosts: merged within the batching window, the hosts'
  // fixed costs are shared, so the analytic mode's busiest host stays below 100%, and its
  // throughput near the exact mode's (which reserves each merged batch). The exact mode merges
  // somewhat more: batches keep the workers in step, which the analytic rate model ignores.
  CostProfile p = toy_profile();
  p.expert_fixed_s = 2e-4;
  p.expert_per_expert_s = 5e-5;
  p.expert_per_row_s = 2e-6;
  p.attn_fixed_s = 2e-3;
  Deployment d;
  d.attention_workers = 32;
  d.expert_hosts = 2;
  d.expert_batch_window_s = 1e-3;
  const TrafficSpec t = fixed_traffic("closed:256", 32, 64, 1024);
  SimOptions exact, fast;
  exact.layers_per_event = 1;
  fast.layers_per_event = 2;
  fast.sample_every_s = 0.05;
  const SimResult a = simulate(p, d, t, ExpertLoad::uniform(8), exact);
  const SimResult b = simulate(p, d, t, ExpertLoad::uniform(8), fast);
  EXPECT_LE(b.expert_util_max, 1.0);
  EXPECT_LE(a.expert_util_max, 1.0);
  EXPECT_GT(a.dispatches_per_batch, 3);
  EXPECT_GT(b.dispatches_per_batch, 3);
  EXPECT_NEAR(b.dispatches_per_batch, a.dispatches_per_batch, 0.4 * a.dispatches_per_batch);
  EXPECT_NEAR(b.output_tok_s, a.output_tok_s, 0.3 * a.output_tok_s);
}

TEST(PlannerSim, FastModeHoldsAnOverloadedHostToItsCapacity) {
  // Far more expert work than one host can do: the analytic steps queue behind the host's
  // backlog, so the host serves at most its capacity and the throughput falls to what it allows.
  CostProfile p = toy_profile();
  p.expert_fixed_s = 5e-3;
  Deployment d;
  d.attention_workers = 16;
  d.expert_hosts = 1;
  d.expert_batch_window_s = 0;
  const TrafficSpec t = fixed_traffic("closed:128", 16, 64, 512);
  SimOptions fast;
  fast.layers_per_event = 2;
  fast.sample_every_s = 0.05;
  const SimResult r = simulate(p, d, t, ExpertLoad::uniform(8), fast);
  EXPECT_LE(r.expert_util_max, 1.05);
  EXPECT_GT(r.expert_util_max, 0.7);
  // At most one batch per lane per layer per 5 ms: each step holds 8 rows a worker.
  const double steps_per_s = 1.0 / (2 * 5e-3);  // two MoE layers of batches per step and host
  EXPECT_LT(r.output_tok_s, 1.3 * steps_per_s * 128);
}

TEST(PlannerSim, SharedCoresServeInParallel) {
  // Two attention workers on a node whose processes share its cores: CPU-bound, two cores give
  // about twice the throughput of one.
  CostProfile p = toy_profile();
  p.shared_node_compute = true;
  p.gpus_per_node = 8;
  Deployment d;
  d.attention_workers = 2;
  d.expert_hosts = 1;
  const TrafficSpec t = fixed_traffic("closed:32", 16, 32, 128);
  p.node_cores = 1;
  const SimResult one = simulate(p, d, t, ExpertLoad::uniform(8));
  p.node_cores = 2;
  const SimResult two = simulate(p, d, t, ExpertLoad::uniform(8));
  EXPECT_GT(two.output_tok_s, 1.5 * one.output_tok_s);
  EXPECT_LE(two.node_util, 1.0);
}

TEST(PlannerSim, AWorkersMicroBatchesTakeTurnsOnSharedCores) {
  // Two idle cores, one worker with two micro-batches of one row each: the simulator runs a
  // worker's calls one at a time, so the two halves' attention runs one after the other, not on
  // a core each (docs/planner.md, "Open points", on why).
  CostProfile p = shared_cores_profile();
  p.attn_fixed_s = 2e-3;  // per layer and call: the two halves' 2 x 2 calls dominate a step
  p.step_fixed_s = 0;
  Deployment d;
  d.micro_batches = 2;
  const SimResult r = simulate(p, d, fixed_traffic("closed:2", 1, 32, 2), ExpertLoad::uniform(8));
  EXPECT_GE(r.itl.p50, 2 * 2 * p.attn_fixed_s);
  EXPECT_LT(r.itl.p50, 2 * 2 * p.attn_fixed_s + 2e-3);
}

TEST(PlannerSim, PrefillRowsCostTimeToFirstTokenNotInterTokenLatency) {
  CostProfile p = toy_profile();
  Deployment d;
  const TrafficSpec t = fixed_traffic("closed:1", 256, 16, 8);
  const SimResult base = simulate(p, d, t, ExpertLoad::uniform(8));
  p.attn_per_prefill_row_s = 1e-4;
  const SimResult heavy = simulate(p, d, t, ExpertLoad::uniform(8));
  EXPECT_NEAR(heavy.ttft.p50 - base.ttft.p50, 2 * 256 * (1e-4 - 1e-5), 1e-3);  // 2 layers x 256 rows
  EXPECT_NEAR(heavy.itl.p50, base.itl.p50, 1e-6);
}

TEST(PlannerSim, RequestsThatFindTheWorkerIdlePayForWakingIt) {
  // Requests seconds apart: each finds the worker idle, and its first step takes the wake-up
  // cost longer, its second 0.4 of that (the first inter-token gap: the largest of a request's
  // seven, so the p90). Back to back, none does.
  CostProfile p = toy_profile();
  Deployment d;
  const TrafficSpec apart = fixed_traffic("poisson:0.1", 16, 8, 16),
                    back_to_back = fixed_traffic("closed:1", 16, 8, 16);
  const SimResult cold = simulate(p, d, apart, ExpertLoad::uniform(8));
  const SimResult warm = simulate(p, d, back_to_back, ExpertLoad::uniform(8));
  p.idle_wake_s = 3e-3;
  const SimResult cold_woken = simulate(p, d, apart, ExpertLoad::uniform(8));
  const SimResult warm_woken = simulate(p, d, back_to_back, ExpertLoad::uniform(8));
  EXPECT_NEAR(cold_woken.ttft.p50 - cold.ttft.p50, 3e-3, 5e-5);  // quantiles are binned by 0.5%
  EXPECT_NEAR(cold_woken.itl.p90 - cold.itl.p90, 0.4 * 3e-3, 1e-4);
  EXPECT_NEAR(warm_woken.ttft.p50, warm.ttft.p50, 1e-5);  // only the very first request is cold
  EXPECT_NEAR(warm_woken.itl.p90, warm.itl.p90, 1e-5);
  const CostProfile q = CostProfile::from_json(p.to_json());
  EXPECT_DOUBLE_EQ(q.idle_wake_s, 3e-3);
  EXPECT_DOUBLE_EQ(q.idle_after_s, p.idle_after_s);
}

TEST(PlannerSim, AStepThatStartsSequencesWaitsOnceForTheirPrefixLookup) {
  // Four requests at once with three full prompt blocks each: the first arrival's step starts it
  // alone and waits for one KV store round trip; the three that came meanwhile start together in
  // the next step, which waits for one more, not three. Later steps start nothing and wait for
  // none. Prompts of one block have nothing to look up (the last token is always computed).
  CostProfile p = toy_profile();
  Deployment d;
  const TrafficSpec four = fixed_traffic("closed:4", 64, 8, 4), short_prompts = fixed_traffic("closed:4", 16, 8, 4);
  const SimResult base = simulate(p, d, four, ExpertLoad::uniform(8));
  const SimResult base_short = simulate(p, d, short_prompts, ExpertLoad::uniform(8));
  p.prefix_lookup_s = 2e-3;
  const SimResult looked_up = simulate(p, d, four, ExpertLoad::uniform(8));
  const SimResult looked_up_short = simulate(p, d, short_prompts, ExpertLoad::uniform(8));
  EXPECT_NEAR(looked_up.ttft.p50 - base.ttft.p50, 2 * 2e-3, 1e-4);
  EXPECT_NEAR(looked_up.itl.p90, base.itl.p90, 1e-6);
  EXPECT_NEAR(looked_up_short.ttft.p50, base_short.ttft.p50, 1e-6);
  EXPECT_DOUBLE_EQ(CostProfile::from_json(p.to_json()).prefix_lookup_s, 2e-3);

  // A store slower than computing: the worker waits for it whole until a step of mostly prompt
  // positions showed what a position costs it; then at most its asked positions at that price
  // (the worker's wait budget: 144 positions for the three that start together).
  SimOptions o;
  o.trace_requests = true;
  auto first_tokens = [&](double lookup_s) {
    p.prefix_lookup_s = lookup_s;
    std::vector<double> v;
    for (const bench::Outcome& t : simulate(p, d, four, ExpertLoad::uniform(8), o).traces) v.push_back(*t.ttft_s);
    std::sort(v.begin(), v.end());
    return v;
  };
  const std::vector<double> none = first_tokens(0), slow = first_tokens(0.5);
  ASSERT_EQ(slow.size(), 4u);
  EXPECT_NEAR(slow[0] - none[0], 0.5, 1e-6);  // no price yet: the whole round trip
  for (size_t i = 1; i < 4; ++i) {
    const double waited = slow[i] - none[i] - 0.5;
    EXPECT_GT(waited, 0.0);
    EXPECT_LT(waited, 144 * none[0] / 64);  // the first step's compute per position, at most
  }
}

TEST(PlannerSim, ALookupWaitsForThePutBeingStoredNotThoseQueuedBehindIt) {
  // R decodes while A1-A3 (two full blocks, one token) arrive: they prefill in one step and
  // finish; the next step frees them, and once it has answered their puts are stored one after
  // the other (6 ms apiece). B (a long prompt: a wait budget that does not bind) arrives during
  // the step after: its lookup waits for the put being stored, not for those queued behind it.
  // D comes to an idle store and waits for nothing. A profile's put costs survive its JSON.
  CostProfile p = toy_profile();
  p.prefix_lookup_s = 0.2e-3;
  Deployment d;
  const TrafficSpec t = trace_traffic({{.arrival_s = 0, .prompt = 8, .output = 4},
                                       {.arrival_s = 1e-3, .prompt = 40, .output = 1},
                                       {.arrival_s = 1e-3, .prompt = 40, .output = 1},
                                       {.arrival_s = 1e-3, .prompt = 40, .output = 1},
                                       {.arrival_s = 30e-3, .prompt = 400, .output = 1},
                                       {.arrival_s = 2, .prompt = 40, .output = 1}});
  SimOptions o;
  o.trace_requests = true;
  // First tokens in arrival order (a trace's arrivals are its start times).
  auto first_tokens = [&](double put_s, double per_block_s) {
    p.kv_put_s = put_s;
    p.kv_put_per_block_s = per_block_s;
    std::vector<std::pair<double, double>> by_start;
    for (const bench::Outcome& r : simulate(p, d, t, ExpertLoad::uniform(8), o).traces)
      by_start.emplace_back(r.start_s, *r.ttft_s);
    std::sort(by_start.begin(), by_start.end());
    std::vector<double> v;
    for (const auto& [start, ttft] : by_start) v.push_back(ttft);
    return v;
  };
  const std::vector<double> none = first_tokens(0, 0), puts = first_tokens(4e-3, 1e-3);
  ASSERT_EQ(puts.size(), 6u);
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(puts[i], none[i], 1e-9) << i;
  EXPECT_GT(puts[4] - none[4], 0.5e-3);  // some of A2's put
  EXPECT_LT(puts[4] - none[4], 6e-3);    // and none of A3's
  EXPECT_NEAR(puts[5], none[5], 1e-9);
  const CostProfile back = CostProfile::from_json(p.to_json());
  EXPECT_DOUBLE_EQ(back.kv_put_s, 4e-3);
  EXPECT_DOUBLE_EQ(back.kv_put_per_block_s, 1e-3);
}

TEST(PlannerSim, ARequestsCpuOnSharedCoresSlowsTheStepsBesideIt) {
  // Two cores, one worker and one host taking turns: a core is mostly free. One stream decodes
  // while another request arrives and finishes its first token. That request's CPU (router and
  // client) is time-shared with the stream's steps: half of it on each core delays the stream,
  // where booked whole on the free core it would not. The request's prefill delays the stream
  // alike in both runs.
  CostProfile p = shared_cores_profile();
  p.router_per_request_s = 20e-3;
  Deployment d;
  const TrafficSpec t =
      trace_traffic({{.arrival_s = 0, .prompt = 8, .output = 100}, {.arrival_s = 0.2, .prompt = 8, .output = 1}});
  SimOptions o;
  o.trace_requests = true;
  auto stream_end = [&](double cpu_share) {
    p.router_request_cpu_share = cpu_share;
    const SimResult r = simulate(p, d, t, ExpertLoad::uniform(8), o);
    for (const bench::Outcome& tr : r.traces)
      if (tr.output_tokens == 100) return tr.end_s;
    ADD_FAILURE() << "the stream did not finish";
    return 0.0;
  };
  EXPECT_NEAR(stream_end(1) - stream_end(0), 20e-3 / 2, 2e-3);
  // A share above 1: threads working on the request at once, the whole latency on each core.
  EXPECT_NEAR(stream_end(2) - stream_end(0), 20e-3, 3e-3);
}

TEST(PlannerSim, ARequestsCpuBeyondItsLatencyKeepsItsLatencyOnIdleCores) {
  // Twice its latency of CPU on two idle cores (several threads at once) still admits the request
  // after its latency, not later: the first token comes as with no CPU at all.
  CostProfile p = shared_cores_profile();
  p.router_per_request_s = 5e-3;
  Deployment d;
  const TrafficSpec t = trace_traffic({{.arrival_s = 0, .prompt = 8, .output = 2}});
  auto ttft = [&](double cpu_share) {
    p.router_request_cpu_share = cpu_share;
    return simulate(p, d, t, ExpertLoad::uniform(8)).ttft.p50;
  };
  EXPECT_NEAR(ttft(2), ttft(0), 1e-6);
  EXPECT_GT(ttft(0), 5e-3);
}

TEST(PlannerSim, RequestTracesHoldWhatTheSummariesAreMadeOf) {
  // Traces only when asked; then one per request, each with its TTFT and output - 1 gaps that add
  // up to its end, and together the same samples as the summaries (binned by 0.5%).
  CostProfile p = toy_profile();
  Deployment d;
  const TrafficSpec t = fixed_traffic("poisson:200", 24, 6, 40);
  EXPECT_TRUE(simulate(p, d, t, ExpertLoad::uniform(8)).traces.empty());
  SimOptions o;
  o.trace_requests = true;
  const SimResult r = simulate(p, d, t, ExpertLoad::uniform(8), o);
  ASSERT_EQ(r.traces.size(), 40u);
  std::vector<double> ttft, itl;
  for (const bench::Outcome& tr : r.traces) {
    ASSERT_EQ(tr.itl_s.size(), 5u);
    EXPECT_EQ(tr.prompt_tokens, 24);
    EXPECT_EQ(tr.output_tokens, 6);
    ASSERT_TRUE(tr.ttft_s.has_value());
    double end = tr.start_s + *tr.ttft_s;
    for (double g : tr.itl_s) end += g;
    EXPECT_NEAR(end, tr.end_s, 1e-9);
    ttft.push_back(*tr.ttft_s);
    itl.insert(itl.end(), tr.itl_s.begin(), tr.itl_s.end());
  }
  std::sort(ttft.begin(), ttft.end());
  std::sort(itl.begin(), itl.end());
  EXPECT_NEAR(ttft[ttft.size() / 2], r.ttft.p50, 0.01 * r.ttft.p50);
  EXPECT_NEAR(itl[itl.size() * 9 / 10], r.itl.p90, 0.01 * r.itl.p90);
  const nlohmann::json j = bench::outcome_json(r.traces.front());
  EXPECT_EQ(j.at("itl_s").size(), 5u);
  EXPECT_DOUBLE_EQ(j.at("ttft_s").get<double>(), *r.traces.front().ttft_s);
  EXPECT_FALSE(j.contains("failure"));
}

// A calibration run as a cluster of profile `p` would measure it.
CalibrationPoint simulated_point(const CostProfile& p, const Deployment& d, int conc, int64_t prompt, int64_t output,
                                 int64_t requests, double rate = 0) {
  const std::string kind = rate > 0 ? "poisson:" + std::to_string(rate) : "closed:" + std::to_string(conc);
  const SimResult r = simulate(p, d, fixed_traffic(kind, prompt, output, requests), ExpertLoad::uniform(8));
  return CalibrationPoint{.concurrency = conc,
                          .rate = rate,
                          .prompt = prompt,
                          .output = output,
                          .requests = requests,
                          .ttft_p50_s = r.ttft.p50,
                          .itl_p50_s = r.itl.p50,
                          .itl_p90_s = r.itl.p90};
}

// plan profile's three runs (one at a time, long prompts, 48 at once) as a cluster of `truth`
// would measure them.
struct ThreeRuns {
  CalibrationPoint one, long_prompt, loaded;
};
ThreeRuns three_runs(const CostProfile& truth, const Deployment& d) {
  return {simulated_point(truth, d, 1, 16, 48, 8), simulated_point(truth, d, 1, 128, 2, 8),
          simulated_point(truth, d, 48, 32, 48, 192)};
}

TEST(PlannerCalibration, RecoversTheClusterOverheadsThatPredictOtherTraffic) {
  // A "cluster" whose hand-offs, router work, streaming CPU and waking from idle are known:
  // calibration from its four runs on a profile without them predicts traffic it was not fitted on.
  CostProfile truth = shared_cores_profile();
  truth.step_fixed_s += 4e-4;
  truth.dispatch_overhead_s = 4e-4;
  truth.router_per_request_s = 2e-3;
  truth.router_per_token_s = 3e-4;
  truth.router_request_cpu_share = 0.5;
  truth.attn_per_prefill_row_s = 3e-5;
  truth.step_jitter = 0.2;
  truth.idle_wake_s = 1.5e-3;
  truth.idle_wake_decay = 0.75;  // a long tail, as this machine shows
  truth.prefix_lookup_s = 5e-4;
  Deployment d;
  auto measure = [&](const CostProfile& p, int conc, int64_t prompt, int64_t output, int64_t requests,
                     double rate = 0) { return simulated_point(p, d, conc, prompt, output, requests, rate); };
  const CalibrationPoint one = measure(truth, 1, 16, 48, 8), long_prompt = measure(truth, 1, 128, 2, 8),
                         loaded = measure(truth, 8, 32, 48, 32);
  // Requests four lifetimes apart on average, as plan profile spaces them.
  const CalibrationPoint idle = measure(truth, 1, 16, 8, 12, idle_calibration_rate(one.ttft_p50_s, one.itl_p50_s, 8));
  CostProfile fitted = shared_cores_profile();
  fitted.prefix_lookup_s = truth.prefix_lookup_s;  // measured by plan profile, not fitted
  const auto back = calibrate_cluster(fitted, d, one, long_prompt, loaded, &idle);
  EXPECT_NEAR(back[0].itl_p50_s, one.itl_p50_s, 0.03 * one.itl_p50_s);
  EXPECT_NEAR(back[2].itl_p50_s, loaded.itl_p50_s, 0.05 * loaded.itl_p50_s);
  EXPECT_NEAR(fitted.router_per_token_s, truth.router_per_token_s, 0.3 * truth.router_per_token_s);
  EXPECT_NEAR(fitted.step_jitter, truth.step_jitter, 0.3 * truth.step_jitter);
  EXPECT_NEAR(fitted.idle_wake_s, truth.idle_wake_s, 0.3 * truth.idle_wake_s);
  EXPECT_NEAR(fitted.idle_wake_decay, truth.idle_wake_decay, 0.15);
  EXPECT_NEAR(back[3].itl_p50_s, idle.itl_p50_s, 0.05 * idle.itl_p50_s);
  const TrafficSpec poisson = fixed_traffic("poisson:20", 32, 32, 64);
  const SimResult want_poisson = simulate(truth, d, poisson, ExpertLoad::uniform(8));
  const SimResult got_poisson = simulate(fitted, d, poisson, ExpertLoad::uniform(8));
  EXPECT_NEAR(got_poisson.ttft.p50, want_poisson.ttft.p50, 0.1 * want_poisson.ttft.p50);
  const TrafficSpec other = fixed_traffic("closed:24", 48, 32, 96);
  const SimResult want = simulate(truth, d, other, ExpertLoad::uniform(8));
  const SimResult got = simulate(fitted, d, other, ExpertLoad::uniform(8));
  EXPECT_NEAR(got.output_tok_s, want.output_tok_s, 0.1 * want.output_tok_s);
  EXPECT_NEAR(got.ttft.p50, want.ttft.p50, 0.1 * want.ttft.p50);
}

// A 1/1/1/1 cluster on two shared cores with per-request work, its CPU share and CPU per token,
// fitted back from its three calibration runs.
struct ShareFit {
  CalibrationPoint loaded;
  std::vector<CalibrationPoint> back;  // the fitted profile's own calibration points
  CostProfile fitted = shared_cores_profile();
};
ShareFit fit_request_share(double per_request_s, double cpu_share) {
  CostProfile truth = shared_cores_profile();
  truth.attn_per_prefill_row_s = 0;
  truth.router_per_request_s = per_request_s;
  truth.router_request_cpu_share = cpu_share;
  truth.router_per_token_s = 4e-4;
  Deployment d;
  d.micro_batches = 1;
  const auto [one, long_prompt, loaded] = three_runs(truth, d);
  ShareFit f;
  f.loaded = loaded;
  f.back = calibrate_cluster(f.fitted, d, one, long_prompt, loaded, nullptr);
  return f;
}

TEST(PlannerCalibration, ConvergesWhereTheLoadedFirstTokenMovesManyStepsPerUnitOfItsParameter) {
  // Per-request work of several steps, under a deep closed loop: the loaded TTFT grows by many
  // steps per unit of the CPU share, where its fitting step assumes one. Measured on this machine
  // (a 1/1/1/1 cluster, 2026-12-06), that swung the share between 0 and 1 and left the loaded TTFT
  // fitted at 17 ms against 37.5 measured.
  const ShareFit f = fit_request_share(12e-3, 0.45);
  EXPECT_NEAR(f.back[2].ttft_p50_s, f.loaded.ttft_p50_s, 0.05 * f.loaded.ttft_p50_s);
  EXPECT_NEAR(f.back[2].itl_p50_s, f.loaded.itl_p50_s, 0.05 * f.loaded.itl_p50_s);
  EXPECT_NEAR(f.fitted.router_request_cpu_share, 0.45, 0.15);
}

TEST(PlannerCalibration, FitsARequestCpuShareAboveOneUpToTheCores) {
  // A request's CPU beyond its latency (the router's threads and the client at once): the loaded
  // run's first tokens ask for a share above 1, and the fit may give it, up to the node's cores.
  const ShareFit f = fit_request_share(4e-3, 1.6);
  EXPECT_NEAR(f.back[2].ttft_p50_s, f.loaded.ttft_p50_s, 0.05 * f.loaded.ttft_p50_s);
  EXPECT_GT(f.fitted.router_request_cpu_share, 1.0);
  EXPECT_LE(f.fitted.router_request_cpu_share, double(f.fitted.node_cores));
}

TEST(PlannerCalibration, AnEngineTimedWhileTheMachineWasSlowIsScaledDownByTheLoadedRun) {
  // The engine's decode rows timed 1.8x too slow (the machine's speed moves): the loaded run is
  // faster than they allow even with no CPU per streamed token. The calibration scales them down
  // to what the loaded run shows, and predicts another concurrency from there.
  CostProfile truth = shared_cores_profile();
  truth.attn_per_row_s = 5e-5;
  truth.expert_per_row_s = 5e-5;
  Deployment d;
  d.micro_batches = 1;
  const auto [one, long_prompt, loaded] = three_runs(truth, d);
  CostProfile fitted = truth;
  fitted.attn_per_row_s *= 1.8;
  fitted.attn_per_ctx_s *= 1.8;
  fitted.expert_per_row_s *= 1.8;
  const auto back = calibrate_cluster(fitted, d, one, long_prompt, loaded, nullptr);
  EXPECT_NEAR(back[2].itl_p50_s, loaded.itl_p50_s, 0.05 * loaded.itl_p50_s);
  EXPECT_EQ(fitted.router_per_token_s, 0.0);
  EXPECT_NEAR(fitted.attn_per_row_s, truth.attn_per_row_s, 0.3 * truth.attn_per_row_s);
  const TrafficSpec other = fixed_traffic("closed:32", 32, 32, 128);
  const SimResult want = simulate(truth, d, other, ExpertLoad::uniform(8));
  const SimResult got = simulate(fitted, d, other, ExpertLoad::uniform(8));
  EXPECT_NEAR(got.output_tok_s, want.output_tok_s, 0.1 * want.output_tok_s);
}

TEST(PlannerBeside, ClassesTheStreamsGapsByWhatTheOtherRequestDidInTheirStep) {
  // A stream with a token every millisecond; another request starts in the step of token 20
  // (that gap 0.8 ms longer), decodes through tokens 21-22 (0.1 ms longer each) and ends with
  // token 23 (0.4 ms), whose next gap is 0.3 ms longer. Its tokens reach its client 0.1 ms after
  // the stream's of the same step.
  std::vector<double> stream = {0.0};
  const std::map<int, double> extra = {{20, 8e-4}, {21, 1e-4}, {22, 1e-4}, {23, 4e-4}, {24, 3e-4}};
  for (int k = 1; k <= 60; ++k) stream.push_back(stream.back() + 1e-3 + (extra.count(k) ? extra.at(k) : 0.0));
  const std::vector<double> other = {stream[20] + 1e-4, stream[21] + 1e-4, stream[22] + 1e-4, stream[23] + 1e-4};
  const GapExcess g = gap_excess(stream, {other});
  ASSERT_EQ(g.start.size(), 1u);
  EXPECT_NEAR(g.start[0], 8e-4, 1e-9);
  ASSERT_EQ(g.decode.size(), 2u);
  EXPECT_NEAR(g.decode[0], 1e-4, 1e-9);
  ASSERT_EQ(g.end.size(), 1u);
  EXPECT_NEAR(g.end[0], 4e-4, 1e-9);
  ASSERT_EQ(g.after_end.size(), 1u);
  EXPECT_NEAR(g.after_end[0], 3e-4, 1e-9);
}

TEST(PlannerBeside, MatchesTheClientsClocksOnTheStepsBothSaw) {
  // Steps of uneven length, as a loaded machine runs them; the other client's clock started
  // 123.4 ms later, so its times are that much smaller, and its first tokens come 0.05-0.15 ms
  // after the stream's token of the same step.
  std::vector<double> stream = {0.0};
  for (int k = 1; k <= 400; ++k) stream.push_back(stream.back() + 1e-3 + 1e-4 * double((k * 37) % 11));
  std::vector<std::vector<double>> others;
  for (int k = 10; k < 390; k += 40) others.push_back({stream[size_t(k)] + 5e-5 + 1e-5 * (k % 10) - 0.1234});
  const auto [offset, matched] = align_clocks(stream, others);
  EXPECT_EQ(matched, int(others.size()));
  EXPECT_NEAR(offset, 0.1234, 2e-4);
}

TEST(PlannerBeside, ReadsARunFromItsTwoClientsRecords) {
  // The stream's client: one request of 300 tokens, steps of uneven length. The other client
  // started its clock 40 ms later and sent twelve requests of 4 tokens, each arriving 2 ms before
  // the step that gives its first token; their tokens reach it 0.1 ms after the stream's.
  bench::Outcome stream;
  stream.start_s = 0.01;
  stream.ttft_s = 0.005;
  stream.output_tokens = 300;
  stream.prompt_tokens = 32;
  std::mt19937 rng(7);  // not periodic: a period of steps would match the clocks a period apart too
  for (int k = 1; k < 300; ++k) stream.itl_s.push_back(std::uniform_real_distribution<double>(1e-3, 2e-3)(rng));
  const std::vector<double> st = token_times(stream);
  std::vector<bench::Outcome> beside;
  for (int first = 20; first <= 240; first += 20) {
    bench::Outcome o;
    o.start_s = st[size_t(first)] - 2e-3 - 0.04;
    o.ttft_s = 2e-3 + 1e-4;
    o.prompt_tokens = 16;
    o.output_tokens = 4;
    for (int k = first + 1; k < first + 4; ++k) o.itl_s.push_back(st[size_t(k)] - st[size_t(k - 1)]);
    beside.push_back(o);
  }
  const BesideRun r = beside_run({stream}, beside);
  EXPECT_EQ(r.matched, 12);
  EXPECT_NEAR(r.offset_s, 0.04, 3e-4);
  ASSERT_EQ(r.others.size(), 12u);
  EXPECT_NEAR(r.others[5].front(), st[120] + 1e-4, 3e-4);
  // The trace: arrivals from the first (the stream's), in order, with each request's lengths.
  ASSERT_EQ(r.trace.size(), 13u);
  EXPECT_EQ(r.trace[0].arrival_s, 0.0);
  EXPECT_EQ(r.trace[0].output, 300);
  EXPECT_NEAR(r.trace[6].arrival_s, st[120] - 2e-3 - 0.01, 3e-4);
  EXPECT_EQ(r.trace[6].prompt, 16);
  // The same requests on one clock (as the simulator writes them): the longest is the stream.
  std::vector<bench::Outcome> one = beside;
  for (auto& o : one) o.start_s += 0.04;
  one.insert(one.begin() + 1, stream);
  const BesideRun s = beside_run(one);
  EXPECT_EQ(s.stream, st);
  EXPECT_EQ(s.matched, 12);
  EXPECT_EQ(s.offset_s, 0.0);
  EXPECT_NEAR(s.others[11].front(), st[240] + 1e-4, 1e-9);
}

TEST(PlannerCalibration, AStepStartingARequestIsPricedByTheStreamBesideIt) {
  // A cluster whose steps that start a sequence take 0.8 ms longer: the runs of one request at a
  // time cannot tell that from the router's per-request work, the stream beside short requests
  // can. Fitted from a profile without it, the simulator's start excess matches the measured one.
  CostProfile truth = shared_cores_profile();
  truth.router_per_request_s = 2e-3;
  truth.router_request_cpu_share = 0.5;
  truth.step_start_s = 8e-4;
  Deployment d;
  d.micro_batches = 1;
  const auto [one, long_prompt, loaded] = three_runs(truth, d);
  BesidePoint beside;
  std::vector<SimRequest> run = {{0.0, 32, 600, 0}};
  for (int k = 0; k < 12; ++k) run.push_back({0.05 + 0.07 * k, 32, 8, 0});
  beside.runs = {run};
  beside.start_excess_s = simulated_start_excess(truth, d, beside.runs).value();
  CostProfile fitted = shared_cores_profile();
  calibrate_cluster(fitted, d, one, long_prompt, loaded, nullptr, &beside);
  EXPECT_NEAR(fitted.step_start_s, truth.step_start_s, 0.25 * truth.step_start_s);
  EXPECT_NEAR(beside.fitted_start_excess_s, beside.start_excess_s, 0.15 * beside.start_excess_s);
  // Without the stream beside it the start is left unpriced.
  CostProfile blind = shared_cores_profile();
  calibrate_cluster(blind, d, one, long_prompt, loaded, nullptr);
  EXPECT_EQ(blind.step_start_s, 0.0);
}

TEST(PlannerSearch, ReturnsTheCheapestShapeMeetingTheSlo) {
  CostProfile p = toy_profile();
  p.gpus_per_node = 1;  // one process per node: every process costs
  p.node_cost_per_hour = 1;
  const TrafficSpec t = fixed_traffic("poisson:400", 32, 16, 400);
  const auto load = ExpertLoad::uniform(8);
  SearchSpace space;
  space.max_attention = 3;
  space.max_experts = 3;
  space.replicas = {1};
  space.micro_batches = {1, 2};
  space.step_budgets = {512};
  const Slo slo = Slo::parse("ttft_p99=60ms,itl_p99=14ms");
  const SearchResult r = search(p, t, load, slo, space);
  ASSERT_TRUE(r.best.has_value());
  EXPECT_TRUE(slo.met_by(r.best->result));
  const int chosen = r.best->dep.attention_workers + r.best->dep.expert_hosts;
  // Every strictly cheaper shape fails with every knob tried.
  for (int a = 1; a <= 3; ++a)
    for (int e = 1; e <= 3; ++e) {
      if (a + e >= chosen) continue;
      for (int mb : {1, 2}) {
        Deployment d;
        d.attention_workers = a;
        d.expert_hosts = e;
        d.micro_batches = mb;
        EXPECT_FALSE(slo.met_by(simulate(p, d, t, load))) << a << " attention, " << e << " experts, mb " << mb;
      }
    }
  EXPECT_GT(chosen, 2) << r.best->dep.describe();  // the smallest shape is not enough: the search did choose
  const std::string values = helm_values(*r.best, p, slo.describe(), t.describe(), "");
  EXPECT_NE(values.find("expertHosts: " + std::to_string(r.best->dep.expert_hosts)), std::string::npos);
  EXPECT_NE(values.find("  replicas: " + std::to_string(r.best->dep.attention_workers)), std::string::npos);
}

TEST(PlannerSearch, SloParsing) {
  const Slo s = Slo::parse("ttft_p99=2s,itl_p99=100ms");
  EXPECT_DOUBLE_EQ(s.ttft_p99, 2.0);
  EXPECT_DOUBLE_EQ(s.itl_p99, 0.1);
  EXPECT_FALSE(std::isfinite(s.e2e_p99));
  EXPECT_THROW(Slo::parse("ttft_p99"), Error);
  EXPECT_THROW(Slo::parse("latency=2s"), Error);
  EXPECT_THROW(Slo::parse("ttft_p99=-1s"), Error);
}

TEST(PlannerTraffic, SpecsAndErrors) {
  EXPECT_EQ(TrafficSpec::parse("poisson:5").rate, 5);
  EXPECT_EQ(TrafficSpec::parse("closed:8").concurrency, 8);
  EXPECT_THROW(TrafficSpec::parse("poisson"), Error);
  EXPECT_THROW(TrafficSpec::parse("poisson:-1"), Error);
  EXPECT_THROW(TrafficSpec::parse("uniform:3"), Error);
  TrafficSpec t = TrafficSpec::parse("poisson:100");
  t.duration_s = 50;
  const auto arr = open_loop_arrivals(t);
  EXPECT_NEAR(double(arr.size()), 5000, 300);  // 100/s for 50 s
  for (size_t i = 1; i < arr.size(); ++i) ASSERT_LE(arr[i - 1].arrival_s, arr[i].arrival_s);
}

TEST(PlannerCost, RooflineProfileRoundTripsThroughJson) {
  const CostProfile p = roofline_profile(deepseek_moe_16b_config(), hardware("h100"));
  EXPECT_EQ(p.kind, "roofline");
  EXPECT_GT(p.expert_per_expert_s, 0);
  EXPECT_GT(p.kv_tokens_per_worker, 100000);
  const CostProfile q = CostProfile::from_json(p.to_json());
  EXPECT_DOUBLE_EQ(q.attn_fixed_s, p.attn_fixed_s);
  EXPECT_EQ(q.model.num_experts, 64);
  EXPECT_THROW(hardware("tpu"), Error);
  // h200 has more memory bandwidth than h100: its expert batches are cheaper.
  EXPECT_LT(roofline_profile(deepseek_moe_16b_config(), hardware("h200")).expert_per_expert_s, p.expert_per_expert_s);
}

TEST(PlannerCost, ProfileFromGpuBenchmarkResults) {
  // bench.md as tests/gpu/run.sh writes it (bench_gpu_kernels' header and table, abridged).
  const std::string md =
      "device: NVIDIA H200, 132 SMs; measured copy bandwidth (read + write): 4000 GB/s\n\n"
      "| kernel       | shape                    | time (us) | GB/s      | roofline | TFLOP/s  |\n"
      "|--------------|--------------------------|-----------|-----------|----------|----------|\n"
      "| rmsnorm      | 1x4096 w:bf16            |    4.0000 |       4.1 |     0.1% |     0.00 |\n"
      "| matmul       | 1x4096x14336 w:bf16      |   40.0000 |    2936.0 |    73.4% |     2.94 |\n"
      "| matmul       | 4096x4096x4096 w:bf16    |  200.0000 |     671.0 |    16.8% |   687.19 |\n"
      "| matmul       | 4096x4096x4096 w:f32     |  900.0000 |     223.7 |     5.6% |   152.71 |\n";
  const ModelConfig m = deepseek_moe_16b_config();
  const CostProfile p = gpu_results_profile(m, md);
  EXPECT_EQ(p.kind, "benchmarked");
  EXPECT_NE(p.note.find("h200"), std::string::npos);  // links, memory, price: the named hardware's
  const double expert_bytes = 3.0 * double(m.hidden_size) * double(m.moe_intermediate_size) * 2;
  EXPECT_NEAR(p.expert_per_expert_s, expert_bytes / 4000e9, 1e-12);          // the measured bandwidth
  EXPECT_NEAR(p.expert_per_row_s, 2 * expert_bytes / 2 / 687.19e12, 1e-15);  // the bf16 matmul, not f32
  EXPECT_NEAR(p.expert_fixed_s, 4 * 4e-6, 1e-12);                            // the fastest kernel
  EXPECT_EQ(p.gpus_per_node, 8);
  EXPECT_EQ(CostProfile::from_json(p.to_json()).kind, "benchmarked");
  EXPECT_THROW(gpu_results_profile(m, "| matmul | 1x1x1 w:bf16 | 1 | 1 | 1% | 1 |\n"), Error);
  EXPECT_THROW(gpu_results_profile(m, md.substr(0, md.find("| matmul"))), Error);
}

TEST(PlannerCost, EngineFitPricesPromptRowsApartFromDecodeRows) {
  // Decode rows cost 50 us each (2 layers), prompt rows 4 us: a prompt is not a pile of decode steps.
  CostProfile p = toy_profile();
  EngineMeasurements m;
  for (double b : {1.0, 4.0, 16.0, 64.0})
    for (double c : {32.0, 256.0}) {
      const double ctx = b * (c + 5);
      m.steps.push_back({b, ctx, 1e-3 + 5e-5 * b + 2e-8 * ctx, 0, false});
    }
  for (double c : {32.0, 128.0, 256.0}) {
    const double ctx = c * (c + 1) / 2;
    m.steps.push_back({c, ctx, 1e-3 + 4e-6 * c + 1e-9 * ctx, 0, true});
  }
  m.experts = {{1, 1, 1e-4}, {2, 8, 2.2e-4}, {4, 64, 5e-4}};
  fit_engine_costs(m, p);
  EXPECT_NEAR(p.attn_per_row_s, 2.5e-5, 1e-9);  // per layer
  EXPECT_NEAR(p.attn_per_prefill_row_s, 2e-6, 1e-9);
  EXPECT_NEAR(p.attn_per_prefill_ctx_s, 5e-10, 1e-12);
  EXPECT_NEAR(p.attn_fixed_s, 5e-4, 1e-8);
}

TEST(PlannerCost, FitRecoversALinearCost) {
  std::vector<std::vector<double>> x;
  std::vector<double> y;
  for (int r = 1; r <= 64; r *= 2)
    for (int c : {16, 256}) {
      x.push_back({1.0, double(r), double(r * c)});
      y.push_back(2e-3 + 5e-5 * r + 1e-7 * r * c);
    }
  const auto b = fit_linear(x, y);
  EXPECT_NEAR(b[0], 2e-3, 1e-9);
  EXPECT_NEAR(b[1], 5e-5, 1e-11);
  EXPECT_NEAR(b[2], 1e-7, 1e-13);
}

}  // namespace
}  // namespace moemesh::planner
