// `moemesh bench-engine`: the in-process engine's decode and prefill speed, measured against this
// machine's memory roofline in the same run. Batch-1 decode reads every active weight byte once
// per token, so it can go no faster than (read bandwidth) / (active bytes per token); the ratio
// of the measured speed to that bound says how much of the memory system the kernels use.
// Only the Engine API is used, so it measures whatever kernels the engine runs on.
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/lora.h"
#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/model_config.h"
#include "core/model_presets.h"
#include "kernels/cpu/membw.h"
#include "kernels/cpu/thread_pool.h"
#include "services/cli/commands.h"
#include "services/cli/int_list.h"

namespace moemesh::cli {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

// Prompt length of each decode sequence: short, so the KV cache adds little to the bytes read.
constexpr int64_t kDecodePrompt = 32;
// The bandwidth buffer is at least this big and at least 4x the last-level caches.
constexpr uint64_t kMinBandwidthBuffer = uint64_t(1) << 30;
constexpr int kBandwidthRepeats = 5;

struct BenchEngineArgs {
  std::string model;
  std::string batches = "1,8,32";
  int64_t prefill_tokens = 512;
  int64_t decode_tokens = 16;
  int64_t warmup = 2;
  int64_t repeats = 3;
  std::optional<int> threads;  // default: the CPUs this process may use
  bool json = false;
  std::vector<std::string> lora;  // LoRA adapters the decode sequences use, round robin
};

std::vector<int64_t> parse_batches(const std::string& s) {
  auto out = parse_int_list(s, "--batches", 1, 4096, "a batch size", "integers 1..4096, e.g. 1,8,32");
  if (out.empty()) throw Error("--batches is empty (expected e.g. 1,8,32)");
  return out;
}

void validate(const BenchEngineArgs& a) {
  if (a.prefill_tokens < 1) throw Error("--prefill-tokens must be >= 1, got " + std::to_string(a.prefill_tokens));
  if (a.decode_tokens < 1) throw Error("--decode-tokens must be >= 1, got " + std::to_string(a.decode_tokens));
  if (a.warmup < 0) throw Error("--warmup must be >= 0, got " + std::to_string(a.warmup));
  if (a.repeats < 1) throw Error("--repeats must be >= 1, got " + std::to_string(a.repeats));
  if (a.threads && *a.threads < 1) throw Error("--threads must be >= 1, got " + std::to_string(*a.threads));
}

int allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

std::string read_line(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::string s;
  std::getline(in, s);
  return s;
}

// Total bytes of the last-level caches (each instance once, told apart by the CPUs sharing it),
// from sysfs; 0 when sysfs does not say (containers, VMs).
uint64_t last_level_cache_bytes() {
  namespace fs = std::filesystem;
  std::error_code ec;
  int best_level = 0;
  std::map<std::string, uint64_t> instances;  // shared_cpu_list -> size, at best_level
  for (const auto& cpu : fs::directory_iterator("/sys/devices/system/cpu", ec)) {
    const std::string name = cpu.path().filename().string();
    if (name.rfind("cpu", 0) != 0 || name.size() == 3 || !std::isdigit(static_cast<unsigned char>(name[3]))) continue;
    std::error_code ec2;
    for (const auto& idx : fs::directory_iterator(cpu.path() / "cache", ec2)) {
      const std::string type = read_line(idx.path() / "type");
      if (type != "Unified" && type != "Data") continue;
      int level = 0;
      uint64_t size = 0;
      try {
        level = std::stoi(read_line(idx.path() / "level"));
        size_t used = 0;
        const std::string s = read_line(idx.path() / "size");  // e.g. "32768K"
        size = std::stoull(s, &used);
        if (used < s.size() && s[used] == 'K') size <<= 10;
        if (used < s.size() && s[used] == 'M') size <<= 20;
      } catch (const std::exception&) {
        continue;
      }
      if (level > best_level) {
        best_level = level;
        instances.clear();
      }
      if (level == best_level) instances[read_line(idx.path() / "shared_cpu_list")] = size;
    }
  }
  uint64_t total = 0;
  for (const auto& [cpus, size] : instances) total += size;
  return total;
}

// Bytes read per token at batch 1, by part of the model, in print order.
struct ActiveBytes {
  std::vector<std::pair<std::string, uint64_t>> parts;
  std::map<std::string, uint64_t> by_dtype;  // "bf16", "int4", ...
  uint64_t total() const {
    uint64_t t = 0;
    for (const auto& [name, b] : parts) t += b;
    return t;
  }
};

// What the kernels read of a weight: its stored bytes, or a quantized matrix's values, scales and zeros.
uint64_t weight_bytes(const Weight& w) {
  if (w.quant) return w.quant->q.size() + (w.quant->scale.size() + w.quant->scaled_zero.size()) * sizeof(float);
  return w.empty() ? 0 : uint64_t(w.numel()) * dtype_size(w.dtype);
}

// The CLI's spelling of what a weight holds: bf16, f16, f32, int4, int8.
std::string weight_kind(const Weight& w) {
  std::string s = w.quant ? "int" + std::to_string(w.quant->bits) : std::string(dtype_name(w.dtype));
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

ActiveBytes active_bytes_per_token(const ModelConfig& cfg, const ModelWeights& w) {
  uint64_t attention = 0, norms = 0, router = 0, routed = 0, shared = 0, dense = 0;
  std::map<std::string, uint64_t> by_dtype;
  // Adds a weight read once per token to a part (and to its dtype's share).
  auto add = [&](uint64_t& part, const Weight& x) {
    const uint64_t b = weight_bytes(x);
    part += b;
    by_dtype[weight_kind(x)] += b;
  };
  auto add_mlp = [&](uint64_t& part, const MlpWeights& m) {
    add(part, m.gate);
    add(part, m.up);
    add(part, m.down);
  };
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& lw = w.layers[l];
    for (const Weight* x : {&lw.q, &lw.k, &lw.v, &lw.o}) add(attention, *x);
    add(norms, lw.input_norm);
    add(norms, lw.post_attention_norm);
    if (lw.moe) {
      add(router, lw.router);
      // k experts per token: k times the average expert (all experts of a checkpoint have one shape).
      uint64_t sum = 0, n = 0;
      std::map<std::string, uint64_t> expert_dtypes;
      for (const auto& e : lw.experts) {
        if (!e) continue;
        for (const Weight* x : {&e->gate, &e->up, &e->down}) {
          sum += weight_bytes(*x);
          expert_dtypes[weight_kind(*x)] += weight_bytes(*x);
        }
        ++n;
      }
      if (n == 0) throw Error("layer " + std::to_string(l) + " has no routed experts loaded");
      const uint64_t k = uint64_t(cfg.num_experts_per_tok);
      routed += sum * k / n;
      for (const auto& [dt, b] : expert_dtypes) by_dtype[dt] += b * k / n;
      if (lw.shared) add_mlp(shared, *lw.shared);
    } else if (lw.dense) {
      add_mlp(dense, *lw.dense);
    }
  }
  ActiveBytes a;
  uint64_t final_norm = 0, lm_head = 0;
  add(final_norm, w.final_norm);
  add(lm_head, w.lm_head);
  const uint64_t embed_row = uint64_t(w.embed.cols()) * dtype_size(w.embed.dtype);
  by_dtype[weight_kind(w.embed)] += embed_row;
  a.parts = {{"attention", attention},   {"layer_norms", norms},     {"router", router},
             {"routed_experts", routed}, {"shared_experts", shared}, {"dense_mlp", dense},
             {"final_norm", final_norm}, {"lm_head", lm_head},       {"embedding_row", embed_row}};
  a.by_dtype = std::move(by_dtype);
  return a;
}

// The kind of weight holding most of the active bytes (bf16, f16, f32, int4, int8).
std::string main_dtype(const ActiveBytes& a) {
  std::string best = "f32";
  uint64_t most = 0;
  for (const auto& [kind, b] : a.by_dtype)
    if (b > most) best = kind, most = b;
  return best;
}

// Valid, varied token ids (all below the vocabulary); `salt` makes each sequence different.
std::vector<int32_t> prompt_ids(int64_t n, int64_t salt, int64_t vocab) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = int32_t((salt * 131 + i * 7919 + 1) % vocab);
  return ids;
}

