// A decoder stack for a small batch of token rows (M <= kQ16MaxRows) in one call: the decode batches of
// continuous batching and the verify rows of speculative decoding, each row computed with the SAME BITS as
// decode_layer.cpp computes that token alone (a batch-1 decode step).
//
// Row t is one token: its residual stream h[t] [hidden], its position's cos / signed-sin rows [D], and its slot
// list (row_slots[t], row_lens[t] entries; the token's own slot LAST). A decode row's list is its sequence's
// slot table; verify row j of a chain is the table up to its own slot (the rows before it in the same
// sequence included); a tree row lists the prefix, its ancestors and itself. Per layer:
//   prep   x_t = rms_norm(h_t) * ln1, quantized (q16 | q8), packed for the tile          (rows over threads)
//   qkv    x @ Wqkv^T (+ bias) for all rows                                              (columns)
//   store  rope k, store k / v of every row at its slot                                  (rows)
//   attn   rope q, attention of the row's heads over its slot list                       (rows, or groups: attn_items)
//   o      h += attn @ Wo^T (+ bias)                                                     (prep by rows, columns)
//   gu     act = silu(x2 @ Wgate^T) * (x2 @ Wup^T), x2 = rms_norm(h) * ln2              (prep by rows, columns)
//   down   h += act @ Wdown^T                                                            (prep by rows, columns)
// Every row's K/V is stored before any row attends, so a verify row sees the draft rows before it.
// Same bits as decode_layer per row: the per-row small ops are decode_common.h's; the matmuls are quant_q16_tile.h's
// batch-invariant q16 GEMM or quant_q8_tile.h's q8 one (act: 2 / 1; every row the bits of gemv_rows / gemv_rows8
// on that row alone);
// attention is attend_heads (attention_common.h), whose per-head arithmetic does not depend on the head range,
// or attend_group (attention_rows.h) for rows sharing a slot prefix: the bits of attend_heads per row.
// Why: a 32-row decode step through llama.py's torch path is ~15 torch ops per layer, each parallelized by
// OpenMP (which scales poorly at 2 threads under PASSIVE), plus fp32-activation matmuls; a verify row
// computed there differs from a decode step in the last bits. tests/kernels/test_cpu_decode_rows.py checks
// the bits against decode_stack.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "quant_common.h"
#include "quant_q16.h"
#include "quant_gemm_avx512.h"
#include "quant_q16_tile.h"
#include "quant_q8_tile.h"
#include "attention_common.h"
#include "attention_rows.h"
#include "decode_common.h"
#include "thread_pool.h"

namespace {

// The activations of M rows in the call's mode (q16 | q8): row-major blocks (as quantize_act16 / quantize_act8
// lay them) and, where the tile runs, the tile's layout (quant_q16_tile.h / quant_q8_tile.h). Sized once per
// call; rows fill their own parts.
struct RowsAct {
  std::vector<int16_t> q;  // q16
  std::vector<int8_t> q8;  // q8
  std::vector<int32_t> c8;  // q8: the lane corrections (quant_q8_blocks.h)
  std::vector<float> d, s;
  Q16Tiled tiled;
  Q8Tiled tiled8;
  int64_t M = 0, K = 0, nb = 0;
  bool tile = false;
  Act mode = Act::Q16;

  void size(int64_t m, int64_t k, bool use_tile, Act act) {
    M = m, K = k, nb = k / kBlock, tile = use_tile, mode = act;
    d.resize(M * nb);
    s.resize(M * nb);
    if (mode == Act::Q8) {
      q8.resize(M * K);
      c8.resize(M * nb * kQ8Corr);
      if (tile) size_tiled8(M, nb, tiled8);
    } else {
      q.resize(M * K);
      if (tile) size_tiled(M, nb, tiled);
    }
  }
  void set_row(int64_t r, const float* x) {  // x [K] -> row r
    float *dr = d.data() + r * nb, *sr = s.data() + r * nb;
    if (mode == Act::Q8) {
      quantize_blocks8(x, nb, q8.data() + r * K, dr, sr, c8.data() + r * nb * kQ8Corr);
      if (tile) pack_row8(q8.data() + r * K, dr, sr, c8.data() + r * nb * kQ8Corr, r, tiled8);
    } else {
      quantize_blocks16(x, nb, q.data() + r * K, dr, sr);
      if (tile) pack_row(q.data() + r * K, dr, sr, r, tiled);
    }
  }
};

// out[r, n] (row stride ldo) = x_r . W row n (+ bias[n]) (+ resid[r, n]) for n in [n0, n1), every row r.
void gemm_rows(QT t, const uint8_t* W, int64_t K, const RowsAct& a, float* out, int64_t ldo, const float* bias,
               const float* resid, int64_t n0, int64_t n1) {
  if (a.mode == Act::Q8) {
    const Q8BAct av{a.q8.data(), a.d.data(), a.s.data(), a.c8.data(), K, a.nb};
    const Q8Tiled* pp = a.tile ? &a.tiled8 : nullptr;
    with_block_qtype(t, [&](auto tc) {
      gemm_q8_cols<decltype(tc)::value>(W, a.M, ldo, K, av, pp, out, bias, resid, n0, n1);
    });
    return;
  }
  const Q16Act av{a.q.data(), a.d.data(), a.s.data(), K, a.nb};
  const Q16Tiled* pp = a.tile ? &a.tiled : nullptr;
  with_block_qtype(t, [&](auto tc) {
    gemm_q16_cols<decltype(tc)::value>(W, a.M, ldo, K, av, pp, out, bias, resid, n0, n1);
  });
}

// The attention phase of a call (attention_rows.h): consecutive rows sharing a slot prefix (one sequence's
// verify rows) as groups, and the work items over threads. Made once per call: the slot lists are the same
// in every layer.
struct AttnPlan {
  std::vector<RowGroup> groups;
  std::vector<AttnItem> items;
};

struct Rows {
  float* h;  // [M, hidden]
  int64_t M;
  const float *cos, *sin;  // [M, D]
  const int64_t* const* slots;  // [M] slot lists
  const int64_t* lens;  // [M]
  float scale;
  const AttnPlan* attn;  // the attention phase's row groups and items
};

struct Shape {
  int64_t hidden, H, Hkv, D, I;
  float eps;
};

// Attention of one item: RoPE of its rows' query heads [h0 G, h1 G), then attend_heads for a lone row or
// attend_group for a group's rows (the same bits per row: attention_rows.h).
void attend_item(const Rows& r, const Shape& s, const KVPool& kv, const float* qkv, const AttnItem& it, float* attn) {
  const RowGroup& g = r.attn->groups[it.group];
  const int64_t D = s.D, G = s.H / s.Hkv, nqkv = (s.H + 2 * s.Hkv) * D, qd = s.H * D, kvrow = s.Hkv * D;
  const int64_t t0 = g.first + it.r0, R = it.r1 - it.r0, nq = (it.h1 - it.h0) * G;
  static thread_local std::vector<float> qr, scores;
  static thread_local std::vector<const float*> qp;
  static thread_local std::vector<float*> op;
  qr.resize(R * nq * D);
  qp.resize(R);
  op.resize(R);
  for (int64_t u = 0; u < R; u++) {
    const int64_t t = t0 + u;
    for (int64_t j = 0; j < nq; j++)
      rope(qkv + t * nqkv + (it.h0 * G + j) * D, r.cos + t * D, r.sin + t * D, D, qr.data() + (u * nq + j) * D);
    qp[u] = qr.data() + u * nq * D;
    op[u] = attn + t * qd + it.h0 * G * D;
  }
  scores.resize(group_scores_size(r.lens, t0, t0 + R, nq));
  if (g.count == 1)
    kv.attend(qp[0], it.h0, it.h1, G, D, r.slots[t0], r.lens[t0], kvrow, r.scale, scores.data(), op[0]);
  else
    attend_group(kv, qp.data(), r.slots + t0, r.lens + t0, R, g.shared, it.h0, it.h1, G, D, kvrow, r.scale,
                 scores.data(), op.data());
}

// Per-call scratch, shared by the call's threads (each writes its own rows / columns).
struct Scratch {
  std::vector<float> qkv, attn, act;
  RowsAct a_h, a_attn, a_act;
};

void run_layer_rows(const Rows& r, const LayerW& w, const Shape& s, Scratch& sc, int threads) {
  const int64_t M = r.M, D = s.D, nqkv = (s.H + 2 * s.Hkv) * D, qd = s.H * D, kvrow = s.Hkv * D;
  float *qkv = sc.qkv.data(), *attn = sc.attn.data(), *act = sc.act.data();
  const int64_t cq = chunk_for(nqkv, threads), ch = chunk_for(s.hidden, threads), ci = chunk_for(s.I, threads);
  sgl_cpu::Phase prep1, ph_qkv, store, ph_attn, prep2, ph_o, prep3, ph_gu, prep4, ph_down;
  prep1.reset(M, 1), ph_qkv.reset(nqkv, cq), store.reset(M, 1), ph_attn.reset(int64_t(r.attn->items.size()), 1);
  prep2.reset(M, 1), ph_o.reset(s.hidden, ch), prep3.reset(M, 1), ph_gu.reset(s.I, ci);
  prep4.reset(M, 1), ph_down.reset(s.hidden, ch);
  const int64_t rb_gu = row_bytes(w.tgu, s.hidden);
  auto body = [&] {
    static thread_local std::vector<float> xr, gate, up, kr;
    xr.resize(std::max(s.hidden, qd));
    prep1.work([&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        rms_norm_row(r.h + t * s.hidden, w.ln1, s.hidden, s.eps, xr.data());
        sc.a_h.set_row(t, xr.data());
      }
    });
    prep1.wait_done();
    ph_qkv.work([&](int64_t n0, int64_t n1) {
      gemm_rows(w.tqkv, w.wqkv, s.hidden, sc.a_h, qkv, nqkv, w.qkv_bias, nullptr, n0, n1);
    });
    ph_qkv.wait_done();
    store.work([&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        const int64_t slot = r.slots[t][r.lens[t] - 1];
        const float* row = qkv + t * nqkv;
        kr.resize(kvrow);
        for (int64_t g = 0; g < s.Hkv; g++) rope(row + (s.H + g) * D, r.cos + t * D, r.sin + t * D, D, kr.data() + g * D);
        w.kv.store_k(slot * kvrow, kr.data(), kvrow);
        w.kv.store_v(slot * kvrow, row + (s.H + s.Hkv) * D, kvrow);
      }
    });
    store.wait_done();
    ph_attn.work([&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; i++) attend_item(r, s, w.kv, qkv, r.attn->items[i], attn);
    });
    ph_attn.wait_done();
    prep2.work([&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) sc.a_attn.set_row(t, attn + t * qd);
    });
    prep2.wait_done();
    ph_o.work([&](int64_t n0, int64_t n1) {  // in place on h: an entry reads only itself
      gemm_rows(w.to, w.wo, qd, sc.a_attn, r.h, s.hidden, w.o_bias, r.h, n0, n1);
    });
    ph_o.wait_done();
    prep3.work([&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        rms_norm_row(r.h + t * s.hidden, w.ln2, s.hidden, s.eps, xr.data());
        sc.a_h.set_row(t, xr.data());
      }
    });
    prep3.wait_done();
    ph_gu.work([&](int64_t j0, int64_t j1) {  // gate and up of columns [j0, j1) as [M, j1 - j0] tiles
      const int64_t n = j1 - j0;
      gate.resize(M * n);
      up.resize(M * n);
      gemm_rows(w.tgu, w.wgu + j0 * rb_gu, s.hidden, sc.a_h, gate.data(), n, nullptr, nullptr, 0, n);
      gemm_rows(w.tgu, w.wgu + (s.I + j0) * rb_gu, s.hidden, sc.a_h, up.data(), n, nullptr, nullptr, 0, n);
      for (int64_t t = 0; t < M; t++)
        for (int64_t j = 0; j < n; j++) {
          const float gv = gate[t * n + j];
          act[t * s.I + j0 + j] = gv / (1.f + std::exp(-gv)) * up[t * n + j];
        }
    });
    ph_gu.wait_done();
    prep4.work([&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) sc.a_act.set_row(t, act + t * s.I);
    });
    prep4.wait_done();
    ph_down.work([&](int64_t n0, int64_t n1) {
      gemm_rows(w.td, w.wd, s.I, sc.a_act, r.h, s.hidden, nullptr, r.h, n0, n1);
    });
    ph_down.wait_done();
  };
  if (threads <= 1) body();
  else sgl_cpu::parallel_run(threads, body);
}

}  // namespace

