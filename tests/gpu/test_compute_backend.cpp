// `--device` parsing and the backend factory, on any machine: cpu is the reference backend, and a
// CUDA device that is not there is a clear "no CUDA device: ..." error, never a crash.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "core/backend_factory.h"
#include "core/error.h"
#include "core/moe.h"

using namespace moemesh;

TEST(ComputeBackend, ParsesDevices) {
  EXPECT_EQ(parse_device("cpu").kind, DeviceSpec::Kind::Cpu);
  EXPECT_EQ(parse_device("cuda").kind, DeviceSpec::Kind::Cuda);
  EXPECT_EQ(parse_device("cuda").index, 0);
  EXPECT_EQ(parse_device("cuda:3").index, 3);
  EXPECT_EQ(parse_device("cuda:3").str(), "cuda:3");
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:1x", "CPU", ""}) {
    try {
      parse_device(bad);
      ADD_FAILURE() << "accepted \"" << bad << "\"";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("expected cpu, cuda or cuda:N"), std::string::npos) << e.what();
    }
  }
}

TEST(ComputeBackend, CpuIsTheReferenceBackend) {
  const auto b = make_compute_backend(parse_device("cpu"));
  EXPECT_EQ(b, cpu_backend());
  EXPECT_EQ(b->name(), "cpu");
  auto kv = b->make_kv_cache(2, 8, 4, {KvDType::Int8, 2});
  EXPECT_EQ(kv->dtype(), KvDType::Int8);
}

// No machine has 100 GPUs: whether CUDA is built in or not, the answer is the same kind of error.
TEST(ComputeBackend, MissingCudaDeviceIsAClearError) {
  try {
    make_compute_backend(parse_device("cuda:99"));
    FAIL() << "cuda:99 gave a backend";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("no CUDA device: ", 0), 0u) << e.what();
  }
}

// The default grouped MLP (what the CPU backend runs): each expert over its rows of x, gathered
// in the order given (repeats allowed), equals mlp_forward on those rows; an expert with no rows
// is skipped; a row outside x is an error naming it.
TEST(ComputeBackend, GroupedMlpIsEachExpertOverItsRows) {
  const int64_t hidden = 8, inter = 12, x_rows = 6;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 0.5f);
  auto values = [&](size_t n) {
    std::vector<float> v(n);
    for (float& f : v) f = nd(rng);
    return v;
  };
  std::vector<std::vector<float>> storage;
  auto weight = [&](int64_t rows, int64_t cols) {
    storage.push_back(values(size_t(rows * cols)));
    return Weight{"w", DType::F32, {rows, cols}, storage.back().data(), nullptr};
  };
  storage.reserve(6);
  const MlpWeights a{weight(inter, hidden), weight(inter, hidden), weight(hidden, inter)};
  const MlpWeights b{weight(inter, hidden), weight(inter, hidden), weight(hidden, inter)};
  const std::vector<float> x = values(size_t(x_rows * hidden));
  const std::vector<int32_t> rows_a{5, 0, 5}, rows_b{2}, none{};
  std::vector<float> out_a(rows_a.size() * hidden), out_b(rows_b.size() * hidden);
  const ExpertRows experts[] = {{&a, rows_a, out_a.data()}, {&b, none, out_b.data()},
                                {&b, rows_b, out_b.data()}};
  cpu_backend()->grouped_mlp(x.data(), x_rows, hidden, experts);

  auto expected = [&](const MlpWeights& w, const std::vector<int32_t>& rows) {
    std::vector<float> in, out(rows.size() * hidden);
    for (int32_t r : rows) in.insert(in.end(), x.begin() + r * hidden, x.begin() + (r + 1) * hidden);
    mlp_forward(w, in.data(), int64_t(rows.size()), hidden, out.data());
    return out;
  };
  EXPECT_EQ(out_a, expected(a, rows_a));
  EXPECT_EQ(out_b, expected(b, rows_b));
  EXPECT_EQ(std::vector<float>(out_a.begin(), out_a.begin() + hidden),
            std::vector<float>(out_a.begin() + 2 * hidden, out_a.end()))
      << "row 5 twice gives the same result twice";

  const std::vector<int32_t> outside{1, 6};
  const ExpertRows bad[] = {{&a, outside, out_b.data()}};
  try {
    cpu_backend()->grouped_mlp(x.data(), x_rows, hidden, bad);
    FAIL() << "row 6 of 6 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 6 outside the 6 rows of x"), std::string::npos) << e.what();
  }
}
