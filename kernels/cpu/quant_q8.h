// q8 activations for quant_gemm.cpp (included there, after quant_common.h): llama.cpp's Q8_0 of the
// activations (int8 per 32-block with an fp32 scale), int8 x (u)int8 block dots, one fp32 FMA per block.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "quant_common.h"

namespace {

// ---- q8 activations: xq int8 [M, K], xd/xs fp32 [M, nb] (scale, exact fp32 sum of the block) ----
struct Q8Act {
  const int8_t* q;
  const float* d;
  const float* s;   // sum of the fp32 block (Q4_1's m term)
  const int32_t* qsum;  // sum of the int8 block (Q4_0's -8 term)
  int64_t k, nb;
};

#ifdef SGL_AVX2
inline __m256 i32_sum_pairs(__m256i p16) { return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1))); }
#endif

template <QT T, int R>
inline void dot_q8(const uint8_t* w, const Q8Act& a, int64_t r0, float* res) {
  float scal[R] = {};  // the per-block scalar terms (m * sum x, -8 d dx qsum)
#ifdef SGL_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
#else
  float acc[R] = {};
#endif
  for (int64_t b = 0; b < a.nb; b++) {
    const uint8_t* blk = w + b * block_bytes(T);
    prefetch(blk);
    float dw = f16(blk);
#ifdef SGL_AVX2
    __m256i wq;
    if constexpr (T == QT::Q8_0) {
      wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    } else {
      const __m128i m4 = _mm_set1_epi8(15);
      __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QT::Q4_0 ? 2 : 4)));
      wq = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m4), _mm_and_si128(qs, m4));
    }
    __m256i wabs = T == QT::Q8_0 ? _mm256_sign_epi8(wq, wq) : wq;
#endif
    for (int r = 0; r < R; r++) {
      const int64_t row = r0 + r;
      const float dd = dw * a.d[row * a.nb + b];
      if constexpr (T == QT::Q4_1) scal[r] += f16(blk + 2) * a.s[row * a.nb + b];
      if constexpr (T == QT::Q4_0) scal[r] -= 8.f * dd * float(a.qsum[row * a.nb + b]);
#ifdef SGL_AVX2
      __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + row * a.k + b * kBlock));
      if constexpr (T == QT::Q8_0) xq = _mm256_sign_epi8(xq, wq);  // |w| * (x * sign w)
      acc[r] = _mm256_fmadd_ps(i32_sum_pairs(_mm256_maddubs_epi16(wabs, xq)), _mm256_set1_ps(dd), acc[r]);
#else
      const int8_t* xq = a.q + row * a.k + b * kBlock;
      int32_t s = 0;
      if constexpr (T == QT::Q8_0) {
        for (int j = 0; j < 32; j++) s += int32_t(int8_t(blk[2 + j])) * xq[j];
      } else {
        const uint8_t* qs = blk + (T == QT::Q4_0 ? 2 : 4);
        for (int j = 0; j < 16; j++) s += int32_t(qs[j] & 15) * xq[j] + int32_t(qs[j] >> 4) * xq[j + 16];
      }
      acc[r] += dd * float(s);
#endif
    }
  }
  for (int r = 0; r < R; r++) {
#ifdef SGL_AVX2
    res[r] = hsum(acc[r]) + scal[r];
#else
    res[r] = acc[r] + scal[r];
#endif
  }
}

// Round half away from zero, as llama.cpp's quantize_row_q8_0_ref (roundf).
void quantize_act(const float* x, int64_t M, int64_t K, std::vector<int8_t>& q, std::vector<float>& d,
                  std::vector<float>& s, std::vector<int32_t>& qs) {
  const int64_t nb = K / kBlock;
  q.resize(M * K);
  d.resize(M * nb);
  s.resize(M * nb);
  qs.resize(M * nb);
  for (int64_t i = 0; i < M * nb; i++) {
    const float* xb = x + i * kBlock;
    float amax, sum;
    block_amax_sum(xb, amax, sum);
    const float dx = amax / 127.f, id = dx != 0.f ? 1.f / dx : 0.f;
    int32_t qsum = 0;
    for (int j = 0; j < kBlock; j++) {
      const int8_t v = int8_t(std::round(xb[j] * id));
      q[i * kBlock + j] = v;
      qsum += v;
    }
    d[i] = dx;
    s[i] = sum;
    qs[i] = qsum;
  }
}

}  // namespace
