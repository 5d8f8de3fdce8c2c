// The register tiles of the INT4/INT8 weight products (kernels/cpu/quant_matrix.h), written once
// over a vector type V and compiled per ISA beside GemmTiles (gemm_tile.h). Besides what GemmTiles
// uses, V provides rn_quant (x rows per tile), set1(float), fmsub(a, b, c) = a·b - c,
// quant<BITS>(const uint8_t* block, int h): part h (of 32 / lanes) of a 32-value block as floats,
// and has_table<BITS>: when true, V instead dequantizes through a 16-entry table per row and group
// (table(scale, scaled_zero), lookup(block, h, table): AVX-512's VPERMPS on the nibbles as
// indices), two instructions fewer per vector than converting and scaling.
//
// A weight vector is dequantized in registers, exactly (q·scale and zero·scale are exact in f32,
// and so is their difference), then multiplied like an f32 weight: the result is the product
// with the dequantized matrix, in the f32 kernels' order of additions per lane.
#pragma once
#include <cstdint>

#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/quant_matrix.h"

namespace moemesh::cpu {

template <class V>
struct QuantTiles {
  static constexpr int L = V::lanes;
  static constexpr int64_t B = QuantMatrix::kBlock;
  using R = typename V::reg;

  // c[r * ldc + i] = row o0 + i of m · xr[r] (xr in the matrix's padded order).
  template <int BITS, int RM, int RN>
  static void tile(const QuantMatrix& m, int64_t o0, const float* const* xr, float* c, int64_t ldc) {
    const int64_t groups = m.groups(), row_bytes = m.row_bytes();
    const uint8_t* q = m.q.data() + o0 * row_bytes;
    R acc[RM][RN];
    MOEMESH_UNROLL
    for (int i = 0; i < RM; ++i) {
      MOEMESH_UNROLL
      for (int r = 0; r < RN; ++r) acc[i][r] = V::zero();
    }
    constexpr bool table = V::template has_table<BITS>;
    // The next tile's scales and zeros ([out, groups] each: RM rows are contiguous).
    constexpr int64_t kF = int64_t(sizeof(float));
    for (int64_t at = (o0 + RM) * groups * kF, end = at + RM * groups * kF; at < end; at += kCacheLine) {
      prefetch_at(m.scale.data(), at);
      prefetch_at(m.scaled_zero.data(), at);
    }
    for (int64_t g = 0; g < groups; ++g) {
      R s[RM], zs[RM];  // a row's scale and scaled zero, or (table) its 16 dequantized values in s
      MOEMESH_UNROLL
      for (int i = 0; i < RM; ++i) {
        const float scale = m.scale[size_t((o0 + i) * groups + g)], zero = m.scaled_zero[size_t((o0 + i) * groups + g)];
        if constexpr (table) {
          s[i] = V::table(scale, zero);
        } else {
          s[i] = V::set1(scale);
          zs[i] = V::set1(zero);
        }
      }
      for (int64_t k = m.group_start[size_t(g)]; k < m.group_start[size_t(g + 1)]; k += B) {
        // The next tile's rows at this offset, a cache line at a time: the hardware prefetcher
        // did not keep RM row streams ahead from DRAM (INT4 GEMV 15-20 -> 29-36 G MAC/s a core).
        if ((k * BITS / 8) % kCacheLine == 0) {
          MOEMESH_UNROLL
          for (int i = 0; i < RM; ++i) prefetch_at(q, (RM + i) * row_bytes + k * BITS / 8);
        }
        MOEMESH_UNROLL
        for (int h = 0; h < B / L; ++h) {
          R xv[RN];
          MOEMESH_UNROLL
          for (int r = 0; r < RN; ++r) xv[r] = V::load(xr[r] + k + h * L);
          MOEMESH_UNROLL
          for (int i = 0; i < RM; ++i) {
            const uint8_t* block = q + i * row_bytes + k * BITS / 8;
            R w;
            if constexpr (table)
              w = V::lookup(block, h, s[i]);
            else
              w = V::fmsub(V::template quant<BITS>(block, h), s[i], zs[i]);
            MOEMESH_UNROLL
            for (int r = 0; r < RN; ++r) acc[i][r] = V::fma(w, xv[r], acc[i][r]);
          }
        }
      }
    }
    for (int i = 0; i < RM; ++i)
      for (int r = 0; r < RN; ++r) c[r * ldc + i] = V::hsum(acc[i][r]);
  }

  template <int BITS, int RM>
  static void rows_block(const QuantMatrix& m, int64_t o0, const float* const* xr, int64_t nrows, float* c,
                         int64_t ldc) {
    int64_t r = 0;
    for (; r + V::rn_quant <= nrows; r += V::rn_quant) tile<BITS, RM, V::rn_quant>(m, o0, xr + r, c + r * ldc, ldc);
    rest<BITS, RM, V::rn_quant - 1>(m, o0, xr + r, nrows - r, c + r * ldc, ldc);
  }

  template <int BITS, int RM, int RN>
  static void rest(const QuantMatrix& m, int64_t o0, const float* const* xr, int64_t nrows, float* c, int64_t ldc) {
    if constexpr (RN > 0) {
      if (nrows == RN) return tile<BITS, RM, RN>(m, o0, xr, c, ldc);
      rest<BITS, RM, RN - 1>(m, o0, xr, nrows, c, ldc);
    }
  }

  template <int BITS>
  static void block(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows, float* c,
                    int64_t ldc) {
    int64_t o = 0;
    if (nrows == 1) {
      for (; o + 8 <= nout; o += 8) tile<BITS, 8, 1>(m, o0 + o, xr, c + o, ldc);
    } else {
      for (; o + 4 <= nout; o += 4) rows_block<BITS, 4>(m, o0 + o, xr, nrows, c + o, ldc);
    }
    for (; o < nout; ++o) rows_block<BITS, 1>(m, o0 + o, xr, nrows, c + o, ldc);
  }

  static void run(const QuantMatrix& m, int64_t o0, int64_t nout, const float* const* xr, int64_t nrows, float* c,
                  int64_t ldc) {
    if (m.bits == 4)
      block<4>(m, o0, nout, xr, nrows, c, ldc);
    else
      block<8>(m, o0, nout, xr, nrows, c, ldc);
  }
};

}  // namespace moemesh::cpu
