// The AVX-512 VNNI kernel of the q8 block-dot contract (quant_q8_blocks.h states it): 4 columns x R rows per
// call, for M = 1 (R = 1: the decode layer, gemv) and batches (quant_q8_tile.h's tile, R <= 12). Compiled into
// the AVX2 build with a target attribute and chosen at run time (have_q16_zmm(): AVX-512 F/BW/VL/DQ + VNNI).
//
// The layout is dot_q16_quad's (quant_q16_zmm.h): one zmm holds one row's 4 lanes of 4 columns (128-bit lane
// c = column c), the float part is the same code (Q4_1's scalar term too; Q4_0 has none here). What changes is
// the integer part: per block and 4 columns the weights are 2 byte vectors (Q4: nibbles & 0xF and >> 4 & 0xF of
// one 16-byte load per column; Q8_0: the two 16-byte halves xor 0x80), shared by the R rows; per row 2 x
// broadcasts (load uops) and 2 vpdpbusd give I (64 products each) where q16 needs 4 int16 dots. So an extra row
// costs ~5 zmm ALU uops per 4 column-blocks (2 dots, convert, scale multiply, FMA; Q4_0's and Q8_0's init is a
// broadcast load), q16's ~7-8.
#pragma once

#include <cstdint>
#include <cstring>

#include "quant_common.h"
#include "quant_q16_zmm.h"
#include "quant_q8_blocks.h"

namespace {

// The x of a tile of rows as the kernel reads it: row r of block b at q + b * bq + r * 32, its scale and block
// sum at d / s + b * bds + r, its kQ8Corr lane corrections at c + b * bc + r * kQ8Corr. M = 1 reads a row-major
// row ({q, d, s, c, 32, 1, kQ8Corr}); batches read Q8Tiled (quant_q8_tile.h), a tile's rows of a block adjacent.
struct Q8TileX {
  const int8_t* q;
  const float *d, *s;
  const int32_t* c;
  int64_t bq, bds, bc;
};

#ifdef SGL_Q16_ZMM
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// The 2 unsigned weight byte vectors of the blocks at blk + c * rb (c < 4): lo = weights 0..15, hi = 16..31.
template <QT T>
SGL_TARGET_Q16 inline void weight_bytes4(const uint8_t* blk, int64_t rb, __m512i& lo, __m512i& hi) {
  if constexpr (T == QT::Q8_0) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));  // signed byte + 128 (the contract's init undoes it)
    lo = _mm512_xor_si512(load4x16(blk, rb, 2), flip);
    hi = _mm512_xor_si512(load4x16(blk, rb, 18), flip);
  } else {
    const __m512i m4 = _mm512_set1_epi8(0x0F), v = load4x16(blk, rb, T == QT::Q4_0 ? 2 : 4);
    lo = _mm512_and_si512(v, m4);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
  }
}

// out[r * ldo + c] = the contract's y (+ bias[c]) (+ resid[r * ldo + c]) for column c < 4 (W rows w + c * rb, nb
// blocks) and row r < R of x; out and resid point at (the tile's first row, the first column).
template <QT T, int R>
SGL_TARGET_Q16 inline void dot_q8_quad(const uint8_t* w, int64_t rb, int64_t nb, const Q8TileX& x, float* out,
                                       int64_t ldo, const float* bias, const float* resid) {
  static_assert(R >= 1 && R <= 12, "rows per tile");
  constexpr int G = (R + 3) / 4;  // R > 1: the scalar terms of 4 rows x 4 columns per zmm
  // |I| < 2^22 for every type: float(I) = bits(I + 0x4B400000) - 1.5 * 2^23 (quant_q16_zmm.h: on port 5)
  const __m512i magic_i = _mm512_set1_epi32(0x4B400000);
  const __m512 magic_f = _mm512_set1_ps(12582912.f);
  const __m512i didx = T == QT::Q4_1 ? _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6)
                                     : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i midx = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  __m256 scal1 = _mm256_setzero_ps();
  __m512 scal[G];
  for (int g = 0; g < G; g++) scal[g] = _mm512_setzero_ps();
  const int8_t* xq = x.q;
  const float *xd = x.d, *xs = x.s;
  const int32_t* xc = x.c;
  for (int64_t b = 0; b < nb; b++, xq += x.bq, xd += x.bds, xs += x.bds, xc += x.bc) {
    const uint8_t* blk = w + b * block_bytes(T);
    for (int c = 0; c < 4; c++) prefetch(blk + c * rb);
    __m256 hdr;  // as dot_q16_quad
    if constexpr (T == QT::Q4_1) {
      uint32_t h[4];
      for (int c = 0; c < 4; c++) std::memcpy(&h[c], blk + c * rb, 4);
      hdr = _mm256_cvtph_ps(_mm_setr_epi32(int(h[0]), int(h[1]), int(h[2]), int(h[3])));
    } else {
      uint16_t h[4];
      for (int c = 0; c < 4; c++) std::memcpy(&h[c], blk + c * rb, 2);
      hdr = _mm256_cvtph_ps(_mm_setr_epi16(short(h[0]), short(h[1]), short(h[2]), short(h[3]), 0, 0, 0, 0));
    }
    const __m512 dv = _mm512_permutexvar_ps(didx, _mm512_castps256_ps512(hdr));
    if constexpr (T == QT::Q4_1) {
      if constexpr (R == 1) {
        scal1 = _mm256_fmadd_ps(hdr, _mm256_set1_ps(xs[0]), scal1);  // m_c in lane 2c + 1
      } else {
        const __m512 mv = _mm512_permutexvar_ps(midx, _mm512_castps256_ps512(hdr));
        for (int g = 0; g < G; g++)
          scal[g] = _mm512_fmadd_ps(mv, _mm512_broadcast_f32x4(_mm_loadu_ps(xs + 4 * g)), scal[g]);
      }
    }
    __m512i lo, hi;
    weight_bytes4<T>(blk, rb, lo, hi);
    for (int r = 0; r < R; r++) {
      const int8_t* xb = xq + r * kBlock;
      constexpr int corr = T == QT::Q8_0 ? 4 : 0;  // Q4_0: c_0..3, Q8_0: c_4..7
      const __m512i init = T == QT::Q4_1
          ? _mm512_setzero_si512()
          : _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xc + r * kQ8Corr + corr)));
      __m512i I = _mm512_dpbusd_epi32(init, lo,
                                      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb))));
      I = _mm512_dpbusd_epi32(I, hi, _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16))));
      const __m512 f = r % 2 == 0 ? _mm512_sub_ps(_mm512_castsi512_ps(_mm512_add_epi32(I, magic_i)), magic_f)
                                  : _mm512_cvtepi32_ps(I);
      acc[r] = _mm512_fmadd_ps(f, _mm512_mul_ps(dv, _mm512_set1_ps(xd[r])), acc[r]);
    }
  }
  alignas(64) float st[G][16];
  if constexpr (R == 1) {
    const __m256i pick = _mm256_setr_epi32(1, 3, 5, 7, 0, 0, 0, 0);
    _mm_store_ps(st[0], _mm256_castps256_ps128(_mm256_permutevar8x32_ps(scal1, pick)));
  } else {
    for (int g = 0; g < G; g++) _mm512_store_ps(st[g], scal[g]);
  }
  for (int r = 0; r < R; r++) {
    __m128 y = _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, lane_sums4(acc[r])));
    if constexpr (T == QT::Q4_1) {
      const float* sg = st[r / 4] + r % 4;
      y = _mm_add_ps(y, R == 1 ? _mm_load_ps(st[0]) : _mm_setr_ps(sg[0], sg[4], sg[8], sg[12]));
    }
    if (bias != nullptr) y = _mm_add_ps(y, _mm_loadu_ps(bias));
    if (resid != nullptr) y = _mm_add_ps(y, _mm_loadu_ps(resid + r * ldo));
    _mm_storeu_ps(out + r * ldo, y);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

}  // namespace
