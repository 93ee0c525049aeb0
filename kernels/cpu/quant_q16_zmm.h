// The AVX-512 kernel of the q16 block-dot contract (quant_q16.h states it): 4 columns x R rows per call, for
// M = 1 (R = 1: the decode layer, gemv) and batches (quant_q16_tile.h's tile, R <= 8). Compiled into the
// AVX2 build with a target attribute and chosen at run time (have_q16_zmm(): AVX-512 F/BW/VL/DQ + VNNI).
//
// One zmm holds one row's 4 lanes of 4 columns (128-bit lane c = column c). Per block and 4 columns: the 4
// blocks' nibble bytes go into the 4 lanes of one zmm (1 load + 3 inserts), shifts and masks give the 4
// weight quarters (widened once, shared by the R rows); per row: the x quarters are 128-bit broadcasts (load
// uops only), 1 vpmaddwd + 3 vpdpwssd give I, then convert, one scale multiply (d_c * xd as [d_c x 4 | ..] times
// a broadcast xd) and one FMA for all 4 columns. So an extra row costs ~7-8 zmm uops per 4 column-blocks, 4 of
// them the int dots on port 0 (the floor), where the previous 8-lane contract paid a convert, a multiply and an
// FMA per column (as a row pair per zmm: 10 uops per 4 column-blocks and row, 6 of them on port 0).
// Q4's int-to-float of every other row is an integer add and a float subtract (exact for |I| < 2^22, which Q4's
// bound keeps: the same value as vcvtdq2ps), which can run on port 5 beside the FMAs, not on port 0 beside
// the dots: measured 3-5% faster than all converts or all add/subtracts (1 thread, 9 rows).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "quant_common.h"
#include "quant_gemm_avx512.h"
#include "quant_q16.h"

namespace {

// The x of a tile of rows as the kernel reads it: row r of block b at q + b * bq + r * 32 (perm16 order), its
// scale and block sum at d / s + b * bds + r. M = 1 reads a row-major row ({q, d, s, 32, 1}); batches read
// Q16Tiles (quant_q16_tile.h), where a tile's rows of a block are adjacent: constant address offsets per row.
struct Q16TileX {
  const int16_t* q;
  const float *d, *s;
  int64_t bq, bds;
};

#ifdef SGL_AVX512_TILE
// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own `__Y = __Y` placeholders (as quant_gemm_avx512.h)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define SGL_TARGET_Q16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define SGL_Q16_ZMM 1

// SGL_CPU_Q16_NO_TILE=1 takes the AVX2 kernels instead (what an AVX2-only CPU runs; tests compare the two)
inline bool have_q16_zmm() {
  static const bool ok = have_avx512() && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni") && std::getenv("SGL_CPU_Q16_NO_TILE") == nullptr;
  return ok;
}

// 16 bytes at p0 .. p3 (+ off) as the 4 128-bit lanes of a zmm.
SGL_TARGET_Q16 inline __m512i load4x16(const uint8_t* p, int64_t rb, int off) {
  const auto ld = [&](int c) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c * rb + off)); };
  __m512i v = _mm512_castsi128_si512(ld(0));
  v = _mm512_inserti32x4(v, ld(1), 1);
  v = _mm512_inserti32x4(v, ld(2), 2);
  return _mm512_inserti32x4(v, ld(3), 3);
}

// Q8_0's 4 weight quarters from its bytes 0-15 (lo) and 16-31 (hi) of 4 blocks, lane c = column c.
SGL_TARGET_Q16 inline void widen_q8_0(__m512i lo, __m512i hi, __m512i w[4]) {
  w[0] = _mm512_srai_epi16(_mm512_slli_epi16(lo, 8), 8);
  w[1] = _mm512_srai_epi16(lo, 8);
  w[2] = _mm512_srai_epi16(_mm512_slli_epi16(hi, 8), 8);
  w[3] = _mm512_srai_epi16(hi, 8);
}

// The 4 weight quarters of the blocks at blk + c * rb (c < 4), lane c = column c (widen_quarters2's shifts).
template <QT T>
SGL_TARGET_Q16 inline void widen_quarters4(const uint8_t* blk, int64_t rb, __m512i w[4]) {
  if constexpr (T == QT::Q8_0) {
    widen_q8_0(load4x16(blk, rb, 2), load4x16(blk, rb, 18), w);
  } else {
    const __m512i m4 = _mm512_set1_epi16(0x000F), v = load4x16(blk, rb, T == QT::Q4_0 ? 2 : 4);
    w[0] = _mm512_and_si512(v, m4);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(v, 8), m4);
    w[2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    w[3] = _mm512_srli_epi16(v, 12);
  }
}

// quantize_blocks16_scalar (quant_q16.h) with AVX-512: the same values (max is exact; vcvtps2dq rounds to
// nearest even as nearbyint does in the default rounding mode; the block sum stays a scalar sum in order j =
// 0..31), ~3x faster: x is quantized once per matmul call (decode: 4 times per layer and row).
SGL_TARGET_Q16 inline void quantize_blocks16_zmm(const float* x, int64_t nb, int16_t* q, float* d, float* s) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i lim = _mm512_set1_epi32(32767), nlim = _mm512_set1_epi32(-32767);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t i = 0; i < nb; i++) {
    const float* xb = x + i * kBlock;
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absmask), _mm512_and_ps(b, absmask)));
    float sum = 0.f;
    for (int j = 0; j < kBlock; j++) sum += xb[j];  // block_amax_sum's order
    const float dx = amax / 32767.f, id = dx != 0.f ? 1.f / dx : 0.f;
    const __m512 iv = _mm512_set1_ps(id);
    const __m512i qa = _mm512_max_epi32(nlim, _mm512_min_epi32(lim, _mm512_cvtps_epi32(_mm512_mul_ps(a, iv))));
    const __m512i qb = _mm512_max_epi32(nlim, _mm512_min_epi32(lim, _mm512_cvtps_epi32(_mm512_mul_ps(b, iv))));
    // perm16: even j first (j = 2i at position i), then odd j
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kBlock),
                        _mm512_cvtepi32_epi16(_mm512_permutex2var_epi32(qa, even, qb)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kBlock + 16),
                        _mm512_cvtepi32_epi16(_mm512_permutex2var_epi32(qa, odd, qb)));
    d[i] = dx;
    s[i] = sum;
  }
}

// x quarter q of the block at xb (perm16 order) in all 4 lanes.
SGL_TARGET_Q16 inline __m512i xquarter(const int16_t* xb, int q) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + kQuarterX[q])));
}

// ((L_0 + L_2) + (L_1 + L_3)) of each 128-bit lane, in its element 0 (lane_sums in 512 bits).
SGL_TARGET_Q16 inline __m512 lane_sums4(__m512 v) {
  const __m512 t = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
}

// The quad-packed Q8_0 layout (pack_q8_0_quad; the lm_head's copy under q16 activations): 4 rows' block b as ONE
// 136-byte record, their 4 f16 scales (8 bytes, column order), then their weight bytes 0-15 and 16-31 as the two
// 64-byte vectors load4x16 would gather (lane c = column c): 3 loads per block instead of 12 row loads, 6 inserts and
// a header gather. 4 rows take 4 * rb bytes as in GGUF, so group g starts at W + 4 g * rb in both.
constexpr int64_t kQuadRecord = 8 + 2 * 64;
// From this many rows a tile's packed reads prefetch every cache line of a record, not one per record: a block then
// takes long enough that the stream's hardware prefetch falls behind (the Q4 copies, cold, at 8 rows: 0.8x the GGUF
// rows with one line per record, 1.4x with all; fewer rows are bound by instructions, and one line is cheaper).
constexpr int kPrefetchAllRows = 4;

// P = the packed copy of N Q8_0 rows of rb bytes at W: whole groups of 4 packed, the last N % 4 rows as they are.
inline void pack_q8_0_quad(const uint8_t* W, int64_t N, int64_t rb, uint8_t* P) { pack_q8_0_lanes<4>(W, N, rb, P); }

// out[r * ldo + c] = the contract's y (+ bias[c]) (+ resid[r * ldo + c]) for column c < 4 (W rows w + c * rb, nb
// blocks; Packed: the group's quad-packed records at w) and row r < R of x; out and resid point at (the tile's first
// row, the first column). Packed reads other bytes into the same registers: the same bits.
template <QT T, int R, bool Packed = false>
SGL_TARGET_Q16 inline void dot_q16_quad(const uint8_t* w, int64_t rb, int64_t nb, const Q16TileX& x, float* out,
                                        int64_t ldo, const float* bias, const float* resid) {
  static_assert(R >= 1 && R <= 12, "rows per tile");
  static_assert(!Packed || T == QT::Q8_0, "the quad-packed layout is Q8_0's");
  constexpr int G = (R + 3) / 4;          // R > 1: the scalar terms of 4 rows x 4 columns per zmm
  constexpr bool kMagic = T != QT::Q8_0;  // Q4: |I| < 2^22, so float(I) = bits(I + 0x4B400000) - 1.5 * 2^23
  const __m512i magic_i = _mm512_set1_epi32(0x4B400000);
  const __m512 magic_f = _mm512_set1_ps(12582912.f);
  // f16 header lanes -> [d_c x 4 | ..] (Q4_1 headers convert to d0 m0 d1 m1 ..; the others to d0 d1 ..)
  const __m512i didx = T == QT::Q4_1 ? _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6)
                                     : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i midx = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);  // Q4_1: [m_c x 4 | ..]
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  __m256 scal1 = _mm256_setzero_ps();  // R = 1: header lanes x xs (Q4_1: m_c in lane 2c + 1; Q4_0: -8 d_c in lane c)
  __m512 scal[G];                      // R > 1: lane 4c + j = column c, row 4g + j
  for (int g = 0; g < G; g++) scal[g] = _mm512_setzero_ps();
  const int16_t* xq = x.q;
  const float *xd = x.d, *xs = x.s;
  for (int64_t b = 0; b < nb; b++, xq += x.bq, xd += x.bds, xs += x.bds) {
    const uint8_t* blk = w + b * (Packed ? kQuadRecord : block_bytes(T));
    __m256 hdr;
    __m512i wq[4];
    if constexpr (Packed) {  // one record: a stream; every line of it ahead once a tile's rows make a block long
      constexpr int lines = R >= kPrefetchAllRows ? int((kQuadRecord + 63) / 64) : 1;
      for (int l = 0; l < lines; l++) prefetch(blk + 64 * l);
      hdr = _mm256_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk)));
      widen_q8_0(_mm512_loadu_si512(blk + 8), _mm512_loadu_si512(blk + 72), wq);
    } else {
      // the next 4 columns' block b: one group ahead (prefetch()'s fixed kPrefetch bytes land inside this group
      // once 4 rows are longer than kPrefetch; measured on the default model, 1 thread, interleaved A/B: the
      // lm_head (Q8_0, 612-byte rows) 2.07 -> 1.64 ms, a batch-1 step 8.2 -> 8.0 ms over a 300-token context)
      for (int c = 0; c < 4; c++) __builtin_prefetch(blk + (c + 4) * rb, 0, 3);
      if constexpr (T == QT::Q4_1) {
        uint32_t h[4];
        for (int c = 0; c < 4; c++) std::memcpy(&h[c], blk + c * rb, 4);
        hdr = _mm256_cvtph_ps(_mm_setr_epi32(int(h[0]), int(h[1]), int(h[2]), int(h[3])));
      } else {
        uint16_t h[4];
        for (int c = 0; c < 4; c++) std::memcpy(&h[c], blk + c * rb, 2);
        hdr = _mm256_cvtph_ps(_mm_setr_epi16(short(h[0]), short(h[1]), short(h[2]), short(h[3]), 0, 0, 0, 0));
      }
      widen_quarters4<T>(blk, rb, wq);
    }
    const __m512 dv = _mm512_permutexvar_ps(didx, _mm512_castps256_ps512(hdr));
    if constexpr (T != QT::Q8_0) {
      if constexpr (R == 1) {
        const __m256 term = T == QT::Q4_1 ? hdr : _mm256_mul_ps(hdr, _mm256_set1_ps(-8.f));
        scal1 = _mm256_fmadd_ps(term, _mm256_set1_ps(xs[0]), scal1);
      } else {
        const __m512 mv = T == QT::Q4_1 ? _mm512_permutexvar_ps(midx, _mm512_castps256_ps512(hdr))
                                        : _mm512_mul_ps(dv, _mm512_set1_ps(-8.f));
        for (int g = 0; g < G; g++)
          scal[g] = _mm512_fmadd_ps(mv, _mm512_broadcast_f32x4(_mm_loadu_ps(xs + 4 * g)), scal[g]);
      }
    }
    for (int r = 0; r < R; r++) {
      const int16_t* xb = xq + r * kBlock;
      __m512i I = _mm512_madd_epi16(wq[0], xquarter(xb, 0));
      I = _mm512_dpwssd_epi32(I, wq[1], xquarter(xb, 1));
      I = _mm512_dpwssd_epi32(I, wq[2], xquarter(xb, 2));
      I = _mm512_dpwssd_epi32(I, wq[3], xquarter(xb, 3));
      const __m512 f = kMagic && r % 2 == 0 ? _mm512_sub_ps(_mm512_castsi512_ps(_mm512_add_epi32(I, magic_i)), magic_f)
                              : _mm512_cvtepi32_ps(I);
      acc[r] = _mm512_fmadd_ps(f, _mm512_mul_ps(dv, _mm512_set1_ps(xd[r])), acc[r]);
    }
  }
  // the scalar terms as [column 0 .. 3] per row
  alignas(64) float st[G][16];
  if constexpr (R == 1) {
    const __m256i pick = T == QT::Q4_1 ? _mm256_setr_epi32(1, 3, 5, 7, 0, 0, 0, 0) : _mm256_setr_epi32(0, 1, 2, 3, 0, 0, 0, 0);
    _mm_store_ps(st[0], _mm256_castps256_ps128(_mm256_permutevar8x32_ps(scal1, pick)));
  } else {
    for (int g = 0; g < G; g++) _mm512_store_ps(st[g], scal[g]);
  }
  for (int r = 0; r < R; r++) {
    __m128 y = _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, lane_sums4(acc[r])));
    if constexpr (T != QT::Q8_0) {
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
