// Shared by the CPU quant kernels (quant_gemm.cpp, quant_q16.h): block types, the f16 scale decode,
// the prefetch distance, a horizontal sum. Everything in an anonymous namespace: one translation unit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SGL_AVX2 1
#endif

namespace {

enum class QT { Q4_0, Q4_1, Q8_0, F16 };

// Software prefetch distance in bytes ahead of the weight block being read. Decode streams ~96 MB of
// weights per token, far past the caches; the hardware prefetchers alone left a 1-thread batch-1 step
// latency-bound (measured on the default model, interleaved A/B in one process: 0 B -> 640 B -> 2560 B
// ahead cut the forward ~25-35%; past ~4 KB no further gain). The weight arena lays the matrices out in
// forward order, so prefetching past a matrix's end warms the next one.
constexpr int kPrefetch = 2560;

inline void prefetch(const uint8_t* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p + kPrefetch, 0, 3);
#endif
}
constexpr int kBlock = 32;

#ifdef SGL_AVX2
// Rows per AVX2 tile at most, q8's (quant_q8_blocks.h: dot_q8_quad) and q16's (quant_q16_tile.h: dot_q16_pair): a
// verify row of 1 + 8 tokens is one tile (each weight block unpacked once). The accumulators then spill past the 16
// ymm, but the 30-layer stack of 9 rows ran no slower than with tiles of 6 (28.3 / 30.4 ms), and 6 beat 4 (29.0 /
// 32.0 ms; benchmarks/bench_q16_rows.py --stack --act q8, Zen 3, 1 thread).
constexpr int kAvx2TileRows = 9;
#endif

// max |x| and the exact fp32 sum of one 32-block of activations: the scale and the affine term of both
// activation quantizations (q8: quant_q8_blocks.h, q16: quant_q16.h).
inline void block_amax_sum(const float* xb, float& amax, float& sum) {
  amax = 0.f;
  sum = 0.f;
  for (int j = 0; j < kBlock; j++) {
    amax = std::max(amax, std::fabs(xb[j]));
    sum += xb[j];
  }
}

#ifdef SGL_AVX2
// A 32-block of x quantized to integers of at most qmax in magnitude (AVX2; q8: 127, q16: 32767): returns the
// scale dx = max |x| / qmax, qi[k] the int32 round-to-nearest-even of x_j / dx, j = 8k..8k+7, clamped to +-qmax.
// The scalar code's values: max is exact in any order, dx and 1 / dx the same single roundings, and cvtps rounds
// to nearest even as nearbyint does in the default rounding mode.
inline float block_ints8(const float* xb, float qmax, __m256i qi[4]) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4];
  for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(xb + 8 * k);
  const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  const float dx = amax / qmax, id = dx != 0.f ? 1.f / dx : 0.f;
  const __m256 iv = _mm256_set1_ps(id);
  const __m256i lim = _mm256_set1_epi32(int32_t(qmax)), nlim = _mm256_set1_epi32(-int32_t(qmax));
  for (int k = 0; k < 4; k++)
    qi[k] = _mm256_max_epi32(nlim, _mm256_min_epi32(lim, _mm256_cvtps_epi32(_mm256_mul_ps(v[k], iv))));
  return dx;
}
#endif

inline QT parse_qtype(const std::string& s) {
  if (s == "q4_0") return QT::Q4_0;
  if (s == "q4_1") return QT::Q4_1;
  if (s == "q8_0") return QT::Q8_0;
  if (s == "f16") return QT::F16;
  throw std::invalid_argument("unknown qtype " + s);
}

inline int64_t row_bytes(QT t, int64_t k) {
  switch (t) {
    case QT::Q4_0: return k / kBlock * 18;
    case QT::Q4_1: return k / kBlock * 20;
    case QT::Q8_0: return k / kBlock * 34;
    default: return 2 * k;
  }
}

// IEEE half bits <-> float. The float -> half direction rounds to nearest-even (as F16C's
// _MM_FROUND_TO_NEAREST_INT and torch's .to(torch.float16)); overflow gives inf, NaN stays NaN.
inline float f16_bits_to_f32(uint16_t h) {
#ifdef SGL_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 1;
      while (!(mant & 0x400)) { mant <<= 1; exp--; }
      bits = sign | ((exp + 112) << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint16_t f32_to_f16_bits(float x) {
#ifdef SGL_AVX2
  return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  uint32_t b;
  std::memcpy(&b, &x, 4);
  const uint32_t sign = (b >> 16) & 0x8000, absb = b & 0x7fffffffu;
  if (absb >= 0x7f800000u) return uint16_t(sign | 0x7c00 | (absb > 0x7f800000u ? 0x200 : 0));  // inf / NaN
  if (absb >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // rounds past 65504: inf
  if (absb < 0x38800000u) {  // below 2^-14: a subnormal half (or 0), RNE on the shifted mantissa
    if (absb < 0x33000000u) return uint16_t(sign);  // below half of the smallest subnormal (2^-25): 0
    const uint32_t e = absb >> 23, m = (absb & 0x7fffff) | 0x800000, shift = 126 - e;  // 2^-24 units
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1))) q++;
    return uint16_t(sign | q);
  }
  uint32_t r = absb - 0x38000000u;  // rebias the exponent (127 -> 15): bits [10..] hold exp and mantissa
  r += 0xfff + ((r >> 13) & 1);     // round to nearest-even at bit 13
  return uint16_t(sign | (r >> 13));
#endif
}

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_bits_to_f32(h);
}

// f(std::integral_constant<int, R>{}) for the run-time R among the compile-time Rs (the LAST of them when R is none):
// the tile kernels take their row count as a template argument (their accumulators are registers).
template <int... Rs, class F>
inline void with_int(int r, F&& f) {
  static_assert(sizeof...(Rs) > 0);
  if (!((r == Rs ? (f(std::integral_constant<int, Rs>{}), true) : false) || ...)) {
    constexpr int last[] = {Rs...};
    f(std::integral_constant<int, last[sizeof...(Rs) - 1]>{});
  }
}

// f(std::integral_constant<QT, T>{}) for the run-time block type t of the integer-activation kernels (q16, q8):
// Q4_0, Q4_1, or Q8_0 for any other (callers reject F16 before they get here).
template <class F>
inline void with_block_qtype(QT t, F&& f) {
  switch (t) {
    case QT::Q4_0: f(std::integral_constant<QT, QT::Q4_0>{}); break;
    case QT::Q4_1: f(std::integral_constant<QT, QT::Q4_1>{}); break;
    default: f(std::integral_constant<QT, QT::Q8_0>{}); break;
  }
}

constexpr int block_bytes(QT t) { return t == QT::Q4_0 ? 18 : t == QT::Q4_1 ? 20 : t == QT::Q8_0 ? 34 : 64; }

#ifdef SGL_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace
