// AVX-512 versions of the attention row loops (attention_common.h's dot, dot4, axpy64_rows, exp_shifted, as
// the Zmm primitives of attend_heads / attend_group) with the SAME BITS: a zmm holds what the AVX2 code keeps
// in two ymm registers, and every lane does the same operation in the same order. Included by
// attention_common.h after its AVX2 primitives; compiled into the AVX2 build with a target attribute and chosen
// at run time (have_attn_zmm()), so M = 1 decode (decode_layer) and verify rows (decode_rows) keep giving a
// token the same bits, whichever CPU runs them.
//   dot / dot4n: the AVX2 accumulators acc0 (elements j..j+8 of each 16) and acc1 (j+8..j+16) are the low and
//          high halves of one zmm accumulator (an FMA per 16 elements instead of two); then acc0 + acc1 and
//          dot()'s reduction tree, for up to 16 accumulators at once (N query rows x 4 keys).
//   axpy64n: 4 zmm accumulators per output instead of 8 ymm, the same FMA per output element and key.
//   exp_shifted: exp of 16 lanes with exp256's operations per lane; the sum adds the low and then the high 8
//          lanes to the same ymm sum, i.e. 8-element chunks in order, as the AVX2 loop (the max is exact in
//          any order).
// Why: with the row groups of attention_rows.h the K/V come from L1/L2 and a verify step's attention is
// bound by its FMAs and loads: half the FMA instructions, and a K / V vector loaded once for N rows.
// Measured by benchmarks/bench_attention_verify.py (benchmarks/speculative_history.md: "Cheaper verify rows:
// grouped attention").
#pragma once

#if defined(SGL_ATTN_AVX2) && (defined(__GNUC__) || defined(__clang__))
#include <cstdlib>

#define SGL_ATTN_ZMM 1
#define SGL_TARGET_ATTN_ZMM __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,f16c")))

// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own `__Y = __Y` placeholders (as quant_gemm_avx512.h)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

// SGL_CPU_ATTN_NO_ZMM=1 (read once) takes the AVX2 loops (what an AVX2-only CPU runs; tests compare the two).
inline bool have_attn_zmm() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq") && std::getenv("SGL_CPU_ATTN_NO_ZMM") == nullptr;
  return ok;
}

SGL_TARGET_ATTN_ZMM inline __m512 kv_load16(const float* p) { return _mm512_loadu_ps(p); }
SGL_TARGET_ATTN_ZMM inline __m512 kv_load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The AVX2 accumulator pair (acc0, acc1) of a zmm accumulator: acc0 + acc1.
SGL_TARGET_ATTN_ZMM inline __m256 halves_sum(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

// Per 128-bit lane: [x0 + x2, x1 + x3, y0 + y2, y1 + y3] (dot()'s h + movehl(h) for two accumulators).
SGL_TARGET_ATTN_ZMM inline __m512 pair_sums(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
}

// Per 128-bit lane: [x0 + x1, x2 + x3, y0 + y1, y2 + y3] (dot()'s last add for four accumulators).
SGL_TARGET_ATTN_ZMM inline __m512 lane_sums(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

// exp256 on 16 lanes (the same operations per lane).
SGL_TARGET_ATTN_ZMM inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(n));
}

