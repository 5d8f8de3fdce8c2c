// core/gptq_quantizer: the Hessian, RTN and GPTQ on one Linear, their packing against the loader
// (core/gptq.h's repack_gptq), GPTQ against the independent NumPy version
// (tests/reference/gptq_quantizer_reference.py), and GPTQ's output error below RTN's.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "core/gptq.h"
#include "core/gptq_calibrate.h"
#include "core/gptq_quantizer.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;

// Activations like a transformer's: a low-rank correlated part plus noise, with column scales
// spread over several orders of magnitude (what makes GPTQ's ordering and feedback matter);
// `dead` columns are never active.
std::vector<float> activations(int64_t rows, int64_t in, uint32_t seed, std::vector<int64_t> dead = {}) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n01(0, 1), spread(0, 1.5);
  const int64_t rank = 12;
  std::vector<double> a(static_cast<size_t>(rank * in)), scale(static_cast<size_t>(in));
  for (auto& v : a) v = n01(rng);
  for (auto& s : scale) s = std::exp(spread(rng));
  std::vector<float> x(size_t(rows * in));
  std::vector<double> z(static_cast<size_t>(rank));
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& v : z) v = n01(rng);
    for (int64_t i = 0; i < in; ++i) {
      double v = 0.3 * n01(rng);
      for (int64_t k = 0; k < rank; ++k) v += z[size_t(k)] * a[size_t(k * in + i)];
      x[size_t(r * in + i)] = float(v * scale[size_t(i)]);
    }
  }
  for (int64_t d : dead)
    for (int64_t r = 0; r < rows; ++r) x[size_t(r * in + d)] = 0;
  return x;
}

std::vector<float> weights(int64_t out, int64_t in, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0, 0.05f);
  std::vector<float> w(size_t(out * in));
  for (auto& v : w) v = n(rng);
  return w;
}

// ||X Wᵀ - X Ŵᵀ||² in f64.
double output_error(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& wq,
                    int64_t rows, int64_t out, int64_t in) {
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < out; ++j) {
      double d = 0;
      for (int64_t i = 0; i < in; ++i)
        d += double(x[size_t(r * in + i)]) * (double(w[size_t(j * in + i)]) - double(wq[size_t(j * in + i)]));
      sum += d * d;
    }
  return sum;
}

Hessian hessian_of(const std::vector<float>& x, int64_t rows, int64_t in) {
  Hessian h(in);
  h.add(x.data(), rows);
  return h;
}

TEST(GptqHessian, IsTwiceTheMeanOuterProduct) {
  const int64_t rows = 300, in = 24;  // more rows than one dsyrk batch
  const auto x = activations(rows, in, 1);
  Hessian h(in);
  h.add(x.data(), 100);
  std::vector<int32_t> rest;
  for (int32_t r = 100; r < rows; ++r) rest.push_back(r);
  h.add_rows(x.data(), in, rest);
  EXPECT_EQ(h.samples(), rows);
  const auto H = h.matrix();
  for (int64_t a = 0; a < in; ++a)
    for (int64_t b = 0; b < in; ++b) {
      double want = 0;
      for (int64_t r = 0; r < rows; ++r) want += double(x[size_t(r * in + a)]) * double(x[size_t(r * in + b)]);
      want *= 2.0 / double(rows);
      EXPECT_NEAR(H[size_t(a * in + b)], want, 1e-9 * std::abs(want) + 1e-12) << a << ", " << b;
    }
}

// The packed tensors read back by the loader's own repacking give the quantizer's dequantized W.
void expect_loader_agrees(const QuantizedLinear& q, bool desc_act) {
  const PackedLinear p = pack_gptq_v1(q);
  GptqConfig cfg;
  cfg.bits = q.bits, cfg.group_size = q.group_size, cfg.desc_act = desc_act;
  GptqTensors t{p.qweight.data(), p.qzeros.data(), p.scales.data(), DType::F16, p.g_idx.data()};
  const auto loaded = repack_gptq(cfg, "test", q.out, q.in, t).dequantize();
  EXPECT_EQ(loaded, q.dequantize());
}

TEST(GptqQuantizer, RtnWithinHalfAStepAndLoadable) {
  const int64_t out = 16, in = 80;
  const auto w = weights(out, in, 2);
  for (int bits : {4, 8})
    for (int64_t G : {int64_t(32), int64_t(-1)})
      for (bool sym : {true, false}) {
        const QuantOptions o{bits, G, sym, false, 0.01};
        const auto q = quantize_rtn(w.data(), out, in, o, "w");
        const auto back = q.dequantize();
        for (int64_t j = 0; j < out; ++j)
          for (int64_t i = 0; i < in; ++i) {
            const double s = f16_to_f32(q.scales[size_t(q.g_idx[size_t(i)] * out + j)]);
            ASSERT_LE(std::abs(double(back[size_t(j * in + i)]) - double(w[size_t(j * in + i)])), s / 2 * (1 + 1e-6));
          }
        expect_loader_agrees(q, false);
      }
}

