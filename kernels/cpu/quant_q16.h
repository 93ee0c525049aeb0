// q16 activations for quant_gemm.cpp (included there, after quant_common.h): x quantized per 32-block
// to int16, weights widened to int16 in registers, integer block dots, the affine part in exact fp32.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "quant_common.h"

namespace {

// ---- q16 activations: x quantized per 32-block to int16 (scale amax / 32767: ~1.5e-5 of the block's max,
// ~250x finer than q8), weights widened to int16, vpmaddwd -> int32 pair sums -> one fp32 FMA per block. ----
// The affine part stays exact fp32: Q4_1 adds m * xs_b, Q4_0 adds -8 d * xs_b with xs_b the fp32 sum of the
// x block (so only the d * q * x term sees the int16 rounding). Q4 nibble x int16: |pair sum| <= 2 * 15 *
// 32767 and Q8_0: 2 * 128 * 32767, so the 16 int32 lanes' sums of one block cannot overflow.
// Within a block the int16 x are stored even positions first: x_j at perm16(j) (see widen16).
constexpr int perm16(int j) { return (j & 1) * 16 + (j >> 1); }

// The integer q of weight j of a block (Q8_0: int8; Q4: the nibble 0..15).
template <QT T>
inline int q_at(const uint8_t* blk, int j) {
  if constexpr (T == QT::Q8_0) return int8_t(blk[2 + j]);
  const uint8_t* qs = blk + (T == QT::Q4_0 ? 2 : 4);
  return j < 16 ? qs[j] & 15 : qs[j - 16] >> 4;
}

struct Q16Act {
  const int16_t* q;   // [M, K], each block in perm16 order
  const float* d;     // [M, nb] scale of the block
  const float* s;     // [M, nb] exact fp32 sum of the block
  int64_t k, nb;
};

#ifdef SGL_AVX2
// The block's 32 weights as two int16 vectors, EVEN = weights 0, 2, ..., 30 and ODD = 1, 3, ..., 31 (the
// order the q16 activations are stored in), built with shifts and masks only: no cross-lane shuffle, so
// nothing competes for port 5 (pmovzx/pmovsx would: that port bound the first version at ~12 GB/s).
//   Q4: v = qs | qs (both 128-bit halves), the high half shifted right by 4 (32-bit lanes): 16-bit lane i
//       of the low half holds bytes 2i, 2i+1 -> & 0xF = weight 2i, >> 8 & 0xF = weight 2i + 1; of the high
//       half their high nibbles -> weights 16 + 2i, 17 + 2i.
//   Q8_0: the 32 int8 as 16-bit lanes: (v << 8) >> 8 (arithmetic) = even bytes, v >> 8 = odd bytes.
template <QT T>
inline void widen16(const uint8_t* blk, __m256i& even, __m256i& odd) {
  if constexpr (T == QT::Q8_0) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    even = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
    odd = _mm256_srai_epi16(v, 8);
  } else {
    const __m256i m4 = _mm256_set1_epi16(0x000F);
    const __m256i v = _mm256_srlv_epi32(
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QT::Q4_0 ? 2 : 4)))),
        _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    even = _mm256_and_si256(v, m4);
    odd = _mm256_and_si256(_mm256_srli_epi16(v, 8), m4);
  }
}

inline __m256i dot16(__m256i w0, __m256i w1, __m256i x0, __m256i x1) {
#if defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(_mm256_madd_epi16(w0, x0), w1, x1);
#else
  return _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
#endif
}
#endif

// The scalar term of a block (exact fp32 affine part): Q4_1 m * xs, Q4_0 -8 d * xs, Q8_0 none.
template <QT T>
inline float affine_term(const uint8_t* blk, float xs, float acc) {
  if constexpr (T == QT::Q4_1) return std::fma(f16(blk + 2), xs, acc);
  if constexpr (T == QT::Q4_0) return std::fma(-8.f * f16(blk), xs, acc);
  return acc;
}

