// Attention pieces shared by the decode kernels (decode_attention.cpp: batches over the paged pool;
// decode_layer.cpp: the fused batch-1 layer; decode_rows.cpp: rows): dot, axpy and the shifted exp of a score
// row (8-wide on AVX2), over a KV pool of fp32 or of fp16 (`--kv-cache-dtype fp16`: Half below).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "quant_common.h"  // f16_bits_to_f32

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SGL_ATTN_AVX2 1
#endif

namespace {

// An element of an fp16 KV pool: IEEE half bits (torch.float16's layout). Values are rounded to nearest-even
// when stored (as torch's .to(torch.float16): the torch store path and these kernels write the same bits) and
// widened exactly when read, so a pool's entries read the same in every kernel and in the torch path.
struct Half {
  uint16_t bits;
};

inline float kv_f32(float x) { return x; }
inline float kv_f32(Half h) { return f16_bits_to_f32(h.bits); }

#ifdef SGL_ATTN_AVX2
inline __m256 kv_load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 kv_load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

// dst[0..n) = x[0..n) in the pool's element type.
inline void kv_store(const float* x, int64_t n, float* dst) { std::copy(x, x + n, dst); }
inline void kv_store(const float* x, int64_t n, Half* dst) {
  int64_t j = 0;
#ifdef SGL_ATTN_AVX2
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; j < n; j++) dst[j].bits = f32_to_f16_bits(x[j]);
}

template <typename KV>
inline float dot(const float* a, const KV* b, int64_t d) {
  int64_t j = 0;
  float s = 0.f;
#ifdef SGL_ATTN_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= d; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), kv_load8(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), kv_load8(b + j + 8), acc1);
  }
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  s = _mm_cvtss_f32(h);
#endif
  for (; j < d; j++) s = std::fma(a[j], kv_f32(b[j]), s);  // fma: the same rounding in every instantiation
  return s;
}

template <typename KV>
inline void axpy(float a, const KV* x, float* y, int64_t d) {  // y += a * x
  int64_t j = 0;
#ifdef SGL_ATTN_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; j + 8 <= d; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, kv_load8(x + j), _mm256_loadu_ps(y + j)));
#endif
  for (; j < d; j++) y[j] = std::fma(a, kv_f32(x[j]), y[j]);
}

#ifdef SGL_ATTN_AVX2
// exp of 8 floats (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, 2^n by exponent bits): ~1e-7
// relative error for the softmax range (x <= 0; below -88.4 it clamps to ~1e-38, i.e. 0 in the sum).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif

// s[0..n) <- exp(s - max s); returns their sum (the softmax before its normalization). At decode with
// batches this is ~n x G x layers exps per row and step: the scalar std::exp loop was most of the attention.
inline float exp_shifted(float* s, int64_t n) {
  float mx = -INFINITY, sum = 0.f;
  int64_t l = 0;
#ifdef SGL_ATTN_AVX2
  __m256 vm = _mm256_set1_ps(-INFINITY);
  for (; l + 8 <= n; l += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + l));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vm);
  for (float v : lanes) mx = std::max(mx, v);
#endif
  for (; l < n; l++) mx = std::max(mx, s[l]);
  l = 0;
#ifdef SGL_ATTN_AVX2
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vs = _mm256_setzero_ps();
  for (; l + 8 <= n; l += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + l), vmx));
    _mm256_storeu_ps(s + l, e);
    vs = _mm256_add_ps(vs, e);
  }
  _mm256_store_ps(lanes, vs);
  for (float v : lanes) sum += v;
#endif
  for (; l < n; l++) sum += (s[l] = std::exp(s[l] - mx));
  return sum;
}

#ifdef SGL_ATTN_AVX2
// dot(q, k[c], d) * scale for the 4 keys k[0..3] (d % 16 == 0), with dot()'s FMAs and its reduction tree per
// key (acc0 + acc1; low + high half; lanes 0 + 2 and 1 + 3; then their sum): the same bits, the four keys'
// chains interleaved and their horizontal sums done together (~2/3 of dot()'s instructions per key).
template <typename KV>
inline void dot4(const float* q, const KV* const k[4], int64_t d, float scale, float* s0, float* s1, float* s2,
                 float* s3) {
  __m256 a0[4], a1[4];
  for (int c = 0; c < 4; c++) a0[c] = a1[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    const __m256 q0 = _mm256_loadu_ps(q + j), q1 = _mm256_loadu_ps(q + j + 8);
    for (int c = 0; c < 4; c++) {
      a0[c] = _mm256_fmadd_ps(q0, kv_load8(k[c] + j), a0[c]);
      a1[c] = _mm256_fmadd_ps(q1, kv_load8(k[c] + j + 8), a1[c]);
    }
  }
  __m256 t[4];
  for (int c = 0; c < 4; c++) t[c] = _mm256_add_ps(a0[c], a1[c]);
  const __m256 t01 = _mm256_add_ps(_mm256_permute2f128_ps(t[0], t[1], 0x20), _mm256_permute2f128_ps(t[0], t[1], 0x31));
  const __m256 t23 = _mm256_add_ps(_mm256_permute2f128_ps(t[2], t[3], 0x20), _mm256_permute2f128_ps(t[2], t[3], 0x31));
  const __m256 y = _mm256_add_ps(_mm256_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
  alignas(32) float z[8];
  _mm256_store_ps(z, _mm256_mul_ps(_mm256_hadd_ps(y, y), _mm256_set1_ps(scale)));  // keys 0, 2 | 1, 3
  *s0 = z[0], *s1 = z[4], *s2 = z[1], *s3 = z[5];
}

// out[0..64) += sum over the n rows r: a[r] * v[r][off .. off + 64), the rows in order: axpy()'s FMAs with the
// 64 outputs held in registers across the rows instead of loaded and stored per row.
template <typename KV>
inline void axpy64_rows(const float* a, const KV* const* v, int64_t off, int64_t n, float* out) {
  __m256 acc[8];
  for (int j = 0; j < 8; j++) acc[j] = _mm256_loadu_ps(out + 8 * j);
  for (int64_t r = 0; r < n; r++) {
    const __m256 av = _mm256_set1_ps(a[r]);
    for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(av, kv_load8(v[r] + off + 8 * j), acc[j]);
  }
  for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + 8 * j, acc[j]);
}
#endif

// The row loops of attend_heads / attend_group (attention_rows.h) as a type, so that each kernel is compiled
// twice with the same bits: Ymm (the AVX2 loops above; dot and exp_shifted alone in the scalar build) and Zmm
// (attention_zmm.h: AVX-512, chosen at run time). The N-row forms take N = 1, 2 or 4 query rows that read the
// same keys / values (the G query heads of a kv head, a group's rows): Zmm loads each K / V vector once for
// the N rows and keeps 4N FMA chains in flight (4 chains wait on the FMA latency); Ymm runs the rows one by one.
struct Ymm {
  template <typename KV>
  static float dot(const float* a, const KV* b, int64_t d) { return ::dot(a, b, d); }
  static float exp_shifted(float* s, int64_t n) { return ::exp_shifted(s, n); }
#ifdef SGL_ATTN_AVX2
  // s[m][c] = dot(q[m], k[c], d) * scale for m < N, c < 4 (d % 16 == 0)
  template <int N, typename KV>
  static void dot4n(const float* const* q, const KV* const k[4], int64_t d, float scale, float* const* s) {
    for (int m = 0; m < N; m++) ::dot4(q[m], k, d, scale, s[m], s[m] + 1, s[m] + 2, s[m] + 3);
  }
  // out[m][0..64) += sum over r < n of p[m][r] * v[r][off .. off + 64), for m < N
  template <int N, typename KV>
  static void axpy64n(const float* const* p, const KV* const* v, int64_t off, int64_t n, float* const* out) {
    for (int m = 0; m < N; m++) ::axpy64_rows(p[m], v, off, n, out[m]);
  }
#endif
};

}  // namespace

#include "attention_zmm.h"

namespace {

// Slots ahead that attend_heads prefetches. A sequence's slots are rarely adjacent in the pool (page size 1:
// at batch 32 its decode tokens sit 32 slots apart, 24 KB), so neither the hardware prefetchers nor the
// out-of-order window hide the misses: at 32 rows x ~91 slots, 30 layers, 1 thread the prefetch took a
// step's attention from 30.7 to 20.9 ms (/tmp-style microbenchmark in the PR note; main: 34.4 ms).
constexpr int64_t kAttnAhead = 8;

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// A query vector of an attention call: q [D], its score row (key l's score at s[l]) and its output [D].
struct QueryRow {
  const float* q;
  float* s;
  float* out;
};

// f(i, N) for the rows [0, n) in chunks of N = 4, then 2, then 1 (N a compile-time constant).
template <class F>
inline void by_4_2_1(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) f(i, std::integral_constant<int, 4>{});
  for (; i + 2 <= n; i += 2) f(i, std::integral_constant<int, 2>{});
  for (; i < n; i++) f(i, std::integral_constant<int, 1>{});
}

