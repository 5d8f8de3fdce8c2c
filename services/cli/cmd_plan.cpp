// `moemesh plan`: the capacity planner (docs/planner.md).
//   moemesh plan            simulate one deployment under one traffic (core/planner_sim.h)
//   moemesh plan profile    measure this machine's costs (or write a GPU roofline profile)
//   moemesh plan search     the cheapest shape meeting an SLO, and its Helm values
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <thread>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "actors/kv_client.h"
#include "actors/local_cluster.h"
#include "core/bench_stats.h"
#include "core/error.h"
#include "core/model_config.h"
#include "core/planner_measure.h"
#include "core/planner_search.h"
#include "kernels/cpu/thread_pool.h"
#include "services/cli/commands.h"
#include "services/cli/plot.h"

namespace moemesh::planner {
// A calibration run as a profile records it (both directions, for --refit).
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE_WITH_DEFAULT(CalibrationPoint, concurrency, rate, prompt, output, requests,
                                                ttft_p50_s, itl_p50_s, itl_p90_s)
}  // namespace moemesh::planner

namespace moemesh::cli {
namespace fs = std::filesystem;
using namespace moemesh::planner;

namespace {

// What `plan` and `plan search` share: the profile, the traffic, the expert load, outputs.
struct PlanArgs {
  std::string profile, hardware, model;
  std::string traffic = "poisson:10", prompt_len = "128", output_len = "64";
  int64_t requests = 0;
  double duration_s = 60, prefix_hit_rate = 0, expert_skew = 0;
  std::string expert_load;
  int tenants = 1;
  uint64_t seed = 1;
  Deployment dep;
  int64_t batch_window_us = 200;
  std::string transport = "zmq";
  int64_t layers_per_event = 0;
  double sample_every_s = 1.0;
  std::string csv, plot, json, per_request;
};

void add_common(CLI::App* cmd, PlanArgs& a) {
  cmd->add_option("--profile", a.profile, "cost profile (JSON) from `moemesh plan profile`")->check(CLI::ExistingFile);
  cmd->add_option("--hardware", a.hardware, "instead of --profile: a GPU roofline profile (h100, h200, a100)");
  cmd->add_option("--model", a.model,
                  "with --hardware: a checkpoint folder or config.json, or deepseek-moe-16b (the default)");
  cmd->add_option("--traffic", a.traffic, "poisson:RATE, closed:CONCURRENCY, bursts:RATE:PERIOD_S or trace:FILE.csv")
      ->capture_default_str();
  cmd->add_option("--prompt-len", a.prompt_len, "prompt tokens: N, uniform:A:B or normal:MEAN:SD")
      ->capture_default_str();
  cmd->add_option("--output-len", a.output_len, "output tokens: N, uniform:A:B or normal:MEAN:SD")
      ->capture_default_str();
  cmd->add_option("--requests", a.requests, "requests to simulate (default: --duration-s of arrivals)");
  cmd->add_option("--duration-s", a.duration_s, "simulated seconds of arrivals")->capture_default_str();
  cmd->add_option("--prefix-hit-rate", a.prefix_hit_rate, "share of prompt tokens found in the prefix cache")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--expert-skew", a.expert_skew, "Zipf exponent of the expert load (0: uniform)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--expert-load", a.expert_load, "measured per-expert load: a JSON array or one number a line")
      ->check(CLI::ExistingFile);
  cmd->add_option("--tenants", a.tenants, "tenants the requests are dealt over")->check(CLI::PositiveNumber);
  cmd->add_option("--seed", a.seed, "seed of arrivals, lengths and routing")->capture_default_str();
  cmd->add_option("--max-running", a.dep.max_running_per_worker, "sequences per attention worker (router flag)")
      ->capture_default_str();
  cmd->add_option("--kv-tokens", a.dep.kv_tokens_per_worker, "KV capacity per attention worker (0: the profile's)");
  cmd->add_option("--transport", a.transport, "expert dispatch payloads: zmq or nccl")
      ->check(CLI::IsMember({"zmq", "nccl"}))
      ->capture_default_str();
  cmd->add_option("--processes-per-node", a.dep.processes_per_node,
                  "attention workers + expert hosts a node holds (0: the profile's)");
  cmd->add_option("--batch-window-us", a.batch_window_us, "expert hosts' batching window")->capture_default_str();
  cmd->add_option("--layers-per-event", a.layers_per_event,
                  "1: exact per layer; the model's layers: analytic steps (fast); 0: by the run's size")
      ->capture_default_str();
  cmd->add_option("--sample-every-s", a.sample_every_s, "queue timeline resolution")->capture_default_str();
  cmd->add_option("--json", a.json, "write the result as JSON to this file");
}

// `moemesh plan` only: a request-by-request record, the format of `moemesh bench --per-request`.
void add_per_request(CLI::App* cmd, PlanArgs& a) {
  cmd->add_option("--per-request", a.per_request,
                  "also write one JSON line per simulated request: start, end, TTFT and inter-token gaps (seconds), "
                  "as moemesh bench --per-request does");
}

CostProfile load_profile(const PlanArgs& a) {
  if (!a.profile.empty()) return CostProfile::load(a.profile);
  if (a.hardware.empty()) throw Error("give --profile FILE or --hardware h100|h200|a100");
  ModelConfig m = deepseek_moe_16b_config();
  if (!a.model.empty() && a.model != "deepseek-moe-16b") {
    const fs::path p = fs::is_directory(a.model) ? fs::path(a.model) / "config.json" : fs::path(a.model);
    m = ModelConfig::load(p);
  }
  return roofline_profile(m, hardware(a.hardware));
}

TrafficSpec make_traffic(const PlanArgs& a) {
  TrafficSpec t = TrafficSpec::parse(a.traffic);
  t.prompt_len = bench::LengthDist::parse(a.prompt_len);
  t.output_len = bench::LengthDist::parse(a.output_len);
  t.requests = a.requests;
  t.duration_s = a.duration_s;
  t.prefix_hit_rate = a.prefix_hit_rate;
  t.seed = a.seed;
  if (t.kind != TrafficSpec::Kind::trace) {
    t.tenants.clear();
    for (int i = 0; i < a.tenants; ++i) t.tenants.push_back("tenant-" + std::to_string(i));
  }
  return t;
}

ExpertLoad make_load(const PlanArgs& a, const CostProfile& p) {
  const int64_t experts = std::max<int64_t>(1, p.model.num_experts);
  if (!a.expert_load.empty()) return ExpertLoad::load(a.expert_load, experts);
  return a.expert_skew > 0 ? ExpertLoad::zipf(experts, a.expert_skew) : ExpertLoad::uniform(experts);
}

SimOptions make_options(const PlanArgs& a) {
  SimOptions o;
  o.layers_per_event = a.layers_per_event;
  o.sample_every_s = a.sample_every_s;
  return o;
}

void finish_deployment(PlanArgs& a) {
  a.dep.nccl = a.transport == "nccl";
  a.dep.expert_batch_window_s = double(a.batch_window_us) * 1e-6;
}

std::string ms(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", s * 1e3);
  return b;
}

void print_result(const SimResult& r, const CostProfile& p, const Deployment& d, const TrafficSpec& t) {
  std::cout << "profile     " << p.name << " (" << p.kind << (p.kind == "roofline" ? ", not measured" : "") << ")\n";
  std::cout << "deployment  " << d.describe() << ", " << d.nodes(p) << " node(s)\n";
  std::cout << "traffic     " << t.describe() << "\n";
  char b[256];
  std::snprintf(
      b, sizeof b, "completed   %lld of %lld requests in %.1f s simulated (%lld unfinished, %lld preemptions)\n",
      (long long)r.completed, (long long)r.requests, r.duration_s, (long long)r.unfinished, (long long)r.preemptions);
  std::cout << b;
  std::snprintf(b, sizeof b, "throughput  %.2f req/s, %.1f output tok/s\n", r.requests_per_s, r.output_tok_s);
  std::cout << b;
  std::cout << "              p50 ms    p90 ms    p99 ms\n";
  const std::pair<const char*, const LatencySummary*> rows[] = {
      {"TTFT", &r.ttft}, {"ITL", &r.itl}, {"E2E", &r.e2e}, {"queue", &r.queue}};
  for (auto [name, s] : rows) {
    std::snprintf(b, sizeof b, "%-8s %9s %9s %9s\n", name, ms(s->p50).c_str(), ms(s->p90).c_str(), ms(s->p99).c_str());
    std::cout << b;
  }
  std::snprintf(
      b, sizeof b,
      "utilisation attention %.0f%%, expert hosts %.0f%% (busiest %.0f%%), network %.0f%%%s, KV peak %.0f%%\n",
      100 * r.attention_util, 100 * r.expert_util, 100 * r.expert_util_max, 100 * r.network_util,
      p.shared_node_compute ? (", node cores " + std::to_string(int(100 * r.node_util)) + "%").c_str() : "",
      100 * r.kv_used_peak);
  std::cout << b;
  std::snprintf(b, sizeof b, "a lane's MoE layer goes to %.2f expert hosts; they merge %.2f dispatches per batch\n",
                r.hosts_per_dispatch, r.dispatches_per_batch);
  std::cout << b;
  std::cout << "bottleneck  " << r.bottleneck << "\n";
  std::snprintf(b, sizeof b, "simulator   %lld events, %s, %.2f s of wall time\n", (long long)r.events,
                r.layers_per_event == 1 ? "per layer" : "analytic steps", r.wall_s);
  std::cout << b;
}

// The queue timeline as a PNG.
void plot_timeline(const std::string& csv, const std::string& png) {
  cli::plot_csv(R"(t = [float(r["t_s"]) for r in rows]
fig, ax = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
ax[0].plot(t, [int(r["waiting"]) for r in rows], label="waiting")
ax[0].plot(t, [int(r["running"]) for r in rows], label="running")
ax[0].set_ylabel("requests"); ax[0].legend()
ax[1].plot(t, [100 * float(r["kv_used"]) for r in rows], color="tab:red")
ax[1].set_ylabel("KV used %")
ax[2].plot(t, [float(r["output_tok_s"]) for r in rows], color="tab:green")
ax[2].set_ylabel("output tok/s"); ax[2].set_xlabel("simulated seconds")
fig.suptitle("moemesh plan: queues over time")
)",
                csv, png);
}

void run_plan(PlanArgs a) {
  finish_deployment(a);
  const CostProfile p = load_profile(a);
  const TrafficSpec t = make_traffic(a);
  SimOptions o = make_options(a);
  o.trace_requests = !a.per_request.empty();
  const SimResult r = simulate(p, a.dep, t, make_load(a, p), o);
  print_result(r, p, a.dep, t);
  if (!a.per_request.empty()) {
    std::ofstream out(a.per_request);
    for (const auto& tr : r.traces) out << bench::outcome_json(tr).dump() << "\n";
    if (!out) throw Error("--per-request: cannot write " + a.per_request);
  }
  if (!a.json.empty()) {
    nlohmann::json j = r.to_json();
    j["profile"] = p.name;
    j["deployment"] = a.dep.describe();
    j["traffic"] = t.describe();
    std::ofstream(a.json) << j.dump(2) << "\n";
  }
  std::string csv = a.csv;
  if (csv.empty() && !a.plot.empty()) csv = a.plot + ".csv";
  if (!csv.empty()) {
    std::ofstream out(csv);
    if (!out) throw Error(csv + ": cannot write");
    out << timeline_csv(r);
  }
  if (!a.plot.empty()) plot_timeline(csv, a.plot);
}

// The ZeroMQ round trip (DEALER -> ROUTER echo over loopback TCP, two threads) per payload size:
// what the links of a measured profile are fitted to.
LinkCost measure_zmq(int rounds) {
  zmq::context_t ctx(1);
  zmq::socket_t router(ctx, zmq::socket_type::router);
  router.bind("tcp://127.0.0.1:*");
  const std::string ep = router.get(zmq::sockopt::last_endpoint);
  std::thread echo([&router] {
    while (true) {
      zmq::message_t id, m;
      if (!router.recv(id) || !router.recv(m)) return;
      const bool stop = m.size() == 0;
      router.send(id, zmq::send_flags::sndmore);
      router.send(m, zmq::send_flags::none);
      if (stop) return;
    }
  });
  zmq::socket_t dealer(ctx, zmq::socket_type::dealer);
  dealer.connect(ep);
  std::vector<std::vector<double>> x;
  std::vector<double> y;
  for (size_t bytes : {size_t(256), size_t(4096), size_t(65536), size_t(524288)}) {
    std::vector<char> payload(bytes, 1);
    for (int r = 0; r < rounds; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      dealer.send(zmq::buffer(payload), zmq::send_flags::none);
      zmq::message_t back;
      if (!dealer.recv(back)) throw Error("plan profile: ZeroMQ echo failed");
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r >= 3) {  // the first rounds set up the connection
        x.push_back({1.0, double(bytes)});
        y.push_back(s);
      }
    }
  }
  dealer.send(zmq::message_t(), zmq::send_flags::none);
  zmq::message_t last;
  (void)dealer.recv(last);
  echo.join();
  const auto b = fit_linear(x, y);
  // A round trip is two one-way transfers.
  return {b[0] / 2, b[1] > 0 ? 2 / b[1] : 1e12, 0};
}

