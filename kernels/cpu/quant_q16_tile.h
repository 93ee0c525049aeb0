// The q16 small-M GEMM (2 <= M <= kQ16MaxRows) for quant_gemm.cpp (included there, after quant_q16.h):
// batch-invariant, i.e. every row gets the SAME BITS as the M = 1 path (gemv_rows) on that row alone.
//
// The contract, per output column c and row r (what dot_q16_cols4 / dot_q16_cols<T, 1> do at M = 1):
//   8 fp32 lanes; per block b in order: lane l += float(int32 dot of the x positions {2l, 2l+1} of both
//   16-wide halves (the perm16 order) with the widened weights) * (d_c * xd_rb)   (one cvt, one mul, one fma)
//   scal = fma(m_c, xs_rb, scal)  (Q4_1)  |  fma(-8 d_c, xs_rb, scal)  (Q4_0)  |  none (Q8_0)
//   y = hsum(lanes) + scal (+ bias) (+ residual)         (hsum: quant_common.h's tree)
// Integer sums are exact, so only the partition of products into lanes matters, not the instruction that
// adds them; each fp32 operation above is one IEEE rounding whatever the vector width. So a zmm holding two
// rows' 8 lanes side by side ([row r | row r+1]) computes each row exactly as the ymm kernel does.
//
// Why a zmm row pair: the arithmetic per (block, column, 8 lanes) is fixed by the contract (int dot, cvt, scale
// mul, fma); 512-bit ops do it for two rows at once on the two zmm ports, and each weight block is widened
// once per tile and serves 2 * P rows (C columns x 2P rows register tile; P pairs of x in registers).
// Compiled into the AVX2 build with a target attribute and chosen at run time (have_q16_tile(): AVX-512
// F/BW/VL/DQ + VNNI); elsewhere (AVX2 only, the scalar build) gemm runs gemv_rows per row: same bits too.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "quant_common.h"
#include "quant_q16.h"

namespace {

// Rows up to which gemm runs q16 activations (the default act mode): decode batches and speculative verify rows
// are batch-invariant up to here. Above it (prefill) the fp32 / MKL paths are faster. Mirrored by quant.py.
constexpr int64_t kQ16MaxRows = 64;
// Rows from which the row-pair tile runs (where the machine has it); fewer rows run gemm_q16_rows, whose
// 256-bit row pairs were faster there (1 thread, 3072 x 576 Q4_1: M = 2 0.115 vs 0.140 ms, M = 3 equal, M = 4
// 0.220 vs 0.193).
constexpr int64_t kQ16TileMinRows = 4;

// x of a q16 batch re-laid for the row-pair tile: pair p = rows 2p, 2p + 1 (an odd M's last pair has a zero row).
//   q: [P][nb][64] int16 per block: x0 of row 2p | x0 of row 2p+1 | x1 of row 2p | x1 of row 2p+1 (x0 = the
//      block's first 16 perm16 values, x1 the last 16), so one zmm load gives a pair's half block.
//   d: [P][nb][2]: xd of rows 2p, 2p+1 (the activation scales).
//   s: [nb][ld] the block sums transposed (ld >= 2P + 16: a 16-row vector load from any pair stays inside).
struct Q16Pairs {
  std::vector<int16_t> q;
  std::vector<float> d, s;
  int64_t pairs = 0, nb = 0, ld = 0;
};

// Sizes p for M rows of nb blocks (zeroed: an odd M's last pair has a zero row); pack_row then fills row r.
inline void size_pairs(int64_t M, int64_t nb, Q16Pairs& p) {
  p.pairs = (M + 1) / 2;
  p.nb = nb;
  p.ld = 2 * p.pairs + 16;
  p.q.assign(p.pairs * nb * 64, 0);
  p.d.assign(p.pairs * nb * 2, 0.f);
  p.s.assign(nb * p.ld, 0.f);
}

// Row r of p from its q16 blocks (q [nb * 32], d [nb], s [nb]); rows write disjoint parts of p.
inline void pack_row(const int16_t* q, const float* d, const float* s, int64_t r, Q16Pairs& p) {
  const int64_t pr = r / 2, h = r % 2;
  for (int64_t b = 0; b < p.nb; b++) {
    const int16_t* src = q + b * kBlock;
    int16_t* dst = p.q.data() + (pr * p.nb + b) * 64;
    std::memcpy(dst + 16 * h, src, 16 * sizeof(int16_t));
    std::memcpy(dst + 32 + 16 * h, src + 16, 16 * sizeof(int16_t));
    p.d[(pr * p.nb + b) * 2 + h] = d[b];
    p.s[b * p.ld + r] = s[b];
  }
}

inline void pack_pairs(const Q16Act& a, int64_t M, Q16Pairs& p) {
  size_pairs(M, a.nb, p);
  for (int64_t r = 0; r < M; r++) pack_row(a.q + r * a.k, a.d + r * a.nb, a.s + r * a.nb, r, p);
}

#ifdef SGL_AVX512_TILE
// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own `__Y = __Y` placeholders (as quant_gemm_avx512.h)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define SGL_TARGET_Q16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

// SGL_CPU_Q16_NO_TILE=1 takes the per-row path instead (what an AVX2-only CPU runs; a test compares the two)
inline bool have_q16_tile() {
  static const bool ok = have_avx512() && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni") && std::getenv("SGL_CPU_Q16_NO_TILE") == nullptr;
  return ok;
}

// widen16 (quant_q16.h) in both 256-bit halves: even = [weights 0, 2, .., 30 | the same], odd likewise.
template <QT T>
SGL_TARGET_Q16 inline void widen16x2(const uint8_t* blk, __m512i& even, __m512i& odd) {
  if constexpr (T == QT::Q8_0) {
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)));
    even = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);
    odd = _mm512_srai_epi16(v, 8);
  } else {
    const __m512i m4 = _mm512_set1_epi16(0x000F);
    const __m512i v = _mm512_srlv_epi32(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QT::Q4_0 ? 2 : 4)))),
        _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4));
    even = _mm512_and_si512(v, m4);
    odd = _mm512_and_si512(_mm512_srli_epi16(v, 8), m4);
  }
}