TEST(GptqQuantizer, BeatsRtnOnUnevenActivations) {
  // The property GPTQ exists for: at the same bits and groups its output error on the
  // calibration inputs is well below round-to-nearest's.
  const int64_t rows = 512, out = 48, in = 256;
  for (uint32_t seed : {3u, 4u}) {
    const auto x = activations(rows, in, seed);
    const auto w = weights(out, in, seed + 10);
    const Hessian h = hessian_of(x, rows, in);
    for (int bits : {4, 8})
      for (int64_t G : {int64_t(128), int64_t(-1)})
        for (bool desc : {false, true}) {
          const QuantOptions o{bits, G, !desc, desc, 0.01};
          const double e_rtn = output_error(x, w, quantize_rtn(w.data(), out, in, o, "w").dequantize(), rows, out, in);
          const auto q = quantize_gptq(w.data(), out, in, h, o, "w");
          const double e_gptq = output_error(x, w, q.dequantize(), rows, out, in);
          EXPECT_LT(e_gptq, 0.5 * e_rtn) << "seed " << seed << " bits " << bits << " G " << G << " desc_act " << desc
                                         << ": GPTQ " << e_gptq << " RTN " << e_rtn;
          expect_loader_agrees(q, desc);
        }
  }
}

TEST(GptqQuantizer, DescActGroupsAndDeadColumns) {
  const int64_t rows = 200, out = 8, in = 64;
  const auto x = activations(rows, in, 5, {3, 40});
  const auto w = weights(out, in, 6);
  const auto q = quantize_gptq(w.data(), out, in, hessian_of(x, rows, in), QuantOptions{4, 16, false, true, 0.01}, "w");
  std::vector<int> count(4, 0);
  for (int32_t g : q.g_idx) ++count.at(size_t(g));
  EXPECT_EQ(count, std::vector<int>(4, 16));
  bool sequential = true;
  for (int64_t i = 0; i < in; ++i) sequential &= q.g_idx[size_t(i)] == i / 16;
  EXPECT_FALSE(sequential) << "desc_act should group columns by the Hessian's order";
  const auto back = q.dequantize();
  for (int64_t j = 0; j < out; ++j) {
    EXPECT_EQ(back[size_t(j * in + 3)], 0.0f);
    EXPECT_EQ(back[size_t(j * in + 40)], 0.0f);
  }
}

TEST(GptqQuantizer, Errors) {
  const auto w = weights(8, 16, 1);
  Hessian h(16);  // no rows
  EXPECT_THROW(quantize_gptq(w.data(), 8, 16, h, QuantOptions{4, 16, true, false, 0.0}, "m.weight"), Error);
  Hessian h8(8);
  try {
    quantize_gptq(w.data(), 8, 16, h8, QuantOptions{}, "m.weight");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("m.weight"), std::string::npos) << e.what();
  }
  auto bad = w;
  bad[5] = NAN;
  EXPECT_THROW(quantize_rtn(bad.data(), 8, 16, QuantOptions{}, "m.weight"), Error);
}

// --- against tests/reference/gptq_quantizer_reference.py

template <typename T>
void write_raw(const fs::path& p, const std::vector<T>& v) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
}

template <typename T>
std::vector<T> read_raw(const fs::path& p, size_t n) {
  std::vector<T> v(n);
  std::ifstream f(p, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(T)));
  EXPECT_TRUE(f.good()) << p;
  return v;
}

struct RefCase {
  std::string name;
  QuantOptions o;
  int64_t rows, out, in;
  std::vector<int64_t> dead;
};