// The primitives of attend_heads / attend_group (attention_common.h's Ymm, the same signatures and bits).
struct Zmm {
  template <typename KV>
  SGL_TARGET_ATTN_ZMM static inline float dot(const float* a, const KV* b, int64_t d) {
    int64_t j = 0;
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= d; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), kv_load16(b + j), acc);
    const __m256 t = halves_sum(acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float s = _mm_cvtss_f32(h);
    for (; j < d; j++) s = std::fma(a[j], kv_f32(b[j]), s);
    return s;
  }

  // s[m][c] = dot(q[m], k[c], d) * scale for m < N (1, 2, 4), c < 4 (d % 16 == 0). Accumulator a[4m + c] holds
  // AVX2's (acc0, acc1) of row m and key c; the reduction applies dot()'s tree to each accumulator, several at
  // once (128-bit lane shuffles keep their sums apart):
  //   t = low 8 + high 8 lanes (acc0 + acc1);  h = t's low 4 + high 4;  (h0 + h2) + (h1 + h3);  * scale.
  template <int N, typename KV>
  SGL_TARGET_ATTN_ZMM static inline void dot4n(const float* const* q, const KV* const k[4], int64_t d, float scale,
                                               float* const* s) {
    __m512 a[4 * N];
    for (int p = 0; p < 4 * N; p++) a[p] = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
      __m512 kv[4];
      for (int c = 0; c < 4; c++) kv[c] = kv_load16(k[c] + j);
      for (int m = 0; m < N; m++) {
        const __m512 x = _mm512_loadu_ps(q[m] + j);
        for (int c = 0; c < 4; c++) a[4 * m + c] = _mm512_fmadd_ps(x, kv[c], a[4 * m + c]);
      }
    }
    if constexpr (N == 1) {  // dot4's ymm reduction
      __m256 t[4];
      for (int c = 0; c < 4; c++) t[c] = halves_sum(a[c]);
      const __m256 t01 = _mm256_add_ps(_mm256_permute2f128_ps(t[0], t[1], 0x20), _mm256_permute2f128_ps(t[0], t[1], 0x31));
      const __m256 t23 = _mm256_add_ps(_mm256_permute2f128_ps(t[2], t[3], 0x20), _mm256_permute2f128_ps(t[2], t[3], 0x31));
      const __m256 y = _mm256_add_ps(_mm256_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm256_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
      alignas(32) float z[8];
      _mm256_store_ps(z, _mm256_mul_ps(_mm256_hadd_ps(y, y), _mm256_set1_ps(scale)));  // keys 0, 2 | 1, 3
      float* s0 = s[0];
      s0[0] = z[0], s0[1] = z[4], s0[2] = z[1], s0[3] = z[5];
    } else {
      // T[i] (128-bit lanes) = [t_2i low, t_2i high, t_2i+1 low, t_2i+1 high]
      __m512 T[2 * N];
      for (int i = 0; i < 2 * N; i++)
        T[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
      // U[m]: 128-bit lane c = h of row m, key c
      __m512 U[N];
      for (int m = 0; m < N; m++)
        U[m] = _mm512_add_ps(_mm512_shuffle_f32x4(T[2 * m], T[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(T[2 * m], T[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
      // V01: lane c = [h0 + h2, h1 + h3] of rows 0 and 1 (key c); R: lane c = the rows' sums, element m = row m
      const __m512 V01 = pair_sums(U[0], U[1]);
      const __m512 R = N == 4 ? lane_sums(V01, pair_sums(U[N == 4 ? 2 : 0], U[N == 4 ? 3 : 1])) : lane_sums(V01, V01);
      // element 4c + m of R is row m, key c: rows to 128-bit lanes
      const __m512 S = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
                                             _mm512_mul_ps(R, _mm512_set1_ps(scale)));
      _mm_storeu_ps(s[0], _mm512_castps512_ps128(S));
      _mm_storeu_ps(s[1], _mm512_extractf32x4_ps(S, 1));
      if constexpr (N == 4) {
        _mm_storeu_ps(s[2], _mm512_extractf32x4_ps(S, 2));
        _mm_storeu_ps(s[3], _mm512_extractf32x4_ps(S, 3));
      }
    }
  }

  // out[m][0..64) += sum over r < n of p[m][r] * v[r][off .. off + 64) for m < N: 4 zmm accumulators per row,
  // each V vector loaded once for the N rows; per output element the FMAs in r order (axpy64_rows').
  template <int N, typename KV>
  SGL_TARGET_ATTN_ZMM static inline void axpy64n(const float* const* p, const KV* const* v, int64_t off, int64_t n,
                                                 float* const* out) {
    __m512 acc[N][4];
    for (int m = 0; m < N; m++)
      for (int j = 0; j < 4; j++) acc[m][j] = _mm512_loadu_ps(out[m] + 16 * j);
    for (int64_t r = 0; r < n; r++) {
      __m512 x[4];
      for (int j = 0; j < 4; j++) x[j] = kv_load16(v[r] + off + 16 * j);
      for (int m = 0; m < N; m++) {
        const __m512 b = _mm512_set1_ps(p[m][r]);
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_fmadd_ps(b, x[j], acc[m][j]);
      }
    }
    for (int m = 0; m < N; m++)
      for (int j = 0; j < 4; j++) _mm512_storeu_ps(out[m] + 16 * j, acc[m][j]);
  }

  SGL_TARGET_ATTN_ZMM static inline float exp_shifted(float* s, int64_t n) {
    float mx = -INFINITY, sum = 0.f;
    int64_t l = 0;
    __m512 vm16 = _mm512_set1_ps(-INFINITY);
    for (; l + 16 <= n; l += 16) vm16 = _mm512_max_ps(vm16, _mm512_loadu_ps(s + l));
    __m256 vm = _mm256_max_ps(_mm512_castps512_ps256(vm16), _mm512_extractf32x8_ps(vm16, 1));
    for (; l + 8 <= n; l += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + l));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vm);
    for (float v : lanes) mx = std::max(mx, v);
    for (; l < n; l++) mx = std::max(mx, s[l]);
    l = 0;
    const __m512 vmx16 = _mm512_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    for (; l + 16 <= n; l += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + l), vmx16));
      _mm512_storeu_ps(s + l, e);
      vs = _mm256_add_ps(vs, _mm512_castps512_ps256(e));  // chunk l .. l + 8, then l + 8 .. l + 16
      vs = _mm256_add_ps(vs, _mm512_extractf32x8_ps(e, 1));
    }
    for (; l + 8 <= n; l += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + l), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(s + l, e);
      vs = _mm256_add_ps(vs, e);
    }
    _mm256_store_ps(lanes, vs);
    for (float v : lanes) sum += v;
    for (; l < n; l++) sum += (s[l] = std::exp(s[l] - mx));
    return sum;
  }
};

}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif
