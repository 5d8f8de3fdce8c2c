// The CPU matmul kernels (kernels/cpu/gemm.h) against this machine's memory read bandwidth and
// against OpenBLAS's sgemm, measured in the same run. Prints a markdown table:
//   - rows 1 (decode): weight bytes streamed per second, as a share of the read bandwidth
//     (the roofline a memory-bound product can reach);
//   - rows 8..512 (decode batches, prefill chunks): GFLOP/s, and the ratio to OpenBLAS sgemm on
//     the same shape with f32 weights (the library's best case).
// Every ISA this CPU runs is measured; the portable kernel only at small batches (it is slow).
//   bench_cpu_kernels [--threads N] [--out N] [--in N]
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/membw.h"
#include "kernels/cpu/quant_matrix.h"
#include "kernels/cpu/thread_pool.h"

extern "C" void openblas_set_num_threads(int);

using namespace moemesh;
using Clock = std::chrono::steady_clock;

namespace {

// Best of `reps` timings of fn (seconds), after one warm-up call.
template <class Fn>
double best_of(int reps, Fn fn) {
  fn();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

std::vector<uint8_t> random_weight(DType t, int64_t n) {
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 0.05f);
  std::vector<float> f(static_cast<size_t>(n));
  for (float& v : f) v = d(rng);
  std::vector<uint8_t> out(size_t(n) * dtype_size(t));
  from_f32(t, f.data(), out.data(), size_t(n));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = cpu::compute_threads();
  int64_t out = 8192, in = 4096;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads")
      threads = std::atoi(argv[i + 1]);
    else if (a == "--out")
      out = std::atoll(argv[i + 1]);
    else if (a == "--in")
      in = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "bench_cpu_kernels: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (threads < 1 || out < 1 || in < 1) {
    std::fprintf(stderr, "bench_cpu_kernels: --threads, --out and --in must be >= 1\n");
    return 2;
  }
  cpu::set_compute_threads(threads);
  openblas_set_num_threads(threads);
  const double bw = cpu::measure_read_bandwidth(size_t(1) << 30, threads, 5).bytes_per_s;
  std::printf("threads %d, weight [%lld, %lld], read bandwidth %.1f GB/s, detected ISA %s\n\n", threads, (long long)out,
              (long long)in, bw / 1e9, std::string(cpu::isa_name(cpu::detected_isa())).c_str());
  std::printf("| dtype | ISA | rows | ms | weight GB/s | of read bw | GFLOP/s | vs OpenBLAS sgemm (f32) |\n");
  std::printf("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");

  const auto w32 = random_weight(DType::F32, out * in);
  std::vector<float> x(size_t(512 * in)), y(size_t(512 * out));
  std::mt19937 rng(2);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (float& v : x) v = d(rng);
  std::vector<double> blas_s;
  const int64_t batch[] = {1, 8, 32, 128, 512};
  for (int64_t rows : batch)
    blas_s.push_back(best_of(rows >= 128 ? 2 : 5, [&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(out), int(in), 1.0f, x.data(), int(in),
                  reinterpret_cast<const float*>(w32.data()), int(in), 0.0f, y.data(), int(out));
    }));
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {
    const auto w = t == DType::F32 ? w32 : random_weight(t, out * in);
    for (size_t b = 0; b < std::size(batch); ++b) {
      const int64_t rows = batch[b];
      for (cpu::Isa isa : cpu::runnable_isas()) {
        if (isa == cpu::Isa::Portable && rows > 8) continue;
        cpu::force_isa(isa);
        const double s =
            best_of(rows >= 128 ? 2 : 5, [&] { cpu::matmul(x.data(), rows, in, w.data(), t, out, y.data()); });
        const double bytes = double(out * in) * double(dtype_size(t)), flops = 2.0 * double(rows * out * in);
        std::printf("| %s | %s | %lld | %.2f | %.1f | %.0f%% | %.1f | %.2fx |\n", std::string(dtype_name(t)).c_str(),
                    std::string(cpu::isa_name(isa)).c_str(), (long long)rows, s * 1e3, bytes / s / 1e9,
                    100.0 * bytes / s / bw, flops / s / 1e9, blas_s[b] / s);
      }
    }
  }
  // GPTQ-style INT4/INT8 weights, groups of 128 (bytes: the values and the per-group scale and zero).
  for (int bits : {4, 8}) {
    cpu::QuantMatrix m;
    m.shape(bits, out, in, std::vector<int64_t>(size_t((in + 127) / 128), 128));
    for (size_t k = 0; k < m.source.size(); ++k) m.source[k] = k < size_t(in) ? int32_t(k) : -1;
    for (auto& b : m.q) b = uint8_t(rng());
    for (size_t i = 0; i < m.scale.size(); ++i) m.scale[i] = 0.01f, m.scaled_zero[i] = 0.01f * float(1 << (bits - 1));
    const double bytes = double(m.q.size() + 8 * m.scale.size());
    for (size_t b = 0; b < std::size(batch); ++b) {
      const int64_t rows = batch[b];
      for (cpu::Isa isa : cpu::runnable_isas()) {
        if (isa == cpu::Isa::Portable && rows > 8) continue;
        cpu::force_isa(isa);
        cpu::MatmulJob j{.x = x.data(), .rows = rows, .in = in, .out = out, .y = y.data()};
        j.wq = &m;
        const double s = best_of(rows >= 128 ? 2 : 5, [&] { cpu::matmul(std::span(&j, 1)); });
        std::printf("| INT%d | %s | %lld | %.2f | %.1f | %.0f%% | %.1f | %.2fx |\n", bits,
                    std::string(cpu::isa_name(isa)).c_str(), (long long)rows, s * 1e3, bytes / s / 1e9,
                    100.0 * bytes / s / bw, 2.0 * double(rows * out * in) / s / 1e9, blas_s[b] / s);
      }
    }
  }
  return 0;
}
