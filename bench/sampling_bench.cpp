// Time per sampled token: Sampler::sample (the row's summary first, core/logits_summary.h) against
// Sampler::sample_full_row (process() over the whole row, the reference), measured alternately in
// the same run on the same rows, for realistic vocabularies.
// Also checks that both chose the same tokens. Prints a markdown table.
//   bench_sampling [ROWS]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/logits_summary.h"
#include "core/sampler.h"

using namespace moemesh;

namespace {

struct Case {
  const char* name;
  double temperature;
  int64_t top_k;
  double top_p, min_p, repetition;
};

// Five candidates `lead` apart from each other above a noisy tail: "peaked" rows (lead 2: the
// five hold ~99% of the mass, as most positions of a trained model) and "broad" ones (lead 0.5:
// the tail holds most of it).
std::vector<std::vector<float>> make_rows(int vocab, int n, float lead, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::uniform_int_distribution<int> id(0, vocab - 1);
  std::vector<std::vector<float>> rows(static_cast<size_t>(n), std::vector<float>(static_cast<size_t>(vocab)));
  for (auto& r : rows) {
    for (float& x : r) x = nd(rng);
    for (int j = 0; j < 5; ++j) r[size_t(id(rng))] = 10.0f + lead * float(5 - j) + (lead > 1 ? 8.0f : 0.0f);
  }
  return rows;
}

// How many rows the summary decides alone (the rest take the full row after it).
int decided(const SamplingParams& p, const std::vector<int32_t>& prompt, const std::vector<std::vector<float>>& rows) {
  Sampler s(p, prompt);
  int n = 0;
  for (const auto& r : rows) {
    const LogitsRequest req = s.logits_request();
    if (s.sample_from(req, summarise_logits(r, req)))
      ++n;
    else
      s.sample_full_row(r);
  }
  return n;
}

double ms_per_row(Sampler& s, const std::vector<std::vector<float>>& rows, bool full, std::vector<int32_t>& ids) {
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& r : rows) ids.push_back((full ? s.sample_full_row(r) : s.sample(r)).id);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / double(rows.size());
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 40;
  if (n < 1) {
    std::fprintf(stderr, "usage: %s [ROWS >= 1]\n", argv[0]);
    return 1;
  }
  const Case cases[] = {{"greedy", 0, 0, 1, 0, 1},
                        {"T 0.7, top_p 0.9", 0.7, 0, 0.9, 0, 1},
                        {"top_k 50", 1, 50, 1, 0, 1},
                        {"T 0.8, min_p 0.05", 0.8, 0, 1, 0.05, 1},
                        {"top_p 0.95, rep 1.1", 1, 0, 0.95, 0, 1.1},
                        {"T 1, no cut", 1, 0, 1, 0, 1}};
  std::printf(
      "| vocab | rows | parameters | full row (ms/token) | sample() (ms/token) | ratio | decided by the summary | same "
      "tokens |\n");
  std::printf("| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |\n");
  bool all_same = true;
  for (int vocab : {32000, 152064})
    for (const float lead : {2.0f, 0.5f}) {
      const auto rows = make_rows(vocab, n, lead, uint32_t(vocab));
      const std::vector<int32_t> prompt(rows.size(), 7);
      for (const Case& c : cases) {
        SamplingParams p;
        p.temperature = c.temperature;
        p.top_k = c.top_k;
        p.top_p = c.top_p;
        p.min_p = c.min_p;
        p.repetition_penalty = c.repetition;
        p.seed = 1;
        // Three alternating rounds, each on fresh samplers; the best of each side.
        double full = 1e30, fast = 1e30;
        bool same = true;
        for (int round = 0; round < 3; ++round) {
          Sampler a(p, prompt), b(p, prompt);
          std::vector<int32_t> ia, ib;
          full = std::min(full, ms_per_row(a, rows, true, ia));
          fast = std::min(fast, ms_per_row(b, rows, false, ib));
          same = same && ia == ib;
        }
        all_same = all_same && same;
        std::printf("| %d | %s | %s | %.3f | %.3f | %.2f | %d/%d | %s |\n", vocab, lead > 1 ? "peaked" : "broad",
                    c.name, full, fast, full / fast, decided(p, prompt, rows), n, same ? "yes" : "NO");
      }
    }
  return all_same ? 0 : 1;
}
