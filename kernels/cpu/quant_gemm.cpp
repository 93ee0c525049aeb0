// GGUF block-quantized linear layers on the CPU: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) (+ residual).
//
// W stays in the GGUF layout (kernels/cpu/quant.py documents it): row n is K/32 blocks of 32 weights.
// Three activation modes:
//   fp32: each weight block is decoded to 4 x 8 fp32 lanes and FMA'd into per-row accumulators: the
//         same numbers as fp32 matmul on the dequantized weights up to summation order (and the single
//         rounding of the fused d*q+m for Q4_1).
//   q16:  (the default) x is quantized per 32-block to int16 (scale amax/32767); the weights are widened
//         to int16 with shifts/masks, block dots are vpmaddwd (+ vpdpwssd with AVX-VNNI) -> int32 -> one
//         fp32 FMA per block; the affine part (Q4_1's m, Q4_0's -8) is applied to the exact fp32 block
//         sums of x. ~2x fewer cycles per weight than fp32 at M = 1, error ~1e-5 relative. Up to kQ16MaxRows
//         rows; 2+ rows run quant_q16_tile.h, which gives every row the bits of that row alone (M = 1).
//   q8:   x is quantized per 32-block to int8 (scale amax/127): the batch-invariant q8 contract of
//         quant_q8_blocks.h (vpdpbusd u8 weights x s8 activations on AVX-512 VNNI, 4 dots per block and 8 columns
//         where q16 needs 8; one float FMA per 8 columns; quant_q8_tile.h), at every row count: more than
//         kQ16MaxRows rows (prefill) run in blocks of kQ16MaxRows, each row with the bits it gets alone.
// Every weight read is prefetched kPrefetch bytes ahead (decode is a stream of ~96 MB per token).
// Work split: output columns (N) over at::parallel_for; for each column the row tiles (R <= 4 rows of x)
// run back to back so the column's weight bytes stay in L1 and are read from memory once per call.
// AVX2+FMA+F16C when compiled with them (SGL_AVX2), else a portable scalar path.
// The interface is raw addresses (the Python launcher in quant.py validated shapes, dtypes, contiguity and
// keeps the tensors alive), so only pybind11 and ATen/Parallel.h are needed: a build of seconds, not minutes.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "quant_common.h"
#include "quant_q16.h"
#include "thread_pool.h"
#include "quant_gemm_avx512.h"
#include "quant_q16_tile.h"
#include "quant_q8_tile.h"

namespace {

// ---- the fp32 decode of one block (32 weights), scalar: also the dequantize of the prefill path ----
template <QT T>
inline void decode_scalar(const uint8_t* b, float* w) {
  if constexpr (T == QT::Q8_0) {
    float d = f16(b);
    for (int j = 0; j < 32; j++) w[j] = float(int8_t(b[2 + j])) * d;
  } else if constexpr (T == QT::Q4_0) {
    float d = f16(b);
    for (int j = 0; j < 16; j++) {
      w[j] = float(int(b[2 + j] & 15) - 8) * d;
      w[j + 16] = float(int(b[2 + j] >> 4) - 8) * d;
    }
  } else if constexpr (T == QT::Q4_1) {
    float d = f16(b), m = f16(b + 2);
    for (int j = 0; j < 16; j++) {
      w[j] = float(b[4 + j] & 15) * d + m;
      w[j + 16] = float(b[4 + j] >> 4) * d + m;
    }
  } else {
    for (int j = 0; j < 32; j++) w[j] = f16(b + 2 * j);
  }
}

#ifdef SGL_AVX2

// One block -> w[0..3] = weights 0-7, 8-15, 16-23, 24-31 as fp32.
template <QT T>
inline void decode_avx(const uint8_t* b, __m256* w) {
  if constexpr (T == QT::Q4_0 || T == QT::Q4_1) {
    const __m128i m4 = _mm_set1_epi8(15);
    __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (T == QT::Q4_0 ? 2 : 4)));
    __m128i lo = _mm_and_si128(qs, m4), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
    __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    __m256 d = _mm256_set1_ps(f16(b));
    // Q4_0: (q - 8) * d == fma(q, d, -8d) exactly (-8d is exact, one rounding either way).
    __m256 c = T == QT::Q4_0 ? _mm256_mul_ps(d, _mm256_set1_ps(-8.f)) : _mm256_set1_ps(f16(b + 2));
    w[0] = _mm256_fmadd_ps(q0, d, c);
    w[1] = _mm256_fmadd_ps(q1, d, c);
    w[2] = _mm256_fmadd_ps(q2, d, c);
    w[3] = _mm256_fmadd_ps(q3, d, c);
  } else if constexpr (T == QT::Q8_0) {
    __m256 d = _mm256_set1_ps(f16(b));
    for (int i = 0; i < 4; i++) {
      __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * i));
      w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
  } else {
    for (int i = 0; i < 4; i++)
      w[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * i)));
  }
}
#endif

#ifdef SGL_AVX2
// Q4_0/Q4_1 with few rows: factor the block's affine decode out of the dot,
//   sum_j (d q_j + c) x_j = d * sum_j q_j x_j + c * xs_b     (c = m, or -8d; xs_b = sum of the x block)
// 4 FMAs + 1 per block and row instead of 4 decode FMAs + 4 per row; wins for R <= 2.
template <QT T, int R>
inline void dot_fp32_factored(const uint8_t* w, const float* x, int64_t ldx, const float* xs, int64_t nb,
                              float* res) {
  const __m128i m4 = _mm_set1_epi8(15);
  __m256 acc[R][2];
  float scal[R] = {};
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = w + b * block_bytes(T);
    prefetch(blk);
    __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QT::Q4_0 ? 2 : 4)));
    __m128i lo = _mm_and_si128(qs, m4), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
    __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    const float d = f16(blk), c = T == QT::Q4_0 ? -8.f * d : f16(blk + 2);
    const __m256 dv = _mm256_set1_ps(d);
    for (int r = 0; r < R; r++) {
      const float* xp = x + r * ldx + b * kBlock;
      __m256 p = _mm256_mul_ps(q0, _mm256_loadu_ps(xp));
      p = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp + 8), p);
      p = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xp + 16), p);
      p = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp + 24), p);
      acc[r][b & 1] = _mm256_fmadd_ps(dv, p, acc[r][b & 1]);  // 2 chains: the FMA latency per block
      scal[r] += c * xs[r * nb + b];
    }
  }
  for (int r = 0; r < R; r++) res[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + scal[r];
}
#endif

#ifdef SGL_AVX2
// M = 1, 4 output columns per pass (weight rows w, w + rb, ...): each x block is loaded once and used 4x,
// the block's affine decode is factored out of the dot (Q4: d * sum q x + c * xs_b; Q8_0: d * sum q x),
// one FMA scales a block's partial dot; horizontal sums only at the end. 4 columns = 4 independent chains.
// C = 1 (the < 4 tail columns) does each column's arithmetic in the same order, so a column's result does not
// depend on where a thread's range starts: thread counts stay bit-identical.
template <QT T, int C>
inline void dot_fp32_cols(const uint8_t* w, int64_t rb, const float* x, const float* xs, int64_t nb,
                           float* res) {
  const __m128i m4 = _mm_set1_epi8(15);
  __m256 acc[C];
  float scal[C] = {};
  for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const float* xp = x + b * kBlock;
    const __m256 x0 = _mm256_loadu_ps(xp), x1 = _mm256_loadu_ps(xp + 8), x2 = _mm256_loadu_ps(xp + 16),
                 x3 = _mm256_loadu_ps(xp + 24);
    for (int c = 0; c < C; c++) {
      const uint8_t* blk = w + c * rb + b * block_bytes(T);
      prefetch(blk);
      __m256 q0, q1, q2, q3;
      if constexpr (T == QT::Q8_0) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
        const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
        q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
        q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
        q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e));
        q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e, 8)));
      } else {
        const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QT::Q4_0 ? 2 : 4)));
        const __m128i lo = _mm_and_si128(qs, m4), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
        q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      }
      __m256 p = _mm256_mul_ps(q0, x0);
      __m256 p2 = _mm256_mul_ps(q1, x1);
      p = _mm256_fmadd_ps(q2, x2, p);
      p2 = _mm256_fmadd_ps(q3, x3, p2);
      const float d = f16(blk);
      acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_add_ps(p, p2), acc[c]);
      // explicit fma: the same rounding whether or not the compiler contracts or vectorizes this (C = 4 vs 1)
      if constexpr (T == QT::Q4_1) scal[c] = std::fma(f16(blk + 2), xs[b], scal[c]);
      if constexpr (T == QT::Q4_0) scal[c] = std::fma(-8.f * d, xs[b], scal[c]);
    }
  }
  for (int c = 0; c < C; c++) res[c] = hsum(acc[c]) + scal[c];
}
#endif