// row.s[l] = dot(row.q, k_l) * scale for the keys l in [l0, l1) and the rows that read kv head h0 + g
// (rows[first[g] .. first[g + 1]), g < nkv); key l of kv head h: the D values at kbuf + slots[l] * stride +
// h * D. Keys 4 at a time where D % 16 == 0 (dot4: dot()'s bits). Prefetches the K and V rows of the slot
// kAttnAhead ahead (below l1): the value pass then reads them from L2.
template <typename Ops, typename KV>
inline void scores_rows(const QueryRow* rows, const int64_t* first, int64_t nkv, int64_t D, int64_t h0, const KV* kbuf,
                        const KV* vbuf, const int64_t* slots, int64_t l0, int64_t l1, int64_t stride, float scale) {
  const int64_t row_bytes = nkv * D * int64_t(sizeof(KV)), base = h0 * D;
  for (int64_t l = l0; l < l1;) {
#ifdef SGL_ATTN_AVX2
    const int64_t step = D % 16 == 0 && l + 4 <= l1 ? 4 : 1;
#else
    const int64_t step = 1;
#endif
    for (int64_t c = l; c < l + step && c + kAttnAhead < l1; c++) {
      prefetch_bytes(kbuf + slots[c + kAttnAhead] * stride + base, row_bytes);
      prefetch_bytes(vbuf + slots[c + kAttnAhead] * stride + base, row_bytes);
    }
    for (int64_t g = 0; g < nkv; g++) {
      const QueryRow* rg = rows + first[g];
#ifdef SGL_ATTN_AVX2
      if (step == 4) {
        const KV* k4[4];
        for (int c = 0; c < 4; c++) k4[c] = kbuf + slots[l + c] * stride + base + g * D;
        by_4_2_1(first[g + 1] - first[g], [&](int64_t i, auto N) {
          constexpr int n = decltype(N)::value;
          const float* qs[n];
          float* ss[n];
          for (int m = 0; m < n; m++) qs[m] = rg[i + m].q, ss[m] = rg[i + m].s + l;
          Ops::template dot4n<n>(qs, k4, D, scale, ss);
        });
        continue;
      }
#endif
      const KV* k = kbuf + slots[l] * stride + base + g * D;
      for (int64_t i = 0; i < first[g + 1] - first[g]; i++) rg[i].s[l] = Ops::dot(rg[i].q, k, D) * scale;
    }
    l += step;
  }
}

// row.out[0..D) += sum over keys l in [l0, l1) of row.s[l] * v_l (kv head h0 + g's value row at slots[l] for
// the rows of kv head g, as scores_rows): per output element the FMAs in key order (axpy's).
template <typename Ops, typename KV>
inline void values_rows(const QueryRow* rows, const int64_t* first, int64_t nkv, int64_t D, int64_t h0, const KV* vbuf,
                        const int64_t* slots, int64_t l0, int64_t l1, int64_t stride) {
  int64_t l = l0;
#ifdef SGL_ATTN_AVX2
  // Tiles of kTile slots: a row's output chunk of 64 stays in registers across the tile (the V rows then
  // come from L1 for the rows that share them).
  constexpr int64_t kTile = 16;
  const KV* vt[kTile];
  for (; l < l1; l += kTile) {
    const int64_t cnt = std::min(kTile, l1 - l);
    for (int64_t g = 0; g < nkv; g++) {
      for (int64_t t = 0; t < cnt; t++) vt[t] = vbuf + slots[l + t] * stride + (h0 + g) * D;
      const QueryRow* rg = rows + first[g];
      by_4_2_1(first[g + 1] - first[g], [&](int64_t i, auto N) {
        constexpr int n = decltype(N)::value;
        const float* ps[n];
        float* os[n];
        for (int m = 0; m < n; m++) ps[m] = rg[i + m].s + l;
        int64_t d0 = 0;
        for (; d0 + 64 <= D; d0 += 64) {
          for (int m = 0; m < n; m++) os[m] = rg[i + m].out + d0;
          Ops::template axpy64n<n>(ps, vt, d0, cnt, os);
        }
        for (int64_t t = 0; d0 < D && t < cnt; t++)
          for (int m = 0; m < n; m++) axpy(ps[m][t], vt[t] + d0, rg[i + m].out + d0, D - d0);
      });
    }
  }
#endif
  for (; l < l1; l++)
    for (int64_t g = 0; g < nkv; g++) {
      const KV* v = vbuf + slots[l] * stride + (h0 + g) * D;
      for (int64_t i = first[g]; i < first[g + 1]; i++) axpy(rows[i].s[l], v, rows[i].out, D);
    }
}

