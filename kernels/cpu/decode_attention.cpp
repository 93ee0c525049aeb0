// Batch decode attention over the paged KV pool (one query token per sequence), fp32.
//
//   q [B, H, D], k_buf/v_buf [num_slots, Hkv, D], slots [B, Lmax] (row b's first lens[b] entries are its
//   slot table; the rest is padding and never read), out [B, H, D]. Query head h reads kv head h / (H / Hkv).
// Work split: (row, kv head) pairs over at::parallel_for; the G = H / Hkv query heads of a kv head share
// each K/V row load (GQA without repeating K/V). Softmax in two passes over the scores (max, then exp/sum),
// output = sum_l p_l v_l / sum_l p_l: the same quantity as torch's scaled_dot_product_attention, up to
// rounding (tests/kernels/test_cpu_attention.py compares against sgl.kernels.attention.paged_attention).
// Replaces ~10 small torch ops per layer (index/view/SDPA) at decode, where each runs cold after a weight
// stream (the note in runtime/models/llama.py).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SGL_ATTN_AVX2 1
#endif

namespace {

inline float dot(const float* a, const float* b, int64_t d) {
  int64_t j = 0;
  float s = 0.f;
#ifdef SGL_ATTN_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= d; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
  }
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  s = _mm_cvtss_f32(h);
#endif
  for (; j < d; j++) s += a[j] * b[j];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t d) {  // y += a * x
  int64_t j = 0;
#ifdef SGL_ATTN_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; j + 8 <= d; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
#endif
  for (; j < d; j++) y[j] += a * x[j];
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

}  // namespace

void decode_attention(std::uintptr_t q_addr, std::uintptr_t k_addr, std::uintptr_t v_addr, std::uintptr_t slots_addr,
                      std::uintptr_t lens_addr, std::uintptr_t out_addr, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                      int64_t Lmax, int64_t num_slots, double scale, int64_t threads) {
  if (B <= 0 || H <= 0 || Hkv <= 0 || D <= 0 || H % Hkv || Lmax <= 0) throw std::invalid_argument("bad attention shape");
  const float* q = reinterpret_cast<const float*>(q_addr);
  const float* kb = reinterpret_cast<const float*>(k_addr);
  const float* vb = reinterpret_cast<const float*>(v_addr);
  const int64_t* slots = reinterpret_cast<const int64_t*>(slots_addr);
  const int64_t* lens = reinterpret_cast<const int64_t*>(lens_addr);
  float* out = reinterpret_cast<float*>(out_addr);
  for (int64_t b = 0; b < B; b++) {  // validated once here: the parallel region cannot throw
    if (lens[b] < 1 || lens[b] > Lmax) throw std::invalid_argument("attention row length out of range");
    for (int64_t l = 0; l < lens[b]; l++)
      if (slots[b * Lmax + l] < 0 || slots[b * Lmax + l] >= num_slots) throw std::invalid_argument("slot out of range");
  }
  const int64_t G = H / Hkv, row_stride = Hkv * D;
  const float sc = float(scale);
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, at::get_num_threads()));
  const int64_t grain = std::max<int64_t>(1, (B * Hkv + threads - 1) / threads);
  at::parallel_for(0, B * Hkv, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / Hkv, kvh = i % Hkv, len = lens[b];
      const int64_t* sl = slots + b * Lmax;
      scores.assign(G * len, 0.f);
      const float* qg = q + (b * H + kvh * G) * D;  // the G query heads of this kv head, consecutive
      for (int64_t l = 0; l < len; l++) {
        const float* k = kb + sl[l] * row_stride + kvh * D;
        for (int64_t g = 0; g < G; g++) scores[g * len + l] = dot(qg + g * D, k, D) * sc;
      }
      float* og = out + (b * H + kvh * G) * D;
      for (int64_t g = 0; g < G; g++) {
        float* s = scores.data() + g * len;
        const float sum = exp_shifted(s, len);
        std::fill(og + g * D, og + (g + 1) * D, 0.f);
        for (int64_t l = 0; l < len; l++) axpy(s[l], vb + sl[l] * row_stride + kvh * D, og + g * D, D);
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < D; j++) og[g * D + j] *= inv;
      }
    }
  });
}
