#include "core/logits_summary.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "core/error.h"

namespace moemesh {
namespace {

// log Σ exp(v / t), in double.
double log_sum_exp(std::span<const float> v, double t) {
  double mx = -std::numeric_limits<double>::infinity();
  for (float x : v) mx = std::max(mx, double(x) / t);
  if (!std::isfinite(mx)) return mx;
  double sum = 0;
  for (float x : v) sum += std::exp(double(x) / t - mx);
  return mx + std::log(sum);
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
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + ptrdiff_t(k), ids.end(), [&](int32_t a, int32_t b) {
    return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b);
  });
  s.top_ids.assign(ids.begin(), ids.begin() + ptrdiff_t(k));
  for (int32_t id : s.top_ids) s.top_values.push_back(logits[size_t(id)]);
  s.lse = log_sum_exp(logits, 1.0);
  s.lse_scaled = request.temperature > 0 ? log_sum_exp(logits, request.temperature) : s.lse;
  for (int32_t id : request.watch)
    s.watch_values.push_back(id >= 0 && id < s.vocab ? logits[size_t(id)] : -std::numeric_limits<float>::infinity());
  return s;
}

}  // namespace moemesh
