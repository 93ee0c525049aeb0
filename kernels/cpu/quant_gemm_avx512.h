// The multi-row (M >= 3) fp32-activation GEMM tile with AVX-512, for quant_gemm.cpp (included there, after
// quant_common.h). Compiled into the AVX2 build with per-function target attributes and chosen at run time
// (`have_avx512()`), so one .so serves AVX2-only CPUs (Zen 3) and AVX-512 ones (the CI/VM Xeon).
//
// Why: with several rows the fused kernel is compute-bound, not weight-stream-bound: each decoded weight block
// is FMA'd into every row. An AVX2 block is 4 x 8 lanes (4 FMAs per row); a zmm block is 2 x 16 lanes (2 FMAs
// per row, each with its x load folded in), and the block decode (nibbles -> fp32, one FMA for d*q + m) is
// 2 instead of 4 vector ops, shared by up to 8 rows.
// Same numbers as the AVX2 tile up to summation order (the fp32 path's contract: tests/kernels compare against
// the dequantize + mm reference).
#pragma once

#include <cstdint>

#include "quant_common.h"

#if defined(SGL_AVX2) && (defined(__GNUC__) || defined(__clang__))
#define SGL_AVX512_TILE 1
#define SGL_TARGET_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own `__Y = __Y` placeholders when inlined here
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

inline bool have_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// One block -> w0 = weights 0..15, w1 = weights 16..31 as fp32 (the same d*q+c FMA as decode_avx).
template <QT T>
SGL_TARGET_512 inline void decode512(const uint8_t* b, __m512& w0, __m512& w1) {
  if constexpr (T == QT::Q4_0 || T == QT::Q4_1) {
    const __m128i m4 = _mm_set1_epi8(15);
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (T == QT::Q4_0 ? 2 : 4)));
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, m4)));
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), m4)));
    const float d = f16(b);
    const __m512 dv = _mm512_set1_ps(d);
    // Q4_0: (q - 8) * d == fma(q, d, -8d) exactly (-8d is exact), as decode_avx
    const __m512 c = _mm512_set1_ps(T == QT::Q4_0 ? -8.f * d : f16(b + 2));
    w0 = _mm512_fmadd_ps(q0, dv, c);
    w1 = _mm512_fmadd_ps(q1, dv, c);
  } else if constexpr (T == QT::Q8_0) {
    const __m512 dv = _mm512_set1_ps(f16(b));
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)))), dv);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)))), dv);
  } else {
    w0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    w1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
  }
}

// res[r] = dot(W row `w`, x row r) for r < R over nb full blocks; x rows are ldx floats apart.
// Two accumulators per row (a block's 2 FMAs go to different chains), for every R <= 8 (16 + 2 zmm registers):
// a row's arithmetic is the same in every tile size and position, so a prompt's rows (prefill under
// SGL_CPU_PREFILL_M rows) get the same numbers alone and batched with others (seeded sampling then gives the
// same tokens whatever the batch). With the default q16 activations, 2..64 rows run quant_q16_tile.h instead
// (every row the bits of M = 1); this tile serves --cpu-act-quant none and 65+ rows.
template <QT T, int R>
SGL_TARGET_512 inline void dot_fp32_512(const uint8_t* w, const float* x, int64_t ldx, int64_t nb, float* res) {
  __m512 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512 w0, w1;
    prefetch(w + b * block_bytes(T));
    decode512<T>(w + b * block_bytes(T), w0, w1);
    for (int r = 0; r < R; r++) {
      const float* xp = x + r * ldx + b * kBlock;
      acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), acc[r][1]);
    }
  }
  for (int r = 0; r < R; r++) res[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif
