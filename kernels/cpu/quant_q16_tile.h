// The q16 matmuls for quant_gemm.cpp, decode_layer.cpp and decode_rows.cpp: gemv_rows (M = 1) and the small-M
// GEMM (2 <= M <= kQ16MaxRows), batch-invariant, i.e. every row gets the SAME BITS as gemv_rows on that row
// alone: every kernel they choose from computes the one block-dot contract stated in quant_q16.h (scalar,
// AVX2 2-column, AVX-512 4-column x R-row kernels), and a column's arithmetic does not depend on which
// kernel, tile or thread range computed it.
//
// Where the machine has AVX-512 VNNI (have_q16_tile()) a tile of 4 columns x up to kQ16TileRows rows widens each weight
// block once for all its rows (quant_q16_zmm.h); on AVX2 only (or SGL_CPU_Q16_NO_TILE=1) a tile of 2 columns x up
// to kAvx2TileRows rows does (dot_q16_pair); the scalar build runs the rows one at a time: the same bits
// (tests/kernels/test_cpu_q16_batch.py, test_cpu_decode_rows.py compare them).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "quant_common.h"
#include "quant_q16.h"
#include "quant_q16_zmm.h"

namespace {

// Rows up to which gemm runs q16 activations (the default act mode): decode batches and speculative verify rows
// are batch-invariant up to here. Above it (prefill) the fp32 / MKL paths are faster. Mirrored by quant.py.
constexpr int64_t kQ16MaxRows = 64;
// Rows from which the tile runs (where the machine has it): from 2, each weight block widened once per tile.
constexpr int64_t kQ16TileMinRows = 2;
// Rows per tile at most: 12 accumulators + 4 weight quarters + 3 scalar-term vectors + constants and temporaries
// fit the 32 zmm; so a verify row of 1 + 8 tokens (9 rows) is one tile: each weight block widened once.
constexpr int kQ16TileRows = 12;

// The x of a batch re-laid for the tile (Q16TileX, quant_q16_zmm.h): M rows in tiles of `rows` (the last one
// shorter; rows = ceil(M / tiles), tiles = ceil(M / kQ16TileRows)); tile t, block b, row j of the tile:
//   q [t][b][rows][32] int16 (perm16 order), d and s [t][b][rows] (+ 4 floats of padding: the scalar-term
//   loads read 4 rows at a time).
struct Q16Tiled {
  std::vector<int16_t> q;
  std::vector<float> d, s;
  int64_t M = 0, nb = 0, rows = 0;
  Q16TileX tile(int64_t t) const {
    const int64_t o = t * nb * rows;
    return Q16TileX{q.data() + o * kBlock, d.data() + o, s.data() + o, rows * kBlock, rows};
  }
};

// nb blocks of x -> their q16 blocks (quant_q16.h's quantize_blocks16_scalar): the same values from the
// AVX-512, the AVX2 or the scalar code.
inline void quantize_blocks16(const float* x, int64_t nb, int16_t* q, float* d, float* s) {
#ifdef SGL_Q16_ZMM
  if (have_q16_zmm()) {
    quantize_blocks16_zmm(x, nb, q, d, s);
    return;
  }
#endif
#ifdef SGL_AVX2
  quantize_blocks16_avx2(x, nb, q, d, s);
#else
  quantize_blocks16_scalar(x, nb, q, d, s);
#endif
}

// x fp32 [M, K] -> its q16 blocks (quantize_blocks16), into vectors sized here.
inline void quantize_act16(const float* x, int64_t M, int64_t K, std::vector<int16_t>& q, std::vector<float>& d,
                           std::vector<float>& s) {
  const int64_t nb = K / kBlock;
  q.resize(M * K);
  d.resize(M * nb);
  s.resize(M * nb);
  quantize_blocks16(x, M * nb, q.data(), d.data(), s.data());
}

// x fp32 [M, K] as q16 blocks (quantize_act16), owned, with the Q16Act that reads them (as Q8Blocks).
struct Q16Blocks {
  std::vector<int16_t> q;
  std::vector<float> d, s;
  Q16Act act;
  Q16Blocks(const float* x, int64_t M, int64_t K) {
    quantize_act16(x, M, K, q, d, s);
    act = Q16Act{q.data(), d.data(), s.data(), K, K / kBlock};
  }
  Q16Blocks(const Q16Blocks&) = delete;  // act points into the vectors
};

// Rows per tile at most (q8's and q16's): the AVX-512 tiles' kQ16TileRows where they run, else the AVX2 tiles'.
inline int64_t tile_rows() {
#ifdef SGL_Q16_ZMM
  if (have_q16_zmm()) return kQ16TileRows;
#endif
#ifdef SGL_AVX2
  return kAvx2TileRows;
#else
  return kQ16TileRows;
#endif
}

// Whether a batch runs a tile here (each weight block read once per tile of rows), q8 and q16: the AVX-512 tiles
// or the AVX2 ones; the scalar build runs the rows one at a time.
inline bool have_rows_tile() {
#ifdef SGL_AVX2
  return true;
#else
  return false;
#endif
}

// Sizes p for M rows of nb blocks; pack_row then fills row r (rows write disjoint parts of p).
inline void size_tiled(int64_t M, int64_t nb, Q16Tiled& p) {
  const int64_t tiles = (M + tile_rows() - 1) / tile_rows();
  p.M = M;
  p.nb = nb;
  p.rows = (M + tiles - 1) / tiles;
  p.q.assign(tiles * nb * p.rows * kBlock, 0);
  p.d.assign(tiles * nb * p.rows + 4, 0.f);
  p.s.assign(tiles * nb * p.rows + 4, 0.f);
}

// Blocks [b0, b1) of row r of p from their q16 blocks (q [(b1 - b0) * 32], d, s [b1 - b0], as quantize_blocks16
// writes them): a thread that quantized only those blocks packs them (decode_rows.cpp's gate/up phase).
inline void pack_row_blocks(const int16_t* q, const float* d, const float* s, int64_t r, int64_t b0, int64_t b1,
                            Q16Tiled& p) {
  const int64_t t = r / p.rows, j = r % p.rows;
  for (int64_t b = b0; b < b1; b++) {
    const int64_t o = (t * p.nb + b) * p.rows + j;
    std::memcpy(p.q.data() + o * kBlock, q + (b - b0) * kBlock, kBlock * sizeof(int16_t));
    p.d[o] = d[b - b0];
    p.s[o] = s[b - b0];
  }
}

// Row r of p from its q16 blocks (q [nb * 32], d [nb], s [nb], as quantize_blocks16 writes them).
inline void pack_row(const int16_t* q, const float* d, const float* s, int64_t r, Q16Tiled& p) {
  pack_row_blocks(q, d, s, r, 0, p.nb, p);
}

inline void pack_tiled(const Q16Act& a, int64_t M, Q16Tiled& p) {
  size_tiled(M, a.nb, p);
  for (int64_t r = 0; r < M; r++) pack_row(a.q + r * a.k, a.d + r * a.nb, a.s + r * a.nb, r, p);
}

// Whether the AVX-512 VNNI q16 tile (dot_q16_quad) runs here: also what q16's packed copies need.
inline bool have_q16_tile() {
#ifdef SGL_Q16_ZMM
  return have_q16_zmm();
#else
  return false;
#endif
}

#ifdef SGL_AVX2

// The contract for 2 columns (W rows w, w + rb) x R rows of x (Q16TileX): out[r * ldo + c] (+ bias[c])
// (+ resid[r * ldo + c]), c < 2, on AVX2 CPUs without AVX-512 VNNI (R = 1: the decode gemv). Each block's weights
// are widened once for all R rows (widen_quarters2: column 0 in the low 128-bit lane, column 1 in the high one).
// Packed (Q8_0 only): w is the group's pair-packed records (pack_q8_0_lanes<2>): the same registers, the same bits.
template <QT T, int R, bool Packed = false>
inline void dot_q16_pair(const uint8_t* w, int64_t rb, int64_t nb, const Q16TileX& x, float* out, int64_t ldo,
                         const float* bias, const float* resid) {
  static_assert(R >= 1 && R <= kAvx2TileRows, "rows per tile");
  __m256 acc[R];
  __m128 scal[R];  // the scalar terms of columns 0, 1 in lanes 0, 1 (a lane's fma is the scalar fma)
  for (int r = 0; r < R; r++) {
    acc[r] = _mm256_setzero_ps();
    scal[r] = _mm_setzero_ps();
  }
  const int16_t* xq = x.q;
  const float *xd = x.d, *xs = x.s;
  for (int64_t b = 0; b < nb; b++, xq += x.bq, xd += x.bds, xs += x.bds) {
    __m256i wq[4];
    float d0, d1;
    __m128 mv = _mm_setzero_ps();  // affine_term's factor: Q4_1 m, Q4_0 -8 d (Q8_0: none)
    if constexpr (Packed) {
      static_assert(T == QT::Q8_0, "q16 packs Q8_0 only");
      const uint8_t* rec = w + b * kQ8_0LanesRecord<2>;
      prefetch(rec);
      prefetch(rec + 64);
      widen_q8_0_halves(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 4)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 36)), wq);
      d0 = f16(rec), d1 = f16(rec + 2);
    } else {
      const uint8_t* b0 = w + b * block_bytes(T);
      const uint8_t* b1 = b0 + rb;
      prefetch(b0);
      prefetch(b1);
      widen_quarters2<T>(b0, b1, wq);
      d0 = f16(b0), d1 = f16(b1);
      if constexpr (T == QT::Q4_1) mv = _mm_setr_ps(f16(b0 + 2), f16(b1 + 2), 0.f, 0.f);
    }
    const __m256 dv = _mm256_set_m128(_mm_set1_ps(d1), _mm_set1_ps(d0));
    if constexpr (T == QT::Q4_0) mv = _mm_setr_ps(-8.f * d0, -8.f * d1, 0.f, 0.f);
    for (int r = 0; r < R; r++) {
      const __m256 f = _mm256_cvtepi32_ps(dot_quarters2(wq, xq + r * kBlock));
      acc[r] = _mm256_fmadd_ps(f, _mm256_mul_ps(dv, _mm256_set1_ps(xd[r])), acc[r]);
      if constexpr (T != QT::Q8_0) scal[r] = _mm_fmadd_ps(mv, _mm_set1_ps(xs[r]), scal[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    const __m256 t = lane_sums(acc[r]);  // ((L_0 + L_2) + (L_1 + L_3)) of column c at element 4c
    __m128 y = _mm_add_ps(_mm_unpacklo_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), scal[r]);
    if (bias != nullptr) y = _mm_add_ps(y, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(bias))));
    if (resid != nullptr)
      y = _mm_add_ps(y, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(resid + r * ldo))));
    _mm_store_sd(reinterpret_cast<double*>(out + r * ldo), _mm_castps_pd(y));
  }
}
#endif

// out[c] = (dot(W row c, x row 0 of a) (+ bias[c])) (+ resid[c]) for c < count; W points at the first row.
// One entry for gemv, gemm's single row and the fused decode layer, so all three give the same bits.
template <QT T>
void gemv_rows(const uint8_t* W, int64_t rb, int64_t count, const Q16Act& a, float* out, const float* bias,
               const float* resid) {
  const Q16TileX x{a.q, a.d, a.s, kBlock, 1};
  int64_t n = 0;
#ifdef SGL_Q16_ZMM
  if (have_q16_zmm())
    for (; n + 4 <= count; n += 4)
      dot_q16_quad<T, 1>(W + n * rb, rb, a.nb, x, out + n, 0, bias != nullptr ? bias + n : nullptr,
                         resid != nullptr ? resid + n : nullptr);
#endif
#ifdef SGL_AVX2
  for (; n + 2 <= count; n += 2)
    dot_q16_pair<T, 1>(W + n * rb, rb, a.nb, x, out + n, 0, bias != nullptr ? bias + n : nullptr,
                       resid != nullptr ? resid + n : nullptr);
#endif
  for (; n < count; n++) {
    float v = dot_q16_col<T>(W + n * rb, a, 0);
    if (bias != nullptr) v += bias[n];
    if (resid != nullptr) v += resid[n];
    out[n] = v;
  }
}

