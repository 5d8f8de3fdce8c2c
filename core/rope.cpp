#include "core/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace moemesh {

namespace {

// YaRN's attention scale: 0.1 m ln s + 1 (1 for s <= 1).
double yarn_mscale(double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

// The dimension (of d) that makes num_rotations turns over max_pos positions.
double yarn_correction_dim(double num_rotations, double d, double base, double max_pos) {
  return d * std::log(max_pos / (num_rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
}

}  // namespace

bool rope_depends_on_length(const ModelConfig& cfg) { return cfg.rope_scaling.type == RopeScaling::Type::Dynamic; }

RopeTable rope_table(const ModelConfig& cfg, int64_t seq_len) {
  const RopeScaling& r = cfg.rope_scaling;
  const int64_t dim = cfg.head_dim, half = dim / 2;
  double base = cfg.rope_theta;
  if (r.type == RopeScaling::Type::Dynamic) {
    const double max_pos = double(cfg.max_position_embeddings);
    const double len = std::max<double>(double(seq_len), max_pos);
    base *= std::pow(r.factor * len / max_pos - (r.factor - 1.0), double(dim) / double(dim - 2));
  }
  RopeTable t;
  t.inv_freq.resize(size_t(half));
  for (int64_t i = 0; i < half; ++i) t.inv_freq[size_t(i)] = 1.0 / std::pow(base, double(2 * i) / double(dim));
  switch (r.type) {
    case RopeScaling::Type::Linear:
      for (double& f : t.inv_freq) f /= r.factor;
      break;
    case RopeScaling::Type::Yarn: {
      const double orig = double(r.original_max_position_embeddings);
      double low = yarn_correction_dim(r.beta_fast, double(dim), base, orig);
      double high = yarn_correction_dim(r.beta_slow, double(dim), base, orig);
      if (r.truncate) low = std::floor(low), high = std::ceil(high);
      low = std::max(low, 0.0);
      high = std::min(high, double(dim - 1));
      if (low == high) high += 0.001;  // no singularity
      for (int64_t i = 0; i < half; ++i) {
        const double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
        const double extrapolate = 1.0 - ramp;  // 1: keep the pretrained frequency
        double& f = t.inv_freq[size_t(i)];
        f = (f / r.factor) * (1.0 - extrapolate) + f * extrapolate;
      }
      t.attention_factor = r.attention_factor
                               ? *r.attention_factor
                               : yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim);
      break;
    }
    case RopeScaling::Type::Llama3: {
      const double orig = double(r.original_max_position_embeddings);
      const double low_wavelen = orig / r.low_freq_factor, high_wavelen = orig / r.high_freq_factor;
      for (double& f : t.inv_freq) {
        const double wavelen = 2.0 * std::numbers::pi / f;
        if (wavelen > low_wavelen) {
          f /= r.factor;
        } else if (!(wavelen < high_wavelen)) {
          const double smooth = (orig / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
          f = (1.0 - smooth) * f / r.factor + smooth * f;
        }
      }
      break;
    }
    default:
      break;
  }
  return t;
}

double attention_score_scale(const ModelConfig& cfg) {
  double s = 1.0 / std::sqrt(double(cfg.head_dim));
  const RopeScaling& r = cfg.rope_scaling;
  if (cfg.arch == Arch::DeepSeek && r.type == RopeScaling::Type::Yarn && r.mscale_all_dim != 0.0) {
    const double m = yarn_mscale(r.factor, r.mscale_all_dim);
    s *= m * m;
  }
  return s;
}

}  // namespace moemesh
