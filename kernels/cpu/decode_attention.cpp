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

#include "attention_common.h"

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