// Attention of the query heads of kv heads [h0, h1) over len keys/values. Key l of kv head h is the D floats
// at kbuf + slots[l] * stride + h * D (values at vbuf likewise); the G query heads of kv head h are the rows
// (h - h0) * G .. + G of q [(h1 - h0) * G, D] and of out. out = softmax(q k^T * scale) v per query head.
// Each slot's K (and V) row of the heads is read ONCE, contiguously, for all of their query heads: a
// head-outer loop re-read a slot's row G times, and splitting (row, kv head) pairs over threads read 1/Hkv
// of each pool row at a stride, which the hardware prefetchers stream badly (at batch 32 the pool's rows,
// ~300 MB per step, come from memory). Per query head the operations and their order are those of a
// head-outer loop (dot per key, exp_shifted, l-ascending axpy, then * 1 / sum), so the results do not depend
// on the head range, nor on Ops (Ymm or Zmm). scores: (h1 - h0) * G * (len + 1) floats of scratch.
template <typename Ops, typename KV>
inline void attend_heads_with(const float* q, int64_t h0, int64_t h1, int64_t G, int64_t D, const KV* kbuf,
                              const KV* vbuf, const int64_t* slots, int64_t len, int64_t stride, float scale,
                              float* scores, float* out) {
  const int64_t nkv = h1 - h0, nq = nkv * G;
  static thread_local std::vector<QueryRow> rows;
  static thread_local std::vector<int64_t> first;
  rows.resize(nq);
  first.resize(nkv + 1);
  for (int64_t i = 0; i < nq; i++) rows[i] = QueryRow{q + i * D, scores + i * len, out + i * D};
  for (int64_t g = 0; g <= nkv; g++) first[g] = g * G;
  scores_rows<Ops>(rows.data(), first.data(), nkv, D, h0, kbuf, vbuf, slots, 0, len, stride, scale);
  float* sums = scores + nq * len;
  for (int64_t i = 0; i < nq; i++) sums[i] = Ops::exp_shifted(scores + i * len, len);
  std::fill(out, out + nq * D, 0.f);
  values_rows<Ops>(rows.data(), first.data(), nkv, D, h0, vbuf, slots, 0, len, stride);
  for (int64_t i = 0; i < nq; i++) {
    const float inv = 1.f / sums[i];
    for (int64_t j = 0; j < D; j++) out[i * D + j] *= inv;
  }
}

#ifdef SGL_ATTN_ZMM
// attend_heads_with<Zmm> compiled for AVX-512: flatten inlines the loops (and Zmm's primitives) into this body.
template <typename KV>
SGL_TARGET_ATTN_ZMM __attribute__((flatten)) void attend_heads_zmm(const float* q, int64_t h0, int64_t h1, int64_t G,
                                                                   int64_t D, const KV* kbuf, const KV* vbuf,
                                                                   const int64_t* slots, int64_t len, int64_t stride,
                                                                   float scale, float* scores, float* out) {
  attend_heads_with<Zmm>(q, h0, h1, G, D, kbuf, vbuf, slots, len, stride, scale, scores, out);
}
#endif

// Attention of a row (attend_heads_with above): the AVX-512 loops where the CPU has them, else AVX2's.
template <typename KV>
inline void attend_heads(const float* q, int64_t h0, int64_t h1, int64_t G, int64_t D, const KV* kbuf,
                         const KV* vbuf, const int64_t* slots, int64_t len, int64_t stride, float scale,
                         float* scores, float* out) {
#ifdef SGL_ATTN_ZMM
  if (have_attn_zmm()) return attend_heads_zmm(q, h0, h1, G, D, kbuf, vbuf, slots, len, stride, scale, scores, out);
#endif
  attend_heads_with<Ymm>(q, h0, h1, G, D, kbuf, vbuf, slots, len, stride, scale, scores, out);
}

// The KV pool as the kernels receive it: its K and V base addresses and element type (fp32 or fp16).
struct KVPool {
  void *k, *v;
  bool half;
  // attend_heads over this pool (the arguments of attend_heads after the pool's two buffers).
  void attend(const float* q, int64_t h0, int64_t h1, int64_t G, int64_t D, const int64_t* slots, int64_t len,
              int64_t stride, float scale, float* scores, float* out) const {
    if (half)
      attend_heads(q, h0, h1, G, D, static_cast<const Half*>(k), static_cast<const Half*>(v), slots, len, stride,
                   scale, scores, out);
    else
      attend_heads(q, h0, h1, G, D, static_cast<const float*>(k), static_cast<const float*>(v), slots, len, stride,
                   scale, scores, out);
  }
  // Element `off` of the K (V) pool <- x[0..n).
  void store_k(int64_t off, const float* x, int64_t n) const { store(k, off, x, n); }
  void store_v(int64_t off, const float* x, int64_t n) const { store(v, off, x, n); }

 private:
  void store(void* base, int64_t off, const float* x, int64_t n) const {
    if (half) kv_store(x, n, static_cast<Half*>(base) + off);
    else kv_store(x, n, static_cast<float*>(base) + off);
  }
};

}  // namespace