// res[c * 2P + j] = dot(W row w + c * rb, x row 2 * p0 + j) for c < C, j < 2P, by the contract above.
template <QT T, int C, int P>
SGL_TARGET_Q16 inline void dot_q16_tile(const uint8_t* w, int64_t rb, const Q16Pairs& a, int64_t p0, float* res) {
  __m512 acc[C][P];
  __m512 scal[C];  // lane j: row 2 * p0 + j's scalar term (j < 2P used)
  for (int c = 0; c < C; c++) {
    scal[c] = _mm512_setzero_ps();
    for (int p = 0; p < P; p++) acc[c][p] = _mm512_setzero_ps();
  }
  const int64_t nb = a.nb;
  for (int64_t b = 0; b < nb; b++) {
    const __m512 xs = _mm512_loadu_ps(a.s.data() + b * a.ld + 2 * p0);
    const uint8_t* blk0 = w + b * block_bytes(T);
    // the pairs' activation scales as lanes [xd_r x 8 | xd_r+1 x 8], built once per block into an L1-hot stack
    // line (a 16-float copy per pair and block in memory measured ~10% slower at K = 1536: L1 footprint)
    alignas(64) float xdx[P][16];
    for (int p = 0; p < P; p++) {
      const float* d2 = a.d.data() + ((p0 + p) * nb + b) * 2;
      _mm512_store_ps(xdx[p], _mm512_insertf32x8(_mm512_set1_ps(d2[0]), _mm256_set1_ps(d2[1]), 1));
    }
    // the C blocks' f16 headers in one convert (as dot_q16_cols4), stored so that each column's d (and m) is a
    // broadcast load, not a port-5 permute: Q4_1 hf = d0 m0 d1 m1 ..; else d0 d1 ..
    alignas(32) float hf[8];
    if constexpr (T == QT::Q4_1) {
      uint32_t h[4] = {};
      for (int c = 0; c < C; c++) std::memcpy(&h[c], blk0 + c * rb, 4);
      _mm256_store_ps(hf, _mm256_cvtph_ps(_mm_setr_epi32(int(h[0]), int(h[1]), int(h[2]), int(h[3]))));
    } else {
      uint16_t h[4] = {};
      for (int c = 0; c < C; c++) std::memcpy(&h[c], blk0 + c * rb, 2);
      _mm256_store_ps(hf, _mm256_cvtph_ps(_mm_setr_epi16(short(h[0]), short(h[1]), short(h[2]), short(h[3]), 0, 0, 0, 0)));
    }
    for (int c = 0; c < C; c++) {
      const uint8_t* blk = blk0 + c * rb;
      prefetch(blk);
      __m512i w0, w1;
      widen16x2<T>(blk, w0, w1);
      const float dw = hf[T == QT::Q4_1 ? 2 * c : c];
      const __m512 dv = _mm512_set1_ps(dw);  // d_c
      if constexpr (T == QT::Q4_1) scal[c] = _mm512_fmadd_ps(_mm512_set1_ps(hf[2 * c + 1]), xs, scal[c]);
      if constexpr (T == QT::Q4_0) scal[c] = _mm512_fmadd_ps(_mm512_set1_ps(-8.f * dw), xs, scal[c]);
      for (int p = 0; p < P; p++) {
        // the pair's x straight from L1 (memory operands: no registers held across the columns)
        const int16_t* xq = a.q.data() + ((p0 + p) * nb + b) * 64;
        const __m512i dot = _mm512_dpwssd_epi32(_mm512_madd_epi16(w0, _mm512_loadu_si512(xq)), w1,
                                                _mm512_loadu_si512(xq + 32));
        const __m512 scale = _mm512_mul_ps(dv, _mm512_load_ps(xdx[p]));  // d_c * xd (as the M = 1 kernel)
        acc[c][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[c][p]);
      }
    }
  }
  for (int c = 0; c < C; c++) {
    alignas(64) float sc[16];
    _mm512_store_ps(sc, scal[c]);
    for (int p = 0; p < P; p++) {
      res[c * 2 * P + 2 * p] = hsum(_mm512_castps512_ps256(acc[c][p])) + sc[2 * p];
      res[c * 2 * P + 2 * p + 1] = hsum(_mm512_extractf32x8_ps(acc[c][p], 1)) + sc[2 * p + 1];
    }
  }
}

