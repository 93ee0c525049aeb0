// Attention of a GROUP of query rows that share a slot-list prefix (the 1 + k verify rows of one sequence: row
// j's list is the sequence's table up to its own slot; tree rows: the prefix, ancestors, itself), for
// decode_rows.cpp and decode_attention.cpp. Each shared key/value row is read once for all rows of the group
// instead of once per row: a 1 + 8 chain over 400 slots re-read the prefix's K/V 9 times per layer.
//
// Contract: every row's result has the BITS of attend_heads (attention_common.h) on that row alone. Per query
// head the operations and their order are attend_heads': a score per key is dot(q, k) * scale (dot4n and dot
// give the same bits: attention_common.h), exp_shifted over the row's own score row, the output's FMAs over
// the keys in ascending order (axpy64n and axpy do the same FMA per element), then * (1 / sum). Only the
// loop nest changes (keys outer, rows inner), and a key's score or an output element's FMA chain does not
// depend on it. tests/kernels/test_cpu_attention_rows.py checks the bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "attention_common.h"

namespace {

// Rows [first, first + count) of a call; their lists all begin with `shared` equal slots.
struct RowGroup {
  int64_t first, count, shared;
};

// Rows that share a prefix group only while each has at most this many keys of its own: a group computes
// every row's scores before any row's values, so long own parts (decode rows of requests that share only a
// cached prompt) would lose attend_heads' K/V reuse from L2 between a row's two passes.
constexpr int64_t kMaxOwnKeys = 64;

// Consecutive rows whose lists begin with the same slots as the run's first row (values compared; a chain's
// rows point into one table), `shared` = the shortest such common prefix, each row's own part at most
// kMaxOwnKeys. Rows of another sequence share no slot with it, or a cached prompt prefix whose K/V is the same
// for both (grouping them is as exact). Once per call: the lists do not change across layers.
// SGL_CPU_ATTN_NO_GROUPS=1 (read once) runs every row alone: the A/B of the benchmarks.
inline std::vector<RowGroup> group_rows(const int64_t* const* slots, const int64_t* lens, int64_t M) {
  static const bool off = std::getenv("SGL_CPU_ATTN_NO_GROUPS") != nullptr;
  std::vector<RowGroup> groups;
  for (int64_t t = 0; t < M;) {
    RowGroup g{t, 1, lens[t]};
    int64_t longest = lens[t];
    for (int64_t u = t + 1; u < M && !off; u++) {
      const int64_t n = std::min(lens[u], lens[t]);
      int64_t c = 0;
      if (slots[u] == slots[t]) c = n;
      else
        while (c < n && slots[u][c] == slots[t][c]) c++;
      const int64_t shared = std::min(g.shared, c), top = std::max(longest, lens[u]);
      if (c == 0 || top - shared > kMaxOwnKeys) break;
      g.count++, g.shared = shared, longest = top;
    }
    groups.push_back(g);
    t += g.count;
  }
  return groups;
}

// A work item of the attention phase: rows [r0, r1) of group `group`, kv heads [h0, h1).
struct AttnItem {
  int64_t group, r0, r1, h0, h1;
};

// The attention phase's items. One thread: one item per group (all rows, all kv heads). More threads: a
// group's rows share its K/V, so a group splits by kv heads (each item reads 1/Hkv of the rows' K/V, once),
// and by rows too when Hkv items would leave a thread idle (Hkv % threads != 0: 3 kv heads on 2 threads
// gave one thread 2 heads, the other 1). Lone rows keep decode_attention's rule: whole rows when there are
// at least as many of them as threads, else (row, kv head) pairs. Results do not depend on the items.
inline std::vector<AttnItem> attn_items(const std::vector<RowGroup>& groups, int64_t Hkv, int64_t threads) {
  std::vector<AttnItem> items;
  const bool pairs = threads > 1 && int64_t(groups.size()) < threads;  // lone rows as (row, kv head) pairs
  for (int64_t i = 0; i < int64_t(groups.size()); i++) {
    const RowGroup& g = groups[i];
    const bool grouped = g.count > 1;
    const int64_t heads = threads <= 1 ? 1 : grouped || pairs ? Hkv : 1;
    const int64_t chunks = grouped && threads > 1 && Hkv % threads ? std::min(g.count, threads) : 1;
    for (int64_t c = 0; c < chunks; c++) {
      const int64_t r0 = g.count * c / chunks, r1 = g.count * (c + 1) / chunks;
      for (int64_t h = 0; h < heads; h++)
        items.push_back(heads == 1 ? AttnItem{i, r0, r1, 0, Hkv} : AttnItem{i, r0, r1, h, h + 1});
    }
  }
  return items;
}

// Attention of R rows over kv heads [h0, h1) (attend_heads' arguments per row: q[r] [(h1 - h0) G, D], the
// slot list slots[r][0..lens[r]), out[r]), where slots[r][l] == slots[0][l] for l < P <= every lens[r].
// scores: sum over r of (h1 - h0) G (lens[r] + 1) floats of scratch. Ops: Ymm or Zmm (attention_common.h).
// The shared keys run for all the rows' query heads of a kv head at once (scores_rows / values_rows take
// them 4 at a time: each K / V vector loaded once for 4 of them), then each row's own keys.
template <typename Ops, typename KV>
inline void attend_group_with(const float* const* q, const int64_t* const* slots, const int64_t* lens, int64_t R,
                              int64_t P, int64_t h0, int64_t h1, int64_t G, int64_t D, const KV* kbuf, const KV* vbuf,
                              int64_t stride, float scale, float* scores, float* const* out) {
  const int64_t nkv = h1 - h0, nq = nkv * G;
  // by_head: the query rows by kv head (g, then row r, then head), first[g] = g R G; by_row: row r's nq rows
  // from r nq, kv head g's from r nq + g G (first_row[g] = g G).
  static thread_local std::vector<QueryRow> by_head, by_row;
  static thread_local std::vector<int64_t> first, first_row;
  by_head.resize(R * nq);
  by_row.resize(R * nq);
  first.resize(nkv + 1);
  first_row.resize(nkv + 1);
  for (int64_t r = 0, off = 0; r < R; off += nq * (lens[r] + 1), r++)
    for (int64_t i = 0; i < nq; i++) {
      const QueryRow row{q[r] + i * D, scores + off + i * lens[r], out[r] + i * D};
      by_row[r * nq + i] = row;
      by_head[(i / G) * R * G + r * G + i % G] = row;
    }
  for (int64_t g = 0; g <= nkv; g++) first[g] = g * R * G, first_row[g] = g * G;
  scores_rows<Ops>(by_head.data(), first.data(), nkv, D, h0, kbuf, vbuf, slots[0], 0, P, stride, scale);
  // each row's own keys [P, lens[r]) (a chain row's drafts before it and itself: just stored, in cache)
  for (int64_t r = 0; r < R; r++)
    scores_rows<Ops>(by_row.data() + r * nq, first_row.data(), nkv, D, h0, kbuf, vbuf, slots[r], P, lens[r], stride,
                     scale);
  for (int64_t r = 0; r < R; r++) {
    float* sums = by_row[r * nq].s + nq * lens[r];
    for (int64_t i = 0; i < nq; i++) sums[i] = Ops::exp_shifted(by_row[r * nq + i].s, lens[r]);
    std::fill(out[r], out[r] + nq * D, 0.f);
  }
  values_rows<Ops>(by_head.data(), first.data(), nkv, D, h0, vbuf, slots[0], 0, P, stride);
  for (int64_t r = 0; r < R; r++) {
    values_rows<Ops>(by_row.data() + r * nq, first_row.data(), nkv, D, h0, vbuf, slots[r], P, lens[r], stride);
    const float* sums = by_row[r * nq].s + nq * lens[r];
    for (int64_t i = 0; i < nq; i++) {
      const float inv = 1.f / sums[i];
      for (int64_t j = 0; j < D; j++) out[r][i * D + j] *= inv;
    }
  }
}

#ifdef SGL_ATTN_ZMM
// attend_group_with<Zmm> compiled for AVX-512 (as attend_heads_zmm).
template <typename KV>
SGL_TARGET_ATTN_ZMM __attribute__((flatten)) void attend_group_zmm(const float* const* q, const int64_t* const* slots,
                                                                   const int64_t* lens, int64_t R, int64_t P,
                                                                   int64_t h0, int64_t h1, int64_t G, int64_t D,
                                                                   const KV* kbuf, const KV* vbuf, int64_t stride,
                                                                   float scale, float* scores, float* const* out) {
  attend_group_with<Zmm>(q, slots, lens, R, P, h0, h1, G, D, kbuf, vbuf, stride, scale, scores, out);
}
#endif

template <typename KV>
inline void attend_group(const float* const* q, const int64_t* const* slots, const int64_t* lens, int64_t R,
                         int64_t P, int64_t h0, int64_t h1, int64_t G, int64_t D, const KV* kbuf, const KV* vbuf,
                         int64_t stride, float scale, float* scores, float* const* out) {
#ifdef SGL_ATTN_ZMM
  if (have_attn_zmm()) return attend_group_zmm(q, slots, lens, R, P, h0, h1, G, D, kbuf, vbuf, stride, scale, scores, out);
#endif
  attend_group_with<Ymm>(q, slots, lens, R, P, h0, h1, G, D, kbuf, vbuf, stride, scale, scores, out);
}

// attend_group over a pool (KVPool::attend's dispatch on the element type).
inline void attend_group(const KVPool& kv, const float* const* q, const int64_t* const* slots, const int64_t* lens,
                         int64_t R, int64_t P, int64_t h0, int64_t h1, int64_t G, int64_t D, int64_t stride,
                         float scale, float* scores, float* const* out) {
  if (kv.half)
    attend_group(q, slots, lens, R, P, h0, h1, G, D, static_cast<const Half*>(kv.k), static_cast<const Half*>(kv.v),
                 stride, scale, scores, out);
  else
    attend_group(q, slots, lens, R, P, h0, h1, G, D, static_cast<const float*>(kv.k), static_cast<const float*>(kv.v),
                 stride, scale, scores, out);
}

// Scratch floats attend_group needs for rows [r0, r1) of a group over kv heads [h0, h1).
inline int64_t group_scores_size(const int64_t* lens, int64_t r0, int64_t r1, int64_t nq) {
  int64_t n = 0;
  for (int64_t r = r0; r < r1; r++) n += nq * (lens[r] + 1);
  return n;
}

}  // namespace
