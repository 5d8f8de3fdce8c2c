// The matmul kernels (kernels/cpu/gemm.h) and the compute pool they run on: every ISA this CPU
// runs against a double-precision loop, every SIMD ISA against the portable kernel, the
// epilogues, gathers and strides, batch and thread invariance, and bad jobs.
#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/quant_matrix.h"
#include "kernels/cpu/thread_pool.h"
#include "tests/support/numeric.h"
#include "tests/support/random_quant.h"

using namespace moemesh;
using moemesh::testing::narrow;
using moemesh::testing::normals;
using Job = cpu::MatmulJob;

namespace {

// A weight stored as `dtype`, with the f32 values it holds after rounding.
struct StoredWeight {
  DType dtype;
  int64_t out, in;
  std::vector<float> values;  // as stored (rounded)
  std::vector<uint8_t> bytes;
  StoredWeight(DType t, int64_t out_, int64_t in_, uint64_t seed) : dtype(t), out(out_), in(in_) {
    auto w = normals(size_t(out * in), seed, 0.1f);
    if (t == DType::F32) {
      values = w;
      bytes.resize(w.size() * 4);
      std::memcpy(bytes.data(), w.data(), bytes.size());
    } else {
      auto half = narrow(w, t, values);
      bytes.resize(half.size() * 2);
      std::memcpy(bytes.data(), half.data(), bytes.size());
    }
  }
};

// The x value a weight of type t multiplies: x itself, or x rounded to bf16 for BF16 weights.
double operand(float x, DType t) { return t == DType::BF16 ? double(bf16_to_f32(f32_to_bf16(x))) : double(x); }

// y[r, o] = Σ x[r, k] w[o, k] in double; also Σ |x w| per entry, the scale of its rounding error.
void reference(const std::vector<float>& x, int64_t rows, const StoredWeight& w, std::vector<double>& y,
               std::vector<double>& mag) {
  y.assign(size_t(rows * w.out), 0.0);
  mag.assign(size_t(rows * w.out), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < w.out; ++o)
      for (int64_t k = 0; k < w.in; ++k) {
        const double p = operand(x[size_t(r * w.in + k)], w.dtype) * w.values[size_t(o * w.in + k)];
        y[size_t(r * w.out + o)] += p;
        mag[size_t(r * w.out + o)] += std::abs(p);
      }
}

std::vector<float> run(const std::vector<float>& x, int64_t rows, const StoredWeight& w) {
  std::vector<float> y(size_t(rows * w.out), NAN);
  cpu::matmul(x.data(), rows, w.in, w.bytes.data(), w.dtype, w.out, y.data());
  return y;
}

// Restores the ISA and pool size a test changed.
struct KernelSettings {
  cpu::Isa isa = cpu::active_isa();
  int threads = cpu::compute_threads();
  ~KernelSettings() {
    cpu::force_isa(isa);
    cpu::set_compute_threads(threads);
  }
};

const DType kTypes[] = {DType::F32, DType::F16, DType::BF16};

}  // namespace

// f32 accumulation of `in` products: each result within in·2⁻²³ of Σ|x·w| (the classic bound
// for a sum of that length, with room to spare: the SIMD sums are pairwise per lane). BF16
// weights multiply x rounded to bf16 (gemm.h), on every ISA; the reference does the same.
TEST(CpuGemm, EveryIsaMatchesDoublePrecision) {
  KernelSettings restore;
  for (cpu::Isa isa : cpu::runnable_isas()) {
    cpu::force_isa(isa);
    for (DType t : kTypes)
      for (int64_t rows : {1, 2, 3, 5, 7, 13, 40})
        for (int64_t in : {1, 15, 16, 17, 100, 1024})
          for (int64_t out : {1, 7, 9, 33}) {
            const StoredWeight w(t, out, in, uint64_t(rows * 1000 + in * 10 + out));
            const auto x = normals(size_t(rows * in), uint64_t(in + rows));
            const auto y = run(x, rows, w);
            std::vector<double> ref, mag;
            reference(x, rows, w, ref, mag);
            for (size_t i = 0; i < y.size(); ++i)
              ASSERT_LE(std::abs(double(y[i]) - ref[i]), double(in) * 0x1p-23 * mag[i] + 1e-30)
                  << cpu::isa_name(isa) << " " << dtype_name(t) << " rows " << rows << " in " << in << " out " << out
                  << " entry " << i;
          }
  }
}

// The SIMD kernels against the portable one, per dtype: all read the same stored values, so they
// differ only in the order of f32 additions; bound: 1e-6 relative to max |y| (in <= 4096).
TEST(CpuGemm, SimdKernelsEqualThePortablePathWithinBound) {
  KernelSettings restore;
  const auto isas = cpu::runnable_isas();
  if (isas.size() < 2) GTEST_SKIP() << "this CPU runs only the portable kernel";
  for (DType t : kTypes)
    for (int64_t rows : {1, 6, 29})
      for (int64_t in : {64, 1000, 4096}) {
        const StoredWeight w(t, 45, in, uint64_t(in + rows));
        const auto x = normals(size_t(rows * in), 7);
        cpu::force_isa(cpu::Isa::Portable);
        const auto base = run(x, rows, w);
        double scale = 0;
        for (float v : base) scale = std::max(scale, double(std::abs(v)));
        for (size_t k = 1; k < isas.size(); ++k) {
          cpu::force_isa(isas[k]);
          const auto y = run(x, rows, w);
          double worst = 0;
          for (size_t i = 0; i < y.size(); ++i) worst = std::max(worst, std::abs(double(y[i]) - base[i]));
          EXPECT_LE(worst, 1e-6 * scale) << cpu::isa_name(isas[k]) << " " << dtype_name(t) << " rows " << rows << " in "
                                         << in;
        }
      }
}

// A row's result is the same bits whether it runs alone, in a batch, or on 1, 2 or 3 threads.
TEST(CpuGemm, RowsAreBatchAndThreadInvariant) {
  KernelSettings restore;
  for (cpu::Isa isa : cpu::runnable_isas()) {
    cpu::force_isa(isa);
    for (DType t : kTypes) {
      const StoredWeight w(t, 301, 256, 11);
      const int64_t rows = 23;
      const auto x = normals(size_t(rows * w.in), 12);
      cpu::set_compute_threads(1);
      const auto batch1t = run(x, rows, w);
      for (int threads : {2, 3}) {
        cpu::set_compute_threads(threads);
        EXPECT_EQ(run(x, rows, w), batch1t) << cpu::isa_name(isa) << " " << dtype_name(t) << " threads " << threads;
      }
      for (int64_t r : {0, 5, 22}) {
        const std::vector<float> one(x.begin() + r * w.in, x.begin() + (r + 1) * w.in);
        const auto y = run(one, 1, w);
        EXPECT_TRUE(std::equal(y.begin(), y.end(), batch1t.begin() + r * w.out))
            << cpu::isa_name(isa) << " " << dtype_name(t) << " row " << r;
      }
    }
  }
}

