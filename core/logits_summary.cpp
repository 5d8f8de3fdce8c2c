#include "core/logits_summary.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "core/error.h"
#include "kernels/cpu/ops.h"

namespace moemesh {
namespace {

// The k largest of v by value, ties lowest id first (the order partial_sort gives with that
// comparison), in one pass: a heap of the k best so far whose worst is the bar an id must beat.
// Ids come in increasing order, so a tie never beats the bar, and past the first few hundred
// logits almost none does: about one comparison per logit.
std::vector<int32_t> top_ids(std::span<const float> v, size_t k) {
  auto better = [&](int32_t a, int32_t b) {
    return v[size_t(a)] > v[size_t(b)] || (v[size_t(a)] == v[size_t(b)] && a < b);
  };
  std::vector<int32_t> heap(k);
  std::iota(heap.begin(), heap.end(), 0);
  std::make_heap(heap.begin(), heap.end(), better);  // front: the worst of the k
  float bar = v[size_t(heap.front())];
  for (size_t i = k; i < v.size(); ++i) {
    if (!(v[i] > bar)) continue;
    std::pop_heap(heap.begin(), heap.end(), better);
    heap.back() = int32_t(i);
    std::push_heap(heap.begin(), heap.end(), better);
    bar = v[size_t(heap.front())];
  }
  std::sort(heap.begin(), heap.end(), better);
  return heap;
}

}  // namespace

void check_logits_request(const LogitsRequest& request) {
  if (request.k < 1) throw Error("logits summary: k must be >= 1 (got " + std::to_string(request.k) + ")");
}

LogitsSummary summarise_logits(std::span<const float> logits, const LogitsRequest& request) {
  if (logits.empty()) throw Error("logits summary: empty row");
  check_logits_request(request);
  LogitsSummary s;
  s.vocab = int64_t(logits.size());
  const size_t k = size_t(std::min<int64_t>(request.k, s.vocab));
  s.top_ids = top_ids(logits, k);
  for (int32_t id : s.top_ids) s.top_values.push_back(logits[size_t(id)]);
  s.lse = cpu::log_sum_exp(logits.data(), s.vocab, 1.0f);
  s.lse_scaled = request.temperature > 0 && request.temperature != 1.0
                     ? cpu::log_sum_exp(logits.data(), s.vocab, float(1.0 / request.temperature))
                     : s.lse;
  for (int32_t id : request.watch)
    s.watch_values.push_back(id >= 0 && id < s.vocab ? logits[size_t(id)] : -std::numeric_limits<float>::infinity());
  return s;
}

}  // namespace moemesh
