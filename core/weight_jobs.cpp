#include "core/weight_jobs.h"

namespace moemesh {

cpu::MatmulJob projection_job(const float* x, int64_t rows, const Weight& w, float* y) {
  cpu::MatmulJob j;
  j.x = x;
  j.rows = rows;
  j.in = w.cols();
  j.w = w.data;
  j.wdtype = w.dtype;
  j.out = w.rows();
  j.y = y;
  j.wq = w.quant.get();
  return j;
}

cpu::MatmulJob swiglu_job(const float* x, int64_t hidden, int64_t all_rows, const MlpWeights& w, float* act) {
  cpu::MatmulJob j = projection_job(x, all_rows, w.gate, act);
  j.in = hidden;
  j.epilogue = cpu::MatmulJob::Epilogue::SwiGlu;
  j.w_up = w.up.data;
  j.wq_up = w.up.quant.get();
  return j;
}

cpu::MatmulJob swiglu_job(const float* x, int64_t hidden, std::span<const int32_t> rows, const MlpWeights& w,
                          float* act) {
  cpu::MatmulJob j = swiglu_job(x, hidden, int64_t(rows.size()), w, act);
  j.x_rows = rows.data();
  return j;
}

}  // namespace moemesh
