#include "core/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "kernels/cpu/ops.h"

namespace moemesh {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Log-softmax, the normaliser as a logits summary computes it (so both give equal logprobs).
std::vector<float> log_softmax(std::span<const float> logits) {
  const double lse = cpu::log_sum_exp(logits.data(), int64_t(logits.size()), 1.0f);
  std::vector<float> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = float(double(logits[i]) - lse);
  return out;
}

// Token ids sorted by value descending, ties lowest id first.
std::vector<int32_t> order_desc(std::span<const float> v) {
  std::vector<int32_t> ids(v.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return v[size_t(a)] > v[size_t(b)]; });
  return ids;
}

int32_t argmax(std::span<const float> v) {
  int32_t best = 0;
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] > v[size_t(best)]) best = int32_t(i);  // strict: ties keep the lowest id
  return best;
}

// A draw without a cut over known tokens first (by id), then every other token (by id), relative
// to exp(mx): the known tokens' cumulative weights, and the total, where the others' mass is the
// row's normaliser less the known tokens' unpenalised share. sample_from and sample_full_row both
// use it, so a draw that ends among the known tokens chooses the same one on both.
struct NoCutDraw {
  double mx = 0, total = 0;
  std::vector<double> cum;
};

template <class Known>
NoCutDraw no_cut_draw(const std::vector<Known>& known, double lse_scaled, double temperature) {
  NoCutDraw d;
  d.mx = -std::numeric_limits<double>::infinity();
  for (const Known& c : known) d.mx = std::max(d.mx, double(c.v));
  double known_raw = 0, acc = 0;
  for (const Known& c : known) {
    d.cum.push_back(acc += std::exp(double(c.v) - d.mx));
    known_raw += std::exp(double(c.raw) / temperature - d.mx);
  }
  d.total = acc + std::max(0.0, std::exp(lse_scaled - d.mx) - known_raw);
  return d;
}

}  // namespace

void SamplingParams::validate() const {
  auto bad = [](const std::string& what) { throw Error("sampling: " + what); };
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) bad("temperature must be >= 0");
  if (!(top_p > 0.0 && top_p <= 1.0)) bad("top_p must be in (0, 1]");
  if (!(min_p >= 0.0 && min_p <= 1.0)) bad("min_p must be in [0, 1]");
  if (!(repetition_penalty > 0.0) || !std::isfinite(repetition_penalty)) bad("repetition_penalty must be > 0");
  if (!(presence_penalty >= -2.0 && presence_penalty <= 2.0)) bad("presence_penalty must be in [-2, 2]");
  if (!(frequency_penalty >= -2.0 && frequency_penalty <= 2.0)) bad("frequency_penalty must be in [-2, 2]");
  if (top_logprobs < 0) bad("top_logprobs must be >= 0");
}

Sampler::Sampler(SamplingParams params, std::span<const int32_t> prompt, std::vector<int32_t> eos_ids)
    : params_(std::move(params)), stop_(params_.stop_token_ids), seen_(prompt.begin(), prompt.end()) {
  params_.validate();
  if (!params_.ignore_eos) stop_.insert(stop_.end(), eos_ids.begin(), eos_ids.end());
  std::sort(seen_.begin(), seen_.end());
  seen_.erase(std::unique(seen_.begin(), seen_.end()), seen_.end());
  rng_.seed(params_.seed ? *params_.seed : std::random_device{}() ^ (uint64_t(std::random_device{}()) << 32));
}

double Sampler::uniform(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

void Sampler::accept(int32_t id) {
  output_.push_back(id);
  ++output_counts_[id];
  auto it = std::lower_bound(seen_.begin(), seen_.end(), id);
  if (it == seen_.end() || *it != id) seen_.insert(it, id);
}

void Sampler::replay(std::span<const int32_t> generated) {
  for (int32_t id : generated) {
    if (params_.temperature != 0.0) (void)uniform(rng_);  // sample() draws once per token
    accept(id);
  }
}

bool Sampler::is_stop(int32_t id) const { return std::find(stop_.begin(), stop_.end(), id) != stop_.end(); }

bool Sampler::penalties_on() const {
  return params_.repetition_penalty != 1.0 || params_.presence_penalty != 0.0 || params_.frequency_penalty != 0.0;
}

float Sampler::penalised(int32_t id, float x) const {
  if (params_.repetition_penalty != 1.0 && std::binary_search(seen_.begin(), seen_.end(), id)) {
    const auto p = float(params_.repetition_penalty);
    x = x > 0 ? x / p : x * p;
  }
  if (params_.presence_penalty != 0.0 || params_.frequency_penalty != 0.0)
    if (auto it = output_counts_.find(id); it != output_counts_.end())
      x -= float(params_.presence_penalty + params_.frequency_penalty * double(it->second));
  return x;
}

std::vector<float> Sampler::process(std::span<const float> logits) const {
  std::vector<float> x(logits.begin(), logits.end());
  const auto vocab = int64_t(x.size());
  auto in_vocab = [&](int32_t id) { return id >= 0 && id < vocab; };

  // Hugging Face repetition penalty over prompt + output, OpenAI presence / frequency penalties
  // over output tokens (a subset of seen_).
  if (penalties_on())
    for (int32_t id : seen_)
      if (in_vocab(id)) x[size_t(id)] = penalised(id, x[size_t(id)]);

  if (params_.temperature == 0.0) return x;
  for (float& v : x) v = float(double(v) / params_.temperature);

  if (params_.top_k > 0 && params_.top_k < vocab) {
    const std::vector<int32_t> order = order_desc(x);
    for (size_t i = size_t(params_.top_k); i < order.size(); ++i) x[size_t(order[i])] = kNegInf;
  }
  if (params_.top_p < 1.0) {
    // Keep the smallest set of most likely tokens whose probability reaches top_p.
    const std::vector<float> lp = log_softmax(x);
    const std::vector<int32_t> order = order_desc(lp);
    double cum = 0.0;
    size_t keep = 0;
    while (keep < order.size() && (keep == 0 || cum < params_.top_p))
      cum += std::exp(double(lp[size_t(order[keep++])]));
    for (size_t i = keep; i < order.size(); ++i) x[size_t(order[i])] = kNegInf;
  }
  if (params_.min_p > 0.0) {
    // Keep tokens whose probability is at least min_p times the most likely one's.
    const float mx = *std::max_element(x.begin(), x.end());
    const double cut = double(mx) + std::log(params_.min_p);
    for (float& v : x)
      if (double(v) < cut) v = kNegInf;
  }
  return x;
}

SampledToken Sampler::sample(std::span<const float> logits) {
  if (logits.empty()) throw Error("sampling: empty logits");
  // process() sorts the whole vocabulary for top_k and top_p, and the draw exponentiates all of
  // it: the summary is one pass, and most draws end among its tokens.
  const LogitsRequest request = logits_request();
  const LogitsSummary summary = summarise_logits(logits, request);
  if (auto t = sample_from(request, summary)) return std::move(*t);
  return sample_full_row(logits, &summary);
}

bool Sampler::draw_known_first(std::span<const float> logits, std::span<const float> x, const LogitsSummary* summary,
                               int32_t& id) {
  const auto vocab = int64_t(x.size());
  if ((params_.top_k > 0 && params_.top_k < vocab) || params_.top_p < 1.0 || params_.min_p > 0.0) return false;
  const LogitsRequest request = logits_request();
  std::optional<LogitsSummary> own;
  if (!summary) summary = &own.emplace(summarise_logits(logits, request));
  const auto known = known_tokens(request, *summary);
  if (!known || int64_t(known->size()) >= vocab) return false;
  const NoCutDraw d = no_cut_draw(*known, summary->lse_scaled, params_.temperature);
  if (!std::isfinite(d.mx)) return false;
  const double u = uniform(rng_) * d.total;
  const auto at = size_t(std::upper_bound(d.cum.begin(), d.cum.end(), u) - d.cum.begin());
  if (at < known->size()) {
    id = (*known)[at].id;
    return true;
  }
  // Among the other tokens, by id; should rounding leave the sum short of u, the last of them.
  double cum = d.cum.empty() ? 0.0 : d.cum.back();
  int32_t last = -1;
  size_t k = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    while (k < known->size() && (*known)[k].id < j) ++k;
    if ((k < known->size() && (*known)[k].id == j) || x[size_t(j)] == kNegInf) continue;
    last = int32_t(j);
    if ((cum += std::exp(double(x[size_t(j)]) - d.mx)) > u) break;
  }
  id = last >= 0 ? last : argmax(x);
  return true;
}

