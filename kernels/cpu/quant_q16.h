// q16 activations for quant_gemm.cpp (included there, after quant_common.h): x quantized per 32-block
// to int16, weights widened to int16 in registers, integer block dots, the affine part in exact fp32.
// This file: the activations, the block-dot contract, its scalar and AVX2 kernels; quant_q16_zmm.h has the
// AVX-512 kernel, quant_q16_tile.h the matmuls (gemv_rows, gemm_q16_cols) that choose between them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "quant_common.h"

namespace {

// ---- q16 activations: x quantized per 32-block to int16 (scale amax / 32767: ~1.5e-5 of the block's max,
// ~250x finer than q8), weights widened to int16, int16 pair dots -> int32 -> fp32 FMAs per block. ----
// The affine part stays exact fp32: Q4_1 adds m * xs_b, Q4_0 adds -8 d * xs_b with xs_b the fp32 sum of the
// x block (so only the d * q * x term sees the int16 rounding).
// Within a block the int16 x are stored even positions first: x_j at perm16(j).
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

// The scalar term of a block (exact fp32 affine part): Q4_1 m * xs, Q4_0 -8 d * xs, Q8_0 none.
template <QT T>
inline float affine_term(const uint8_t* blk, float xs, float acc) {
  if constexpr (T == QT::Q4_1) return std::fma(f16(blk + 2), xs, acc);
  if constexpr (T == QT::Q4_0) return std::fma(-8.f * f16(blk), xs, acc);
  return acc;
}

// nb blocks of x -> int16 per 32-block in perm16 order (q [nb * 32]), scale amax / 32767 (round to nearest
// even: d [nb]), and the exact fp32 block sums (s [nb], summed in order j = 0..31). Pointers: a row of a batch
// writes its part in place. Scalar code: below is the AVX2 twin, quant_q16_zmm.h has the AVX-512 one (the same
// values), quant_q16_tile.h's quantize_blocks16 chooses.
inline void quantize_blocks16_scalar(const float* x, int64_t nb, int16_t* q, float* d, float* s) {
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

#ifdef SGL_AVX2
// quantize_blocks16_scalar in AVX2 (the same values, as quant_q8_blocks.h's quantize_blocks8_avx2; the block sum
// stays the scalar sum in order j = 0..31), ~4x faster: a machine without AVX-512 ran the scalar loop.
inline void quantize_blocks16_avx2(const float* x, int64_t nb, int16_t* q, float* d, float* s) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs' 4-byte pairs back to j order
  for (int64_t i = 0; i < nb; i++) {
    const float* xb = x + i * kBlock;
    __m256i qi[4];
    const float dx = block_ints8(xb, 32767.f, qi);
    float sum = 0.f;
    for (int j = 0; j < kBlock; j++) sum += xb[j];  // block_amax_sum's order
    __m256 qf[4];  // the int32 values, as floats' bits for the shuffles below
    for (int k = 0; k < 4; k++) qf[k] = _mm256_castsi256_ps(qi[k]);
    // perm16: even j at 0..15, odd j at 16..31; per 128-bit lane the shuffles take j = 0, 2, 8, 10 | 4, 6, 12, 14
    const __m256i e01 = _mm256_castps_si256(_mm256_shuffle_ps(qf[0], qf[1], _MM_SHUFFLE(2, 0, 2, 0)));
    const __m256i e23 = _mm256_castps_si256(_mm256_shuffle_ps(qf[2], qf[3], _MM_SHUFFLE(2, 0, 2, 0)));
    const __m256i o01 = _mm256_castps_si256(_mm256_shuffle_ps(qf[0], qf[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m256i o23 = _mm256_castps_si256(_mm256_shuffle_ps(qf[2], qf[3], _MM_SHUFFLE(3, 1, 3, 1)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kBlock),
                        _mm256_permutevar8x32_epi32(_mm256_packs_epi32(e01, e23), order));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kBlock + 16),
                        _mm256_permutevar8x32_epi32(_mm256_packs_epi32(o01, o23), order));
    d[i] = dx;
    s[i] = sum;
  }
}
#endif

// ---- The q16 block dot: ONE contract for M = 1 and every row of a batch (the same bits; quant_q16_tile.h) ----
// A block's 32 weights in four quarters of 8, the orders one 16-byte Q4 load gives with shifts and masks
// (int16 lane i of the 16 bytes holds bytes 2i, 2i + 1; Q8_0 does the same to each 16-byte half):
//   quarter 0: weights 0, 2, .., 14   1: 1, 3, .., 15   2: 16, 18, .., 30   3: 17, 19, .., 31
// i.e. element i of quarter q is weight kQuarterW[q] + 2i, and its x is at kQuarterX[q] + i of the block's
// perm16-ordered int16 (even positions at 0..15, odd at 16..31).
// Per output column c and row r: 4 fp32 lanes L, a scalar term; per block b, in order:
//   I_l  = sum over the 4 quarters q and i in {2l, 2l + 1} of w_q[i] * x_q[i]   (int32, exact: |I| <= 8 * 128
//          * 32767; Q4 nibbles: |I| <= 8 * 15 * 32767 < 2^22, so float(I) is exact for Q4 and an rne for Q8_0)
//   L_l  = fma(float(I_l), d_c * xd_rb, L_l)                                    (d_c * xd_rb: one fp32 rounding)
//   scal = fma(m_c, xs_rb, scal)  (Q4_1)  |  fma(-8 d_c, xs_rb, scal)  (Q4_0)  |  none (Q8_0)
//   y    = ((L_0 + L_2) + (L_1 + L_3)) + scal  (+ bias) (+ residual)
// Why 4 lanes (the previous contract had 8): a vector register then holds 4 (zmm) or 2 (ymm) columns of one
// row, the block's x quarters are 128-bit broadcasts, and the per-block float work (convert, scale, FMA) is one
// instruction per 4 columns instead of one per column: that work per extra row was most of a verify row's cost.
// Integer sums are exact, so only the partition of products into lanes matters; each fp32 operation above is
// one IEEE rounding whatever the vector width, so the scalar, AVX2 and AVX-512 kernels give the same bits.
constexpr int kQuarterW[4] = {0, 1, 16, 17};
constexpr int kQuarterX[4] = {0, 16, 8, 24};

// The contract for one column (W row w) and row `row` of a, in scalar code: the portable build, odd tail
// columns, and the reference the vector kernels are tested against (through their outputs).
template <QT T>
inline float dot_q16_col(const uint8_t* w, const Q16Act& a, int64_t row) {
  const int16_t* xq = a.q + row * a.k;
  const float* xd = a.d + row * a.nb;
  const float* xs = a.s + row * a.nb;
  float L[4] = {}, scal = 0.f;
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = w + b * block_bytes(T);
    const int16_t* xb = xq + b * kBlock;
    const float s = f16(blk) * xd[b];
    for (int l = 0; l < 4; l++) {
      int32_t I = 0;
      for (int q = 0; q < 4; q++)
        for (int i = 2 * l; i < 2 * l + 2; i++) I += int32_t(q_at<T>(blk, kQuarterW[q] + 2 * i)) * xb[kQuarterX[q] + i];
      L[l] = std::fma(float(I), s, L[l]);
    }
    scal = affine_term<T>(blk, xs[b], scal);
  }
  return ((L[0] + L[2]) + (L[1] + L[3])) + scal;
}

// The Q8_0 copies of q16 activations (the lm_head's, a draft head's): G rows' block b as ONE record of G * 34
// bytes, their G f16 scales (column order), then their weight bytes 0-15 and 16-31 as two vectors of G 16-byte
// lanes, lane c = column c: what the q16 kernels widen (quant_q16_zmm.h's quad-packed G = 4 with AVX-512 VNNI,
// the AVX2 pair-packed G = 2), one stream instead of G strided rows. G rows take G * rb bytes as in GGUF, so group
// g starts at W + G g * rb in both; the last N % G rows are left as they are.
template <int G>
constexpr int64_t kQ8_0LanesRecord = G * 34;

template <int G>
inline void pack_q8_0_lanes(const uint8_t* W, int64_t N, int64_t rb, uint8_t* P) {
  const int64_t nb = rb / 34, full = N / G * G;
  std::memcpy(P + full * rb, W + full * rb, (N - full) * rb);
  for (int64_t g = 0; g < N / G; g++)
    for (int64_t b = 0; b < nb; b++) {
      uint8_t* o = P + (g * nb + b) * kQ8_0LanesRecord<G>;
      for (int c = 0; c < G; c++) {
        const uint8_t* blk = W + (g * G + c) * rb + b * 34;
        std::memcpy(o + 2 * c, blk, 2);
        std::memcpy(o + 2 * G + 16 * c, blk + 2, 16);
        std::memcpy(o + 18 * G + 16 * c, blk + 18, 16);
      }
    }
}

#ifdef SGL_AVX2
// Q8_0's 4 weight quarters from the 16-byte halves lo (bytes 0-15), hi (16-31) of two blocks' lanes.
inline void widen_q8_0_halves(__m256i lo, __m256i hi, __m256i w[4]) {
  w[0] = _mm256_srai_epi16(_mm256_slli_epi16(lo, 8), 8);
  w[1] = _mm256_srai_epi16(lo, 8);
  w[2] = _mm256_srai_epi16(_mm256_slli_epi16(hi, 8), 8);
  w[3] = _mm256_srai_epi16(hi, 8);
}

// The 4 weight quarters of two blocks as int16 vectors [block b0's quarter | block b1's] (128-bit lanes).
// Q4: v = the 16 nibble bytes; quarter 0 = v & 0xF, 1 = v >> 8 & 0xF, 2 = v >> 4 & 0xF, 3 = v >> 12 (16-bit
// lanes). Q8_0: each 16-byte half h as 16-bit lanes: (h << 8) >> 8 (arithmetic) = even bytes, h >> 8 = odd.
template <QT T>
inline void widen_quarters2(const uint8_t* b0, const uint8_t* b1, __m256i w[4]) {
  const auto load2 = [](const uint8_t* p0, const uint8_t* p1) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))),
                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)), 1);
  };
  if constexpr (T == QT::Q8_0) {
    widen_q8_0_halves(load2(b0 + 2, b1 + 2), load2(b0 + 18, b1 + 18), w);
  } else {
    constexpr int off = T == QT::Q4_0 ? 2 : 4;
    const __m256i m4 = _mm256_set1_epi16(0x000F), v = load2(b0 + off, b1 + off);
    w[0] = _mm256_and_si256(v, m4);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 8), m4);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    w[3] = _mm256_srli_epi16(v, 12);
  }
}

// I_l of the contract for both 128-bit lanes: x quarters broadcast to both.
inline __m256i dot_quarters2(const __m256i w[4], const int16_t* xb) {
  __m256i x[4];
  for (int q = 0; q < 4; q++)
    x[q] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + kQuarterX[q])));
#if defined(__AVXVNNI__)
  __m256i acc = _mm256_madd_epi16(w[0], x[0]);
  for (int q = 1; q < 4; q++) acc = _mm256_dpwssd_avx_epi32(acc, w[q], x[q]);
  return acc;
#else
  return _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(w[0], x[0]), _mm256_madd_epi16(w[1], x[1])),
                          _mm256_add_epi32(_mm256_madd_epi16(w[2], x[2]), _mm256_madd_epi16(w[3], x[3])));
#endif
}

// ((L_0 + L_2) + (L_1 + L_3)) of each 128-bit lane, in its element 0.
inline __m256 lane_sums(__m256 v) {
  const __m256 t = _mm256_add_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm256_add_ps(t, _mm256_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
}

#endif

}  // namespace