TEST(CpuGemm, EpiloguesGathersAndStrides) {
  for (DType t : kTypes) {
    const int64_t in = 48, out = 20, rows = 5, ldx = 50, ldy = 27;
    const StoredWeight w(t, out, in, 21), up(t, out, in, 22);
    const auto xs = normals(size_t(9 * ldx), 23);
    const std::vector<int32_t> pick = {8, 0, 3, 3, 6};
    std::vector<float> dense(size_t(rows * in));  // the gathered rows, packed
    for (int64_t r = 0; r < rows; ++r) std::copy_n(xs.begin() + pick[size_t(r)] * ldx, in, dense.begin() + r * in);
    std::vector<double> g, gm, u, um;
    reference(dense, rows, w, g, gm);
    reference(dense, rows, up, u, um);

    std::vector<float> y(size_t(rows * ldy), 1.5f);
    Job j;
    j.x = xs.data(), j.ldx = ldx, j.x_rows = pick.data(), j.rows = rows, j.in = in;
    j.w = w.bytes.data(), j.wdtype = t, j.out = out, j.y = y.data(), j.ldy = ldy;
    j.epilogue = Job::Epilogue::Add;
    cpu::matmul(std::span(&j, 1));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t o = 0; o < out; ++o) EXPECT_NEAR(y[size_t(r * ldy + o)], 1.5 + g[size_t(r * out + o)], 1e-5);
      for (int64_t o = out; o < ldy; ++o) EXPECT_EQ(y[size_t(r * ldy + o)], 1.5f) << "wrote past the row";
    }

    j.epilogue = Job::Epilogue::SwiGlu;
    j.w_up = up.bytes.data();
    cpu::matmul(std::span(&j, 1));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) {
        const double a = g[size_t(r * out + o)], b = u[size_t(r * out + o)];
        EXPECT_NEAR(y[size_t(r * ldy + o)], a / (1 + std::exp(-a)) * b, 1e-5) << dtype_name(t);
      }
  }
}

// Several jobs in one call give exactly what each gives alone.
TEST(CpuGemm, JobsInOneCallEqualJobsAlone) {
  const StoredWeight a(DType::BF16, 96, 64, 31), b(DType::F16, 17, 64, 32), c(DType::F32, 130, 40, 33);
  const auto x = normals(size_t(9 * 64), 34);
  std::vector<float> ya(9 * 96), yb(3 * 17), yc(9 * 130);
  Job ja{.x = x.data(), .rows = 9, .in = 64, .w = a.bytes.data(), .wdtype = a.dtype, .out = 96, .y = ya.data()};
  Job jb{.x = x.data(), .rows = 3, .in = 64, .w = b.bytes.data(), .wdtype = b.dtype, .out = 17, .y = yb.data()};
  Job jc{.x = x.data(),
         .rows = 9,
         .in = 40,
         .ldx = 64,
         .w = c.bytes.data(),
         .wdtype = c.dtype,
         .out = 130,
         .y = yc.data()};
  const Job all[] = {ja, jb, jc};
  cpu::matmul(all);
  EXPECT_EQ(ya, run(x, 9, a));
  EXPECT_EQ(yb, run(std::vector<float>(x.begin(), x.begin() + 3 * 64), 3, b));
  std::vector<float> xc;
  for (int r = 0; r < 9; ++r) xc.insert(xc.end(), x.begin() + r * 64, x.begin() + r * 64 + 40);
  EXPECT_EQ(yc, run(xc, 9, c));
}

TEST(CpuGemm, EmptySumsAndEmptyJobs) {
  std::vector<float> y(6, 3.0f);
  const float x = 1.0f;
  Job j{.x = &x, .rows = 2, .in = 0, .w = &x, .out = 3, .y = y.data()};
  cpu::matmul(std::span(&j, 1));
  EXPECT_EQ(y, std::vector<float>(6, 0.0f));
  j.rows = 0;
  j.y = nullptr;
  EXPECT_NO_THROW(cpu::matmul(std::span(&j, 1)));
}

TEST(CpuGemm, BadJobsAreRefusedByName) {
  std::vector<float> x(4), y(4);
  const int8_t w[4] = {};
  Job j{.x = x.data(), .rows = 1, .in = 4, .w = w, .wdtype = DType::I8, .out = 1, .y = y.data()};
  try {
    cpu::matmul(std::span(&j, 1));
    FAIL() << "an I8 weight was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("I8"), std::string::npos) << e.what();
  }
  j.wdtype = DType::F32;
  j.w = nullptr;
  EXPECT_THROW(cpu::matmul(std::span(&j, 1)), Error);
  j.w = w;
  j.epilogue = Job::Epilogue::SwiGlu;
  EXPECT_THROW(cpu::matmul(std::span(&j, 1)), Error);
  j.epilogue = Job::Epilogue::Store;
  j.ldx = 2;
  EXPECT_THROW(cpu::matmul(std::span(&j, 1)), Error);
}

namespace {

// A low-rank job's result for each ISA: y (gathered x rows, scattered y rows, add or store).
std::vector<float> low_rank(const std::vector<float>& x, int64_t rows, const StoredWeight& a, const StoredWeight& bt,
                            const int32_t* x_rows = nullptr, const int32_t* y_rows = nullptr, int64_t y_size = 0,
                            bool add = false) {
  std::vector<float> y(size_t(y_size ? y_size : rows * bt.in), 0.5f);
  const cpu::LowRankJob j{.x = x.data(),
                          .rows = rows,
                          .in = a.in,
                          .x_rows = x_rows,
                          .a = a.bytes.data(),
                          .bt = bt.bytes.data(),
                          .wdtype = a.dtype,
                          .rank = a.out,
                          .out = bt.in,
                          .y = y.data(),
                          .y_rows = y_rows,
                          .add = add};
  cpu::matmul({}, std::span(&j, 1));
  return y;
}

}  // namespace

// y = (x·Aᵀ)·B with B given as bt [rank, out]: every ISA against double precision (x rounded to
// bf16 for BF16 weights, the rank-long intermediate kept in f32), within (in + rank)·2⁻²³ of the
// sum of magnitudes; tails of the output vectors included (out 7, 33, 100).
TEST(CpuGemm, LowRankJobsMatchDoublePrecision) {
  KernelSettings restore;
  for (cpu::Isa isa : cpu::runnable_isas()) {
    cpu::force_isa(isa);
    for (DType t : kTypes)
      for (int64_t rank : {1, 8, 17})
        for (int64_t in : {16, 100})
          for (int64_t out : {7, 33, 100}) {
            const int64_t rows = 3;
            const StoredWeight a(t, rank, in, uint64_t(rank * 100 + in)), bt(t, rank, out, uint64_t(out + 7));
            const auto x = normals(size_t(rows * in), uint64_t(in + out));
            const auto y = low_rank(x, rows, a, bt);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t o = 0; o < out; ++o) {
                double ref = 0, mag = 0;
                for (int64_t k = 0; k < rank; ++k) {
                  double tk = 0, tmag = 0;
                  for (int64_t i = 0; i < in; ++i) {
                    const double p = operand(x[size_t(r * in + i)], t) * a.values[size_t(k * in + i)];
                    tk += p;
                    tmag += std::abs(p);
                  }
                  const double b = bt.values[size_t(k * out + o)];
                  ref += tk * b;
                  mag += (std::abs(tk) + tmag) * std::abs(b);
                }
                ASSERT_LE(std::abs(double(y[size_t(r * out + o)]) - ref), double(in + rank) * 0x1p-23 * mag + 1e-30)
                    << cpu::isa_name(isa) << " " << dtype_name(t) << " rank " << rank << " in " << in << " out " << out;
              }
          }
  }
}