int32_t argmax(const std::vector<float>& logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Sequences freed when a measurement ends, also when it throws.
struct Sequences {
  Engine& engine;
  std::vector<SeqId> ids;
  Sequences(Engine& e, int64_t n) : engine(e) {
    for (int64_t i = 0; i < n; ++i) ids.push_back(engine.create_sequence());
  }
  ~Sequences() {
    for (SeqId s : ids) engine.free_sequence(s);
  }
  Sequences(const Sequences&) = delete;
  Sequences& operator=(const Sequences&) = delete;
};

// Seconds for `steps` decode steps of `batch` sequences (after a short prefill and `warmup`
// untimed steps); each step adds one greedy token to every sequence.
double time_decode(Engine& engine, int64_t batch, int64_t warmup, int64_t steps,
                   const std::vector<std::shared_ptr<const LoraAdapter>>& adapters) {
  const int64_t vocab = engine.config().vocab_size;
  Sequences seqs(engine, batch);
  std::vector<StepInput> in(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    in[size_t(b)] = StepInput{seqs.ids[size_t(b)], prompt_ids(kDecodePrompt, b, vocab)};
    if (!adapters.empty()) in[size_t(b)].adapter = adapters[size_t(b) % adapters.size()];
  }
  auto step = [&] {
    std::vector<StepOutput> out = engine.step(in);
    for (size_t b = 0; b < in.size(); ++b) in[b].tokens.assign(1, argmax(out[b].logits));
  };
  step();  // prefill
  for (int64_t i = 0; i < warmup; ++i) step();
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < steps; ++i) step();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Seconds for one step that prefills `tokens` tokens of one new sequence.
double time_prefill(Engine& engine, int64_t tokens) {
  Sequences seq(engine, 1);
  const StepInput in{seq.ids[0], prompt_ids(tokens, 7, engine.config().vocab_size)};
  const auto t0 = Clock::now();
  engine.step(std::span<const StepInput>(&in, 1));
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string mib(uint64_t b) { return fmt("%.2f MiB", double(b) / double(1 << 20)); }

void run_bench_engine(const BenchEngineArgs& a) {
  validate(a);
  const std::vector<int64_t> batches = parse_batches(a.batches);
  const int threads = a.threads ? *a.threads : allowed_cpus();

  auto ckpt = Checkpoint::open(a.model);
  const ModelConfig& cfg = ckpt->config();
  const int64_t decode_len = kDecodePrompt + a.warmup + a.decode_tokens;
  if (decode_len > cfg.max_context())
    throw Error("decode needs " + std::to_string(decode_len) +
                " positions (32-token prompt + --warmup + --decode-tokens), "
                "more than the model's " +
                std::to_string(cfg.max_context()));
  if (a.prefill_tokens > cfg.max_context())
    throw Error("--prefill-tokens " + std::to_string(a.prefill_tokens) + " is more than the model's " +
                std::to_string(cfg.max_context()) + " positions");

  cpu::set_compute_threads(threads);
  std::vector<std::shared_ptr<const LoraAdapter>> adapters;
  for (const std::string& dir : a.lora)
    adapters.push_back(LoraAdapter::load(dir, cfg, WeightSelection::all(), {}, {}, lora_dtype_for(*ckpt)));
  // KV room for the largest measurement; sequences are freed between measurements.
  auto blocks = [](int64_t len) { return (len + KvCache::kBlockSize - 1) / KvCache::kBlockSize + 1; };
  EngineOptions opts;
  opts.kv_blocks =
      std::max(*std::max_element(batches.begin(), batches.end()) * blocks(decode_len + 1), blocks(a.prefill_tokens));
  Engine engine(ckpt, opts);

  const ActiveBytes active = active_bytes_per_token(cfg, engine.weights());
  const uint64_t active_total = active.total();
  const std::string dtype = main_dtype(active);
  const bool human = !a.json;
  if (human) {
    std::cout << "bench-engine: " << ckpt->name() << " (" << arch_name(cfg.arch) << ", " << dtype << "), " << threads
              << " threads\n";
    std::cout << "active bytes per token at batch 1:\n";
    for (const auto& [name, b] : active.parts)
      if (b) std::cout << "  " << std::left << std::setw(16) << name << std::right << std::setw(14) << mib(b) << "\n";
    std::cout << "  " << std::left << std::setw(16) << "total" << std::right << std::setw(14) << mib(active_total)
              << "\n"
              << std::flush;
  }

  // The bandwidth buffer must dwarf every cache, or part of the "memory" reads hit in cache.
  const uint64_t buffer = std::max(kMinBandwidthBuffer, 4 * last_level_cache_bytes());
  const cpu::ReadBandwidth bw = cpu::measure_read_bandwidth(buffer, threads, kBandwidthRepeats);
  const double roofline = bw.bytes_per_s / double(active_total);
  if (human) {
    std::cout << "memory read bandwidth: " << fmt("%.2f GB/s", bw.bytes_per_s / 1e9) << " (" << threads
              << " threads reading " << (bw.buffer_bytes >> 20) << " MiB, best of " << kBandwidthRepeats << ")\n"
              << "roofline at batch 1: " << fmt("%.2f tok/s", roofline) << " (bandwidth / active bytes)\n"
              << "decode (" << a.decode_tokens << " steps after a " << kDecodePrompt << "-token prompt and " << a.warmup
              << " warm-up steps, median of " << a.repeats << "):\n"
              << "  batch      tok/s    ms/step\n"
              << std::flush;
  }

  // Median over repeats of batch * steps / seconds, and the median step time. With --lora every
  // repeat also times the same batch without adapters, right after: the LoRA/base ratio of each
  // pair, then their median (the machine is noisy; one process, interleaved, is the fairest).
  std::vector<double> lora_ratios;
  auto measure_decode = [&](int64_t b) {
    std::vector<double> rates, seconds;
    lora_ratios.clear();
    for (int64_t r = 0; r < a.repeats; ++r) {
      seconds.push_back(time_decode(engine, b, a.warmup, a.decode_tokens, adapters));
      rates.push_back(double(b * a.decode_tokens) / seconds.back());
      if (!adapters.empty()) lora_ratios.push_back(seconds.back() / time_decode(engine, b, a.warmup, a.decode_tokens, {}));
    }
    return std::pair{rates, median(seconds) / double(a.decode_tokens) * 1e3};
  };
  json decode = json::array();
  std::optional<double> batch1_tok_s;
  for (int64_t b : batches) {
    const auto [rates, ms_step] = measure_decode(b);
    const double tok_s = median(rates);
    if (b == 1) batch1_tok_s = tok_s;
    decode.push_back({{"batch", b}, {"tok_s", tok_s}, {"ms_per_step", ms_step}, {"tok_s_repeats", rates}});
    if (!adapters.empty()) {
      decode.back()["lora_adapters"] = adapters.size();
      decode.back()["lora_over_base"] = median(lora_ratios);
      decode.back()["lora_over_base_repeats"] = lora_ratios;
    }
    if (human)
      std::cout << "  " << std::setw(5) << b << std::setw(11) << fmt("%.2f", tok_s) << std::setw(11)
                << fmt("%.1f", ms_step) << "\n"
                << std::flush;
  }
  // The roofline is a batch-1 bound: measure batch 1 even when --batches leaves it out.
  if (!batch1_tok_s) batch1_tok_s = median(measure_decode(1).first);

  std::vector<double> prefill_rates;
  for (int64_t r = 0; r < a.repeats; ++r)
    prefill_rates.push_back(double(a.prefill_tokens) / time_prefill(engine, a.prefill_tokens));
  const double prefill_tok_s = median(prefill_rates);
  const double ratio = *batch1_tok_s / roofline;

  if (human) {
    std::cout << "prefill of " << a.prefill_tokens << " tokens in one step: " << fmt("%.2f tok/s", prefill_tok_s)
              << "\n"
              << "decode roofline ratio (batch 1): " << fmt("%.3f", ratio) << "  (" << fmt("%.2f", *batch1_tok_s)
              << " tok/s x " << mib(active_total) << " = "
              << fmt("%.2f GB/s", *batch1_tok_s * double(active_total) / 1e9) << " of weights read)\n";
    return;
  }
  json parts = json::object();
  for (const auto& [name, b] : active.parts) parts[name] = b;
  json j;
  j["model"] = ckpt->name();
  j["arch"] = std::string(arch_name(cfg.arch));
  j["dtype"] = dtype;
  j["threads"] = threads;
  j["bandwidth_bytes_per_s"] = bw.bytes_per_s;
  j["bandwidth_kind"] = "read";
  j["bandwidth_buffer_bytes"] = bw.buffer_bytes;
  j["active_bytes_per_token"] = active_total;
  j["active_bytes"] = parts;
  j["roofline_tok_s"] = roofline;
  j["decode"] = decode;
  j["decode_prompt_tokens"] = kDecodePrompt;
  j["decode_tokens"] = a.decode_tokens;
  j["warmup"] = a.warmup;
  j["repeats"] = a.repeats;
  j["prefill"] = {{"tokens", a.prefill_tokens}, {"tok_s", prefill_tok_s}, {"tok_s_repeats", prefill_rates}};
  j["decode_roofline_ratio"] = ratio;
  j["decode_weight_bytes_per_s"] = *batch1_tok_s * double(active_total);
  std::cout << j.dump() << "\n";
}

}  // namespace

void add_bench_engine(CLI::App& app) {
  auto a = std::make_shared<BenchEngineArgs>();
  auto* cmd = app.add_subcommand("bench-engine",
                                 "Measure the in-process engine's decode and prefill speed against this machine's "
                                 "memory read bandwidth (the batch-1 roofline)");
  cmd->add_option("--model", a->model, "Hugging Face checkpoint folder")->required();
  cmd->add_option("--batches", a->batches, "decode batch sizes, comma-separated")->capture_default_str();
  cmd->add_option("--prefill-tokens", a->prefill_tokens, "prompt length of the prefill measurement")
      ->capture_default_str();
  cmd->add_option("--decode-tokens", a->decode_tokens, "timed decode steps per measurement")->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "untimed decode steps before the timed ones")->capture_default_str();
  cmd->add_option("--repeats", a->repeats, "measurements per number (the median is reported)")->capture_default_str();
  cmd->add_option("--threads", a->threads, "compute and bandwidth threads (default: the CPUs this process may use)");
  cmd->add_flag("--json", a->json, "print one JSON object");
  cmd->add_option("--lora", a->lora, "a LoRA adapter folder; several: the decode sequences use them round robin");
  cmd->callback([a] { run_bench_engine(*a); });
}

}  // namespace moemesh::cli