// The KV store's costs (actors/kv_client.h) against a moemesh-kvstore process on loopback, rounds
// 2 ms apart as steps are (the store sleeps between them, as in a cluster): a step's prefix-cache
// lookup, a KvClient round trip for two-block chains the store does not hold (random prompts
// miss), the median of `rounds`; and what a finished sequence's put of its blocks takes the store,
// from how much later a lookup that needs the last of eight puts is answered than one alone (the
// store stores its puts in order), for puts of one block and of six (medians of `rounds` / 4),
// fitted fixed + per block.
struct KvStoreCosts {
  double lookup_s = 0, put_s = 0, put_per_block_s = 0;
};

KvStoreCosts measure_kv_store(int rounds, size_t block_floats) {
  const std::string bin = actors::service_binary(fs::read_symlink("/proc/self/exe").parent_path(), "kvstore");
  const std::string ep = "tcp://127.0.0.1:" + std::to_string(actors::pick_free_port());
  const std::vector<std::string> args{
      bin, "--listen",    ep,    "--admin-port", std::to_string(actors::pick_free_port()), "--threads",
      "1", "--log-level", "warn"};
  const pid_t pid = actors::spawn_service(args, "/dev/null", /*append_log=*/true);
  struct Stop {
    pid_t pid;
    ~Stop() {
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
    }
  } stop{pid};

  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 1);
  caf::actor_system sys{cfg};
  actors::KvClient client(sys,
                          {ep, "plan-profile", std::chrono::milliseconds(1000), std::chrono::milliseconds(0), "", {}});
  auto keys = [](int32_t salt, int64_t blocks) {
    std::vector<int32_t> tokens(size_t(blocks * kBlockTokens));
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = salt * 7919 + int32_t(i);
    return prefix_block_keys("plan-profile", tokens);
  };
  auto query = [&](int32_t salt) { return std::vector<actors::PrefixQuery>{{keys(salt, 2), {}}}; };
  const auto ready_by = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (int32_t salt = 0;; ++salt) {  // until the store answers
    const uint64_t failures = client.stats().fetch_failures;
    client.fetch_many(query(salt), 64);
    if (client.stats().fetch_failures == failures) break;
    if (std::chrono::steady_clock::now() > ready_by) throw Error("plan profile: " + bin + " does not answer on " + ep);
  }
  const uint64_t warm_failures = client.stats().fetch_failures;
  int32_t salt = 1000;
  auto median = [](const std::vector<double>& v) { return bench::percentile(v, 50); };
  // One lookup, after `puts` puts of `blocks` blocks each: seconds until it is answered. The
  // store answers a lookup before the puts queued ahead of it unless it needs one of them: this
  // one names a block of the last put (after one it does not hold, so no block comes back), so
  // it is answered once all of them are stored.
  auto lookup_after = [&](int puts, int64_t blocks) {
    std::vector<std::vector<BlockKey>> put_keys;
    std::vector<std::vector<std::vector<float>>> put_blocks;
    for (int i = 0; i < puts; ++i) {
      put_keys.push_back(keys(salt++, blocks));
      put_blocks.emplace_back(size_t(blocks), std::vector<float>(block_floats, 1.0f));
    }
    auto q = query(salt++);
    if (puts > 0) q[0].keys.back() = put_keys.back()[0];
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < puts; ++i) client.publish(put_keys[size_t(i)], std::move(put_blocks[size_t(i)]));
    client.fetch_many(q, 64);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  KvStoreCosts c;
  std::vector<double> t;
  for (int r = 0; r < rounds; ++r) t.push_back(lookup_after(0, 0));
  c.lookup_s = median(t);
  constexpr int kPuts = 8;
  std::vector<double> one, six;
  for (int r = 0; r < rounds / 4; ++r) {
    one.push_back(lookup_after(kPuts, 1));
    six.push_back(lookup_after(kPuts, 6));
  }
  const double put1 = std::max(0.0, (median(one) - c.lookup_s) / kPuts),
               put6 = std::max(put1, (median(six) - c.lookup_s) / kPuts);
  c.put_per_block_s = (put6 - put1) / 5;
  c.put_s = std::max(0.0, put1 - c.put_per_block_s);
  if (client.stats().fetch_failures > warm_failures) throw Error("plan profile: KV store lookups failed against " + ep);
  return c;
}

