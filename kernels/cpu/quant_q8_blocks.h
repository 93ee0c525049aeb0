// q8 activations for the batch-invariant paths (quant_gemm.cpp up to kQ16MaxRows rows, decode_layer.cpp,
// decode_rows.cpp): x quantized per 32-block to int8, the weights' integers as the unsigned operand of
// vpdpbusd (u8 x s8 -> int32, 4 products per int32 lane), the signed weights exact through an integer
// correction, Q4_1's m through the quantized block sum (llama.cpp's Q8_1 form).
// This file: the activations, the block-dot contract, its scalar and AVX2 kernels; quant_q8_zmm.h has the
// AVX-512 VNNI kernel, quant_q8_tile.h the matmuls (gemv_rows8, gemm_q8_cols) that choose between them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_common.h"
#include "quant_q16.h"  // q_at: the block types' integers, shared with q16

namespace {

// ---- q8 activations: x per 32-block to int8 (scale d = amax / 127, round to nearest even, |q| <= 127), in
// natural order; the block's quantized sum s = d * float(sum_j q_j) (one rounding: |sum| <= 4064 is exact);
// and per block 4 int32 corrections, c_l = -8 * sum_{j in S_l} q_j and c_{2+l} = -128 * sum_{j in S_l} q_j
// (S_l: the contract's 2 lanes, below), that turn Q4_0's and Q8_0's unsigned weight operands back into signed
// ones. Error: |x_j - d q_j| <= amax / 254, so |y - x.w| <= sum_b amax_b / 254 * ||w_b||_1 (+ fp32 rounding):
// every weight type's error is its own weights' (as llama.cpp's Q8_0 / Q8_1 of x). q16 keeps the exact fp32 sum
// instead, whose error then scales with the unsigned d * nibble, up to 2x ||w_b||_1: fine at 1/65534, but at
// 1/254 it doubled the error (default model, layer 3's Q4_1 gate_up / down, heavy-tailed x: rms error 0.10 /
// 0.17 with the exact sum, 0.047 / 0.073 with the quantized one).
constexpr int kQ8Corr = 4;  // corrections per block: Q4_0's 2 lanes, then Q8_0's

struct Q8BAct {
  const int8_t* q;    // [M, K]
  const float* d;     // [M, nb] scale of the block
  const float* s;     // [M, nb] quantized sum of the block (Q4_1's m term)
  const int32_t* c;   // [M, nb, kQ8Corr] the lane corrections
  int64_t k, nb;
};

// nb blocks of x -> q [nb * 32], d [nb], s [nb], c [nb * kQ8Corr], in scalar code (quant_q8_zmm.h has the AVX-512
// twin, quant_q8_tile.h's quantize_blocks8 chooses). Pointers: a row of a batch writes its part in place.
inline void quantize_blocks8_scalar(const float* x, int64_t nb, int8_t* q, float* d, float* s, int32_t* c) {
  for (int64_t i = 0; i < nb; i++) {
    const float* xb = x + i * kBlock;
    float amax = 0.f;
    for (int j = 0; j < kBlock; j++) amax = std::max(amax, std::fabs(xb[j]));
    const float dx = amax / 127.f, id = dx != 0.f ? 1.f / dx : 0.f;
    int32_t lane[2] = {}, qsum = 0;
    for (int j = 0; j < kBlock; j++) {
      const int v = int(std::max(-127.f, std::min(127.f, std::nearbyint(xb[j] * id))));
      q[i * kBlock + j] = int8_t(v);
      lane[(j >> 2) & 1] += v;  // j in S_l
      qsum += v;
    }
    for (int l = 0; l < 2; l++) {
      c[i * kQ8Corr + l] = -8 * lane[l];
      c[i * kQ8Corr + 2 + l] = -128 * lane[l];
    }
    d[i] = dx;
    s[i] = dx * float(qsum);
  }
}

// ---- The q8 block dot: ONE contract for M = 1 and every row of a batch (the same bits; quant_q8_tile.h) ----
// Per output column c and row r: 2 fp32 lanes L, a scalar term; per block b, in order:
//   I_l  = sum over j in S_l = {j : bit 2 of j is l} (16 weights) of w_j * x_j   (int32, exact; w_j: Q4_0 the
//          nibble - 8, Q4_1 the nibble 0..15, Q8_0 the signed byte; |I| <= 16 * 128 * 127 < 2^22: float(I_l) is
//          exact, and so is the kernel's magic-number conversion)
//   L_l  = fma(float(I_l), d_c * xd_rb, L_l)                               (d_c * xd_rb: one fp32 rounding)
//   scal = fma(m_c, xs_rb, scal)  (Q4_1; xs the quantized sum)  |  none (Q4_0, Q8_0)
//   y    = (L_0 + L_1) + scal  (+ bias) (+ residual)
// Why 2 lanes (q16 has 4): the vector kernel (quant_q8_zmm.h) then holds 8 columns of one row per zmm (a 64-bit
// lane per column: bytes 8k..8k+7 of weights and x per vpdpbusd, k = 0..3), so the per-block float work of a
// row (convert, scale multiply, FMA) is one instruction per 8 columns. With 4 lanes (4 columns per zmm, 2
// vpdpbusd per block) that float work was as much as the dots: the 2-lane kernel cut the default model's
// matmuls at 9 rows from 13.98 to 11.39 ms per step (benchmarks/bench_q16_rows.py, 1 thread).
// Weights are vpdpbusd's UNSIGNED operand: Q4_1 nibbles as they are (init 0); Q4_0 nibbles, init c_l = -8 *
// sum_{S_l} x_j; Q8_0 bytes + 128 (xor 0x80), init c_{2+l} = -128 * sum_{S_l} x_j: the same integers (the AVX2
// kernel reaches them by vpmaddubsw). Integer sums are exact and every fp32 operation is one IEEE rounding, so
// the scalar, AVX2 and AVX-512 kernels give the same bits.

// The contract for one column (W row w) and row `row` of a, in scalar code: the portable build, AVX2-only CPUs,
// odd tail columns, and the reference the vector kernel is tested against (through their outputs).
template <QT T>
inline float dot_q8_col(const uint8_t* w, const Q8BAct& a, int64_t row) {
  const int8_t* xq = a.q + row * a.k;
  const float* xd = a.d + row * a.nb;
  const float* xs = a.s + row * a.nb;
  float L[2] = {}, scal = 0.f;
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = w + b * block_bytes(T);
    const int8_t* xb = xq + b * kBlock;
    const float s = f16(blk) * xd[b];
    constexpr int zero = T == QT::Q4_0 ? 8 : 0;  // Q4_0's nibble - 8
    for (int l = 0; l < 2; l++) {
      int32_t I = 0;
      for (int j = 0; j < kBlock; j++)
        if (((j >> 2) & 1) == l) I += (q_at<T>(blk, j) - zero) * xb[j];
      L[l] = std::fma(float(I), s, L[l]);
    }
    if constexpr (T == QT::Q4_1) scal = std::fma(f16(blk + 2), xs[b], scal);
  }
  return (L[0] + L[1]) + scal;
}

#ifdef SGL_AVX2
// The contract for 4 columns (W rows w + c * rb, c < 4) of row `row`: res[0..4) (AVX2 CPUs without AVX-512
// VNNI). One ymm holds the 2 lanes of 4 columns, 64-bit element e = column (e >> 1) + 2 (e & 1) (the order of
// two 2-column loads and an unpack). I_l without VNNI: vpmaddubsw (u8 x s8 -> int16 pairs: Q4 nibbles x x, at
// most 2 * 15 * 127; Q8_0 |w| x x * sign(w), at most 2 * 128 * 127 < 2^15: never saturates) then vpmaddwd by
// 1 (-> the int32 lane of 4 bytes, vpdpbusd's partition); Q4_0's -8 is the correction c_l, Q8_0 needs none.
template <QT T>
inline void dot_q8_cols4(const uint8_t* w, int64_t rb, const Q8BAct& a, int64_t row, float* res) {
  const int8_t* xq = a.q + row * a.k;
  const float* xd = a.d + row * a.nb;
  const float* xs = a.s + row * a.nb;
  const int32_t* xc = a.c + row * a.nb * kQ8Corr;
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
  const auto load2 = [&](int c, int off) {  // bytes off..off+15 of columns c, c + 1
    return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(w + (c + 1) * rb + off),
                               reinterpret_cast<const __m128i*>(w + c * rb + off));
  };
  __m256 acc = _mm256_setzero_ps();
  float scal[4] = {};
  for (int64_t b = 0; b < a.nb; b++, w += block_bytes(T)) {
    for (int c = 0; c < 4; c++) prefetch(w + c * rb);
    __m256i wq[4];
    if constexpr (T == QT::Q8_0) {
      const __m256i l01 = load2(0, 2), l23 = load2(2, 2), h01 = load2(0, 18), h23 = load2(2, 18);
      wq[0] = _mm256_unpacklo_epi64(l01, l23);
      wq[1] = _mm256_unpackhi_epi64(l01, l23);
      wq[2] = _mm256_unpacklo_epi64(h01, h23);
      wq[3] = _mm256_unpackhi_epi64(h01, h23);
    } else {
      constexpr int off = T == QT::Q4_0 ? 2 : 4;
      const __m256i v01 = load2(0, off), v23 = load2(2, off);
      const __m256i lo = _mm256_unpacklo_epi64(v01, v23), hi = _mm256_unpackhi_epi64(v01, v23);
      wq[0] = _mm256_and_si256(lo, m4);
      wq[1] = _mm256_and_si256(hi, m4);
      wq[2] = _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4);
      wq[3] = _mm256_and_si256(_mm256_srli_epi16(hi, 4), m4);
    }
    __m256i I = T == QT::Q4_0 ? _mm256_set1_epi64x([&] { int64_t v; std::memcpy(&v, xc + b * kQ8Corr, 8); return v; }())
                              : _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) {
      int64_t xv;
      std::memcpy(&xv, xq + b * kBlock + 8 * k, 8);
      __m256i x = _mm256_set1_epi64x(xv), u = wq[k];
      if constexpr (T == QT::Q8_0) {
        x = _mm256_sign_epi8(x, u);
        u = _mm256_sign_epi8(u, u);
      }
      I = _mm256_add_epi32(I, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones));
    }
    const float d0 = f16(w), d1 = f16(w + rb), d2 = f16(w + 2 * rb), d3 = f16(w + 3 * rb);
    const __m256 dv = _mm256_setr_ps(d0, d0, d2, d2, d1, d1, d3, d3);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), _mm256_mul_ps(dv, _mm256_set1_ps(xd[b])), acc);
    if constexpr (T == QT::Q4_1)
      for (int c = 0; c < 4; c++) scal[c] = std::fma(f16(w + c * rb + 2), xs[b], scal[c]);
  }
  alignas(32) float l[8];
  _mm256_store_ps(l, _mm256_add_ps(acc, _mm256_permute_ps(acc, _MM_SHUFFLE(2, 3, 0, 1))));  // L_0 + L_1 at 2e
  res[0] = l[0] + scal[0];
  res[1] = l[4] + scal[1];
  res[2] = l[2] + scal[2];
  res[3] = l[6] + scal[3];
}
#endif

}  // namespace