// A low-rank row gets the same bits alone or among others, on 1 or 2 threads, and in the same
// call as a matmul job (the one parallel section); gathers, scatters and add work.
TEST(CpuGemm, LowRankRowsAreBatchInvariantAndShareTheSection) {
  KernelSettings restore;
  for (cpu::Isa isa : cpu::runnable_isas()) {
    cpu::force_isa(isa);
    for (DType t : kTypes) {
      const StoredWeight a(t, 16, 64, 41), bt(t, 16, 80, 42), w(t, 50, 64, 43);
      const int64_t rows = 9;
      const auto x = normals(size_t(rows * 64), 44);
      cpu::set_compute_threads(1);
      const auto all = low_rank(x, rows, a, bt);
      cpu::set_compute_threads(2);
      EXPECT_EQ(low_rank(x, rows, a, bt), all) << cpu::isa_name(isa) << " " << dtype_name(t);
      for (int64_t r : {0, 4, 8}) {
        const std::vector<float> one(x.begin() + r * 64, x.begin() + (r + 1) * 64);
        const auto y = low_rank(one, 1, a, bt);
        EXPECT_TRUE(std::equal(y.begin(), y.end(), all.begin() + r * 80)) << cpu::isa_name(isa) << " row " << r;
      }
      // Rows 7 and 2 of x, added onto rows 0 and 3 of a 4-row y that holds 0.5 everywhere.
      const int32_t xr[] = {7, 2}, yr[] = {0, 3};
      const auto scattered = low_rank(x, 2, a, bt, xr, yr, 4 * 80, true);
      for (int64_t o = 0; o < 80; ++o) {
        EXPECT_EQ(scattered[size_t(o)], 0.5f + all[size_t(7 * 80 + o)]);
        EXPECT_EQ(scattered[size_t(80 + o)], 0.5f);
        EXPECT_EQ(scattered[size_t(3 * 80 + o)], 0.5f + all[size_t(2 * 80 + o)]);
      }
      std::vector<float> ym(size_t(rows * 50)), yl(size_t(rows * 80));
      const Job mj{.x = x.data(), .rows = rows, .in = 64, .w = w.bytes.data(), .wdtype = t, .out = 50, .y = ym.data()};
      const cpu::LowRankJob lj{.x = x.data(),
                               .rows = rows,
                               .in = 64,
                               .a = a.bytes.data(),
                               .bt = bt.bytes.data(),
                               .wdtype = t,
                               .rank = 16,
                               .out = 80,
                               .y = yl.data(),
                               .add = false};
      cpu::matmul(std::span(&mj, 1), std::span(&lj, 1));
      EXPECT_EQ(ym, run(x, rows, w));
      EXPECT_EQ(yl, all);
      cpu::LowRankJob bad = lj;
      bad.bt = nullptr;
      EXPECT_THROW(cpu::matmul({}, std::span(&bad, 1)), Error);
    }
  }
}

namespace {

StoredWeight as_f32(const cpu::QuantMatrix& m) {
  StoredWeight w(DType::F32, m.out, m.in, 0);
  w.values = m.dequantize();
  std::memcpy(w.bytes.data(), w.values.data(), w.bytes.size());
  return w;
}

}  // namespace

// INT4/INT8 products equal the product with the dequantized matrix (double precision, same
// f32 bound as above) on every ISA, for padded groups, shuffled channels, gathers and SwiGlu.
TEST(CpuGemm, QuantizedMatricesEqualTheirDequantizedProduct) {
  KernelSettings restore;
  for (int bits : {4, 8})
    for (const auto& groups :
         {std::vector<int64_t>{16, 16, 16, 16}, std::vector<int64_t>{13, 40, 7}, std::vector<int64_t>{100}}) {
      const auto m = moemesh::testing::random_quant(bits, 37, groups, uint64_t(bits * 100 + groups.size()));
      const auto up = moemesh::testing::random_quant(bits, 37, groups, uint64_t(bits * 100 + groups.size() + 1));
      const StoredWeight w = as_f32(m), wu = as_f32(up);
      for (cpu::Isa isa : cpu::runnable_isas()) {
        cpu::force_isa(isa);
        for (int64_t rows : {1, 3, 7, 20}) {
          const auto xs = normals(size_t((rows + 2) * m.in), uint64_t(rows));
          std::vector<int32_t> pick(static_cast<size_t>(rows));
          for (int64_t r = 0; r < rows; ++r) pick[size_t(r)] = int32_t((r * 5 + 1) % (rows + 2));
          std::vector<float> dense;
          for (int32_t r : pick) dense.insert(dense.end(), xs.begin() + r * m.in, xs.begin() + (r + 1) * m.in);
          std::vector<double> ref, mag, refu, magu;
          reference(dense, rows, w, ref, mag);
          reference(dense, rows, wu, refu, magu);
          std::vector<float> y(size_t(rows * m.out), NAN), a(y.size(), NAN);
          Job j{.x = xs.data(), .rows = rows, .in = m.in, .x_rows = pick.data(), .out = m.out, .y = y.data()};
          j.wq = &m;
          cpu::matmul(std::span(&j, 1));
          j.epilogue = Job::Epilogue::SwiGlu, j.wq_up = &up, j.y = a.data();
          cpu::matmul(std::span(&j, 1));
          for (size_t i = 0; i < y.size(); ++i) {
            ASSERT_LE(std::abs(double(y[i]) - ref[i]), double(m.in) * 0x1p-23 * mag[i] + 1e-30)
                << cpu::isa_name(isa) << " bits " << bits << " rows " << rows << " entry " << i;
            // silu' is within [-0.1, 1.1]: the gate's error moves the result by 1.1·|up| times it
            const double g = ref[i], want = g / (1 + std::exp(-g)) * refu[i];
            const double bound = double(m.in) * 0x1p-23 * (1.1 * mag[i] * std::abs(refu[i]) + std::abs(g) * magu[i]);
            ASSERT_NEAR(a[i], want, bound + 1e-6 * std::abs(want)) << cpu::isa_name(isa) << " SwiGlu entry " << i;
          }
        }
      }
    }
}