struct ProfileArgs {
  std::string model, out, hardware, name = "this-machine";
  std::vector<int64_t> batches = {1, 2, 4, 8, 16, 32, 64}, contexts = {32, 128, 256};
  int repeats = 9, zmq_rounds = 200;
  // Calibration against a running cluster (`moemesh up`) of this shape.
  std::string calibrate_url, refit, gpu_results;
  int cal_attention = 1, cal_experts = 1, cal_replicas = 1, cal_micro_batches = 2, cal_concurrency = 48,
      cal_repeats = 3;
  int64_t cal_long_prompt = 112;  // extra prompt tokens of the long-prompt run
  uint64_t cal_seed = 1000;       // the calibration runs' seeds: this, this + 1, ...
  int64_t kv_tokens = 1024 * 16;
  int processes_per_node = 64;
  int cores = 0;  // compute threads of the engine timing, as `moemesh up --cores` (0: every core)
};

// A `moemesh bench` command line against the cluster being calibrated (this binary, output to
// /dev/null). Each run has prompts of its own (its own seed): a prompt seen before would be
// served from the prefix cache.
std::string bench_command(const ProfileArgs& a, const std::string& load, int64_t requests, int64_t prompt,
                          int64_t output, int64_t vocab, const std::string& out_flags) {
  static int run = 0;
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  return "'" + self + "' bench --url '" + a.calibrate_url + "' " + load + " --requests " + std::to_string(requests) +
         " --prompt-len " + std::to_string(prompt) + " --output-len " + std::to_string(output) + " --vocab " +
         std::to_string(vocab) + " --seed " + std::to_string(a.cal_seed + run++) + " " + out_flags + " > /dev/null";
}