// res[r] = dot(W row `w`, x row r) for r < R over nb full blocks; x rows are ldx floats apart.
template <QT T, int R>
inline void dot_fp32(const uint8_t* w, const float* x, int64_t ldx, int64_t nb, float* res) {
#ifdef SGL_AVX2
  // A accumulators per row break the FMA latency chain (R = 1: 4 chains; R <= 4: 2 per row; R = 8: 1 per
  // row, 8 chains, and 8 + 4 ymm registers so nothing spills).
  constexpr int A = R == 1 ? 4 : R <= 4 ? 2 : 1;
  __m256 acc[R][A];
  for (int r = 0; r < R; r++)
    for (int a = 0; a < A; a++) acc[r][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m256 wv[4];
    prefetch(w + b * block_bytes(T));
    decode_avx<T>(w + b * block_bytes(T), wv);
    for (int r = 0; r < R; r++) {
      const float* xp = x + r * ldx + b * kBlock;
      for (int i = 0; i < 4; i++) acc[r][i % A] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xp + 8 * i), acc[r][i % A]);
    }
  }
  for (int r = 0; r < R; r++) {
    __m256 s = acc[r][0];
    for (int a = 1; a < A; a++) s = _mm256_add_ps(s, acc[r][a]);
    res[r] = hsum(s);
  }
#else
  float acc[R] = {};
  float wv[32];
  for (int64_t b = 0; b < nb; b++) {
    decode_scalar<T>(w + b * block_bytes(T), wv);
    for (int r = 0; r < R; r++) {
      const float* xp = x + r * ldx + b * kBlock;
      float s = 0.f;
      for (int j = 0; j < 32; j++) s += wv[j] * xp[j];
      acc[r] += s;
    }
  }
  for (int r = 0; r < R; r++) res[r] = acc[r];
#endif
}

// f16 rows with K % 32 != 0: the tail weights in scalar.
void f16_tail(const uint8_t* w, const float* x, int64_t ldx, int64_t k0, int64_t k, int R, float* res) {
  for (int r = 0; r < R; r++)
    for (int64_t j = k0; j < k; j++) res[r] += f16(w + 2 * j) * x[r * ldx + j];
}

// Output columns per cache block of the multi-row path (gemm_cols): 64 weight rows are <= 40 KB (Q8_0, K 576).
constexpr int64_t kColChunk = 64;

// Rows of x per tile for `rest` remaining rows: 8 (a decoded block serves 8 rows), then <= 4 + the rest.
inline int tile_rows(int64_t rest) { return rest >= 8 ? 8 : int(std::min<int64_t>(4, rest)); }

// f(std::integral_constant<int, R>{}) for a tile's row count R in {1, 2, 3, 4, 8} (tile_rows): the tile kernels
// take R as a template argument (their accumulators are registers).
template <class F>
inline void with_rows(int R, F&& f) {
  with_int<8, 4, 3, 2, 1>(R, f);
}

// res[0..R) = dot(weight row w, x rows r0..r0+R) (xr = x row r0), by the tile kernel for R and the mode.
template <QT T>
inline void tile_dot(const uint8_t* w, const float* xr, int64_t K, int64_t nb, int R, int64_t r0, const float* xsum,
                     float* res) {
#ifdef SGL_AVX512_TILE
  if (have_avx512()) {  // fp32 activations: the zmm tile (quant_gemm_avx512.h says why), every R
    with_rows(R, [&](auto r) { dot_fp32_512<T, decltype(r)::value>(w, xr, K, nb, res); });
    if (T == QT::F16 && nb * kBlock < K) f16_tail(w, xr, K, nb * kBlock, K, R, res);
    return;
  }
#endif
#ifdef SGL_AVX2
  if constexpr (T == QT::Q4_0 || T == QT::Q4_1) {
    if (R <= 2 && xsum != nullptr) {
      if (R == 2) dot_fp32_factored<T, 2>(w, xr, K, xsum + r0 * nb, nb, res);
      else dot_fp32_factored<T, 1>(w, xr, K, xsum + r0 * nb, nb, res);
      return;
    }
  }
#endif
  (void)xsum;
  with_rows(R, [&](auto r) { dot_fp32<T, decltype(r)::value>(w, xr, K, nb, res); });
  if (T == QT::F16 && nb * kBlock < K) f16_tail(w, xr, K, nb * kBlock, K, R, res);
}

template <QT T>
void gemm_cols(const float* x, const uint8_t* W, int64_t M, int64_t N, int64_t K, float* out,
               const float* bias, const float* resid, const float* xsum, int64_t n0, int64_t n1) {
  const int64_t rb = row_bytes(T, K), nb = K / kBlock;
  float res[8];
  int64_t n = n0;
#ifdef SGL_AVX2
  // Q4 only: the Q8_0 variant measured ~1.8x slower than dot_fp32<Q8_0, 1> on the lm_head shape.
  if constexpr (T == QT::Q4_0 || T == QT::Q4_1) {
    if (M == 1 && xsum != nullptr) {
      for (; n < n1;) {
        const int C = n + 4 <= n1 ? 4 : 1;
        if (C == 4) dot_fp32_cols<T, 4>(W + n * rb, rb, x, xsum, nb, res);
        else dot_fp32_cols<T, 1>(W + n * rb, rb, x, xsum, nb, res);
        for (int c = 0; c < C; c++) {
          float v = res[c];
          if (bias != nullptr) v += bias[n + c];
          if (resid != nullptr) v += resid[n + c];
          out[n + c] = v;
        }
        n += C;
      }
    }
  }
#endif
  // Cache blocking (M >= 2): chunks of kColChunk output columns, whose weight rows stay in L2; within a chunk
  // each row tile of x (R rows x K fp32, L1-sized) runs over every column of the chunk before the next tile.
  // (The other order, every row tile per column, re-read all of x from L2 for each output column: at M = 32
  // the lm_head streamed 49152 x 74 KB = 3.6 GB of x per call, the bound of the whole step.)
  // A row's tile and its place in it depend only on M and K, so results do not depend on the thread split.
  for (int64_t c0 = n; c0 < n1; c0 += kColChunk) {
    const int64_t c1 = std::min(n1, c0 + kColChunk);
    for (int64_t r0 = 0; r0 < M;) {
      const int R = tile_rows(M - r0);
      const float* xr = x + r0 * K;
      for (int64_t nn = c0; nn < c1; nn++) {
        const uint8_t* w = W + nn * rb;
        tile_dot<T>(w, xr, K, nb, R, r0, xsum, res);
        for (int r = 0; r < R; r++) {
          const int64_t o = (r0 + r) * N + nn;
          float v = res[r];
          if (bias != nullptr) v += bias[nn];
          if (resid != nullptr) v += resid[o];
          out[o] = v;
        }
      }
      r0 += R;
    }
  }
}

int64_t grain_for(int64_t n, int64_t threads) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, at::get_num_threads()));
  return std::max<int64_t>(16, (n + threads - 1) / threads);
}

// f(std::integral_constant<QT, T>{}, n0, n1) over chunks [n0, n1) of N output columns (at::parallel_for), for the
// block types the q16 and q8 paths take (Q4_0, Q4_1, Q8_0: F16 never reaches them).
template <class F>
void columns_by_qtype(QT t, int64_t N, int64_t threads, F&& f) {
  at::parallel_for(0, N, grain_for(N, threads),
                   [&](int64_t n0, int64_t n1) { with_block_qtype(t, [&](auto tc) { f(tc, n0, n1); }); });
}

template <QT T>
void dequant_rows(const uint8_t* W, int64_t K, float* out, int64_t n0, int64_t n1) {
  const int64_t rb = row_bytes(T, K), nb = K / kBlock;
  for (int64_t n = n0; n < n1; n++) {
    float* o = out + n * K;
    for (int64_t b = 0; b < nb; b++) {
#ifdef SGL_AVX2
      __m256 wv[4];
      decode_avx<T>(W + n * rb + b * block_bytes(T), wv);
      for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + b * kBlock + 8 * i, wv[i]);
#else
      decode_scalar<T>(W + n * rb + b * block_bytes(T), o + b * kBlock);
#endif
    }
    if (T == QT::F16)
      for (int64_t j = nb * kBlock; j < K; j++) o[j] = f16(W + n * rb + 2 * j);
  }
}

}  // namespace

using Addr = std::uintptr_t;  // a tensor's data_ptr(); 0 = absent (bias, residual)

// decode_attention.cpp
void decode_attention(Addr q, Addr k, Addr v, Addr slots, Addr lens, Addr out, int64_t B, int64_t H, int64_t Hkv,
                      int64_t D, int64_t Lmax, int64_t num_slots, double scale, int64_t kv_half, int64_t threads);
// rms_norm.cpp
void rms_norm(Addr x, Addr w, Addr out, int64_t M, int64_t N, double eps);
// decode_layer.cpp (batch-1 decode on the decode thread pool)
void decode_layer(Addr h, Addr ln1, Addr ln2, double eps, Addr wqkv, int64_t tqkv, Addr qkv_bias, Addr wo,
                  int64_t to, Addr o_bias, Addr wgu, int64_t tgu, Addr wd, int64_t td, int64_t hidden, int64_t H,
                  int64_t Hkv, int64_t D, int64_t I, Addr cos, Addr sin, Addr kbuf, Addr vbuf, int64_t num_slots,
                  Addr slots, int64_t L, double scale, int64_t kv_half, int64_t threads, int64_t act, Addr pqkv,
                  Addr po, Addr pgu, Addr pd);
void decode_layers(Addr h, Addr table, int64_t n, double eps, int64_t hidden, int64_t H, int64_t Hkv, int64_t D,
                   int64_t I, Addr cos, Addr sin, int64_t num_slots, Addr slots, int64_t L, double scale,
                   int64_t kv_half, int64_t threads, int64_t act);
void gemv(Addr x, Addr w, int64_t qtype, int64_t N, int64_t K, Addr out, Addr bias, Addr resid, int64_t threads,
          int64_t act);
void decode_rows(Addr h, int64_t M, Addr table, int64_t n, double eps, int64_t hidden, int64_t H, int64_t Hkv,
                 int64_t D, int64_t I, Addr cos, Addr sin, Addr row_slots, Addr row_lens, int64_t num_slots,
                 double scale, int64_t kv_half, int64_t threads, int64_t act);
namespace sgl_cpu { void set_spin_us(int64_t us); void set_adaptive(bool on); }  // thread_pool.cpp

void gemm(Addr x_addr, int64_t M, Addr w_addr, const std::string& qtype, int64_t N, int64_t K, Addr out_addr,
          Addr bias_addr, Addr resid_addr, int64_t act_mode, int64_t threads) {
  // act_mode: 0 = fp32 activations, 1 = q8 (int8 per block, any M), 2 = q16 (int16 per block, M <= kQ16MaxRows)
  const QT t = parse_qtype(qtype);
  if (M <= 0 || N <= 0 || K <= 0 || (t != QT::F16 && K % kBlock)) throw std::invalid_argument("bad gemm shape");
  const float* xp = reinterpret_cast<const float*>(x_addr);
  const uint8_t* W = reinterpret_cast<const uint8_t*>(w_addr);
  float* op = reinterpret_cast<float*>(out_addr);
  const float* b = reinterpret_cast<const float*>(bias_addr);
  const float* rs = reinterpret_cast<const float*>(resid_addr);
  if (act_mode < 0 || act_mode > 2) throw std::invalid_argument("bad act_mode");
  // q16 up to kQ16MaxRows rows (decode batches, verify rows): each row the same bits as alone (quant_q16_tile.h);
  // more rows (prefill) run fp32, where a decoded weight block serves many rows at fewer instructions per row.
  const bool use_q8 = act_mode == 1 && t != QT::F16;
  if (act_mode == 2 && t != QT::F16 && M <= kQ16MaxRows) {
    const Q16Blocks xb(xp, M, K);
    const Q16Act& a16 = xb.act;
    Q16Tiled tiled;
    const Q16Tiled* pp = nullptr;
    if (M >= kQ16TileMinRows && have_rows_tile()) {
      pack_tiled(a16, M, tiled);
      pp = &tiled;
    }
    columns_by_qtype(t, N, threads, [&](auto tc, int64_t n0, int64_t n1) {
      gemm_q16_cols<decltype(tc)::value>(W, M, N, K, a16, pp, op, b, rs, n0, n1);
    });
    return;
  }
  if (use_q8 && M > kQ16MaxRows) {  // prefill: blocks of kQ16MaxRows rows (a row's bits do not depend on its block)
    const int64_t xb = K * int64_t(sizeof(float)), ob = N * int64_t(sizeof(float));
    for (int64_t r0 = 0; r0 < M; r0 += kQ16MaxRows)
      gemm(x_addr + Addr(r0 * xb), std::min(kQ16MaxRows, M - r0), w_addr, qtype, N, K, out_addr + Addr(r0 * ob),
           bias_addr, resid_addr == 0 ? 0 : resid_addr + Addr(r0 * ob), act_mode, threads);
    return;
  }
  if (use_q8) {  // the q8 contract: each row the bits of that row alone (quant_q8_tile.h)
    const Q8Blocks xb(xp, M, K);
    const Q8BAct& a8 = xb.act;
    Q8Tiled tiled;
    const Q8Tiled* pp = nullptr;
    if (M >= kQ16TileMinRows && have_rows_tile()) {
      pack_tiled8(a8, M, tiled);
      pp = &tiled;
    }
    columns_by_qtype(t, N, threads, [&](auto tc, int64_t n0, int64_t n1) {
      gemm_q8_cols<decltype(tc)::value>(W, M, N, K, a8, pp, op, b, rs, n0, n1);
    });
    return;
  }
  std::vector<float> xsum_buf;  // fp32 path, Q4_*: the block sums of x for the factored dot (R <= 2)
  if (t == QT::Q4_0 || t == QT::Q4_1) {
    const int64_t nb = K / kBlock;
    xsum_buf.resize(M * nb);
    for (int64_t i = 0; i < M * nb; i++) {
      float acc = 0.f;
      for (int j = 0; j < kBlock; j++) acc += xp[i * kBlock + j];
      xsum_buf[i] = acc;
    }
  }
  const float* xs = xsum_buf.empty() ? nullptr : xsum_buf.data();
  sgl_cpu::columns_on_pool(N, threads, [&](int64_t n0, int64_t n1) {
    switch (t) {
      case QT::Q4_0: gemm_cols<QT::Q4_0>(xp, W, M, N, K, op, b, rs, xs, n0, n1); break;
      case QT::Q4_1: gemm_cols<QT::Q4_1>(xp, W, M, N, K, op, b, rs, xs, n0, n1); break;
      case QT::Q8_0: gemm_cols<QT::Q8_0>(xp, W, M, N, K, op, b, rs, xs, n0, n1); break;
      case QT::F16: gemm_cols<QT::F16>(xp, W, M, N, K, op, b, rs, xs, n0, n1); break;
    }
  });
}

// Packed copies of block weights (quant.py's QuantWeight.pack), per activation mode: act 1 = q8, any block type,
// oct-packed where the AVX-512 VNNI tiles run (quant_q8_zmm.h's pack_oct, 8 rows per group), else quad-packed for
// the AVX2 kernel (quant_q8_blocks.h's pack_quad8, 4 rows); act 2 = q16, Q8_0 only (quant_q16.h's pack_q8_0_lanes:
// 4 rows for the AVX-512 tile, 2 for the AVX2 one). A copy has the weight's size: whole groups packed, the last
// rows as they are.
static bool q8_oct() {
#ifdef SGL_Q16_ZMM
  return have_q16_zmm();
#else
  return false;
#endif
}

bool packed_ok(int64_t act) {
  if (act != 1 && act != 2) throw std::invalid_argument("packed weights: act must be 1 (q8) or 2 (q16)");
#ifdef SGL_AVX2
  return true;
#else
  return false;
#endif
}

int64_t packed_group(int64_t act) {
  if (act != 1 && act != 2) throw std::invalid_argument("packed weights: act must be 1 (q8) or 2 (q16)");
  if (act == 1) return q8_oct() ? 8 : 4;
  return have_q16_tile() ? 4 : 2;
}

static QT packed_qtype(const std::string& qtype, int64_t act) {
  const QT t = parse_qtype(qtype);
  packed_group(act);
  if (t == QT::F16 || (act == 2 && t != QT::Q8_0))
    throw std::invalid_argument("packed weights: q8 takes q4_0, q4_1 and q8_0 blocks, q16 takes q8_0");
  if (!packed_ok(act)) throw std::runtime_error("packed weights: not on this CPU or build (packed_ok)");
  return t;
}

void pack_weight(Addr w_addr, const std::string& qtype, int64_t N, int64_t K, Addr out_addr, int64_t act) {
  const QT t = packed_qtype(qtype, act);
  if (N <= 0 || K <= 0 || K % kBlock) throw std::invalid_argument("pack_weight: need N > 0, K % 32 == 0");
  const uint8_t* W = reinterpret_cast<const uint8_t*>(w_addr);
  uint8_t* P = reinterpret_cast<uint8_t*>(out_addr);
  const int64_t rb = row_bytes(t, K);
  if (act == 2) {
    if (packed_group(2) == 4) pack_q8_0_lanes<4>(W, N, rb, P);  // quad-packed for the AVX-512 tile
    else pack_q8_0_lanes<2>(W, N, rb, P);  // pair-packed for the AVX2 one
    return;
  }
#ifdef SGL_Q16_ZMM
  if (q8_oct()) {
    with_block_qtype(t, [&](auto tc) { pack_oct<decltype(tc)::value>(W, N, rb, P); });
    return;
  }
#endif
  with_block_qtype(t, [&](auto tc) { pack_quad8<decltype(tc)::value>(W, N, rb, P); });
}

// y = x @ W^T (+ resid) for M <= kQ16MaxRows rows, the weights read from their packed copy P (pack_weight) for act's
// mode: gemm's path of that mode, the same bits per row (a verify row's logits are its decode step's). out may alias
// resid (an entry reads only itself).
void gemm_packed(Addr x_addr, int64_t M, Addr p_addr, const std::string& qtype, int64_t N, int64_t K, Addr out_addr,
                 Addr resid_addr, int64_t act, int64_t threads) {
  const QT t = packed_qtype(qtype, act);
  const int64_t group = packed_group(act);
  if (M <= 0 || M > kQ16MaxRows || N <= 0 || K <= 0 || K % kBlock) throw std::invalid_argument("bad gemm_packed shape");
  const float* xp = reinterpret_cast<const float*>(x_addr);
  const uint8_t* P = reinterpret_cast<const uint8_t*>(p_addr);
  float* op = reinterpret_cast<float*>(out_addr);
  const float* rs = reinterpret_cast<const float*>(resid_addr);
  if (act == 1) {
    const Q8Blocks xb(xp, M, K);
    const Q8BAct& a8 = xb.act;
    Q8Tiled tiled;
    pack_tiled8(a8, M, tiled);  // M = 1: one tile of one row, x's own layout
    with_block_qtype(t, [&](auto tc) {
      sgl_cpu::columns_on_pool((N + group - 1) / group, threads, [&](int64_t g0, int64_t g1) {  // whole groups
        gemm_q8_cols<decltype(tc)::value, true>(P, M, N, K, a8, &tiled, op, nullptr, rs, group * g0,
                                                std::min(N, group * g1));
      });
    });
    return;
  }
  const Q16Blocks xb(xp, M, K);
  const Q16Act& a16 = xb.act;
  Q16Tiled tiled;
  pack_tiled(a16, M, tiled);
  sgl_cpu::columns_on_pool((N + group - 1) / group, threads, [&](int64_t g0, int64_t g1) {  // whole groups
    gemm_q16_cols<QT::Q8_0, true>(P, M, N, K, a16, &tiled, op, nullptr, rs, group * g0, std::min(N, group * g1));
  });
}

