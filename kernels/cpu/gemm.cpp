#include "kernels/cpu/gemm.h"

#include <algorithm>
#include <cstring>
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
  if (j.wq) {
    const bool swiglu = j.epilogue == MatmulJob::Epilogue::SwiGlu;
    for (const QuantMatrix* m : {j.wq, swiglu ? j.wq_up : j.wq}) {
      if (!m) throw Error(where + "SwiGlu without wq_up");
      if (m->in != j.in || m->out != j.out)
        throw Error(where + "quantized matrix [" + std::to_string(m->out) + ", " + std::to_string(m->in) +
                    "] for a product of [" + std::to_string(j.out) + ", " + std::to_string(j.in) + "]");
    }
    if (j.rows > 0 && j.out > 0 && (!j.y || (j.in > 0 && !j.x))) throw Error(where + "null x or y");
    if ((j.ldx != 0 && j.ldx < j.in) || (j.ldy != 0 && j.ldy < j.out)) throw Error(where + "row stride below the row");
    return;
  }
  if (j.wdtype != DType::F32 && j.wdtype != DType::F16 && j.wdtype != DType::BF16)
    throw Error(where + "weights must be F32, F16 or BF16 (got " + std::string(dtype_name(j.wdtype)) + ")");
  if (j.rows == 0 || j.out == 0) return;
  if (!j.y || (j.in > 0 && (!j.x || !j.w))) throw Error(where + "null x, w or y");
  if (j.epilogue == MatmulJob::Epilogue::SwiGlu && j.in > 0 && !j.w_up) throw Error(where + "SwiGlu without w_up");
  if ((j.ldx != 0 && j.ldx < j.in) || (j.ldy != 0 && j.ldy < j.out)) throw Error(where + "row stride below the row");
}

// A job as its tasks run it: a BF16 job's x rows already rounded (gathered, dense), as bf16 bits
// in xb for the bf16 kernel, else widened back to f32 and put in place of job.x; a quantized
// job's x rows gathered into the matrix's padded order in xq.
struct Prepared {
  MatmulJob job;
  const uint16_t* xb = nullptr;
  const float* xq = nullptr;
  const float* xq_up = nullptr;  // SwiGlu: xq again, unless wq_up orders its channels otherwise
};

// Output columns [o0, o1) of a prepared job, or rows [o0, o1) of a low-rank job.
struct Task {
  const Prepared* p;
  const LowRankJob* low_rank;
  int64_t o0, o1;
};

void check(const LowRankJob& j, size_t index) {
  const std::string where = "low-rank job " + std::to_string(index) + ": ";
  if (j.rows < 0 || j.in < 0 || j.rank < 0 || j.out < 0) throw Error(where + "negative size");
  if (j.wdtype != DType::F32 && j.wdtype != DType::F16 && j.wdtype != DType::BF16)
    throw Error(where + "weights must be F32, F16 or BF16 (got " + std::string(dtype_name(j.wdtype)) + ")");
  if (j.rows == 0 || j.out == 0) return;
  if (!j.y || (j.in > 0 && j.rank > 0 && (!j.x || !j.a || !j.bt))) throw Error(where + "null x, A, B or y");
  if ((j.ldx != 0 && j.ldx < j.in) || (j.ldy != 0 && j.ldy < j.out)) throw Error(where + "row stride below the row");
}

// Output rows per task for a job: its share of kTasksPerThread·threads tasks, by work, in whole
// register tiles, no more than kWeightSlice of weights.
int64_t slice_rows(const MatmulJob& j, double share, int threads) {
  const int64_t tasks = std::max<int64_t>(1, int64_t(share * double(kTasksPerThread * threads) + 0.5));
  const int64_t row_bytes = std::max<int64_t>(1, j.wq ? j.wq->row_bytes() : j.in * int64_t(dtype_size(j.wdtype)));
  int64_t n = (j.out + tasks - 1) / tasks;
  n = std::min(n, std::max<int64_t>(8, kWeightSlice / row_bytes));
  n = (n + 7) / 8 * 8;
  return std::min(n, j.out);
}

// Runs rows(r0, r1) over [0, rows), on the pool when there are many elements.
template <class Fn>
void over_rows(int64_t rows, int64_t row_len, Fn&& fn) {
  constexpr int64_t kSerial = 1 << 16;  // elements below which a parallel section costs more than it saves
  if (rows * row_len <= kSerial) return fn(int64_t(0), rows);
  const int64_t step = std::max<int64_t>(1, kSerial / std::max<int64_t>(row_len, 1));
  parallel_for((rows + step - 1) / step, [&](int64_t i) { fn(i * step, std::min(rows, (i + 1) * step)); });
}

// x's rows (gathered) in m's padded order: its padding multiplies zeros.
void gather_x_quant(const MatmulJob& j, const QuantMatrix& m, float* xq) {
  const int64_t ldx = j.ldx ? j.ldx : j.in, kp = m.padded_in;
  const int32_t* source = m.source.data();
  over_rows(j.rows, kp, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = j.x + (j.x_rows ? int64_t(j.x_rows[r]) : r) * ldx;
      for (int64_t k = 0; k < kp; ++k) xq[r * kp + k] = source[k] >= 0 ? x[source[k]] : 0.0f;
    }
  });
}

inline uint16_t to_bf16(float f) {  // f32_to_bf16 without a branch, so that the loop vectorises
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// BF16 weights multiply x rows rounded to bf16 on every ISA, as cuBLAS, oneDNN and llama.cpp do
// (and kernels/cuda/gemm.cu): each product is then exact in f32, AVX512-BF16 takes them two at a
// time, and every ISA forms the same products. Rounds once per call, over the pool when the rows
// are many, into xb (bf16 bits) or xf (widened back, for ISAs without a bf16 kernel).
// One x row rounded to bf16: the bits into xb, or (xb null) widened back to f32 into xf.
void round_row_to_bf16(const float* x, int64_t in, uint16_t* xb, float* xf) {
  if (xb)
    for (int64_t k = 0; k < in; ++k) xb[k] = to_bf16(x[k]);
  else
    for (int64_t k = 0; k < in; ++k) xf[k] = bf16_to_f32(to_bf16(x[k]));
}

void round_x_to_bf16(const MatmulJob& j, uint16_t* xb, float* xf) {
  const int64_t ldx = j.ldx ? j.ldx : j.in, in = j.in;
  over_rows(j.rows, in, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      round_row_to_bf16(j.x + (j.x_rows ? int64_t(j.x_rows[r]) : r) * ldx, in, xb ? xb + r * in : nullptr,
                        xb ? nullptr : xf + r * in);
  });
}

// Rows [r0, r1) of a low-rank job: t = x·Aᵀ for those rows, then their outputs t·B.
void run_low_rank(const LowRankJob& j, int64_t r0, int64_t r1, const GemmKernels& kernels) {
  thread_local std::vector<float> xf, t, d;
  thread_local std::vector<uint16_t> xb;
  thread_local std::vector<const float*> xr, tr;
  thread_local std::vector<const uint16_t*> xbr;
  const int64_t n = r1 - r0, ldx = j.ldx ? j.ldx : j.in, ldy = j.ldy ? j.ldy : j.out;
  const auto x_row = [&](int64_t r) { return j.x + (j.x_rows ? int64_t(j.x_rows[r0 + r]) : r0 + r) * ldx; };
  // Stored into contiguous rows of y, the expand writes them itself; otherwise through d.
  const bool direct = !j.add && !j.y_rows;
  if (!direct) d.resize(size_t(n * j.out));
  float* const out = direct ? j.y + r0 * ldy : d.data();
  const int64_t ldo = direct ? ldy : j.out;
  if (j.in == 0 || j.rank == 0) {
    for (int64_t r = 0; r < n; ++r) std::fill(out + r * ldo, out + r * ldo + j.out, 0.0f);
  } else {
    t.resize(size_t(n * j.rank));
    if (j.wdtype == DType::BF16 && kernels.bf16dot) {
      xb.resize(size_t(n * j.in));
      xbr.resize(size_t(n));
      for (int64_t r = 0; r < n; ++r) {
        round_row_to_bf16(x_row(r), j.in, xb.data() + r * j.in, nullptr);
        xbr[size_t(r)] = xb.data() + r * j.in;
      }
      kernels.bf16dot(j.a, j.in, j.in, xbr.data(), n, j.rank, t.data(), j.rank);
    } else {
      xr.resize(size_t(n));
      if (j.wdtype == DType::BF16) xf.resize(size_t(n * j.in));
      for (int64_t r = 0; r < n; ++r) {
        if (j.wdtype != DType::BF16) {
          xr[size_t(r)] = x_row(r);
          continue;
        }
        round_row_to_bf16(x_row(r), j.in, nullptr, xf.data() + r * j.in);
        xr[size_t(r)] = xf.data() + r * j.in;
      }
      kernels.block(j.a, j.wdtype, j.in, j.in, xr.data(), n, j.rank, t.data(), j.rank);
    }
    tr.resize(size_t(n));
    for (int64_t r = 0; r < n; ++r) tr[size_t(r)] = t.data() + r * j.rank;
    kernels.expand(j.bt, j.wdtype, j.rank, j.out, tr.data(), n, j.out, out, ldo);
  }
  if (direct) return;
  for (int64_t r = 0; r < n; ++r) {
    float* y = j.y + (j.y_rows ? int64_t(j.y_rows[r0 + r]) : r0 + r) * ldy;
    const float* src = d.data() + r * j.out;
    if (j.add)
      for (int64_t o = 0; o < j.out; ++o) y[o] += src[o];
    else
      std::copy(src, src + j.out, y);
  }
}

void run_task(const Task& t, const GemmKernels& kernels) {
  if (t.low_rank) return run_low_rank(*t.low_rank, t.o0, t.o1, kernels);
  const MatmulJob& j = t.p->job;
  const uint16_t* const xbf = t.p->xb;
  const float* const xq = t.p->xq;
  thread_local std::vector<const float*> xr_up;
  const int64_t n = t.o1 - t.o0, ldx = j.ldx ? j.ldx : j.in, ldy = j.ldy ? j.ldy : j.out;
  const size_t es = dtype_size(j.wdtype);
  const int64_t panel = std::clamp<int64_t>(kXPanel / std::max<int64_t>(1, j.in * 4) / 6 * 6, 6, 1 << 20);
  thread_local std::vector<const float*> xr;
  thread_local std::vector<const uint16_t*> xbr;
  thread_local std::vector<float> tmp;
  const bool direct = j.epilogue == MatmulJob::Epilogue::Store;
  for (int64_t r0 = 0; r0 < j.rows; r0 += panel) {
    const int64_t nr = std::min(panel, j.rows - r0);
    float* y = j.y + r0 * ldy + t.o0;
    if (j.in == 0) {  // empty sums: Store and SwiGlu give zeros (silu(0) = 0), Add nothing
      if (j.epilogue != MatmulJob::Epilogue::Add)
        for (int64_t r = 0; r < nr; ++r) std::fill(y + r * ldy, y + r * ldy + n, 0.0f);
      continue;
    }
    if (xbf) {
      xbr.resize(size_t(nr));
      for (int64_t r = 0; r < nr; ++r) xbr[size_t(r)] = xbf + (r0 + r) * j.in;
    } else if (xq) {
      xr.resize(size_t(nr));
      for (int64_t r = 0; r < nr; ++r) xr[size_t(r)] = xq + (r0 + r) * j.wq->padded_in;
      if (j.epilogue == MatmulJob::Epilogue::SwiGlu) {
        xr_up.resize(size_t(nr));
        for (int64_t r = 0; r < nr; ++r) xr_up[size_t(r)] = t.p->xq_up + (r0 + r) * j.wq_up->padded_in;
      }
    } else {
      xr.resize(size_t(nr));
      for (int64_t r = 0; r < nr; ++r) xr[size_t(r)] = j.x + (j.x_rows ? int64_t(j.x_rows[r0 + r]) : r0 + r) * ldx;
    }
    // c[r * ldc + o] = row r of the panel · row t.o0 + o of weight w (w_up when up)
    const auto product = [&](bool up, float* c, int64_t ldc) {
      if (xq) return kernels.quant(*(up ? j.wq_up : j.wq), t.o0, n, (up ? xr_up : xr).data(), nr, c, ldc);
      const auto* wo = static_cast<const uint8_t*>(up ? j.w_up : j.w) + size_t(t.o0 * j.in) * es;
      if (xbf)
        kernels.bf16dot(wo, j.in, j.in, xbr.data(), nr, n, c, ldc);
      else
        kernels.block(wo, j.wdtype, j.in, j.in, xr.data(), nr, n, c, ldc);
    };
    if (direct) {
      product(false, y, ldy);
      continue;
    }
    tmp.resize(size_t(nr * n * 2));
    float* a = tmp.data();
    product(false, a, n);
    if (j.epilogue == MatmulJob::Epilogue::Add) {
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t o = 0; o < n; ++o) y[r * ldy + o] += a[r * n + o];
      continue;
    }
    float* b = a + nr * n;
    product(true, b, n);
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t o = 0; o < n; ++o) y[r * ldy + o] = silu(a[r * n + o]) * b[r * n + o];
  }
}

}  // namespace

void matmul(std::span<const MatmulJob> jobs, std::span<const LowRankJob> low_rank) {
  double total = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    check(jobs[i], i);
    total += double(jobs[i].rows) * double(jobs[i].out) * double(std::max<int64_t>(jobs[i].in, 1));
  }
  const auto low_rank_work = [](const LowRankJob& j) {
    return double(j.rows) * (double(j.rank) * double(j.in + j.out) + double(j.out));
  };
  for (size_t i = 0; i < low_rank.size(); ++i) {
    check(low_rank[i], i);
    total += low_rank_work(low_rank[i]);
  }
  if (total == 0) return;
  const int threads = compute_threads();
  const GemmKernels kernels = gemm_kernels_for(active_isa());
  std::vector<Prepared> prepared(jobs.size());
  std::vector<std::vector<uint16_t>> xb(jobs.size());
  std::vector<std::vector<float>> xf(jobs.size());
  std::vector<Task> tasks;
  // Low-rank jobs first: their tasks are whole row ranges, so they should not be the tail.
  for (const LowRankJob& j : low_rank) {
    if (j.rows == 0 || j.out == 0) continue;
    const double share = low_rank_work(j) / total;
    const int64_t n = std::max<int64_t>(1, int64_t(share * double(kTasksPerThread * threads) + 0.5));
    const int64_t cap = std::max<int64_t>(6, kXPanel / std::max<int64_t>(1, j.in * 4) / 6 * 6);
    const int64_t step = std::clamp<int64_t>((j.rows + n - 1) / n, 1, cap);
    for (int64_t r = 0; r < j.rows; r += step) tasks.push_back({nullptr, &j, r, std::min(j.rows, r + step)});
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    Prepared& p = prepared[i];
    p.job = jobs[i];
    const MatmulJob& j = p.job;
    if (j.rows == 0 || j.out == 0) continue;
    if (j.wq && j.in > 0) {
      const bool swiglu = j.epilogue == MatmulJob::Epilogue::SwiGlu;
      const bool same = !swiglu || j.wq_up->source == j.wq->source;
      const int64_t kp = j.wq->padded_in, kp_up = same ? 0 : j.wq_up->padded_in;
      xf[i].resize(size_t(j.rows * (kp + kp_up)));
      gather_x_quant(j, *j.wq, xf[i].data());
      if (!same) gather_x_quant(j, *j.wq_up, xf[i].data() + j.rows * kp);
      p.xq = xf[i].data();
      p.xq_up = same ? p.xq : p.xq + j.rows * kp;
    } else if (j.wdtype == DType::BF16 && j.in > 0) {
      if (kernels.bf16dot) {
        xb[i].resize(size_t(j.rows * j.in));
        round_x_to_bf16(j, xb[i].data(), nullptr);
        p.xb = xb[i].data();
      } else {
        xf[i].resize(size_t(j.rows * j.in));
        round_x_to_bf16(j, nullptr, xf[i].data());
        p.job.x = xf[i].data(), p.job.ldx = 0, p.job.x_rows = nullptr;
      }
    }
    const double share = double(j.rows) * double(j.out) * double(std::max<int64_t>(j.in, 1)) / total;
    const int64_t step = slice_rows(j, share, threads);
    for (int64_t o = 0; o < j.out; o += step) tasks.push_back({&p, nullptr, o, std::min(j.out, o + step)});
  }
  parallel_for(int64_t(tasks.size()), [&](int64_t i) { run_task(tasks[size_t(i)], kernels); });
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