TEST(GptqQuantizer, MatchesNumPyReference) {
  const std::vector<RefCase> cases = {
      {"int4_g128_sym", {4, 128, true, false, 0.01}, 400, 32, 384, {}},
      {"int4_g128_asym", {4, 128, false, false, 0.01}, 400, 32, 384, {7}},
      {"int4_gall_sym", {4, -1, true, false, 0.01}, 400, 32, 384, {}},
      {"int4_gall_asym_descact", {4, -1, false, true, 0.01}, 400, 32, 384, {}},
      {"int4_g128_sym_descact", {4, 128, true, true, 0.01}, 400, 32, 384, {100}},
      {"int4_g128_asym_descact", {4, 128, false, true, 0.05}, 400, 32, 384, {}},
      {"int8_g32_asym", {8, 32, false, false, 0.01}, 300, 16, 200, {}},  // groups inside blocks; a short last one
      {"int4_g48_sym_descact", {4, 48, true, true, 0.01}, 300, 16, 200, {}},
  };
  const fs::path dir = fs::temp_directory_path() / ("moemesh-test-gptq-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  std::vector<QuantizedLinear> ours;
  uint32_t seed = 20;
  for (const auto& c : cases) {
    const fs::path d = dir / c.name;
    fs::create_directories(d);
    const auto x = activations(c.rows, c.in, seed++, c.dead);
    const auto w = weights(c.out, c.in, seed++);
    write_raw(d / "x.f32", x);
    write_raw(d / "w.f32", w);
    std::ofstream(d / "case.json") << nlohmann::json{
        {"out", c.out},
        {"in", c.in},
        {"rows", c.rows},
        {"bits", c.o.bits},
        {"group_size", c.o.group_size},
        {"sym", c.o.sym},
        {"desc_act", c.o.desc_act},
        {"damp", c.o.damp}}.dump();
    ours.push_back(quantize_gptq(w.data(), c.out, c.in, hessian_of(x, c.rows, c.in), c.o, c.name));
  }
  const std::string cmd = std::string(MOEMESH_PYTHON) + " " + MOEMESH_SOURCE_DIR +
                          "/tests/reference/gptq_quantizer_reference.py " + dir.string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  for (size_t k = 0; k < cases.size(); ++k) {
    const RefCase& c = cases[k];
    const QuantizedLinear& q = ours[k];
    const fs::path d = dir / c.name;
    const size_t n = size_t(c.out * c.in), ng = size_t(c.o.groups(c.in)) * size_t(c.out);
    const auto ref_q = read_raw<int32_t>(d / "q.i32", n);
    const auto ref_scales = read_raw<uint16_t>(d / "scales.f16", ng);
    const auto ref_zeros = read_raw<int32_t>(d / "zeros.i32", ng);
    const auto ref_g_idx = read_raw<int32_t>(d / "g_idx.i32", size_t(c.in));
    EXPECT_EQ(q.g_idx, ref_g_idx) << c.name;
    size_t same = 0, same_params = 0;
    for (size_t i = 0; i < n; ++i) same += int32_t(q.q[i]) == ref_q[i];
    for (size_t i = 0; i < ng; ++i) same_params += q.scales[i] == ref_scales[i] && q.zeros[i] == ref_zeros[i];
    // Rounding ties may go either way after f64 sums in another order; nothing else may differ.
    EXPECT_GE(double(same), 0.995 * double(n)) << c.name << ": " << n - same << " of " << n << " codes differ";
    EXPECT_GE(double(same_params), 0.995 * double(ng)) << c.name << ": " << ng - same_params << " scales/zeros differ";
    // Dequantized: within one quantization step of the reference everywhere.
    const auto back = q.dequantize();
    double worst = 0;
    for (int64_t j = 0; j < c.out; ++j)
      for (int64_t i = 0; i < c.in; ++i) {
        const size_t g = size_t(ref_g_idx[size_t(i)] * c.out + j);
        const double s = f16_to_f32(ref_scales[g]);
        const double ref = s * double(ref_q[size_t(j * c.in + i)] - ref_zeros[g]);
        worst = std::max(worst, std::abs(double(back[size_t(j * c.in + i)]) - ref) / s);
      }
    EXPECT_LE(worst, 1.0 + 1e-6) << c.name << ": dequantized weights differ by " << worst << " steps";
    std::cout << c.name << ": " << same << "/" << n << " codes equal, worst " << worst << " steps\n";
  }
  fs::remove_all(dir);
}

// --- calibration data (core/gptq_calibrate.h)

TEST(GptqCalibration, WindowsCutSamplesUpToTheBudget) {
  const std::vector<std::vector<int32_t>> samples = {{1, 2, 3, 4, 5}, {6, 7}, {8, 9, 10}};
  EXPECT_EQ(token_windows(samples, 2, 0),
            (std::vector<std::vector<int32_t>>{{1, 2}, {3, 4}, {5}, {6, 7}, {8, 9}, {10}}));
  EXPECT_EQ(token_windows(samples, 4, 6), (std::vector<std::vector<int32_t>>{{1, 2, 3, 4}, {5}, {6}}));
  EXPECT_THROW(token_windows(samples, 0, 0), Error);
}

TEST(GptqCalibration, JsonlInputIdsAndErrorsNameTheLine) {
  const fs::path dir = fs::temp_directory_path() / ("moemesh-test-calib-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return dir / name;
  };
  const auto ok = write("ok.jsonl", "{\"input_ids\": [5, 6, 7]}\n\n{\"input_ids\": [8]}\n{\"input_ids\": [9]}\n");
  EXPECT_EQ(read_calibration(ok, nullptr, 0), (std::vector<std::vector<int32_t>>{{5, 6, 7}, {8}, {9}}));
  EXPECT_EQ(read_calibration(ok, nullptr, 2).size(), 2u);
  const auto expect_error = [&](const fs::path& file, const std::string& want) {
    try {
      read_calibration(file, nullptr, 0);
      ADD_FAILURE() << file << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  expect_error(write("a.jsonl", "{\"input_ids\": [1]}\nnot json\n"), "a.jsonl:2: not a JSON object");
  expect_error(write("b.jsonl", "{\"input_ids\": \"x\"}\n"), "b.jsonl:1: input_ids");
  expect_error(write("c.jsonl", "{\"text\": \"hello\"}\n"), "c.jsonl:1: text needs the model's tokenizer.json");
  expect_error(write("d.jsonl", "{\"other\": 1}\n"), "d.jsonl:1: expected");
  expect_error(write("e.txt", "plain text"), "tokenizer.json");
  expect_error(dir / "missing.jsonl", "cannot open");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moemesh
