// Batch decode attention over the paged KV pool (one query token per sequence): fp32 queries and outputs,
// a pool of fp32 or fp16 (kv_half) entries.
//
//   q [B, H, D], k_buf/v_buf [num_slots, Hkv, D], slots [B, Lmax] (row b's first lens[b] entries are its
//   slot table; the rest is padding and never read), out [B, H, D]. Query head h reads kv head h / (H / Hkv).
// Work split: rows over the decode pool (pairs of row and kv head when the batch has fewer rows than threads);
// attend_heads reads each slot's K/V row once for all query heads (GQA without repeating K/V); consecutive rows
// that share a slot prefix (verify rows of one sequence) run as one group (attention_rows.h), same bits.
// Softmax in two passes over the scores (max, then exp/sum), output = sum_l p_l v_l / sum_l p_l: the same
// quantity as torch's scaled_dot_product_attention, up to rounding (tests/kernels/test_cpu_attention.py compares
// against sgl.kernels.attention.paged_attention).
// Replaces ~10 small torch ops per layer (index/view/SDPA) at decode, where each runs cold after a weight
// stream (the note in runtime/models/llama.py).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "attention_common.h"
#include "attention_rows.h"
#include "thread_pool.h"

void decode_attention(std::uintptr_t q_addr, std::uintptr_t k_addr, std::uintptr_t v_addr, std::uintptr_t slots_addr,
                      std::uintptr_t lens_addr, std::uintptr_t out_addr, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                      int64_t Lmax, int64_t num_slots, double scale, int64_t kv_half, int64_t threads) {
  if (B <= 0 || H <= 0 || Hkv <= 0 || D <= 0 || H % Hkv || Lmax <= 0) throw std::invalid_argument("bad attention shape");
  const float* q = reinterpret_cast<const float*>(q_addr);
  const KVPool pool{reinterpret_cast<void*>(k_addr), reinterpret_cast<void*>(v_addr), kv_half != 0};
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
  threads = std::max<int64_t>(1, threads);
  // Items on the decode pool (thread_pool.h), taken one at a time from an atomic counter (rows differ in
  // length): a lone row with all its kv heads (one contiguous pass over its pool rows), or (row, kv head)
  // pairs when there are fewer rows than threads, so one long row still uses every thread; rows sharing a
  // slot prefix (one sequence's verify rows) as a group that reads the shared K/V once, split by kv heads
  // and rows over threads (attention_rows.h: attn_items).
  std::vector<const int64_t*> lists(B);
  for (int64_t b = 0; b < B; b++) lists[b] = slots + b * Lmax;
  const std::vector<RowGroup> groups = group_rows(lists.data(), lens, B);
  const std::vector<AttnItem> items = attn_items(groups, Hkv, threads);
  auto rows = [&](int64_t i0, int64_t i1) {
    static thread_local std::vector<float> scores;
    static thread_local std::vector<const float*> qp;
    static thread_local std::vector<float*> op;
    for (int64_t i = i0; i < i1; i++) {
      const AttnItem& it = items[i];
      const RowGroup& g = groups[it.group];
      const int64_t b0 = g.first + it.r0, R = it.r1 - it.r0, nq = (it.h1 - it.h0) * G;
      qp.resize(R);
      op.resize(R);
      for (int64_t r = 0; r < R; r++) {
        qp[r] = q + ((b0 + r) * H + it.h0 * G) * D;
        op[r] = out + ((b0 + r) * H + it.h0 * G) * D;
      }
      scores.resize(group_scores_size(lens, b0, b0 + R, nq));
      if (g.count == 1)
        pool.attend(qp[0], it.h0, it.h1, G, D, lists[b0], lens[b0], row_stride, sc, scores.data(), op[0]);
      else
        attend_group(pool, qp.data(), lists.data() + b0, lens + b0, R, g.shared, it.h0, it.h1, G, D, row_stride, sc,
                     scores.data(), op.data());
    }
  };
  const int64_t n = int64_t(items.size());
  if (threads <= 1) {
    rows(0, n);
    return;
  }
  sgl_cpu::Phase ph;
  ph.reset(n, 1);
  sgl_cpu::parallel_run(int(threads), [&] {
    ph.work(rows);
    ph.wait_done();
  });
}