// f(std::integral_constant<int, P>{}) for P in 1..4 pairs.
template <class F>
inline void with_pairs(int P, F&& f) {
  switch (P) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// out rows 0..M of columns [n0, n1): cache blocks of 64 columns (their weight rows stay in L2), in each the
// tiles of up to 4 pairs (8 rows) x 4 columns; the < 4 tail columns one at a time (same per-column arithmetic).
template <QT T>
SGL_TARGET_Q16 void gemm_q16_tile(const uint8_t* W, int64_t rb, int64_t M, int64_t N, const Q16Pairs& a,
                                  float* out, const float* bias, const float* resid, int64_t n0, int64_t n1) {
  constexpr int64_t kChunk = 64;
  float res[4 * 8];
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = std::min(n1, c0 + kChunk);
    // 4 pairs x 4 columns: 16 zmm accumulators + 4 scalar-term vectors (x comes from L1 as memory operands).
    // Measured 1 thread, M = 8..32: 3 pairs 5-25% slower, 2 pairs 5-20%, 8 pairs x 2 columns no faster.
    for (int64_t p0 = 0; p0 < a.pairs; p0 += 4) {
      const int P = int(std::min<int64_t>(4, a.pairs - p0));
      with_pairs(P, [&](auto pc) {
        constexpr int PP = decltype(pc)::value;
        for (int64_t n = c0; n < c1;) {
          const int C = n + 4 <= c1 ? 4 : 1;
          if (C == 4) dot_q16_tile<T, 4, PP>(W + n * rb, rb, a, p0, res);
          else dot_q16_tile<T, 1, PP>(W + n * rb, rb, a, p0, res);
          for (int c = 0; c < C; c++)
            for (int j = 0; j < 2 * PP && 2 * p0 + j < M; j++) {
              const int64_t o = (2 * p0 + j) * N + n + c;
              float v = res[c * 2 * PP + j];
              if (bias != nullptr) v += bias[n + c];
              if (resid != nullptr) v += resid[o];
              out[o] = v;
            }
          n += C;
        }
      });
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// The portable way to the same bits (AVX2 without AVX-512 VNNI, the scalar build), and the faster one at a few
// rows: in 64-column cache blocks (a block's weight rows stay in L2 across the rows), rows in pairs through
// dot_q16_cols4_rows (each weight block widened once for both rows; AVX2 builds), the rest per row (gemv_rows).
template <QT T>
void gemm_q16_rows(const uint8_t* W, int64_t rb, int64_t M, int64_t N, const Q16Act& a, float* out,
                   const float* bias, const float* resid, int64_t n0, int64_t n1) {
  constexpr int64_t kChunk = 64;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = std::min(n1, c0 + kChunk);
    int64_t r = 0;
#ifdef SGL_AVX2
    for (; r + 2 <= M; r += 2) {
      float res[8];
      for (int64_t n = c0; n < c1;) {
        if (n + 4 <= c1) {
          dot_q16_cols4_rows<T, 2>(W + n * rb, rb, a, r, res);
          for (int c = 0; c < 4; c++)
            for (int j = 0; j < 2; j++) {
              const int64_t o = (r + j) * N + n + c;
              float v = res[c * 2 + j];
              if (bias != nullptr) v += bias[n + c];
              if (resid != nullptr) v += resid[o];
              out[o] = v;
            }
          n += 4;
          continue;
        }
        for (int64_t j = 0; j < 2; j++) {  // a tail column: per row (dot_q16_cols<T, 1>: the same bits)
          const Q16Act row{a.q + (r + j) * a.k, a.d + (r + j) * a.nb, a.s + (r + j) * a.nb, a.k, a.nb};
          gemv_rows<T>(W + n * rb, rb, 1, row, out + (r + j) * N + n, bias != nullptr ? bias + n : nullptr,
                       resid != nullptr ? resid + (r + j) * N + n : nullptr);
        }
        n += 1;
      }
    }
#endif
    for (; r < M; r++) {
      const Q16Act row{a.q + r * a.k, a.d + r * a.nb, a.s + r * a.nb, a.k, a.nb};
      gemv_rows<T>(W + c0 * rb, rb, c1 - c0, row, out + r * N + c0, bias != nullptr ? bias + c0 : nullptr,
                   resid != nullptr ? resid + r * N + c0 : nullptr);
    }
  }
}

// gemm's q16 path for the output columns [n0, n1) (pairs: a packed for the tile, or null: per row).
template <QT T>
void gemm_q16_cols(const uint8_t* W, int64_t M, int64_t N, int64_t K, const Q16Act& a, const Q16Pairs* pairs,
                   float* out, const float* bias, const float* resid, int64_t n0, int64_t n1) {
  const int64_t rb = row_bytes(T, K);
#ifdef SGL_AVX512_TILE
  if (pairs != nullptr && M >= kQ16TileMinRows) {
    gemm_q16_tile<T>(W, rb, M, N, *pairs, out, bias, resid, n0, n1);
    return;
  }
#endif
  (void)pairs;
  gemm_q16_rows<T>(W, rb, M, N, a, out, bias, resid, n0, n1);
}

}  // namespace