TEST(CpuGemm, QuantizedMatrixOfAnotherShapeIsRefused) {
  const auto m = moemesh::testing::random_quant(4, 8, {16}, 1);
  std::vector<float> x(32), y(8);
  Job j{.x = x.data(), .rows = 1, .in = 32, .out = 8, .y = y.data()};
  j.wq = &m;
  try {
    cpu::matmul(std::span(&j, 1));
    FAIL() << "a [8, 16] matrix was used for a product with 32 inputs";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[8, 16]"), std::string::npos) << e.what();
  }
  j.in = 16, j.epilogue = Job::Epilogue::SwiGlu;
  EXPECT_THROW(cpu::matmul(std::span(&j, 1)), Error);  // no wq_up
}

TEST(CpuFeatures, ParseAndForce) {
  EXPECT_EQ(cpu::parse_isa("avx2"), cpu::Isa::Avx2);
  EXPECT_EQ(cpu::parse_isa("avx512bf16"), cpu::Isa::Avx512Bf16);
  EXPECT_THROW(cpu::parse_isa("sse9"), Error);
  EXPECT_EQ(cpu::runnable_isas().front(), cpu::Isa::Portable);
  EXPECT_EQ(cpu::runnable_isas().back(), cpu::detected_isa());
}

// Every index runs exactly once, with several threads posting sections at once and sections
// nested inside tasks.
TEST(ComputePool, EveryIndexOnceUnderConcurrentAndNestedCalls) {
  KernelSettings restore;
  cpu::set_compute_threads(3);
  constexpr int kOuter = 40, kInner = 25;
  std::vector<std::atomic<int>> hits(4 * kOuter * kInner);
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&, c] {
      cpu::parallel_for(kOuter, [&](int64_t i) {
        cpu::parallel_for(kInner, [&](int64_t j) { hits[size_t((c * kOuter + i) * kInner + j)]++; });
      });
    });
  for (auto& t : callers) t.join();
  for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i;
}

// The work really is spread: with 2 threads, some task runs off the calling thread.
TEST(ComputePool, WorkersTakePartOfASection) {
  KernelSettings restore;
  cpu::set_compute_threads(2);
  const auto caller = std::this_thread::get_id();
  std::atomic<int> elsewhere{0};
  for (int round = 0; round < 200 && elsewhere.load() == 0; ++round)
    cpu::parallel_for(64, [&](int64_t) {
      if (std::this_thread::get_id() != caller) elsewhere++;
      volatile double s = 0;
      for (int k = 0; k < 20000; ++k) s = s + k;
    });
  EXPECT_GT(elsewhere.load(), 0);
}

TEST(ComputePool, RefusesZeroThreads) { EXPECT_THROW(cpu::set_compute_threads(0), Error); }
