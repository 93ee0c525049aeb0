// The q8 matmuls for quant_gemm.cpp, decode_layer.cpp and decode_rows.cpp: gemv_rows8 (M = 1) and the small-M
// GEMM (2 <= M <= kQ16MaxRows), batch-invariant as q16's (quant_q16_tile.h): every kernel they choose from
// computes the one q8 block-dot contract of quant_q8_blocks.h (the scalar and the AVX-512 VNNI 8-column x R-row
// kernels), and a column's arithmetic does not depend on which kernel, tile or thread range computed it.
// Where the machine has AVX-512 VNNI (have_q16_tile()) a tile of 8 columns x up to kQ16TileRows rows reads each
// weight block once for all its rows; on AVX2 only (or SGL_CPU_Q16_NO_TILE=1) the AVX2 tile of 4 columns x up to
// kAvx2TileRows rows does (quant_q8_blocks.h); the scalar build runs the rows one at a time: the same bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quant_common.h"
#include "quant_q16_tile.h"
#include "quant_q8_blocks.h"
#include "quant_q8_zmm.h"

namespace {

// The x of a batch re-laid for the tile (Q8TileX), in q16's tiles (size_tiled: rows = ceil(M / tiles)):
//   q [t][b][rows][32] int8, c [t][b][rows][kQ8Corr] int32, d and s [t][b][rows] (+ 4 floats of padding: the
//   scalar-term loads read 4 rows at a time).
struct Q8Tiled {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> c;
  int64_t M = 0, nb = 0, rows = 0;
  Q8TileX tile(int64_t t) const {
    const int64_t o = t * nb * rows;
    return Q8TileX{q.data() + o * kBlock, d.data() + o, s.data() + o, c.data() + o * kQ8Corr, rows * kBlock, rows,
                   rows * kQ8Corr};
  }
};

// nb blocks of x -> their q8 blocks (quant_q8_blocks.h: q [nb * 32], d, s [nb], c [nb * kQ8Corr]): the same values
// from the AVX-512, the AVX2 or the scalar code.
inline void quantize_blocks8(const float* x, int64_t nb, int8_t* q, float* d, float* s, int32_t* c) {
#ifdef SGL_Q16_ZMM
  if (have_q16_zmm()) {
    quantize_blocks8_zmm(x, nb, q, d, s, c);
    return;
  }
#endif
#ifdef SGL_AVX2
  quantize_blocks8_avx2(x, nb, q, d, s, c);
#else
  quantize_blocks8_scalar(x, nb, q, d, s, c);
#endif
}

// x fp32 [M, K] -> its q8 blocks (quantize_blocks8), into vectors sized here.
inline void quantize_act8(const float* x, int64_t M, int64_t K, std::vector<int8_t>& q, std::vector<float>& d,
                          std::vector<float>& s, std::vector<int32_t>& c) {
  const int64_t nb = K / kBlock;
  q.resize(M * K);
  d.resize(M * nb);
  s.resize(M * nb);
  c.resize(M * nb * kQ8Corr);
  quantize_blocks8(x, M * nb, q.data(), d.data(), s.data(), c.data());
}

// x fp32 [M, K] as q8 blocks (quantize_act8), owned, with the Q8BAct that reads them.
struct Q8Blocks {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> c;
  Q8BAct act;
  Q8Blocks(const float* x, int64_t M, int64_t K) {
    quantize_act8(x, M, K, q, d, s, c);
    act = Q8BAct{q.data(), d.data(), s.data(), c.data(), K, K / kBlock};
  }
  Q8Blocks(const Q8Blocks&) = delete;  // act points into the vectors
};

// Sizes p for M rows of nb blocks; pack_row8 then fills row r (rows write disjoint parts of p).
inline void size_tiled8(int64_t M, int64_t nb, Q8Tiled& p) {
  const int64_t tiles = (M + tile_rows() - 1) / tile_rows();
  p.M = M;
  p.nb = nb;
  p.rows = (M + tiles - 1) / tiles;
  p.q.assign(tiles * nb * p.rows * kBlock, 0);
  p.c.assign(tiles * nb * p.rows * kQ8Corr, 0);
  p.d.assign(tiles * nb * p.rows + 4, 0.f);
  p.s.assign(tiles * nb * p.rows + 4, 0.f);
}

// Blocks [b0, b1) of row r of p from their q8 blocks (pointers at block b0, as quantize_blocks8 writes them).
inline void pack_row8_blocks(const int8_t* q, const float* d, const float* s, const int32_t* c, int64_t r, int64_t b0,
                             int64_t b1, Q8Tiled& p) {
  const int64_t t = r / p.rows, j = r % p.rows;
  for (int64_t b = b0; b < b1; b++) {
    const int64_t o = (t * p.nb + b) * p.rows + j, i = b - b0;
    std::memcpy(p.q.data() + o * kBlock, q + i * kBlock, kBlock);
    std::memcpy(p.c.data() + o * kQ8Corr, c + i * kQ8Corr, kQ8Corr * sizeof(int32_t));
    p.d[o] = d[i];
    p.s[o] = s[i];
  }
}

// Row r of p from its q8 blocks (as quantize_blocks8 writes them).
inline void pack_row8(const int8_t* q, const float* d, const float* s, const int32_t* c, int64_t r, Q8Tiled& p) {
  pack_row8_blocks(q, d, s, c, r, 0, p.nb, p);
}

inline void pack_tiled8(const Q8BAct& a, int64_t M, Q8Tiled& p) {
  size_tiled8(M, a.nb, p);
  for (int64_t r = 0; r < M; r++)
    pack_row8(a.q + r * a.k, a.d + r * a.nb, a.s + r * a.nb, a.c + r * a.nb * kQ8Corr, r, p);
}

// out[c] = (dot(W row c, x row 0 of a) (+ bias[c])) (+ resid[c]) for c < count; W points at the first row.
// One entry for gemv, gemm's single row and the fused decode layer, so all three give the same bits.
// Packed: W is the packed copy from a group's first row: whole groups read as records, the rest as rows (a copy's
// last rows past its whole groups are GGUF rows); oct-packed (pack_oct) where the AVX-512 kernel runs, else
// quad-packed (pack_quad8, AVX2).
template <QT T, bool Packed = false>
void gemv_rows8(const uint8_t* W, int64_t rb, int64_t count, const Q8BAct& a, float* out, const float* bias,
                const float* resid) {
  int64_t n = 0;
  bool oct = false;  // the AVX-512 kernel ran: a packed copy is oct-packed (its < 8 tail rows GGUF rows)
#ifdef SGL_Q16_ZMM
  if (have_q16_zmm()) {
    oct = true;
    for (; n + 8 <= count; n += 8)
      dot_q8_oct<T, 1, Packed>(W + n * rb, rb, a.nb, Q8TileX{a.q, a.d, a.s, a.c, kBlock, 1, kQ8Corr}, out + n, 0,
                               bias != nullptr ? bias + n : nullptr, resid != nullptr ? resid + n : nullptr);
  }
#endif
#ifdef SGL_AVX2
  const auto quad = [&](auto packed) {
    for (; n + 4 <= count; n += 4)
      dot_q8_quad<T, 1, decltype(packed)::value>(W + n * rb, rb, a.nb, Q8TileX{a.q, a.d, a.s, a.c, kBlock, 1, kQ8Corr},
                                                 out + n, 0, bias != nullptr ? bias + n : nullptr,
                                                 resid != nullptr ? resid + n : nullptr);
  };
  if (Packed && !oct) quad(std::true_type{});  // quad-packed (pack_quad8)
  else quad(std::false_type{});
#endif
  (void)oct;
  for (; n < count; n++) {
    float v = dot_q8_col<T>(W + n * rb, a, 0);
    if (bias != nullptr) v += bias[n];
    if (resid != nullptr) v += resid[n];
    out[n] = v;
  }
}

// The portable way to the same bits: rows_columns (quant_q16_tile.h), each row through gemv_rows8.
template <QT T, bool Packed = false>
void gemm_q8_rows(const uint8_t* W, int64_t rb, int64_t M, int64_t N, const Q8BAct& a, float* out,
                  const float* bias, const float* resid, int64_t n0, int64_t n1) {
  rows_columns(M, n0, n1, [&](int64_t r, int64_t c0, int64_t c1) {
    const Q8BAct row{a.q + r * a.k, a.d + r * a.nb, a.s + r * a.nb, a.c + r * a.nb * kQ8Corr, a.k, a.nb};
    gemv_rows8<T, Packed>(W + c0 * rb, rb, c1 - c0, row, out + r * N + c0, bias != nullptr ? bias + c0 : nullptr,
                  resid != nullptr ? resid + r * N + c0 : nullptr);
  });
}

// gemm's q8 path for the output columns [n0, n1) (tiled: a packed for the tile, or null: per row). Packed: W is a
// packed copy (gemv_rows8) and n0 a multiple of its group.
template <QT T, bool Packed = false>
void gemm_q8_cols(const uint8_t* W, int64_t M, int64_t N, int64_t K, const Q8BAct& a, const Q8Tiled* tiled,
                  float* out, const float* bias, const float* resid, int64_t n0, int64_t n1) {
  const int64_t rb = row_bytes(T, K);
  const auto col = [&](const uint8_t* w, int64_t r) { return dot_q8_col<T>(w, a, r); };
#ifdef SGL_Q16_ZMM
  if (tiled != nullptr && M >= kQ16TileMinRows && have_q16_zmm()) {
    gemm_tiles<8, kQ16TileRows>(W, rb, M, N, *tiled, out, bias, resid, n0, n1,
                                [&](auto rc, const uint8_t* w, const Q8TileX& x, float* o, const float* bs,
                                    const float* rs) {
                                  dot_q8_oct<T, decltype(rc)::value, Packed>(w, rb, a.nb, x, o, N, bs, rs);
                                },
                                col);
    return;
  }
#endif
#ifdef SGL_AVX2
  if (tiled != nullptr && M >= kQ16TileMinRows) {  // (a copy is quad-packed here: the AVX-512 tile did not run)
    gemm_tiles<4, kAvx2TileRows>(W, rb, M, N, *tiled, out, bias, resid, n0, n1,
                                 [&](auto rc, const uint8_t* w, const Q8TileX& x, float* o, const float* bs,
                                     const float* rs) {
                                   dot_q8_quad<T, decltype(rc)::value, Packed>(w, rb, a.nb, x, o, N, bs, rs);
                                 },
                                 col);
    return;
  }
#endif
  (void)tiled;
  gemm_q8_rows<T, Packed>(W, rb, M, N, a, out, bias, resid, n0, n1);
}

}  // namespace
