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

// Block i's terms from its lane sums l0, l1 (sum of q_j over S_0, S_1) and scale dx: the corrections c, d, the
// quantized sum s (every quantizer of q8 activations ends here).
inline void put_block_terms8(int64_t i, int32_t l0, int32_t l1, float dx, float* d, float* s, int32_t* c) {
  c[i * kQ8Corr + 0] = -8 * l0;
  c[i * kQ8Corr + 1] = -8 * l1;
  c[i * kQ8Corr + 2] = -128 * l0;
  c[i * kQ8Corr + 3] = -128 * l1;
  d[i] = dx;
  s[i] = dx * float(l0 + l1);
}

// nb blocks of x -> q [nb * 32], d [nb], s [nb], c [nb * kQ8Corr], in scalar code (below: the AVX2 twin;
// quant_q8_zmm.h has the AVX-512 one; quant_q8_tile.h's quantize_blocks8 chooses). Pointers: a row of a batch
// writes its part in place.
inline void quantize_blocks8_scalar(const float* x, int64_t nb, int8_t* q, float* d, float* s, int32_t* c) {
  for (int64_t i = 0; i < nb; i++) {
    const float* xb = x + i * kBlock;
    float amax = 0.f;
    for (int j = 0; j < kBlock; j++) amax = std::max(amax, std::fabs(xb[j]));
    const float dx = amax / 127.f, id = dx != 0.f ? 1.f / dx : 0.f;
    int32_t lane[2] = {};
    for (int j = 0; j < kBlock; j++) {
      const int v = int(std::max(-127.f, std::min(127.f, std::nearbyint(xb[j] * id))));
      q[i * kBlock + j] = int8_t(v);
      lane[(j >> 2) & 1] += v;  // j in S_l
    }
    put_block_terms8(i, lane[0], lane[1], dx, d, s, c);
  }
}

#ifdef SGL_AVX2
// quantize_blocks8_scalar in AVX2 (the same values: quant_common.h's block_ints8, and integer lane sums are exact in
// any order), ~9x faster: on a machine without AVX-512 the scalar loop was ~0.4 ms of a ~6.5 ms
// decode step (4 quantizations per layer and row) and ~1/5 of a verify row's extra cost.
inline void quantize_blocks8_avx2(const float* x, int64_t nb, int8_t* q, float* d, float* s, int32_t* c) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs' 4-byte groups back to j order
  for (int64_t i = 0; i < nb; i++) {
    __m256i qi[4];
    const float dx = block_ints8(x + i * kBlock, 127.f, qi);
    // S_l (bit 2 of j): elements 0-3 of each 8 are lane 0, 4-7 lane 1
    const __m256i t = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    __m128i l = _mm_hadd_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    l = _mm_hadd_epi32(l, l);  // [l0, l1, l0, l1]
    const int32_t l0 = _mm_cvtsi128_si32(l), l1 = _mm_extract_epi32(l, 1);
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kBlock), _mm256_permutevar8x32_epi32(b, order));
    put_block_terms8(i, l0, l1, dx, d, s, c);
  }
}
#endif

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

// The x of a tile of rows as the kernels read it: row r of block b at q + b * bq + r * 32, its scale and block
// sum at d / s + b * bds + r, its kQ8Corr lane corrections at c + b * bc + r * kQ8Corr. M = 1 reads a row-major
// row ({q, d, s, c, 32, 1, kQ8Corr}); batches read Q8Tiled (quant_q8_tile.h), a tile's rows of a block adjacent.
struct Q8TileX {
  const int8_t* q;
  const float *d, *s;
  const int32_t* c;
  int64_t bq, bds, bc;
};

#ifdef SGL_AVX2
// The quad-packed layout of the AVX2 kernel (pack_quad8; the copies of q8 activations where the AVX-512 oct layout
// does not run): 4 rows' block b as ONE record of 4 * block_bytes(T) bytes, so group g starts at W + 4 g * rb as in
// GGUF. A record is the 4 columns' headers in column order (f16 d, or d m for Q4_1: kQuad8Header bytes), then the
// 32-byte vectors dot_q8_quad unpacks from GGUF rows, element e = column (e >> 1) + 2 (e & 1): Q8_0 its 4 vectors
// (bytes 0-7, 8-15, 16-23, 24-31 of each column), Q4_0 / Q4_1 the 2 nibble vectors (bytes 0-7, 8-15). A block is
// then one header load and 4 (2) contiguous loads from ONE stream instead of 4 rows' loads, inserts and unpacks.
template <QT T>
constexpr int64_t kQuad8Record = 4 * block_bytes(T);
template <QT T>
constexpr int64_t kQuad8Header = T == QT::Q4_1 ? 16 : 8;

// P = the packed copy of N rows of rb bytes at W in groups of G rows (pack_quad8: 4, quant_q8_zmm.h's pack_oct: 8):
// group g's block b as one record of G * block_bytes(T) bytes, the G columns' headers in column order (hb bytes
// each), then the byte vectors k (Q8_0: 4, Q4: 2) of G 8-byte elements, element e = bytes 8k..8k+7 of column
// e / 2 + G / 2 (e % 2) (Q8_0's bytes xor `flip`); the last N % G rows as they are.
template <QT T, int G>
inline void pack_groups(const uint8_t* W, int64_t N, int64_t rb, uint8_t* P, uint8_t flip) {
  constexpr int64_t bs = block_bytes(T), hb = T == QT::Q4_1 ? 4 : 2, rec = G * bs;
  const int64_t nb = rb / bs, full = N / G * G;
  for (int64_t g = 0; g < full / G; g++)
    for (int64_t b = 0; b < nb; b++) {
      uint8_t* o = P + (g * nb + b) * rec;
      for (int c = 0; c < G; c++) std::memcpy(o + hb * c, W + (g * G + c) * rb + b * bs, hb);
      constexpr int vectors = T == QT::Q8_0 ? 4 : 2;
      for (int k = 0; k < vectors; k++)
        for (int e = 0; e < G; e++) {
          const uint8_t* src = W + (g * G + e / 2 + G / 2 * (e % 2)) * rb + b * bs + hb + 8 * k;
          uint8_t* dst = o + G * hb + G * 8 * k + 8 * e;
          for (int j = 0; j < 8; j++) dst[j] = T == QT::Q8_0 ? uint8_t(src[j] ^ flip) : src[j];
        }
    }
  std::memcpy(P + full * rb, W + full * rb, (N - full) * rb);
}

template <QT T>
inline void pack_quad8(const uint8_t* W, int64_t N, int64_t rb, uint8_t* P) {
  pack_groups<T, 4>(W, N, rb, P, 0);
}

// The contract for 4 columns (W rows w + c * rb, c < 4) x R rows of x (AVX2 CPUs without AVX-512 VNNI; R = 1 is
// the decode gemv): out[r * ldo + c] (+ bias[c]) (+ resid[r * ldo + c]). One ymm holds a row's 2 lanes of 4
// columns, 64-bit element e = column (e >> 1) + 2 (e & 1) (the order of two 2-column loads and an unpack); the 4
// weight vectors are unpacked once per block for all R rows. I_l without VNNI: vpmaddubsw (u8 x s8 -> int16
// pairs) then vpmaddwd by 1 (-> the int32 lane of 4 bytes, vpdpbusd's partition). Q4: nibble x x pairs are at
// most 2 * 15 * 127, so the 4 vectors' int16 pairs add up exactly (<= 15240) before ONE vpmaddwd per row and
// block (llama.cpp's AVX2 Q4 dot does the same); Q4_0's -8 is the correction c_l. Q8_0: |w| x x * sign(w), at
// most 2 * 128 * 127 < 2^15 per vector but not for two: a vpmaddwd per vector. Integer sums are exact in any
// order: the bits of the scalar contract.
// Packed: w is the group's quad-packed records (pack_quad8): the same registers from other bytes, the same bits.
template <QT T, int R, bool Packed = false>
inline void dot_q8_quad(const uint8_t* w, int64_t rb, int64_t nb, const Q8TileX& x, float* out, int64_t ldo,
                        const float* bias, const float* resid) {
  static_assert(R >= 1 && R <= kAvx2TileRows, "rows per tile");
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
  const auto load2 = [&](const uint8_t* blk, int c, int off) {  // bytes off..off+15 of columns c, c + 1
    return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(blk + (c + 1) * rb + off),
                               reinterpret_cast<const __m128i*>(blk + c * rb + off));
  };
  const auto split = [&](__m256i lo, __m256i hi, __m256i* q) {  // Q4: bytes 0-7 / 8-15 -> weights 8k..8k+7
    q[0] = _mm256_and_si256(lo, m4);
    q[1] = _mm256_and_si256(hi, m4);
    q[2] = _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4);
    q[3] = _mm256_and_si256(_mm256_srli_epi16(hi, 4), m4);
  };
  __m256 acc[R];
  __m128 scal[R];
  for (int r = 0; r < R; r++) {
    acc[r] = _mm256_setzero_ps();
    scal[r] = _mm_setzero_ps();
  }
  const int8_t* xq = x.q;
  const float *xd = x.d, *xs = x.s;
  const int32_t* xc = x.c;
  for (int64_t b = 0; b < nb; b++, xq += x.bq, xd += x.bds, xs += x.bds, xc += x.bc) {
    __m256i wq[4];
    __m256 dv;
    __m128 mv = _mm_setzero_ps();
    if constexpr (Packed) {  // one record: one stream, every cache line of it prefetched
      const uint8_t* rec = w + b * kQuad8Record<T>;
      for (int l = 0; l < int((kQuad8Record<T> + 63) / 64); l++) prefetch(rec + 64 * l);
      if constexpr (T == QT::Q4_1) {  // d0 m0 d1 m1 d2 m2 d3 m3
        const __m256 hdr = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec)));
        dv = _mm256_permutevar8x32_ps(hdr, _mm256_setr_epi32(0, 0, 4, 4, 2, 2, 6, 6));
        mv = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(hdr, _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7)));
      } else {
        const __m128 h = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rec)));
        dv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(h), _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3));
      }
      const uint8_t* body = rec + kQuad8Header<T>;
      if constexpr (T == QT::Q8_0) {
        for (int k = 0; k < 4; k++) wq[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(body + 32 * k));
      } else {
        split(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(body)),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(body + 32)), wq);
      }
    } else {
      const uint8_t* blk = w + b * block_bytes(T);
      for (int c = 0; c < 4; c++) prefetch(blk + c * rb);
      if constexpr (T == QT::Q8_0) {
        const __m256i l01 = load2(blk, 0, 2), l23 = load2(blk, 2, 2), h01 = load2(blk, 0, 18), h23 = load2(blk, 2, 18);
        wq[0] = _mm256_unpacklo_epi64(l01, l23);
        wq[1] = _mm256_unpackhi_epi64(l01, l23);
        wq[2] = _mm256_unpacklo_epi64(h01, h23);
        wq[3] = _mm256_unpackhi_epi64(h01, h23);
      } else {
        constexpr int off = T == QT::Q4_0 ? 2 : 4;
        const __m256i v01 = load2(blk, 0, off), v23 = load2(blk, 2, off);
        split(_mm256_unpacklo_epi64(v01, v23), _mm256_unpackhi_epi64(v01, v23), wq);
      }
      const float d0 = f16(blk), d1 = f16(blk + rb), d2 = f16(blk + 2 * rb), d3 = f16(blk + 3 * rb);
      dv = _mm256_setr_ps(d0, d0, d2, d2, d1, d1, d3, d3);
      if constexpr (T == QT::Q4_1)
        mv = _mm_setr_ps(f16(blk + 2), f16(blk + rb + 2), f16(blk + 2 * rb + 2), f16(blk + 3 * rb + 2));
    }
    __m256i ua[4];  // Q8_0: |w| (the unsigned operand), once per block for all rows
    if constexpr (T == QT::Q8_0)
      for (int k = 0; k < 4; k++) ua[k] = _mm256_sign_epi8(wq[k], wq[k]);
    for (int r = 0; r < R; r++) {
      const int8_t* xb = xq + r * kBlock;
      const auto xk = [&](int k) {
        int64_t v;
        std::memcpy(&v, xb + 8 * k, 8);
        return _mm256_set1_epi64x(v);
      };
      __m256i I;
      if constexpr (T == QT::Q8_0) {
        I = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++)
          I = _mm256_add_epi32(I, _mm256_madd_epi16(_mm256_maddubs_epi16(ua[k], _mm256_sign_epi8(xk(k), wq[k])), ones));
      } else {
        __m256i p = _mm256_maddubs_epi16(wq[0], xk(0));
        for (int k = 1; k < 4; k++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(wq[k], xk(k)));
        I = _mm256_madd_epi16(p, ones);
        if constexpr (T == QT::Q4_0) {
          int64_t cv;
          std::memcpy(&cv, xc + r * kQ8Corr, 8);
          I = _mm256_add_epi32(I, _mm256_set1_epi64x(cv));
        }
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), _mm256_mul_ps(dv, _mm256_set1_ps(xd[r])), acc[r]);
      if constexpr (T == QT::Q4_1) scal[r] = _mm_fmadd_ps(mv, _mm_set1_ps(xs[r]), scal[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    const __m256 t = _mm256_add_ps(acc[r], _mm256_permute_ps(acc[r], _MM_SHUFFLE(2, 3, 0, 1)));  // L_0 + L_1 at 2e
    const __m128 even = _mm_shuffle_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1), _MM_SHUFFLE(2, 0, 2, 0));
    __m128 y = _mm_permute_ps(even, _MM_SHUFFLE(3, 1, 2, 0));  // columns 0..3 (elements 0, 4, 2, 6 of t)
    if constexpr (T == QT::Q4_1) y = _mm_add_ps(y, scal[r]);
    if (bias != nullptr) y = _mm_add_ps(y, _mm_loadu_ps(bias));
    if (resid != nullptr) y = _mm_add_ps(y, _mm_loadu_ps(resid + r * ldo));
    _mm_storeu_ps(out + r * ldo, y);
  }
}
#endif

}  // namespace