// out[r * N + n] = v (+ bias[n]) (+ resid[r * N + n]): a tail column's or per-row kernel's result.
inline void put_out(float* out, int64_t N, const float* bias, const float* resid, int64_t r, int64_t n, float v) {
  const int64_t o = r * N + n;
  if (bias != nullptr) v += bias[n];
  if (resid != nullptr) v += resid[o];
  out[o] = v;
}

// f(std::integral_constant<int, R>{}) for R in 1..MaxR.
template <int MaxR, class F, int... I>
inline void with_rows_seq(int R, F&& f, std::integer_sequence<int, I...>) {
  with_int<(MaxR - I)...>(R, f);
}
template <int MaxR, class F>
inline void with_tile_rows(int R, F&& f) {
  with_rows_seq<MaxR>(R, f, std::make_integer_sequence<int, MaxR>{});
}

// Columns [n0, n1) of rows 0..M in cache blocks of 64 columns (their weight rows stay in L1/L2 across the row
// tiles), in each the tiles of `rows` rows (tile t: rows r0 .. r0 + RR) x C columns, quad(rc, t, r0, n) with rc an
// integral_constant of RR, and the < C tail columns one row at a time, col(r, n). The q16 (C = 4) and q8 (C = 8)
// tiles share it.
template <int C, int MaxR = kQ16TileRows, class Quad, class Col>
inline void tile_columns(int64_t M, int64_t rows, int64_t n0, int64_t n1, Quad&& quad, Col&& col) {
  constexpr int64_t kChunk = 64;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = std::min(n1, c0 + kChunk);
    for (int64_t r0 = 0, t = 0; r0 < M; r0 += rows, t++) {
      with_tile_rows<MaxR>(int(std::min<int64_t>(rows, M - r0)), [&](auto rc) {
        int64_t n = c0;
        for (; n + C <= c1; n += C) quad(rc, t, r0, n);
        for (; n < c1; n++)
          for (int r = 0; r < decltype(rc)::value; r++) col(r0 + r, n);
      });
    }
  }
}