// One `moemesh bench` run against the cluster: the point with what it measured.
CalibrationPoint bench_point(const ProfileArgs& a, CalibrationPoint c, int64_t vocab) {
  const fs::path out = fs::temp_directory_path() / ("moemesh-plan-cal-" + std::to_string(::getpid()) + ".json");
  const std::string load =
      c.rate > 0 ? "--rate " + std::to_string(c.rate) : "--concurrency " + std::to_string(c.concurrency);
  const std::string cmd =
      bench_command(a, load, c.requests, c.prompt, c.output, vocab, "--json '" + out.string() + "'");
  if (std::system(cmd.c_str()) != 0) throw Error("plan profile: calibration bench failed: " + cmd);
  std::ifstream in(out);
  nlohmann::json j;
  in >> j;
  fs::remove(out);
  c.ttft_p50_s = j.at("ttft_ms").at("p50").get<double>() * 1e-3;
  c.itl_p50_s = j.at("itl_ms").at("p50").get<double>() * 1e-3;
  c.itl_p90_s = j.at("itl_ms").at("p90").get<double>() * 1e-3;
  return c;
}

// The median of `repeats` runs of a point (each value apart): one run on a shared machine can
// land in another job's burst.
CalibrationPoint bench_median(const ProfileArgs& a, const CalibrationPoint& c, int64_t vocab) {
  std::vector<double> ttft, itl, itl90;
  for (int r = 0; r < std::max(1, a.cal_repeats); ++r) {
    const CalibrationPoint m = bench_point(a, c, vocab);
    ttft.push_back(m.ttft_p50_s);
    itl.push_back(m.itl_p50_s);
    itl90.push_back(m.itl_p90_s);
  }
  auto mid = [](std::vector<double>& v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  CalibrationPoint out = c;
  out.ttft_p50_s = mid(ttft);
  out.itl_p50_s = mid(itl);
  out.itl_p90_s = mid(itl90);
  return out;
}

// The "beside" runs: one long stream (2000 tokens) while 30 requests of 8 tokens arrive beside it
// at 15/s, two `moemesh bench` clients at once, three times. The clients' clocks are matched on
// the steps both saw; a run that does not match (fewer than 80% of the first tokens) is left out.
BesidePoint beside_point(const ProfileArgs& a, int64_t vocab) {
  const std::string tag = std::to_string(::getpid());
  const fs::path stream_file = fs::temp_directory_path() / ("moemesh-plan-stream-" + tag + ".jsonl"),
                 beside_file = fs::temp_directory_path() / ("moemesh-plan-beside-" + tag + ".jsonl");
  BesidePoint b;
  std::vector<double> excess;
  for (int r = 0; r < 3; ++r) {
    const std::string stream_cmd =
        bench_command(a, "--concurrency 1", 1, 32, 2000, vocab, "--per-request '" + stream_file.string() + "'");
    const std::string beside_cmd =
        bench_command(a, "--rate 15", 30, 32, 8, vocab, "--per-request '" + beside_file.string() + "'");
    int stream_rc = 0;
    std::thread stream([&] { stream_rc = std::system(stream_cmd.c_str()); });
    // The stream is running before the first request beside it arrives.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const int beside_rc = std::system(beside_cmd.c_str());
    stream.join();
    if (stream_rc != 0 || beside_rc != 0) throw Error("plan profile: calibration bench failed: " + beside_cmd);
    const auto so = bench::read_outcomes(stream_file), bo = bench::read_outcomes(beside_file);
    fs::remove(stream_file);
    fs::remove(beside_file);
    if (so.size() != 1) throw Error("plan profile: the stream's bench answered no request");
    BesideRun run = beside_run(so, bo);
    if (run.matched < int(0.8 * double(run.others.size()))) {
      std::cout << "plan profile: beside run " << r << " left out: " << run.matched << " of " << run.others.size()
                << " first tokens matched the stream's steps" << std::endl;
      continue;
    }
    const GapExcess g = gap_excess(run.stream, run.others);
    excess.insert(excess.end(), g.start.begin(), g.start.end());
    b.runs.push_back(std::move(run.trace));
  }
  std::sort(excess.begin(), excess.end());
  b.start_excess_s = excess.empty() ? 0.0 : excess[excess.size() / 2];
  return b;
}

nlohmann::json beside_json(const BesidePoint& b) {
  nlohmann::json runs = nlohmann::json::array();
  for (const auto& run : b.runs) {
    nlohmann::json r = nlohmann::json::array();
    for (const SimRequest& q : run) r.push_back({q.arrival_s, q.prompt, q.output});
    runs.push_back(std::move(r));
  }
  return {{"start_excess_s", b.start_excess_s}, {"runs", std::move(runs)}};
}

// `where` names the record in the error a malformed one gets.
BesidePoint beside_from_json(const nlohmann::json& j, const std::string& where) {
  BesidePoint b;
  try {
    b.start_excess_s = j.at("start_excess_s");
    for (const auto& r : j.at("runs")) {
      std::vector<SimRequest> run;
      for (const auto& q : r) run.push_back({q.at(0).get<double>(), q.at(1).get<int64_t>(), q.at(2).get<int64_t>(), 0});
      b.runs.push_back(std::move(run));
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + ": " + e.what());
  }
  return b;
}

// The measurements and the profile before calibration: `--refit` starts again from them.
nlohmann::json calibration_record(const CostProfile& p, const Deployment& d, const std::vector<CalibrationPoint>& pts) {
  nlohmann::json j = {{"attention", d.attention_workers},
                      {"experts", d.expert_hosts},
                      {"replicas", d.replicas},
                      {"micro_batches", d.micro_batches},
                      {"processes_per_node", d.processes_per_node},
                      {"points", pts},
                      {"uncalibrated", p.to_json()}};
  return j;
}

// `plan profile --refit`: the calibration of a profile fitted again (after a simulator change)
// from the measurements it recorded, without a cluster.
void refit_profile(const ProfileArgs& a) {
  const CostProfile old = CostProfile::load(a.refit);
  if (old.calibration.is_null()) throw Error(a.refit + ": the profile was not calibrated (--calibrate-url)");
  const auto& c = old.calibration;
  CostProfile p = CostProfile::from_json(c.at("uncalibrated"));
  p.calibration = c;
  p.note = old.note + "; refitted";
  Deployment d;
  d.attention_workers = c.at("attention");
  d.expert_hosts = c.at("experts");
  d.replicas = c.at("replicas");
  d.micro_batches = c.at("micro_batches");
  d.processes_per_node = c.at("processes_per_node");
  const auto& pts = c.at("points");
  if (pts.size() != 3 && pts.size() != 4) throw Error(a.refit + ": expected 3 or 4 calibration points");
  const auto idle = pts.size() == 4 ? std::optional(pts[3].get<CalibrationPoint>()) : std::nullopt;
  std::optional<BesidePoint> beside;
  if (c.contains("beside")) beside = beside_from_json(c.at("beside"), a.refit + ": calibration.beside");
  calibrate_cluster(p, d, pts[0].get<CalibrationPoint>(), pts[1].get<CalibrationPoint>(),
                    pts[2].get<CalibrationPoint>(), idle ? &*idle : nullptr, beside ? &*beside : nullptr);
  p.save(a.out);
  std::cout << "wrote " << a.out << "\n";
}

void run_profile(const ProfileArgs& a) {
  if (a.out.empty()) throw Error("plan profile: --out FILE is required");
  if (!a.refit.empty()) return refit_profile(a);
  if (!a.hardware.empty() || !a.gpu_results.empty()) {
    ModelConfig m = deepseek_moe_16b_config();
    if (!a.model.empty() && a.model != "deepseek-moe-16b")
      m = ModelConfig::load(fs::is_directory(a.model) ? fs::path(a.model) / "config.json" : fs::path(a.model));
    CostProfile p;
    if (!a.gpu_results.empty()) {
      std::ifstream in(a.gpu_results);
      std::stringstream text;
      text << in.rdbuf();
      p = gpu_results_profile(m, text.str());
    } else {
      p = roofline_profile(m, hardware(a.hardware));
    }
    p.save(a.out);
    std::cout << "wrote " << a.out << ": " << p.note << "\n";
    return;
  }
  if (a.model.empty()) throw Error("plan profile: --model DIR (the checkpoint to measure) or --hardware NAME");
  CostProfile p;
  p.name = a.name;
  p.kind = "measured";
  p.model = ModelConfig::load(fs::path(a.model) / "config.json");
  p.shared_node_compute = true;  // every process of `moemesh up` computes on this machine's cores
  p.node_cores = int(std::max(1u, std::thread::hardware_concurrency()));
  p.gpus_per_node = a.processes_per_node;
  p.activation_bytes = 4;
  p.kv_tokens_per_worker = a.kv_tokens;
  p.kv_bytes_per_token = 2 * p.model.num_hidden_layers * p.model.num_key_value_heads * p.model.head_dim * 4;
  std::cout << "plan profile: timing the engine (" << a.batches.size() * a.contexts.size() << " batch shapes)..."
            << std::endl;
  // The engine computes with the threads a cluster process has: `moemesh up --cores`.
  if (a.cores > 0) cpu::set_compute_threads(a.cores);
  const auto m = measure_engine(a.model, a.batches, a.contexts, a.repeats);
  fit_engine_costs(m, p);
  std::cout << "plan profile: timing ZeroMQ round trips..." << std::endl;
  p.zmq_local = measure_zmq(a.zmq_rounds);
  p.zmq_remote = p.zmq_local;
  p.nccl_local = p.nccl_remote = p.zmq_local;  // no GPUs here: NCCL pairs fall back to ZeroMQ
  std::cout << "plan profile: timing KV store lookups and puts..." << std::endl;
  const KvStoreCosts kv = measure_kv_store(a.zmq_rounds, size_t(p.kv_bytes_per_token) * kBlockTokens / sizeof(float));
  p.prefix_lookup_s = kv.lookup_s;
  p.kv_put_s = kv.put_s;
  p.kv_put_per_block_s = kv.put_per_block_s;
  p.note = "measured on this machine: engine steps (" + std::to_string(m.steps.size()) + " samples, " +
           std::to_string(cpu::compute_threads()) + " compute threads), expert calls (" +
           std::to_string(m.experts.size()) + "), ZeroMQ echo, KV store lookups";
  if (!a.calibrate_url.empty()) {
    // The cluster's own costs (bridge, actor and pool hand-offs, the router's step round trip,
    // HTTP and streaming, the client's CPU): fitted through the simulator on four traffics.
    std::cout << "plan profile: calibrating against " << a.calibrate_url << "..." << std::endl;
    const int64_t vocab = std::min<int64_t>(250, p.model.vocab_size);
    auto point = [](int concurrency, int64_t prompt, int64_t output, int64_t requests) {
      CalibrationPoint c;
      c.concurrency = concurrency;
      c.prompt = prompt;
      c.output = output;
      c.requests = requests;
      return c;
    };
    // A fresh cluster's first requests pay for its warm-up (page faults, allocator growth):
    // one run to absorb that, not recorded.
    bench_point(a, point(4, 32, 48, 32), vocab);
    // Short prompts of two KV blocks: a prompt with a full block pays the worker's prefix-cache
    // lookup in the KV store (a round trip, priced by the lookup measured above) and one of 16
    // tokens has none, as most prompts served do.
    const int64_t short_prompt = 32;
    // One request at a time: 48 of them, because the fit takes differences of their first-token
    // medians (the long prompts' minus the short ones' prices a prompt position), and with 8 and
    // 16 requests that difference moved 0.6-5.3 ms between runs a minute apart (2026-12-06).
    const int64_t one_at_a_time = 48;
    const CalibrationPoint one = bench_median(a, point(1, short_prompt, 48, one_at_a_time), vocab);
    const CalibrationPoint long_prompt =
        bench_median(a, point(1, short_prompt + a.cal_long_prompt, 2, one_at_a_time), vocab);
    const CalibrationPoint loaded =
        bench_median(a, point(a.cal_concurrency, 32, 48, 4 * int64_t(a.cal_concurrency)), vocab);
    // Requests that mostly find the cluster idle: waking from it is priced.
    CalibrationPoint idle = point(1, short_prompt, 8, 36);
    idle.rate = idle_calibration_rate(one.ttft_p50_s, one.itl_p50_s, idle.output);
    idle = bench_median(a, idle, vocab);
    // A step that starts a request, as a stream beside it sees it.
    BesidePoint beside = beside_point(a, vocab);
    const std::vector<CalibrationPoint> meas = {one, long_prompt, loaded, idle};
    Deployment d;
    d.attention_workers = a.cal_attention;
    d.expert_hosts = a.cal_experts;
    d.replicas = a.cal_replicas;
    d.micro_batches = a.cal_micro_batches;
    d.processes_per_node = a.processes_per_node;
    p.calibration = calibration_record(p, d, meas);
    p.calibration["beside"] = beside_json(beside);
    const auto fitted = calibrate_cluster(p, d, one, long_prompt, loaded, &idle, &beside);
    p.note += "; calibrated on " + a.calibrate_url + " (" + d.describe() + "), measured / fitted p50 ms:";
    for (size_t i = 0; i < meas.size(); ++i) {
      char load[48];
      if (meas[i].rate > 0)
        std::snprintf(load, sizeof load, " rate %.2g/s", meas[i].rate);
      else
        std::snprintf(load, sizeof load, " c%d", meas[i].concurrency);
      const std::string line = std::string(load) + " prompt " + std::to_string(meas[i].prompt) + ": TTFT " +
                               ms(meas[i].ttft_p50_s) + " / " + ms(fitted[i].ttft_p50_s) + ", ITL " +
                               ms(meas[i].itl_p50_s) + " / " + ms(fitted[i].itl_p50_s);
      p.note += line + ";";
      std::cout << "plan profile:" << line << " (measured / fitted)\n";
    }
    const std::string line = " a step starting a request beside a stream: +" + ms(beside.start_excess_s) + " / +" +
                             ms(beside.fitted_start_excess_s) + " (" + std::to_string(beside.runs.size()) + " runs)";
    p.note += line;
    std::cout << "plan profile:" << line << " (measured / fitted)\n";
  }
  p.save(a.out);
  char b[896];
  std::snprintf(b, sizeof b,
                "wrote %s: attention/layer %.1f us + %.2f us/row + %.2f us/prefill row + %.4f us/ctx, expert batch "
                "%.1f us + %.1f us/expert + %.2f us/row, ZeroMQ one-way %.1f us at %.2f GB/s, KV store lookup %.1f "
                "us, put %.1f us + %.1f us/block, dispatch overhead %.1f us, step %.1f us + %.1f us/row, router %.1f "
                "us/request + %.1f us/token, step jitter %.0f%%, waking from idle %.1f us, starting sequences %.1f us, "
                "%d cores\n",
                a.out.c_str(), p.attn_fixed_s * 1e6, p.attn_per_row_s * 1e6, p.attn_per_prefill_row_s * 1e6,
                p.attn_per_ctx_s * 1e6, p.expert_fixed_s * 1e6, p.expert_per_expert_s * 1e6, p.expert_per_row_s * 1e6,
                p.zmq_local.latency_s * 1e6, p.zmq_local.bandwidth_Bps / 1e9, p.prefix_lookup_s * 1e6, p.kv_put_s * 1e6,
                p.kv_put_per_block_s * 1e6, p.dispatch_overhead_s * 1e6, p.step_fixed_s * 1e6, p.step_per_row_s * 1e6,
                p.router_per_request_s * 1e6, p.router_per_token_s * 1e6, p.step_jitter * 100, p.idle_wake_s * 1e6,
                p.step_start_s * 1e6, p.node_cores);
  std::cout << b;
}

struct GapsArgs {
  std::string stream, beside, trace_out;
  bool json = false;
};

// `plan gaps`: a stream's gaps classed by what the requests beside it did in their step, and
// priced against their neighbours (what `plan profile` measures of its own beside runs).
void run_gaps(const GapsArgs& g) {
  const auto so = bench::read_outcomes(g.stream);
  const auto bo = g.beside.empty() ? std::vector<bench::Outcome>{} : bench::read_outcomes(g.beside);
  if (so.empty()) throw Error(g.stream + ": no requests");
  if (!g.beside.empty() && bo.empty()) throw Error(g.beside + ": no requests");
  const BesideRun r = beside_run(so, bo);
  if (r.stream.size() < 2) throw Error(g.stream + ": its longest request has no inter-token gaps (was it streamed?)");
  const GapExcess e = gap_excess(r.stream, r.others);
  if (!g.trace_out.empty()) {
    std::ofstream out(g.trace_out);
    if (!out) throw Error(g.trace_out + ": cannot write");
    out << "arrival_s,prompt_len,output_len,tenant\n" << std::fixed << std::setprecision(6);
    for (const SimRequest& q : r.trace) out << q.arrival_s << "," << q.prompt << "," << q.output << ",default\n";
  }
  const std::vector<std::pair<const char*, const std::vector<double>*>> classes = {
      {"start", &e.start}, {"decode", &e.decode}, {"end", &e.end}, {"after_end", &e.after_end}};
  if (g.json) {
    nlohmann::json ex;
    for (const auto& [name, v] : classes) ex[name] = *v;
    std::cout << nlohmann::json{{"matched", r.matched},
                                {"others", r.others.size()},
                                {"offset_s", r.offset_s},
                                {"excess_s", ex}}
              << "\n";
    return;
  }
  std::cout << r.matched << " of " << r.others.size() << " first tokens came with one of the stream's";
  if (!g.beside.empty()) std::cout << " (the beside client's clock +" << ms(r.offset_s) << " ms)";
  std::cout << "\nexcess of a gap over its unclassed neighbours, median ms (gaps):\n";
  for (const auto& [name, v] : classes) {
    std::vector<double> x = *v;
    std::sort(x.begin(), x.end());
    char median[32] = "-";
    if (!x.empty()) std::snprintf(median, sizeof median, "%+.2f", x[x.size() / 2] * 1e3);
    std::cout << "  " << name << ": " << median << " (" << x.size() << ")\n";
  }
}

struct SearchArgs {
  std::string slo, values_out, model_path;
  int max_attention = 8, max_experts = 8, max_evaluations = 400;
  std::vector<int> replicas = {1, 2}, micro_batches = {1, 2};
  std::vector<int64_t> budgets = {256, 512, 1024, 2048};
};

void run_search(PlanArgs a, const SearchArgs& s) {
  finish_deployment(a);
  const CostProfile p = load_profile(a);
  const TrafficSpec t = make_traffic(a);
  const Slo slo = Slo::parse(s.slo);
  SearchSpace space;
  space.max_attention = s.max_attention;
  space.max_experts = s.max_experts;
  space.replicas = s.replicas;
  space.micro_batches = s.micro_batches;
  space.step_budgets = s.budgets;
  space.base = a.dep;
  space.max_evaluations = s.max_evaluations;
  const SearchResult r = search(p, t, make_load(a, p), slo, space, make_options(a));
  std::cout << "searched " << r.evaluated << " shapes against " << slo.describe() << " under " << t.describe() << "\n";
  for (const auto& f : r.cheapest_failures)
    std::cout << "  too small: " << f.dep.describe() << " (TTFT p99 " << ms(f.result.ttft.p99) << " ms, ITL p99 "
              << ms(f.result.itl.p99) << " ms; " << f.result.bottleneck << ")\n";
  if (!r.best)
    throw Error("no shape within --max-attention " + std::to_string(s.max_attention) + " / --max-experts " +
                std::to_string(s.max_experts) + " meets the SLO");
  const Candidate& c = *r.best;
  std::cout << "cheapest: " << c.dep.describe() << "; " << c.nodes << " node(s), " << c.cost_per_hour << " per hour\n";
  print_result(c.result, p, c.dep, t);
  const std::string values = helm_values(c, p, slo.describe(), t.describe(), s.model_path);
  if (!s.values_out.empty()) {
    std::ofstream out(s.values_out);
    if (!out) throw Error(s.values_out + ": cannot write");
    out << values;
    std::cout << "wrote " << s.values_out << " (helm install ... -f " << s.values_out << ")\n";
  } else {
    std::cout << "\n" << values;
  }
}

}  // namespace