// res[c] = dot(W row w + c * rb, x row `row`) for c < C: each x block is loaded once and serves C weight rows
// (C = 4 at M = 1: 4 independent chains); C = 1 does a column's arithmetic in the same order as C = 4, so a
// column's result does not depend on where a thread's range starts (thread counts stay bit-identical).
template <QT T, int C>
inline void dot_q16_cols(const uint8_t* w, int64_t rb, const Q16Act& a, int64_t row, float* res) {
  float scal[C] = {};
  const int16_t* xq = a.q + row * a.k;
  const float* xd = a.d + row * a.nb;
  const float* xs = a.s + row * a.nb;
#ifdef SGL_AVX2
  __m256 acc[C];
  for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; b++) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock + 16));
    for (int c = 0; c < C; c++) {
      const uint8_t* blk = w + c * rb + b * block_bytes(T);
      prefetch(blk);
      __m256i w0, w1;
      widen16<T>(blk, w0, w1);
      const __m256 p = _mm256_cvtepi32_ps(dot16(w0, w1, x0, x1));
      acc[c] = _mm256_fmadd_ps(p, _mm256_set1_ps(f16(blk) * xd[b]), acc[c]);
      scal[c] = affine_term<T>(blk, xs[b], scal[c]);
    }
  }
  for (int c = 0; c < C; c++) res[c] = hsum(acc[c]) + scal[c];
#else
  for (int c = 0; c < C; c++) {
    float acc = 0.f;
    for (int64_t b = 0; b < a.nb; b++) {
      const uint8_t* blk = w + c * rb + b * block_bytes(T);
      const int16_t* xb = xq + b * kBlock;
      int32_t s = 0;
      for (int j = 0; j < 32; j++) s += int32_t(q_at<T>(blk, j)) * xb[perm16(j)];
      acc += f16(blk) * xd[b] * float(s);
      scal[c] = affine_term<T>(blk, xs[b], scal[c]);
    }
    res[c] = acc + scal[c];
  }
#endif
}

// nb blocks of x -> int16 per 32-block in perm16 order (q [nb * 32]), scale amax / 32767 (round to nearest
// even: d [nb]), and the exact fp32 block sums (s [nb]). Pointers: a row of a batch writes its part in place.
inline void quantize_blocks16(const float* x, int64_t nb, int16_t* q, float* d, float* s) {
  for (int64_t i = 0; i < nb; i++) {
    const float* xb = x + i * kBlock;
    float amax, sum;
    block_amax_sum(xb, amax, sum);
    const float dx = amax / 32767.f, id = dx != 0.f ? 1.f / dx : 0.f;
    for (int j = 0; j < kBlock; j++)
      q[i * kBlock + perm16(j)] = int16_t(std::max(-32767.f, std::min(32767.f, std::nearbyint(xb[j] * id))));
    d[i] = dx;
    s[i] = sum;
  }
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

// ---- M = 1 q16 GEMV over a range of weight rows (the batch-1 decode layer, gemv and gemm's single row) ----
#ifdef SGL_AVX2
// dot_q16_cols<T, 4> for R rows of x at once (rows r0 .. r0 + R of a): res[c * R + r]. The 4 blocks' f16 scales
// (and Q4_1 mins) are converted in ONE vcvtph2ps and the affine terms in one vector FMA: ~5 fewer uops per
// block and column than the scalar header decode (the M = 1 matmuls are instruction-bound once the weights
// stream from memory at full speed). Per row and column the same operations in the same order as
// dot_q16_cols<T, 1> (a lane of a vector mul/fma rounds as the scalar one), so a row's results are bit-identical
// to it, whatever R, and to gemm's q16 path. R = 2 widens each weight block once for both rows (M = 2 on a
// 3072 x 576 Q4_1 matrix, 1 thread: 0.113 ms, two single rows 0.14; a 4-row version was no faster than the
// 512-bit tile: the per-row dot, convert, scale and FMA are most of the work).
template <QT T, int R>
inline void dot_q16_cols4_rows(const uint8_t* w, int64_t rb, const Q16Act& a, int64_t r0, float* res) {
  __m256 acc[4][R], scal[R];
  for (int r = 0; r < R; r++) {
    scal[r] = _mm256_setzero_ps();
    for (int c = 0; c < 4; c++) acc[c][r] = _mm256_setzero_ps();
  }
  const __m256i lane0 = _mm256_set1_epi32(0), lane1 = _mm256_set1_epi32(T == QT::Q4_1 ? 2 : 1),
                lane2 = _mm256_set1_epi32(T == QT::Q4_1 ? 4 : 2), lane3 = _mm256_set1_epi32(T == QT::Q4_1 ? 6 : 3);
  const __m256i lanes[4] = {lane0, lane1, lane2, lane3};
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = w + b * block_bytes(T);
    __m256 hdr;
    if constexpr (T == QT::Q4_1) {
      uint32_t h[4];
      for (int c = 0; c < 4; c++) std::memcpy(&h[c], blk + c * rb, 4);
      hdr = _mm256_cvtph_ps(_mm_setr_epi32(int(h[0]), int(h[1]), int(h[2]), int(h[3])));
    } else {
      uint16_t h[4];
      for (int c = 0; c < 4; c++) std::memcpy(&h[c], blk + c * rb, 2);
      hdr = _mm256_cvtph_ps(_mm_setr_epi16(short(h[0]), short(h[1]), short(h[2]), short(h[3]), 0, 0, 0, 0));
    }
    __m256 dx[R];
    for (int r = 0; r < R; r++) {
      const int64_t i = (r0 + r) * a.nb + b;
      dx[r] = _mm256_mul_ps(hdr, _mm256_set1_ps(a.d[i]));
      if constexpr (T == QT::Q4_1) scal[r] = _mm256_fmadd_ps(hdr, _mm256_set1_ps(a.s[i]), scal[r]);
      if constexpr (T == QT::Q4_0)
        scal[r] = _mm256_fmadd_ps(_mm256_mul_ps(hdr, _mm256_set1_ps(-8.f)), _mm256_set1_ps(a.s[i]), scal[r]);
    }
    for (int c = 0; c < 4; c++) {
      const uint8_t* bc = blk + c * rb;
      prefetch(bc);
      __m256i w0, w1;
      widen16<T>(bc, w0, w1);
      for (int r = 0; r < R; r++) {
        const int16_t* xq = a.q + (r0 + r) * a.k + b * kBlock;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
        const __m256 p = _mm256_cvtepi32_ps(dot16(w0, w1, x0, x1));
        acc[c][r] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(dx[r], lanes[c]), acc[c][r]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    alignas(32) float sc[8];
    _mm256_store_ps(sc, scal[r]);
    for (int c = 0; c < 4; c++) {
      const float s = T == QT::Q4_1 ? sc[2 * c + 1] : T == QT::Q4_0 ? sc[c] : 0.f;
      res[c * R + r] = hsum(acc[c][r]) + s;
    }
  }
}

// The M = 1 kernel: 4 columns of one row.
template <QT T>
inline void dot_q16_cols4(const uint8_t* w, int64_t rb, const Q16Act& a, float* res) {
  dot_q16_cols4_rows<T, 1>(w, rb, a, 0, res);
}
#endif

// out[c] = (dot(W row c, x) (+ bias[c])) (+ resid[c]) for c < count; W points at the first row. One kernel
// for gemv, gemm's single row and the fused decode layer, so all three give the same bits; quant_q16_tile.h
// reproduces its per-lane operations for batches (keep the two in step: tests/kernels/test_cpu_q16_batch.py).
template <QT T>
void gemv_rows(const uint8_t* W, int64_t rb, int64_t count, const Q16Act& a, float* out, const float* bias,
               const float* resid) {
  float res[4];
  for (int64_t n = 0; n < count;) {
    const int C = n + 4 <= count ? 4 : 1;
#ifdef SGL_AVX2
    if (C == 4) dot_q16_cols4<T>(W + n * rb, rb, a, res);
#else
    if (C == 4) dot_q16_cols<T, 4>(W + n * rb, rb, a, 0, res);
#endif
    else dot_q16_cols<T, 1>(W + n * rb, rb, a, 0, res);
    for (int c = 0; c < C; c++) {
      float v = res[c];
      if (bias != nullptr) v += bias[n + c];
      if (resid != nullptr) v += resid[n + c];
      out[n + c] = v;
    }
    n += C;
  }
}

}  // namespace