// The decoder stack (the layers of decode_layer.py's DecodeStack table: decode_common.h) for M token rows, in
// place on h [M, hidden]. cos / sin [M, D]; row_slots [M] the addresses of the rows' int64 slot lists and
// row_lens [M] their lengths (each row's own slot last). Validates every slot before any layer runs.
void decode_rows(Addr h, int64_t M, Addr table, int64_t n, double eps, int64_t hidden, int64_t H, int64_t Hkv,
                 int64_t D, int64_t I, Addr cos, Addr sin, Addr row_slots, Addr row_lens, int64_t num_slots,
                 double scale, int64_t kv_half, int64_t threads, int64_t act) {
  const Act mode = act_mode(act);
  if (M < 1 || M > kQ16MaxRows) throw std::invalid_argument("decode_rows takes 1..64 rows");
  if (n < 1 || hidden <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || D <= 0 || D > 512 || D % 2 || I <= 0 ||
      hidden % kBlock || (H * D) % kBlock || I % kBlock)
    throw std::invalid_argument("bad decode_rows shape");
  const int64_t* const* slots = reinterpret_cast<const int64_t* const*>(row_slots);
  const int64_t* lens = reinterpret_cast<const int64_t*>(row_lens);
  for (int64_t t = 0; t < M; t++) {
    if (lens[t] < 1 || slots[t] == nullptr) throw std::invalid_argument("decode_rows: empty slot list");
    for (int64_t l = 0; l < lens[t]; l++)
      if (slots[t][l] < 0 || slots[t][l] >= num_slots) throw std::invalid_argument("decode_rows: slot out of range");
  }
  const int64_t* tb = reinterpret_cast<const int64_t*>(table);
  std::vector<LayerW> layers;
  layers.reserve(n);
  for (int64_t i = 0; i < n; i++) layers.push_back(stack_layer(tb + i * kStackColumns, kv_half != 0));
  const Shape s{hidden, H, Hkv, D, I, float(eps)};
  const int nt = int(std::max<int64_t>(1, threads));
  AttnPlan plan;
  plan.groups = group_rows(slots, lens, M);
  plan.items = attn_items(plan.groups, Hkv, nt);
  const Rows r{reinterpret_cast<float*>(h), M, reinterpret_cast<const float*>(cos),
               reinterpret_cast<const float*>(sin), slots, lens, float(scale), &plan};
  bool tile = false;
#ifdef SGL_AVX512_TILE
  tile = M >= kQ16TileMinRows && have_q16_tile();
#endif
  static thread_local Scratch sc;  // the caller's: reused across steps (no malloc per layer)
  sc.qkv.resize(M * (H + 2 * Hkv) * D);
  sc.attn.resize(M * H * D);
  sc.act.resize(M * I);
  sc.a_h.size(M, hidden, tile, mode);
  sc.a_attn.size(M, H * D, tile, mode);
  sc.a_act.size(M, I, tile, mode);
  for (const LayerW& w : layers) run_layer_rows(r, w, s, sc, nt);
}
