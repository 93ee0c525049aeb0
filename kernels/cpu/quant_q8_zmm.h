// The AVX-512 VNNI kernel of the q8 block-dot contract (quant_q8_blocks.h states it): 8 columns x R rows per
// call, for M = 1 (R = 1: the decode layer, gemv) and batches (quant_q8_tile.h's tile, R <= 12). Compiled into
// the AVX2 build with a target attribute and chosen at run time (have_q16_zmm(): AVX-512 F/BW/VL/DQ + VNNI).
//
// One zmm holds one row's 2 lanes of 8 columns: 64-bit element e is column col(e) = e / 2 + 4 (e % 2) (the order
// two 4-column loads and an unpack give). Per block and 8 columns the weights are 4 byte vectors, element e of
// vector k = column col(e)'s weights 8k..8k+7 (Q4: the nibbles & 0xF of bytes 0-7 / 8-15, then >> 4; Q8_0:
// bytes 0-7, 8-15, 16-23, 24-31, xor 0x80), made once per tile and shared by its R rows. Per row: 4 x broadcasts
// (64-bit, load uops only) and 4 vpdpbusd (64 products each) give I, then ONE convert, scale multiply and FMA
// for the 8 columns: ~7 ALU uops per 8 column-blocks and row, where q16's 4-column kernel pays ~15.
// Converts: every other row's int-to-float is an integer add and a float subtract (exact for |I| < 2^22, which
// the contract's bound keeps; quant_q16_zmm.h says why), so they split between ports 0 and 5.
// Also here: the AVX-512 quantization of x (quantize_blocks8_zmm), the same values as the scalar code.
#pragma once

#include <cstdint>
#include <cstring>

#include "quant_common.h"
#include "quant_q16_zmm.h"
#include "quant_q8_blocks.h"

namespace {

#ifdef SGL_Q16_ZMM
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Bytes off..off+15 of the 8 blocks at blk + c * rb (c < 8) as two vectors in col() order: lo = bytes 0-7 of
// each, hi = bytes 8-15.
SGL_TARGET_Q16 inline void load8x16(const uint8_t* blk, int64_t rb, int off, __m512i& lo, __m512i& hi) {
  const __m512i v0 = load4x16(blk, rb, off), v1 = load4x16(blk + 4 * rb, rb, off);  // columns 0-3, 4-7
  lo = _mm512_unpacklo_epi64(v0, v1);
  hi = _mm512_unpackhi_epi64(v0, v1);
}

// A Q4 block's weights from its nibble bytes 0-7 (lo) and 8-15 (hi): w[0], w[1] the low nibbles (weights 0-7,
// 8-15), w[2], w[3] the high ones (16-23, 24-31).
SGL_TARGET_Q16 inline void split_nibbles(__m512i lo, __m512i hi, __m512i w[4]) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  w[0] = _mm512_and_si512(lo, m4);
  w[1] = _mm512_and_si512(hi, m4);
  w[2] = _mm512_and_si512(_mm512_srli_epi16(lo, 4), m4);
  w[3] = _mm512_and_si512(_mm512_srli_epi16(hi, 4), m4);
}

// The 4 unsigned weight byte vectors of the 8 blocks at blk + c * rb: w[k] element e = weights 8k..8k+7 of col(e).
template <QT T>
SGL_TARGET_Q16 inline void weight_bytes8(const uint8_t* blk, int64_t rb, __m512i w[4]) {
  if constexpr (T == QT::Q8_0) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));  // signed byte + 128 (the contract's init undoes it)
    load8x16(blk, rb, 2, w[0], w[1]);
    load8x16(blk, rb, 18, w[2], w[3]);
    for (int k = 0; k < 4; k++) w[k] = _mm512_xor_si512(w[k], flip);
  } else {
    __m512i lo, hi;
    load8x16(blk, rb, T == QT::Q4_0 ? 2 : 4, lo, hi);
    split_nibbles(lo, hi, w);
  }
}

// quantize_blocks8_scalar (quant_q8_blocks.h) with AVX-512: the same values (max is exact, vcvtps2dq rounds to
// nearest even as nearbyint does in the default rounding mode, |x * id| < 127.5 so the clamp never binds), ~4x
// faster: the x of every matmul is quantized once per call (decode: 4 times per layer and row).
SGL_TARGET_Q16 inline void quantize_blocks8_zmm(const float* x, int64_t nb, int8_t* q, float* d, float* s,
                                                int32_t* c) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
  for (int64_t i = 0; i < nb; i++) {
    const __m512 a = _mm512_loadu_ps(x + i * kBlock), b = _mm512_loadu_ps(x + i * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absmask), _mm512_and_ps(b, absmask)));
    const float dx = amax / 127.f, id = dx != 0.f ? 1.f / dx : 0.f;
    const __m512 iv = _mm512_set1_ps(id);
    const __m512i qa = _mm512_max_epi32(nlim, _mm512_min_epi32(lim, _mm512_cvtps_epi32(_mm512_mul_ps(a, iv))));
    const __m512i qb = _mm512_max_epi32(nlim, _mm512_min_epi32(lim, _mm512_cvtps_epi32(_mm512_mul_ps(b, iv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kBlock), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kBlock + 16), _mm512_cvtsepi32_epi8(qb));
    const __m512i t = _mm512_add_epi32(qa, qb);  // j and j + 16 are in the same lane S_l (bit 2 of j)
    const int32_t l0 = _mm512_mask_reduce_add_epi32(0x0F0F, t), l1 = _mm512_mask_reduce_add_epi32(0xF0F0, t);
    put_block_terms8(i, l0, l1, dx, d, s, c);
  }
}

// 8 bytes at p in every 64-bit element.
SGL_TARGET_Q16 inline __m512i bcast8(const void* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return _mm512_set1_epi64(v);
}

// The oct-packed layout (pack_oct; the lm_head's copy and, under q8 activations, the layers' weights): 8 rows'
// block b as ONE record of 8 * block_bytes(T) bytes, so 8 rows take 8 * rb bytes as in GGUF and group g starts at
// W + 8 g * rb in both. A record is the 8 columns' headers in column order (f16 d, or d m for Q4_1: kOctHeader
// bytes), then the byte vectors weight_bytes8 gathers, element e = column col(e): Q8_0 its 4 vectors already flipped
// to unsigned; Q4_0 / Q4_1 the 2 nibble vectors (bytes 0-7, 8-15) it splits into 4. A block is then one header load
// and 4 (2) 64-byte loads instead of 16 row loads, inserts and unpacks.
template <QT T>
constexpr int64_t kOctRecord = 8 * block_bytes(T);
template <QT T>
constexpr int64_t kOctHeader = T == QT::Q4_1 ? 32 : 16;

// P = the packed copy of N rows of rb bytes at W: whole groups of 8 packed (Q8_0 flipped to unsigned), the last
// N % 8 rows as they are.
template <QT T>
inline void pack_oct(const uint8_t* W, int64_t N, int64_t rb, uint8_t* P) {
  pack_groups<T, 8>(W, N, rb, P, 0x80);
}

