#include "kernels/cpu/membw.h"

#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "core/error.h"

namespace moemesh::cpu {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;

// A vector of W bytes of uint64 lanes (the attribute cannot take a template parameter).
template <size_t W>
struct Vec;
template <>
struct Vec<16> {
  typedef uint64_t type __attribute__((vector_size(16)));
};
template <>
struct Vec<32> {
  typedef uint64_t type __attribute__((vector_size(32)));
};
template <>
struct Vec<64> {
  typedef uint64_t type __attribute__((vector_size(64)));
};

// Sums with W-byte vector loads (W = the register width of the function it is inlined into).
// Four independent accumulators keep four loads in flight per iteration with no add chain.
template <size_t W>
[[gnu::always_inline]] inline uint64_t sum_wide(const unsigned char* b, size_t n) {
  using vec = typename Vec<W>::type;
  vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
  size_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    vec v0, v1, v2, v3;
    __builtin_memcpy(&v0, b + i, W);  // unaligned full-width loads
    __builtin_memcpy(&v1, b + i + W, W);
    __builtin_memcpy(&v2, b + i + 2 * W, W);
    __builtin_memcpy(&v3, b + i + 3 * W, W);
    a0 += v0;
    a1 += v1;
    a2 += v2;
    a3 += v3;
  }
  for (; i + W <= n; i += W) {
    vec v;
    __builtin_memcpy(&v, b + i, W);
    a0 += v;
  }
  a0 += a1 + a2 + a3;
  uint64_t s = 0;
  for (size_t k = 0; k < W / 8; ++k) s += a0[k];
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, b + i, 8);
    s += w;
  }
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__)
// One variant per ISA, picked from CPUID, so the loads are as wide as the CPU allows on any
// x86-64 without -march flags (the baseline is SSE2).
__attribute__((target("avx512f"))) uint64_t sum_avx512(const unsigned char* b, size_t n) { return sum_wide<64>(b, n); }
__attribute__((target("avx2"))) uint64_t sum_avx2(const unsigned char* b, size_t n) { return sum_wide<32>(b, n); }
#endif

}  // namespace

uint64_t read_sum(const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f")) return sum_avx512(b, n);
  if (__builtin_cpu_supports("avx2")) return sum_avx2(b, n);
#endif
  return sum_wide<16>(b, n);
}

ReadBandwidth measure_read_bandwidth(size_t bytes, int threads, int repeats) {
  if (threads < 1) throw Error("read bandwidth: threads must be >= 1, got " + std::to_string(threads));
  if (repeats < 1) throw Error("read bandwidth: repeats must be >= 1, got " + std::to_string(repeats));
  // Slices of whole 256-byte blocks so every thread runs the wide loop only.
  const size_t slice = bytes / size_t(threads) / 256 * 256;
  if (slice == 0)
    throw Error("read bandwidth: a " + std::to_string(bytes) + "-byte buffer is too small for " +
                std::to_string(threads) + " threads");
  const size_t total = slice * size_t(threads);

  // Huge-page aligned so the kernel can back it with 2 MiB pages: TLB misses would otherwise
  // cost a little of the bandwidth we are trying to measure.
  const size_t alloc = (total + kHugePage - 1) / kHugePage * kHugePage;
  std::unique_ptr<unsigned char, decltype(&std::free)> buf(
      static_cast<unsigned char*>(std::aligned_alloc(kHugePage, alloc)), &std::free);
  if (!buf) throw Error("read bandwidth: cannot allocate a " + std::to_string(alloc >> 20) + " MiB buffer");
#ifdef __linux__
  ::madvise(buf.get(), alloc, MADV_HUGEPAGE);  // a hint; failure only costs TLB misses
#endif

  // Every byte 0x01: each slice sums to a known value, which proves every word was read.
  const uint64_t expected = uint64_t(slice / 8) * 0x0101010101010101ull;
  std::atomic<bool> wrong_sum{false};
  std::barrier<> sync(threads + 1);
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads));
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      unsigned char* mine = buf.get() + size_t(t) * slice;
      std::memset(mine, 0x01, slice);  // first touch by the thread that reads it
      sync.arrive_and_wait();
      for (int r = 0; r < repeats; ++r) {
        sync.arrive_and_wait();  // common start
        if (read_sum(mine, slice) != expected) wrong_sum = true;
        sync.arrive_and_wait();  // end
      }
    });
  }

  using Clock = std::chrono::steady_clock;
  double best = 0;
  sync.arrive_and_wait();  // buffer filled
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    sync.arrive_and_wait();
    sync.arrive_and_wait();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (r == 0 || s < best) best = s;
  }
  for (auto& th : pool) th.join();
  if (wrong_sum) throw Error("read bandwidth: a thread's checksum is wrong (the read kernel skipped bytes)");

  ReadBandwidth out;
  out.best_seconds = best;
  out.bytes_per_s = best > 0 ? double(total) / best : 0;
  out.buffer_bytes = total;
  out.threads = threads;
  out.repeats = repeats;
  return out;
}

}  // namespace moemesh::cpu
