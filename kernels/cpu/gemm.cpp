#include "kernels/cpu/gemm.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/gemm_block.h"
#include "kernels/cpu/thread_pool.h"

namespace moemesh::cpu {
namespace {

// Cache budgets (bytes) for one task: the slice of W it owns stays in L2 while it passes over
// the rows in panels of x that fit beside it.
constexpr int64_t kWeightSlice = 256 << 10;
constexpr int64_t kXPanel = 384 << 10;
// Tasks per thread: enough to even out the threads, few enough that each streams a long run.
constexpr int64_t kTasksPerThread = 4;

void check(const MatmulJob& j, size_t index) {
  const std::string where = "matmul job " + std::to_string(index) + ": ";
  if (j.rows < 0 || j.in < 0 || j.out < 0) throw Error(where + "negative size");
  if (j.wdtype != DType::F32 && j.wdtype != DType::F16 && j.wdtype != DType::BF16)
    throw Error(where + "weights must be F32, F16 or BF16 (got " + std::string(dtype_name(j.wdtype)) + ")");
  if (j.rows == 0 || j.out == 0) return;
  if (!j.y || (j.in > 0 && (!j.x || !j.w))) throw Error(where + "null x, w or y");
  if (j.epilogue == MatmulJob::Epilogue::SwiGlu && j.in > 0 && !j.w_up) throw Error(where + "SwiGlu without w_up");
  if ((j.ldx != 0 && j.ldx < j.in) || (j.ldy != 0 && j.ldy < j.out)) throw Error(where + "row stride below the row");
}

struct Task {
  const MatmulJob* job;
  int64_t o0, o1;
};

// Output rows per task for a job: its share of kTasksPerThread·threads tasks, by work, in whole
// register tiles, no more than kWeightSlice of weights.
int64_t slice_rows(const MatmulJob& j, double share, int threads) {
  const int64_t tasks = std::max<int64_t>(1, int64_t(share * double(kTasksPerThread * threads) + 0.5));
  const int64_t row_bytes = std::max<int64_t>(1, j.in * int64_t(dtype_size(j.wdtype)));
  int64_t n = (j.out + tasks - 1) / tasks;
  n = std::min(n, std::max<int64_t>(8, kWeightSlice / row_bytes));
  n = (n + 7) / 8 * 8;
  return std::min(n, j.out);
}

void run_task(const Task& t, GemmBlockFn block) {
  const MatmulJob& j = *t.job;
  const int64_t n = t.o1 - t.o0, ldx = j.ldx ? j.ldx : j.in, ldy = j.ldy ? j.ldy : j.out;
  const size_t es = dtype_size(j.wdtype);
  const int64_t panel = std::clamp<int64_t>(kXPanel / std::max<int64_t>(1, j.in * 4) / 6 * 6, 6, 1 << 20);
  thread_local std::vector<const float*> xr;
  thread_local std::vector<float> tmp;
  const bool direct = j.epilogue == MatmulJob::Epilogue::Store;
  for (int64_t r0 = 0; r0 < j.rows; r0 += panel) {
    const int64_t nr = std::min(panel, j.rows - r0);
    xr.resize(size_t(nr));
    for (int64_t r = 0; r < nr; ++r) xr[size_t(r)] = j.x + (j.x_rows ? int64_t(j.x_rows[r0 + r]) : r0 + r) * ldx;
    float* y = j.y + r0 * ldy + t.o0;
    if (j.in == 0) {  // empty sums: Store and SwiGlu give zeros (silu(0) = 0), Add nothing
      if (j.epilogue != MatmulJob::Epilogue::Add)
        for (int64_t r = 0; r < nr; ++r) std::fill(y + r * ldy, y + r * ldy + n, 0.0f);
      continue;
    }
    const auto* w = static_cast<const uint8_t*>(j.w) + size_t(t.o0 * j.in) * es;
    if (direct) {
      block(w, j.wdtype, j.in, xr.data(), nr, n, y, ldy);
      continue;
    }
    tmp.resize(size_t(nr * n * 2));
    float* a = tmp.data();
    block(w, j.wdtype, j.in, xr.data(), nr, n, a, n);
    if (j.epilogue == MatmulJob::Epilogue::Add) {
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t o = 0; o < n; ++o) y[r * ldy + o] += a[r * n + o];
      continue;
    }
    float* b = a + nr * n;
    block(static_cast<const uint8_t*>(j.w_up) + size_t(t.o0 * j.in) * es, j.wdtype, j.in, xr.data(), nr, n, b, n);
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t o = 0; o < n; ++o) y[r * ldy + o] = silu(a[r * n + o]) * b[r * n + o];
  }
}

}  // namespace

void matmul(std::span<const MatmulJob> jobs) {
  double total = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    check(jobs[i], i);
    total += double(jobs[i].rows) * double(jobs[i].out) * double(std::max<int64_t>(jobs[i].in, 1));
  }
  if (total == 0) return;
  const int threads = compute_threads();
  std::vector<Task> tasks;
  for (const MatmulJob& j : jobs) {
    if (j.rows == 0 || j.out == 0) continue;
    const double share = double(j.rows) * double(j.out) * double(std::max<int64_t>(j.in, 1)) / total;
    const int64_t step = slice_rows(j, share, threads);
    for (int64_t o = 0; o < j.out; o += step) tasks.push_back({&j, o, std::min(j.out, o + step)});
  }
  const GemmBlockFn block = gemm_block_for(active_isa());
  parallel_for(int64_t(tasks.size()), [&](int64_t i) { run_task(tasks[size_t(i)], block); });
}

void matmul(const float* x, int64_t rows, int64_t in, const void* w, DType wdtype, int64_t out, float* y) {
  MatmulJob j;
  j.x = x;
  j.rows = rows;
  j.in = in;
  j.w = w;
  j.wdtype = wdtype;
  j.out = out;
  j.y = y;
  matmul(std::span(&j, 1));
}

}  // namespace moemesh::cpu