SampledToken Sampler::sample_full_row(std::span<const float> logits, const LogitsSummary* summary) {
  if (logits.empty()) throw Error("sampling: empty logits");
  const std::vector<float> x = process(logits);
  SampledToken out;
  if (params_.temperature == 0.0) {
    out.id = argmax(x);
  } else if (!draw_known_first(logits, x, summary, out.id)) {
    const float mx = *std::max_element(x.begin(), x.end());
    std::vector<double> cum(x.size());
    double total = 0.0;
    for (size_t i = 0; i < x.size(); ++i) {
      total += x[i] == kNegInf ? 0.0 : std::exp(double(x[i]) - double(mx));
      cum[i] = total;
    }
    const double u = uniform(rng_) * total;
    // First token whose cumulative mass exceeds u; never one with zero mass.
    out.id = int32_t(std::upper_bound(cum.begin(), cum.end(), u) - cum.begin());
    if (out.id >= int32_t(x.size())) out.id = argmax(x);
  }
  const std::vector<float> lp = log_softmax(logits);
  out.logprob = lp[size_t(out.id)];
  if (params_.top_logprobs > 0) {
    const std::vector<int32_t> order = order_desc(lp);
    const size_t n = std::min(order.size(), size_t(params_.top_logprobs));
    for (size_t i = 0; i < n; ++i) out.top.emplace_back(order[i], lp[size_t(order[i])]);
  }
  accept(out.id);
  return out;
}

LogitsRequest Sampler::logits_request() const {
  LogitsRequest r;
  // A top_p nucleus often reaches past the 64 most likely tokens; a top_k cut never does.
  const int64_t top_k = params_.top_k > 0 && params_.top_k <= 1024 ? params_.top_k : 0;
  const int64_t base = params_.top_p < 1.0 && top_k == 0 ? 256 : 64;
  r.k = std::max<int64_t>({base, params_.top_logprobs, top_k});
  r.temperature = params_.temperature;
  r.made_at = output_.size();
  if (params_.repetition_penalty != 1.0)
    r.watch = seen_;
  else if (penalties_on())
    for (const auto& [id, count] : output_counts_) r.watch.push_back(id);
  return r;
}

std::optional<std::vector<Sampler::Known>> Sampler::known_tokens(const LogitsRequest& request,
                                                                 const LogitsSummary& summary) const {
  const size_t k = summary.top_ids.size();
  if (k == 0 || summary.top_values.size() != k || summary.watch_values.size() != request.watch.size())
    return std::nullopt;
  const int64_t vocab = summary.vocab;
  std::vector<Known> known;
  for (size_t i = 0; i < k; ++i) {
    if (summary.top_ids[i] < 0 || summary.top_ids[i] >= vocab) return std::nullopt;  // e.g. a row of NaN
    known.push_back({summary.top_ids[i], summary.top_values[i], 0});
  }
  for (size_t i = 0; i < request.watch.size(); ++i)
    if (request.watch[i] >= 0 && request.watch[i] < vocab)
      known.push_back({request.watch[i], summary.watch_values[i], 0});
  std::sort(known.begin(), known.end(), [](const Known& a, const Known& b) { return a.id < b.id; });
  known.erase(std::unique(known.begin(), known.end(), [](const Known& a, const Known& b) { return a.id == b.id; }),
              known.end());
  const double t = params_.temperature;
  for (Known& c : known) {
    c.v = penalised(c.id, c.raw);  // v: penalised, then over the temperature
    if (t != 0.0) c.v = float(double(c.v) / t);
  }
  return known;
}