// out rows 0..M of columns [n0, n1) from a tile kernel: kernel(rc, w, x, out, bias, resid) computes C columns x R
// rows (R = rc's value <= MaxR) of the weight rows at w for the tile's rows x; col(w, r) is the contract's scalar
// statement for a tail column. One driver for every tile: q16's (AVX-512 4 x 12, AVX2 2 x 9) and q8's (AVX-512
// 8 x 12, AVX2 4 x 9), on GGUF rows or on packed copies (then n0 is a multiple of the copy's group, and so is every
// C-column step of tile_columns from it).
template <int C, int MaxR, class Tiled, class Kernel, class Col>
inline void gemm_tiles(const uint8_t* W, int64_t rb, int64_t M, int64_t N, const Tiled& p, float* out,
                       const float* bias, const float* resid, int64_t n0, int64_t n1, Kernel&& kernel, Col&& col) {
  tile_columns<C, MaxR>(
      M, p.rows, n0, n1,
      [&](auto rc, int64_t t, int64_t r0, int64_t n) {
        kernel(rc, W + n * rb, p.tile(t), out + r0 * N + n, bias != nullptr ? bias + n : nullptr,
               resid != nullptr ? resid + r0 * N + n : nullptr);
      },
      [&](int64_t r, int64_t n) { put_out(out, N, bias, resid, r, n, col(W + n * rb, r)); });
}

// The portable way to the same bits: in 64-column cache blocks (a block's weight rows stay in L2 across the
// rows), row(r, c0, c1) per row (gemv_rows / gemv_rows8 on that row).
template <class Row>
inline void rows_columns(int64_t M, int64_t n0, int64_t n1, Row&& row) {
  constexpr int64_t kChunk = 64;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = std::min(n1, c0 + kChunk);
    for (int64_t r = 0; r < M; r++) row(r, c0, c1);
  }
}

template <QT T>
void gemm_q16_rows(const uint8_t* W, int64_t rb, int64_t M, int64_t N, const Q16Act& a, float* out,
                   const float* bias, const float* resid, int64_t n0, int64_t n1) {
  rows_columns(M, n0, n1, [&](int64_t r, int64_t c0, int64_t c1) {
    const Q16Act row{a.q + r * a.k, a.d + r * a.nb, a.s + r * a.nb, a.k, a.nb};
    gemv_rows<T>(W + c0 * rb, rb, c1 - c0, row, out + r * N + c0, bias != nullptr ? bias + c0 : nullptr,
                 resid != nullptr ? resid + r * N + c0 : nullptr);
  });
}

// gemm's q16 path for the output columns [n0, n1) (tiled: a packed for the tile, or null: per row). Packed (Q8_0):
// W is its packed copy (quant_q16.h's pack_q8_0_lanes: the AVX-512 tile's groups of 4, the AVX2 one's of 2), read
// by the tile at every row count (tiled is never null then), n0 a multiple of the group.
template <QT T, bool Packed = false>
void gemm_q16_cols(const uint8_t* W, int64_t M, int64_t N, int64_t K, const Q16Act& a, const Q16Tiled* tiled,
                   float* out, const float* bias, const float* resid, int64_t n0, int64_t n1) {
  const int64_t rb = row_bytes(T, K);
  const auto col = [&](const uint8_t* w, int64_t r) { return dot_q16_col<T>(w, a, r); };
  const bool tile = tiled != nullptr && (M >= kQ16TileMinRows || Packed);
#ifdef SGL_Q16_ZMM
  if (tile && have_q16_zmm()) {
    gemm_tiles<4, kQ16TileRows>(W, rb, M, N, *tiled, out, bias, resid, n0, n1,
                                [&](auto rc, const uint8_t* w, const Q16TileX& x, float* o, const float* bs,
                                    const float* rs) {
                                  dot_q16_quad<T, decltype(rc)::value, Packed>(w, rb, a.nb, x, o, N, bs, rs);
                                },
                                col);
    return;
  }
#endif
#ifdef SGL_AVX2
  if (tile) {
    gemm_tiles<2, kAvx2TileRows>(W, rb, M, N, *tiled, out, bias, resid, n0, n1,
                                 [&](auto rc, const uint8_t* w, const Q16TileX& x, float* o, const float* bs,
                                     const float* rs) {
                                   dot_q16_pair<T, decltype(rc)::value, Packed>(w, rb, a.nb, x, o, N, bs, rs);
                                 },
                                 col);
    return;
  }
#endif
  (void)tile;
  if constexpr (Packed) throw std::logic_error("gemm_q16_cols: a packed copy needs a tile (packed_ok)");
  else gemm_q16_rows<T>(W, rb, M, N, a, out, bias, resid, n0, n1);
}

}  // namespace
