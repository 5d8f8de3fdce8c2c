// Decode and prefill tokens/s of the whole model through Engine, CPU backend against the CUDA
// backend (f32 and INT8 KV cache), on a model written here with the project's model writer.
// For each backend and batch B: one step prefills B sequences of a random prompt, one decode
// step warms up, then `steps` greedy decode steps are timed (wall clock). Prints a Markdown
// table; checks that batch 1's greedy tokens on CUDA equal the CPU engine's (same KV dtype).
// Run by tests/gpu/run.sh. Exit status: 0 done and tokens equal, 1 a mismatch or an error,
// 2 no CUDA device (nothing measured). `--device cpu` puts the CPU backend in CUDA's place: the
// whole flow without a GPU, to check the benchmark itself.
//
// Model: the "medium" Mixtral preset (hidden 1024, 8 layers, 8 experts top-2) with a 32000
// vocabulary, written in f32 (0.64B parameters, 2.6 GB): f32 weights keep cuBLAS and the CPU
// sgemm within summation-order differences, so greedy paths can be compared exactly (BF16
// weights would round the activations to BF16 on the GPU only).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "core/backend_factory.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "kernels/cuda/api.cuh"

using namespace moemesh;
namespace fs = std::filesystem;

namespace {

struct Options {
  std::string preset = "medium";
  int64_t vocab = 32000;
  int64_t layers = 0;  // 0: the preset's
  int prompt = 128;
  int steps = 32;      // timed decode steps on CUDA
  int cpu_steps = 8;   // timed decode steps on the CPU backend at batch > 1 (slow; batch 1 runs `steps`)
  std::vector<int> batches = {1, 8, 32};
  fs::path model_dir;  // empty: a temporary folder, removed at exit
  // The backend measured against the CPU one. "cpu" runs the whole bench without a GPU: a check
  // of the bench itself (its rows then compare the CPU backend with itself).
  std::string device = "cuda:0";
};

[[noreturn]] void usage(const std::string& why) {
  throw Error(why +
              "\nusage: bench_gpu_model [--preset tiny|small|medium] [--layers N] [--vocab N] [--prompt N]"
              " [--steps N] [--cpu-steps N] [--batches 1,8,32] [--model-dir DIR] [--device cuda:N|cpu]");
}

int positive(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || n <= 0 || n > 1'000'000)
    usage(flag + " needs a positive integer, got \"" + v + "\"");
  return int(n);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    static const std::vector<std::string> known = {"--preset", "--vocab",     "--layers",    "--prompt",
                                                   "--steps",  "--cpu-steps", "--model-dir", "--batches",
                                                   "--device"};
    if (std::find(known.begin(), known.end(), flag) == known.end()) usage("unknown option " + flag);
    if (i + 1 >= argc) usage(flag + " needs a value");
    const std::string v = argv[++i];
    if (flag == "--preset") o.preset = v;
    else if (flag == "--vocab") o.vocab = positive(flag, v);
    else if (flag == "--layers") o.layers = positive(flag, v);
    else if (flag == "--prompt") o.prompt = positive(flag, v);
    else if (flag == "--steps") o.steps = positive(flag, v);
    else if (flag == "--cpu-steps") o.cpu_steps = positive(flag, v);
    else if (flag == "--model-dir") o.model_dir = v;
    else if (flag == "--device") o.device = v;
    else {
      o.batches.clear();
      for (size_t start = 0; start <= v.size();) {
        const size_t comma = std::min(v.find(',', start), v.size());
        o.batches.push_back(positive(flag, v.substr(start, comma - start)));
        start = comma + 1;
      }
    }
  }
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int32_t argmax(const StepOutput& out, int64_t vocab) {
  const auto last = out.logits.end() - vocab;
  return int32_t(std::max_element(last, out.logits.end()) - last);
}

// Top logit minus the runner-up of the last row, over the row's largest magnitude: how near a
// tie a greedy choice was.
float margin(const StepOutput& out, int64_t vocab) {
  std::vector<float> row(out.logits.end() - vocab, out.logits.end());
  float scale = 0;
  for (float x : row) scale = std::max(scale, std::fabs(x));
  std::partial_sort(row.begin(), row.begin() + 2, row.end(), std::greater<float>());
  return scale > 0 ? (row[0] - row[1]) / scale : 0.0f;
}

// How far the backends' logits may differ, relative (as tests/gpu/test_gpu_model.cpp bounds them):
// closer than twice that, the two backends may pick either of the best two.
double near_tie(const std::string& kv) { return 2 * (kv == kv_dtype_name(KvDType::Int8) ? 5e-3 : 1e-4); }

struct Run {
  std::string backend, kv;
  int batch = 0;
  double prefill_tps = 0, decode_tps = 0;
  std::vector<int32_t> tokens;  // sequence 0's greedy tokens: after the prefill, then each decode step
  std::vector<float> margins;   // the CPU-side diagnosis of a mismatch
};

// Prefills `batch` sequences with prompts[0..batch), one untimed decode step, then `steps`
// timed greedy decode steps. The sequences are freed afterwards.
Run measure(Engine& engine, const std::vector<std::vector<int32_t>>& prompts, int batch, int steps) {
  const int64_t vocab = engine.config().vocab_size;
  std::vector<StepInput> in(static_cast<size_t>(batch));
  for (int b = 0; b < batch; ++b) in[size_t(b)] = StepInput{engine.create_sequence(), prompts[size_t(b)], false};
  Run r;
  r.batch = batch;
  const auto run_step = [&] {
    const auto out = engine.step(in);
    for (size_t b = 0; b < in.size(); ++b) in[b].tokens = {argmax(out[b], vocab)};
    r.tokens.push_back(in[0].tokens[0]);
    r.margins.push_back(margin(out[0], vocab));
  };
  auto t0 = std::chrono::steady_clock::now();
  run_step();
  r.prefill_tps = double(batch) * double(prompts[0].size()) / seconds_since(t0);
  run_step();  // warm-up: the first decode-shaped step (scratch sized for B rows)
  t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) run_step();
  r.decode_tps = double(batch) * steps / seconds_since(t0);
  for (const auto& i : in) engine.free_sequence(i.seq);
  return r;
}

// Runs every batch on one engine after an untimed warm-up (a prefill and a decode step at the
// largest batch), so that one-time costs (weights uploaded or paged in, handles made, buffers
// grown to their final size) stay out of the table. steps_at(batch): the timed decode steps.
std::vector<Run> measure_all(Engine& engine, const std::string& backend, KvDType kv,
                             const std::vector<std::vector<int32_t>>& prompts, const std::vector<int>& batches,
                             const std::function<int(int)>& steps_at) {
  std::fprintf(stderr, "bench_gpu_model: %s, %s KV cache\n", backend.c_str(), std::string(kv_dtype_name(kv)).c_str());
  const auto warm = std::chrono::steady_clock::now();
  measure(engine, prompts, *std::max_element(batches.begin(), batches.end()), 1);
  std::fprintf(stderr, "  warm-up: %.1f s\n", seconds_since(warm));
  std::vector<Run> runs;
  for (int b : batches) {
    const auto t0 = std::chrono::steady_clock::now();
    runs.push_back(measure(engine, prompts, b, steps_at(b)));
    runs.back().backend = backend;
    runs.back().kv = std::string(kv_dtype_name(kv));
    std::fprintf(stderr, "  batch %d: %.1f s\n", b, seconds_since(t0));
  }
  return runs;
}

// Removes a temporary model folder however main ends.
struct TempDir {
  fs::path path;
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

int bench(const Options& o) {
  const DeviceSpec device = parse_device(o.device);
  if (device.kind == DeviceSpec::Kind::Cuda && cuda::device_count() == 0) {
    std::printf("no CUDA device: %s\n", cuda::device_error());
    return 2;
  }
  ModelConfig cfg = model_preset(Arch::Mixtral, o.preset);
  cfg.vocab_size = o.vocab;
  if (o.layers) cfg.num_hidden_layers = o.layers;
  TempDir tmp;
  fs::path dir = o.model_dir;
  if (dir.empty()) dir = tmp.path = fs::temp_directory_path() / ("moemesh-bench-model-" + std::to_string(::getpid()));
  WriteOptions wo;
  wo.dtype = DType::F32;
  auto t0 = std::chrono::steady_clock::now();
  const WriteSummary written = write_model(cfg, dir, wo);
  ::sync();  // the written gigabytes' writeback would otherwise compete with the first timed steps
  std::fprintf(stderr, "bench_gpu_model: model written in %.1f s\n", seconds_since(t0));

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> token(0, int32_t(cfg.vocab_size - 1));
  const int max_batch = *std::max_element(o.batches.begin(), o.batches.end());
  std::vector<std::vector<int32_t>> prompts(size_t(max_batch), std::vector<int32_t>(size_t(o.prompt)));
  for (auto& p : prompts)
    for (auto& t : p) t = token(rng);
  // Room for the largest batch: prompt, warm-up and timed decode tokens.
  const int64_t tokens = o.prompt + 1 + std::max(o.steps, o.cpu_steps);
  const int64_t per_seq = (tokens + KvCache::kBlockSize - 1) / KvCache::kBlockSize;
  const int64_t kv_blocks = per_seq * max_batch;

  auto ckpt = Checkpoint::open(dir);
  const auto device_backend = make_compute_backend(device);
  const std::string device_name = device.str();
  std::vector<Run> cpu, gpu;
  {
    Engine e(ckpt, EngineOptions{kv_blocks, KvDType::F32});
    // Batch 1 runs every step: its tokens are the reference for the CUDA ones.
    cpu = measure_all(e, "cpu", KvDType::F32, prompts, o.batches,
                      [&](int batch) { return batch == 1 ? o.steps : o.cpu_steps; });
  }
  for (KvDType kv : {KvDType::F32, KvDType::Int8}) {
    Engine e(ckpt, EngineOptions{kv_blocks, kv, device_backend});
    const auto runs = measure_all(e, device_name, kv, prompts, o.batches, [&](int) { return o.steps; });
    gpu.insert(gpu.end(), runs.begin(), runs.end());
  }
  // The reference for the INT8 rows' tokens: the CPU engine with the INT8 cache, batch 1 only.
  std::optional<Run> cpu_int8;
  {
    Engine e(ckpt, EngineOptions{kv_blocks, KvDType::Int8});
    const auto t = std::chrono::steady_clock::now();
    cpu_int8 = measure(e, prompts, 1, o.steps);
    std::fprintf(stderr, "bench_gpu_model: cpu, int8 KV cache, batch 1 (token reference): %.1f s\n", seconds_since(t));
  }

  std::printf("## Whole model through Engine: CPU vs CUDA backend\n\n");
  std::printf("device: %s; model: %s Mixtral preset, %lld layers, vocab %lld, f32 weights, %.1fM parameters;\n",
              device_backend->name().c_str(), o.preset.c_str(), (long long)cfg.num_hidden_layers,
              (long long)cfg.vocab_size, double(written.params) / 1e6);
  std::printf("prompt %d tokens per sequence, prefilled in one step; decode: greedy, 1 warm-up step, then %d timed\n"
              "steps (the CPU backend at batch > 1: %d, it is slow; a rate per step all the same). Each engine first\n"
              "runs an untimed prefill + decode step at batch %d (weights uploaded, buffers at their final size).\n"
              "decode vs cpu: decode tok/s over the CPU backend's (f32 KV cache) at the same batch.\n\n",
              o.prompt, o.steps, o.cpu_steps, max_batch);
  std::printf("| backend | kv dtype | batch | prefill tok/s | decode tok/s | decode vs cpu |\n");
  std::printf("|---------|----------|------:|--------------:|-------------:|--------------:|\n");
  const auto cpu_at = [&](int batch) {
    return std::find_if(cpu.begin(), cpu.end(), [&](const Run& r) { return r.batch == batch; })->decode_tps;
  };
  std::vector<Run> rows = cpu;
  rows.insert(rows.end(), gpu.begin(), gpu.end());
  for (const Run& r : rows)
    std::printf("| %-7s | %-8s | %5d | %13.1f | %12.1f | %12.2fx |\n", r.backend.c_str(), r.kv.c_str(), r.batch,
                r.prefill_tps, r.decode_tps, r.decode_tps / cpu_at(r.batch));

  // Batch 1's greedy tokens on CUDA against the CPU engine with the same KV dtype.
  std::printf("\n");
  if (std::find(o.batches.begin(), o.batches.end(), 1) == o.batches.end())
    std::printf("greedy tokens: not compared (no batch 1 in --batches)\n");
  int failed = 0;
  for (const Run& g : gpu) {
    if (g.batch != 1) continue;
    const Run* ref = nullptr;
    if (g.kv == kv_dtype_name(KvDType::Int8)) {
      ref = &*cpu_int8;
    } else {
      for (const Run& c : cpu)
        if (c.batch == 1) ref = &c;
    }
    if (!ref) continue;
    const size_t n = std::min(ref->tokens.size(), g.tokens.size());
    const auto diff = std::mismatch(ref->tokens.begin(), ref->tokens.begin() + long(n), g.tokens.begin());
    if (diff.first == ref->tokens.begin() + long(n)) {
      std::printf("greedy tokens, batch 1, %s KV cache: %s equals cpu (%zu tokens)\n", g.kv.c_str(),
                  device_name.c_str(), n);
    } else if (const size_t at = size_t(diff.first - ref->tokens.begin()); ref->margins[at] < near_tie(g.kv)) {
      // The paths part at a near-tie and are different texts from there on: nothing to compare.
      std::printf("greedy tokens, batch 1, %s KV cache: %s equals cpu for %zu tokens, then parts at a near-tie "
                  "(cpu's top-2 margin %.3g of the largest logit)\n",
                  g.kv.c_str(), device_name.c_str(), at, ref->margins[at]);
    } else {
      std::printf("FAILED: greedy tokens, batch 1, %s KV cache: %s differs from cpu at token %zu of %zu "
                  "(cpu %d, device %d; cpu's top-2 logit margin there %.3g of the largest logit)\n",
                  g.kv.c_str(), device_name.c_str(), at, n, *diff.first, *diff.second, ref->margins[at]);
      ++failed;
    }
  }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return bench(parse(argc, argv));
  } catch (const std::exception& e) {
    std::printf("FAILED: bench_gpu_model: %s\n", e.what());
    return 1;
  }
}