// Mirrors process() and sample() step by step on the known tokens (the top k and the watched
// ones). Every other token has a logit <= the k-th largest and no penalty, so after temperature
// it is at most `bound`; each filter either provably removes all of them or gives up.
std::optional<SampledToken> Sampler::sample_from(const LogitsRequest& request, const LogitsSummary& summary) {
  const size_t k = summary.top_ids.size();
  const int64_t vocab = summary.vocab;
  if (size_t(params_.top_logprobs) > k && int64_t(k) < vocab) return std::nullopt;
  // Every penalised token must be known: a request made before the last token is refused.
  if (request.made_at != output_.size()) return std::nullopt;
  const auto known_or = known_tokens(request, summary);
  if (!known_or) return std::nullopt;
  const std::vector<Known>& known = *known_or;
  const double t = params_.temperature;
  bool unknown = int64_t(known.size()) < vocab;  // tokens whose logits the summary does not hold
  const float floor = summary.top_values[k - 1];
  const float bound = t != 0.0 ? float(double(floor) / t) : floor;

  SampledToken out;
  if (t == 0.0) {
    const Known* best = &known[0];
    for (const Known& c : known)
      if (c.v > best->v) best = &c;  // in id order, strict: ties keep the lowest id
    if (unknown && !(best->v > bound)) return std::nullopt;
    out.id = best->id;
  } else {
    std::vector<Known> kept = known;  // by value descending, ties lowest id first (order_desc)
    std::stable_sort(kept.begin(), kept.end(), [](const Known& a, const Known& b) { return a.v > b.v; });
    if (params_.top_k > 0 && params_.top_k < vocab) {
      if (int64_t(kept.size()) >= params_.top_k) {
        if (unknown && !(kept[size_t(params_.top_k - 1)].v > bound)) return std::nullopt;
        kept.resize(size_t(params_.top_k));
      } else if (unknown) {
        return std::nullopt;
      }
      unknown = false;
    }
    if (params_.top_p < 1.0) {
      // log_softmax over what is kept; the unknown tokens' mass is the whole row's (lse_scaled)
      // less the known tokens' unpenalised share.
      double mx = kept[0].v;
      if (unknown) mx = std::max(mx, double(bound));
      std::vector<Known> by_id = kept;  // process() sums and ranks in id order
      std::sort(by_id.begin(), by_id.end(), [](const Known& a, const Known& b) { return a.id < b.id; });
      double mass = 0;
      for (const Known& c : by_id) mass += std::exp(double(c.v) - mx);
      if (unknown) {
        double known_raw = 0;
        for (const Known& c : known) known_raw += std::exp(double(c.raw) / t - mx);
        mass += std::max(0.0, std::exp(summary.lse_scaled - mx) - known_raw);
      }
      const double lse = mx + std::log(mass);
      // Ranked by log-probability (as rounded to float), ties lowest id: order_desc(log_softmax).
      std::vector<std::pair<float, Known>> ranked;
      for (const Known& c : by_id) ranked.emplace_back(float(double(c.v) - lse), c);
      std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
      double cum = 0.0;
      size_t keep = 0;
      while (keep < ranked.size() && (keep == 0 || cum < params_.top_p)) {
        if (unknown && !(ranked[keep].second.v > bound)) return std::nullopt;  // unknown tokens could come first
        cum += std::exp(double(ranked[keep++].first));
      }
      kept.clear();
      for (size_t i = 0; i < keep; ++i) kept.push_back(ranked[i].second);
      if (unknown && cum < params_.top_p) return std::nullopt;  // the nucleus reaches unknown tokens
      unknown = false;
    }
    if (params_.min_p > 0.0) {
      float vmax = kept[0].v;
      for (const Known& c : kept) vmax = std::max(vmax, c.v);
      if (unknown && !(vmax >= bound)) return std::nullopt;
      const double cut = double(vmax) + std::log(params_.min_p);
      std::erase_if(kept, [&](const Known& c) { return double(c.v) < cut; });
      if (unknown && !(double(bound) < cut)) return std::nullopt;
      unknown = false;
    }
    if (unknown) {  // no cut: the draw ends among the known tokens, or the full row is needed
      const NoCutDraw d = no_cut_draw(known, summary.lse_scaled, t);
      if (!std::isfinite(d.mx)) return std::nullopt;
      std::mt19937_64 rng = rng_;  // drawn for real only if it decides
      const double u = uniform(rng) * d.total;
      const auto at = size_t(std::upper_bound(d.cum.begin(), d.cum.end(), u) - d.cum.begin());
      if (at >= known.size()) return std::nullopt;
      rng_ = rng;
      out.id = known[at].id;
    } else {
      std::sort(kept.begin(), kept.end(), [](const Known& a, const Known& b) { return a.id < b.id; });
      float mx = kept[0].v;
      for (const Known& c : kept) mx = std::max(mx, c.v);
      std::vector<double> cum;
      double total = 0.0;
      for (const Known& c : kept) cum.push_back(total += std::exp(double(c.v) - double(mx)));
      const double u = uniform(rng_) * total;
      const size_t at = size_t(std::upper_bound(cum.begin(), cum.end(), u) - cum.begin());
      if (at < kept.size()) {
        out.id = kept[at].id;
      } else {  // argmax, ties lowest id
        out.id = std::find_if(kept.begin(), kept.end(), [&](const Known& c) { return c.v == mx; })->id;
      }
    }
  }
  const auto raw = std::lower_bound(known.begin(), known.end(), Known{out.id, 0, 0},
                                    [](const Known& a, const Known& b) { return a.id < b.id; });
  out.logprob = float(double(raw->raw) - summary.lse);
  for (size_t i = 0; i < std::min(k, size_t(params_.top_logprobs)); ++i)
    out.top.emplace_back(summary.top_ids[i], float(double(summary.top_values[i]) - summary.lse));
  accept(out.id);
  return out;
}

}  // namespace moemesh