void add_plan(CLI::App& app) {
  auto a = std::make_shared<PlanArgs>();
  CLI::App* plan =
      app.add_subcommand("plan", "Capacity planner: simulate a deployment under a traffic (docs/planner.md)");
  plan->require_subcommand(0, 1);
  add_common(plan, *a);
  add_per_request(plan, *a);
  plan->add_option("--attention", a->dep.attention_workers, "attention workers")->capture_default_str();
  plan->add_option("--experts", a->dep.expert_hosts, "expert hosts")->capture_default_str();
  plan->add_option("--replicas", a->dep.replicas, "copies of every expert")->capture_default_str();
  plan->add_option("--micro-batches", a->dep.micro_batches, "1 or 2")->capture_default_str();
  plan->add_option("--step-token-budget", a->dep.step_token_budget, "router: tokens per worker step")
      ->capture_default_str();
  plan->add_option("--csv", a->csv, "queue lengths over time as CSV");
  plan->add_option("--plot", a->plot, "queue lengths over time as a PNG (python3-matplotlib)");
  plan->callback([plan, a] {
    if (plan->get_subcommands().empty()) run_plan(*a);
  });

  auto pa = std::make_shared<ProfileArgs>();
  CLI::App* prof = plan->add_subcommand(
      "profile", "Measure this machine's costs into a profile file, or write a GPU roofline profile");
  prof->add_option("--model", pa->model,
                   "checkpoint folder to measure (with --hardware: its config, default deepseek-moe-16b)");
  prof->add_option("--out", pa->out, "profile file to write (JSON)")->required();
  prof->add_option("--hardware", pa->hardware, "no measurement: the roofline profile of h100, h200 or a100");
  prof->add_option("--name", pa->name, "the profile's name")->capture_default_str();
  prof->add_option("--batches", pa->batches, "decode batch sizes timed")->delimiter(',');
  prof->add_option("--contexts", pa->contexts, "contexts timed")->delimiter(',');
  prof->add_option("--repeats", pa->repeats, "decode steps per shape")->capture_default_str();
  prof->add_option("--calibrate-url", pa->calibrate_url,
                   "a running cluster (moemesh up) to fit the cluster's overheads on");
  prof->add_option("--calibrate-attention", pa->cal_attention, "its attention workers")->capture_default_str();
  prof->add_option("--calibrate-experts", pa->cal_experts, "its expert hosts")->capture_default_str();
  prof->add_option("--from-gpu-results", pa->gpu_results,
                   "no measurement here: tests/gpu/run.sh's bench.md (a GPU's kernels) through the roofline model")
      ->check(CLI::ExistingFile);
  prof->add_option("--refit", pa->refit, "a calibrated profile: fit its recorded calibration again (no cluster)")
      ->check(CLI::ExistingFile);
  prof->add_option("--calibrate-replicas", pa->cal_replicas, "its replicas")->capture_default_str();
  prof->add_option("--calibrate-micro-batches", pa->cal_micro_batches, "its micro-batches")->capture_default_str();
  prof->add_option("--calibrate-concurrency", pa->cal_concurrency, "requests at once of the loaded calibration run")
      ->capture_default_str();
  prof->add_option("--calibrate-seed", pa->cal_seed, "seed of the first calibration run (then +1 per run)")
      ->capture_default_str();
  prof->add_option("--calibrate-repeats", pa->cal_repeats, "runs per calibration point (their median)")
      ->capture_default_str();
  prof->add_option("--kv-tokens", pa->kv_tokens,
                   "KV capacity of an attention worker (moemesh-attention --kv-blocks x 16)")
      ->capture_default_str();
  prof->add_option("--cores", pa->cores,
                   "compute threads of the engine timing: the cluster's `moemesh up --cores` (default: every core)")
      ->check(CLI::PositiveNumber);
  prof->add_option("--processes-per-node", pa->processes_per_node, "processes one machine holds")
      ->capture_default_str();
  prof->callback([pa] { run_profile(*pa); });

  auto ga = std::make_shared<GapsArgs>();
  CLI::App* gaps = plan->add_subcommand(
      "gaps", "A stream's inter-token gaps classed by what the requests beside it did (moemesh bench --per-request)");
  gaps->add_option("--stream", ga->stream, "per-request file whose longest request is the stream")
      ->required()
      ->check(CLI::ExistingFile);
  gaps->add_option("--beside", ga->beside,
                   "per-request file of the requests beside it, from another client (its clock is matched to the "
                   "stream's); default: the stream file's other requests")
      ->check(CLI::ExistingFile);
  gaps->add_option("--trace-out", ga->trace_out, "write the run as a trace CSV (plan --traffic trace:FILE)");
  gaps->add_flag("--json", ga->json, "one JSON object: every classed gap's excess in seconds");
  gaps->callback([ga] { run_gaps(*ga); });

  auto sa = std::make_shared<PlanArgs>();
  auto ss = std::make_shared<SearchArgs>();
  CLI::App* srch = plan->add_subcommand("search", "The cheapest shape meeting an SLO, and its Helm values");
  add_common(srch, *sa);
  srch->add_option("--slo", ss->slo, "bounds, e.g. ttft_p99=2s,itl_p99=100ms")->required();
  srch->add_option("--values-out", ss->values_out, "write the Helm values here (default: print them)");
  srch->add_option("--model-path", ss->model_path, "model.path in the values (the checkpoint on the volume)");
  srch->add_option("--max-attention", ss->max_attention, "most attention workers tried")->capture_default_str();
  srch->add_option("--max-experts", ss->max_experts, "most expert hosts tried")->capture_default_str();
  srch->add_option("--replica-options", ss->replicas, "replica counts tried")->delimiter(',');
  srch->add_option("--micro-batch-options", ss->micro_batches, "micro-batch counts tried")->delimiter(',');
  srch->add_option("--budget-options", ss->budgets, "step token budgets tried")->delimiter(',');
  srch->add_option("--max-evaluations", ss->max_evaluations, "simulations at most")->capture_default_str();
  srch->callback([sa, ss] { run_search(*sa, *ss); });
}

}  // namespace moemesh::cli