void dequant(Addr w_addr, const std::string& qtype, int64_t N, int64_t K, Addr out_addr, int64_t threads) {
  const QT t = parse_qtype(qtype);
  if (N <= 0 || K <= 0 || (t != QT::F16 && K % kBlock)) throw std::invalid_argument("bad dequant shape");
  const uint8_t* W = reinterpret_cast<const uint8_t*>(w_addr);
  float* op = reinterpret_cast<float*>(out_addr);
  at::parallel_for(0, N, grain_for(N, threads), [&](int64_t n0, int64_t n1) {
    switch (t) {
      case QT::Q4_0: dequant_rows<QT::Q4_0>(W, K, op, n0, n1); break;
      case QT::Q4_1: dequant_rows<QT::Q4_1>(W, K, op, n0, n1); break;
      case QT::Q8_0: dequant_rows<QT::Q8_0>(W, K, op, n0, n1); break;
      case QT::F16: dequant_rows<QT::F16>(W, K, op, n0, n1); break;
    }
  });
}

std::string isa() {
#if defined(SGL_AVX2) && defined(__AVXVNNI__)
  std::string s = "avx2+avxvnni";
#elif defined(SGL_AVX2)
  std::string s = "avx2";
#else
  std::string s = "scalar";
#endif
#ifdef SGL_AVX512_TILE
  if (have_avx512()) s += " (avx512 multi-row tile)";
  if (have_q16_tile()) s += " (q16 4-column, q8 8-column avx512-vnni tiles)";
#endif
#ifdef SGL_AVX2
  if (!have_q16_tile()) s += " (q16 2-column, q8 4-column avx2 tiles)";
#endif
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  // The GIL is released: other Python threads (e.g. the grammar mask of the next step) run meanwhile.
  m.def("gemm", &gemm, "y = x @ W^T (+ bias) (+ residual) on GGUF blocks", py::call_guard<py::gil_scoped_release>());
  m.def("dequant", &dequant, "GGUF blocks -> fp32 rows", py::call_guard<py::gil_scoped_release>());
  m.def("packed_ok", &packed_ok, "whether pack_weight / gemm_packed run here for an act mode (AVX2 or AVX-512 VNNI)",
        py::arg("act"));
  m.def("packed_group", &packed_group,
        "rows per group of the packed layout of an act mode (with AVX-512 VNNI q8 8, q16 4; else 4, 2)");
  m.def("pack_weight", &pack_weight, "block rows -> their packed copy for an act mode (the same size)",
        py::call_guard<py::gil_scoped_release>());
  m.def("gemm_packed", &gemm_packed, "y = x @ W^T, q8 / q16 activations, block weights from their packed copy",
        py::call_guard<py::gil_scoped_release>());
  m.def("isa", &isa, "the instruction set compiled in");
  m.def("rms_norm", &rms_norm, "RMSNorm rows (fp32)", py::call_guard<py::gil_scoped_release>());
  m.def("decode_layer", &decode_layer, "one decoder layer for one token (batch-1 decode), in place on h",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_layers", &decode_layers, "decode_layer for a stack of layers (rows of an int64 table), in place on h",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_rows", &decode_rows, "the decoder stack for up to 64 token rows (decode batch, verify rows)",
        py::call_guard<py::gil_scoped_release>());
  m.def("gemv", &gemv, "y = x @ W^T (+ bias) (+ residual) for one row (q16 / q8 activations, decode pool)",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_spin_us", &sgl_cpu::set_spin_us, "how long an idle decode-pool thread spins before it sleeps");
  m.def("set_adaptive", &sgl_cpu::set_adaptive, "False: decode calls always use the pool's helpers");
  m.def("decode_attention", &decode_attention, "one-query-per-row attention over the paged KV pool",
        py::call_guard<py::gil_scoped_release>());
}