// out[r * ldo + c] = the contract's y (+ bias[c]) (+ resid[r * ldo + c]) for column c < 8 (W rows w + c * rb, nb
// blocks; Packed: the group's oct-packed records at w) and row r < R of x; out and resid point at (the tile's first
// row, the first column). Packed reads other bytes into the same registers: the same bits.
template <QT T, int R, bool Packed = false>
SGL_TARGET_Q16 inline void dot_q8_oct(const uint8_t* w, int64_t rb, int64_t nb, const Q8TileX& x, float* out,
                                      int64_t ldo, const float* bias, const float* resid) {
  static_assert(R >= 1 && R <= 12, "rows per tile");
  constexpr int G = R == 1 ? 1 : (R + 1) / 2;  // Q4_1's scalar terms: lane 2e + j = column col(e), row 2g + j
  constexpr int corr = T == QT::Q8_0 ? 2 : 0;  // Q4_0: c_0, c_1; Q8_0: c_2, c_3
  const __m512i magic_i = _mm512_set1_epi32(0x4B400000);  // float(I) = bits(I + 0x4B400000) - 1.5 * 2^23
  const __m512 magic_f = _mm512_set1_ps(12582912.f);
  // f16 header lanes -> d of col(e) in lanes 2e, 2e + 1 (Q4_1 headers convert to d0 m0 d1 m1 ..)
  const __m512i didx = T == QT::Q4_1 ? _mm512_setr_epi32(0, 0, 8, 8, 2, 2, 10, 10, 4, 4, 12, 12, 6, 6, 14, 14)
                                     : _mm512_setr_epi32(0, 0, 4, 4, 1, 1, 5, 5, 2, 2, 6, 6, 3, 3, 7, 7);
  const __m512i midx = _mm512_setr_epi32(1, 1, 9, 9, 3, 3, 11, 11, 5, 5, 13, 13, 7, 7, 15, 15);
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  __m512 scal[G];
  for (int g = 0; g < G; g++) scal[g] = _mm512_setzero_ps();
  const int8_t* xq = x.q;
  const float *xd = x.d, *xs = x.s;
  const int32_t* xc = x.c;
  for (int64_t b = 0; b < nb; b++, xq += x.bq, xd += x.bds, xs += x.bds, xc += x.bc) {
    __m512i wq[4];
    __m512 hdr;
    if constexpr (Packed) {  // one record: a stream the prefetcher follows
      const uint8_t* rec = w + b * kOctRecord<T>;
      // every cache line of the record ahead from kPrefetchAllRows rows (quant_q16_zmm.h says why), else one
      constexpr int lines = R >= kPrefetchAllRows ? int((kOctRecord<T> + 63) / 64) : 1;
      for (int l = 0; l < lines; l++) prefetch(rec + 64 * l);
      if constexpr (T == QT::Q4_1) {
        hdr = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec)));
      } else {
        hdr = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec))));
      }
      const uint8_t* body = rec + kOctHeader<T>;
      if constexpr (T == QT::Q8_0) {
        for (int k = 0; k < 4; k++) wq[k] = _mm512_loadu_si512(body + 64 * k);
      } else {
        split_nibbles(_mm512_loadu_si512(body), _mm512_loadu_si512(body + 64), wq);
      }
    } else {
      const uint8_t* blk = w + b * block_bytes(T);
      // the next 8 columns' block b: one group ahead (prefetch()'s fixed kPrefetch bytes land inside this group's
      // 8 rows once 8 rows are longer than kPrefetch; measured on the default model, 1 thread, interleaved A/B:
      // a batch-1 step over a 300-token context 8.7 -> 7.8 ms, the lm_head 2.3 -> 1.5 ms)
      for (int c = 0; c < 8; c++) __builtin_prefetch(blk + (c + 8) * rb, 0, 3);
      if constexpr (T == QT::Q4_1) {
        uint32_t h[8];
        for (int c = 0; c < 8; c++) std::memcpy(&h[c], blk + c * rb, 4);
        hdr = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
      } else {
        uint16_t h[8];
        for (int c = 0; c < 8; c++) std::memcpy(&h[c], blk + c * rb, 2);
        hdr = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))));
      }
      weight_bytes8<T>(blk, rb, wq);
    }
    const __m512 dv = _mm512_permutexvar_ps(didx, hdr);
    if constexpr (T == QT::Q4_1) {
      const __m512 mv = _mm512_permutexvar_ps(midx, hdr);
      if constexpr (R == 1) {
        scal[0] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[0]), scal[0]);
      } else {
        for (int g = 0; g < G; g++) scal[g] = _mm512_fmadd_ps(mv, _mm512_castsi512_ps(bcast8(xs + 2 * g)), scal[g]);
      }
    }
    for (int r = 0; r < R; r++) {
      const int8_t* xb = xq + r * kBlock;
      __m512i I = T == QT::Q4_1 ? _mm512_setzero_si512() : bcast8(xc + r * kQ8Corr + corr);
      for (int k = 0; k < 4; k++) I = _mm512_dpbusd_epi32(I, wq[k], bcast8(xb + 8 * k));
      const __m512 f = r % 2 == 0 ? _mm512_sub_ps(_mm512_castsi512_ps(_mm512_add_epi32(I, magic_i)), magic_f)
                                  : _mm512_cvtepi32_ps(I);
      acc[r] = _mm512_fmadd_ps(f, _mm512_mul_ps(dv, _mm512_set1_ps(xd[r])), acc[r]);
    }
  }
  // lane 2e after the pair add: (L_0 + L_1) of col(e); column c is lane pick[c] = 4 (c % 4) + 2 (c / 4)
  const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i pick1 = _mm512_add_epi32(pick, _mm512_set1_epi32(1));
  for (int r = 0; r < R; r++) {
    const __m512 t = _mm512_add_ps(acc[r], _mm512_permute_ps(acc[r], _MM_SHUFFLE(2, 3, 0, 1)));
    __m256 y = _mm512_castps512_ps256(_mm512_permutexvar_ps(pick, t));
    if constexpr (T == QT::Q4_1) {
      const __m512 sr = _mm512_permutexvar_ps(r % 2 ? pick1 : pick, scal[R == 1 ? 0 : r / 2]);
      y = _mm256_add_ps(y, _mm512_castps512_ps256(sr));
    }
    if (bias != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(bias));
    if (resid != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(resid + r * ldo));
    _mm256_storeu_ps(out + r * ldo, y);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

}  // namespace
