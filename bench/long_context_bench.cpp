// Long contexts (issue #15): time per output token of the in-process engine at 4K, 32K and 128K
// tokens of context, f32 and INT8 KV, with and without a sliding window, and the KV cache's bytes
// per token. A random-weight preset model with max_position_embeddings 131072 is written to a
// temporary folder. The first --prefill tokens are a real chunked prefill (--chunk tokens per
// step, as the router sends them; its speed is reported); the rest of each context is filled with
// random K/V rows written straight into the cache (a decode step's cost does not depend on the
// values, and a 128K prefill without a window takes minutes here), then --decode tokens are
// decoded one step each and timed. Decode attention cost grows with the context unless a window
// bounds it; the split-K CPU attention spreads each decode row's keys over the compute pool.
//
//   bench_long_context [--preset tiny|small] [--contexts 4096,32768,131072] [--window 4096]
//                      [--decode 16] [--chunk 2048] [--prefill 4096] [--threads N]
// Prints one Markdown table (docs/performance.md records it).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/engine.h"
#include "core/kv_cache.h"
#include "core/model_presets.h"
#include "core/model_writer.h"
#include "kernels/cpu/thread_pool.h"

using namespace moemesh;
using Clock = std::chrono::steady_clock;

namespace {

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    out.push_back(std::stoll(s.substr(i, j - i)));
    i = j + 1;
  }
  return out;
}

struct Row {
  std::string kv;
  int64_t window, context;
  double prefill_s, ms_per_token, kv_bytes_per_token;
  int64_t held_bytes;
};

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "tiny", contexts_s = "4096,32768,131072";
  int64_t window = 4096, decode = 16, chunk = 2048, prefill = 4096;
  int threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--preset")
      preset = v;
    else if (k == "--contexts")
      contexts_s = v;
    else if (k == "--window")
      window = std::stoll(v);
    else if (k == "--decode")
      decode = std::stoll(v);
    else if (k == "--chunk")
      chunk = std::stoll(v);
    else if (k == "--prefill")
      prefill = std::stoll(v);
    else if (k == "--threads")
      threads = std::stoi(v);
    else {
      std::fprintf(stderr, "unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  if (threads > 0) cpu::set_compute_threads(threads);
  const std::vector<int64_t> contexts = parse_list(contexts_s);
  const int64_t longest = *std::max_element(contexts.begin(), contexts.end());

  char tmpl[] = "/tmp/moemesh-bench-long-XXXXXX";
  if (!mkdtemp(tmpl)) return 1;
  const std::string base = tmpl;
  std::vector<Row> rows;
  for (int64_t w : {int64_t(0), window}) {
    ModelConfig cfg = model_preset(Arch::Mixtral, preset);
    cfg.vocab_size = 512;
    cfg.bos_token_id = 1;
    cfg.eos_token_ids = {2};
    cfg.max_position_embeddings = 131072;
    if (w > 0) cfg.sliding_window = w;
    const std::string dir = base + (w > 0 ? "/window" : "/full");
    WriteOptions wo;
    wo.seed = 7;
    write_model(cfg, dir, wo);
    auto ckpt = Checkpoint::open(dir);
    for (KvDType dt : {KvDType::F32, KvDType::Int8}) {
      const int64_t blocks = (longest + decode + 2 * chunk) / KvCache::kBlockSize + 4;
      Engine engine(ckpt, EngineOptions{blocks, dt});
      const SeqId seq = engine.create_sequence();
      int64_t pos = 0;
      uint32_t x = 12345;
      auto next_token = [&] { return int32_t(3 + (x = x * 1664525u + 1013904223u) % 500u); };
      double prefill_s = 0;
      std::vector<float> row(size_t(engine.kv_cache().kv_dim()));
      for (int64_t ctx : contexts) {
        const auto t0 = Clock::now();
        while (pos < std::min(ctx, prefill)) {
          StepInput in{seq, {}, false};
          for (int64_t i = 0; i < std::min(chunk, std::min(ctx, prefill) - pos); ++i) in.tokens.push_back(next_token());
          pos += int64_t(in.tokens.size());
          engine.step(std::span(&in, 1));
        }
        prefill_s += std::chrono::duration<double>(Clock::now() - t0).count();
        // The rest of the context: random K/V rows (N(0, 1)-ish), block by block, every layer.
        KvCache& kvc = engine.kv_cache();
        while (pos < ctx) {
          const int64_t end = std::min(ctx, (pos / KvCache::kBlockSize + 1) * KvCache::kBlockSize);
          kvc.reserve(seq, end);
          for (; pos < end; ++pos)
            for (int64_t l = 0; l < kvc.n_layers(); ++l) {
              for (float& f : row) f = float(int32_t(x = x * 1664525u + 1013904223u)) * (1.0f / 2147483648.0f);
              kvc.write_row(l, seq, pos, row.data(), row.data());
            }
          kvc.set_length(seq, pos);
        }
        const auto t1 = Clock::now();
        for (int64_t i = 0; i < decode; ++i) {
          StepInput in{seq, {next_token()}, false};
          engine.step(std::span(&in, 1));
        }
        const double dec = std::chrono::duration<double>(Clock::now() - t1).count();
        pos += decode;
        const KvCache& kv = engine.kv_cache();
        rows.push_back({std::string(kv_dtype_name(dt)), w, ctx, prefill_s, 1e3 * dec / double(decode),
                        double(kv.bytes_per_block()) / double(KvCache::kBlockSize),
                        kv.held_blocks(seq) * kv.bytes_per_block()});
        std::fprintf(stderr, "%s window %lld context %lld: %.2f ms/token\n", kv_dtype_name(dt).data(), (long long)w,
                     (long long)ctx, rows.back().ms_per_token);
      }
    }
  }
  std::printf(
      "%s preset, %d compute threads; each context: the first %lld tokens a real prefill in chunks of %lld (its time "
      "below), the rest random K/V rows written into the cache, then %lld decode steps timed\n\n",
      preset.c_str(), cpu::compute_threads(), (long long)prefill, (long long)chunk, (long long)decode);
  std::printf(
      "| KV | window | context | ms / output token | KV bytes / token | vs f32 | KV held by the sequence |"
      " prefill of the first %lld (s) |\n",
      (long long)prefill);
  std::printf("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Row& r : rows) {
    double f32_bytes = r.kv_bytes_per_token;
    for (const Row& o : rows)
      if (o.kv == "f32" && o.window == r.window && o.context == r.context) f32_bytes = o.kv_bytes_per_token;
    std::printf("| %s | %s | %lld | %.2f | %.0f | %.3fx | %.1f MiB | %.1f |\n", r.kv.c_str(),
                r.window ? std::to_string(r.window).c_str() : "none", (long long)r.context, r.ms_per_token,
                r.kv_bytes_per_token, r.kv_bytes_per_token / f32_bytes, double(r.held_bytes) / double(1 << 20),
                r.prefill_s);
  }
  std::string rm = "rm -rf '" + base + "'";
  return std::system(rm.c_str()) == 0 ? 0 : 1;
}
