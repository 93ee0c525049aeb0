// A decoder stack for a small batch of token rows (M <= kQ16MaxRows) in one call: the decode batches of
// continuous batching and the verify rows of speculative decoding, each row computed with the SAME BITS as
// decode_layer.cpp computes that token alone (a batch-1 decode step).
//
// Row t is one token: its residual stream h[t] [hidden], its position's cos / signed-sin rows [D], and its slot
// list (row_slots[t], row_lens[t] entries; the token's own slot LAST). A decode row's list is its sequence's
// slot table; verify row j of a chain is the table up to its own slot (the rows before it in the same
// sequence included); a tree row lists the prefix, its ancestors and itself. Per layer, 5 phases (run_layer_rows):
//   qkv    x = rms_norm(h) * ln1, quantized (q16 | q8) by each thread for itself;
//          x @ Wqkv^T (+ bias), rope k and store k / v at every row's slot               (columns: whole heads)
//   attn   rope q, attention of the rows' heads over their slot lists                    (attn_items)
//   o      h += attn @ Wo^T (+ bias), attn quantized by each thread                      (columns)
//   gu     act = silu(x2 @ Wgate^T) * (x2 @ Wup^T), x2 = rms_norm(h) * ln2 (each thread);
//          each chunk quantizes its act blocks                                           (columns: whole blocks)
//   down   h += act @ Wdown^T                                                            (columns)
// One parallel_run for the whole stack (the helpers stay in the task across layers).
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
#include <memory>
#include <numeric>
#include <stdexcept>
#include <thread>
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
#include "rows_profile.h"

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
  void set_row(int64_t r, const float* x) { set_blocks(r, x, 0, nb); }  // x [K] -> row r
  // x: the fp32 of blocks [b0, b1) of row r (x[0] is column b0 * kBlock) -> those blocks of row r.
  void set_blocks(int64_t r, const float* x, int64_t b0, int64_t b1) {
    const int64_t o = r * nb + b0;
    float *dr = d.data() + o, *sr = s.data() + o;
    if (mode == Act::Q8) {
      int8_t* qr = q8.data() + o * kBlock;
      int32_t* cr = c8.data() + o * kQ8Corr;
      quantize_blocks8(x, b1 - b0, qr, dr, sr, cr);
      if (tile) pack_row8_blocks(qr, dr, sr, cr, r, b0, b1, tiled8);
    } else {
      int16_t* qr = q.data() + o * kBlock;
      quantize_blocks16(x, b1 - b0, qr, dr, sr);
      if (tile) pack_row_blocks(qr, dr, sr, r, b0, b1, tiled);
    }
  }
};

// out[r, n] (row stride ldo) = x_r . W row n (+ bias[n]) (+ resid[r, n]) for n in [n0, n1), every row r. packed: W is
// an oct-packed copy (q8 only; n0 a multiple of 8).
void gemm_rows(QT t, const uint8_t* W, bool packed, int64_t K, const RowsAct& a, float* out, int64_t ldo,
               const float* bias, const float* resid, int64_t n0, int64_t n1) {
  if (a.mode == Act::Q8) {
    const Q8BAct av{a.q8.data(), a.d.data(), a.s.data(), a.c8.data(), K, a.nb};
    const Q8Tiled* pp = a.tile ? &a.tiled8 : nullptr;
    with_block_qtype(t, [&](auto tc) {
      if (packed) gemm_q8_cols<decltype(tc)::value, true>(W, a.M, ldo, K, av, pp, out, bias, resid, n0, n1);
      else gemm_q8_cols<decltype(tc)::value>(W, a.M, ldo, K, av, pp, out, bias, resid, n0, n1);
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

// Per-call scratch shared by the call's threads (each writes its own rows / columns / blocks).
struct Scratch {
  std::vector<float> qkv, attn;
  RowsAct a_act;  // the down projection's input, quantized block by block in the gate/up phase
};

// A thread's own activations: every thread that takes part in a matmul phase first normalizes and quantizes
// ALL rows itself (a few KB a row) instead of its share of them before a barrier: at 2 threads the split prep
// phases cost more per thread than all the rows alone (cache lines of h and of the tile written by both
// threads), plus four barriers a layer.
struct OwnActs {
  std::vector<float> x;  // [M, hidden]: the rows after rms_norm
  RowsAct h, attn;
};

// The phases of one layer; a phase ends when its items are done, whoever did them (thread_pool.h).
enum LayerPhase { kQkv, kAttn, kO, kGateUp, kDown, kPhases };

// A Phase on its own cache line: the call holds kPhases per layer, claimed and published by every thread.
struct alignas(64) LinePhase {
  sgl_cpu::Phase p;
};

// qkv columns [c, c + D) of every row (c a multiple of D past the q heads): k head g roped and stored, or v head
// g stored, at the row's own slot.
void store_head(const Rows& r, const Shape& s, const KVPool& kv, const float* qkv, int64_t c) {
  const int64_t D = s.D, nqkv = (s.H + 2 * s.Hkv) * D, kvrow = s.Hkv * D, k0 = s.H * D, v0 = k0 + kvrow;
  static thread_local std::vector<float> kr;
  kr.resize(D);
  for (int64_t t = 0; t < r.M; t++) {
    const int64_t slot = r.slots[t][r.lens[t] - 1];
    const float* x = qkv + t * nqkv + c;
    if (c < v0) {
      rope(x, r.cos + t * D, r.sin + t * D, D, kr.data());
      kv.store_k(slot * kvrow + (c - k0), kr.data(), D);
    } else {
      kv.store_v(slot * kvrow + (c - v0), x, D);
    }
  }
}

// One layer for every row, run by each thread of the call (the phases keep them in step):
//   qkv    x = rms_norm(h) * ln1, quantized (own);  x @ Wqkv^T (+ bias) by column chunks; a chunk ropes and
//          stores the k / v heads it holds at every row's slot                                          | done
//   attn   rope q, attention of the rows' heads (attn_items)                                           | done
//   o      the attention rows quantized (own);  h += attn @ Wo^T (+ bias) by column chunks              | done
//   gu     x2 = rms_norm(h) * ln2 (own);  act = silu(x2 @ Wgate^T) * (x2 @ Wup^T) by chunks of whole
//          blocks, each chunk quantizing its act blocks into the shared a_act                           | done
//   down   h += act @ Wdown^T by column chunks                                                         | done
// Every row's K/V is stored before any row attends (qkv's end), so a verify row sees the draft rows before it.
// A thread preps its own activations only when the phase has work left: a helper that arrives late skips
// the phases already done (its prep might read h while it changes: it then finds no work and uses nothing).
void run_layer_rows(const Rows& r, const LayerW& w, const Shape& s, Scratch& sc, OwnActs& own, LinePhase* ph,
                    int slot) {
  const int64_t M = r.M, nqkv = (s.H + 2 * s.Hkv) * s.D, qd = s.H * s.D, ld = s.hidden;
  float *qkv = sc.qkv.data(), *attn = sc.attn.data();
  const int64_t rb_gu = row_bytes(w.tgu, s.hidden);
  (void)slot;  // the profile's (rows_profile.h)
  PROF_DECL;
  if (ph[kQkv].p.has_work()) {
    if (w.ln1 != nullptr)
      rms_norm_rows(r.h, s.hidden, w.ln1, M, s.hidden, s.eps, own.x.data(), ld);
    else  // no input norm (an EAGLE head's layer): the stream itself, as decode_layer
      for (int64_t t = 0; t < M; t++) std::copy(r.h + t * s.hidden, r.h + (t + 1) * s.hidden, own.x.data() + t * ld);
    for (int64_t t = 0; t < M; t++) own.h.set_row(t, own.x.data() + t * ld);
    PROF_MARK(slot, kQkv, 0);
    ph[kQkv].p.work([&](int64_t n0, int64_t n1) {
      gemm_rows(w.tqkv, w.wqkv, w.pqkv, s.hidden, own.h, qkv, nqkv, w.qkv_bias, nullptr, n0, n1);
      for (int64_t c = std::max(n0, qd); c < n1; c += s.D) store_head(r, s, w.kv, qkv, c);
    });
    PROF_MARK(slot, kQkv, 1);
  }
  ph[kQkv].p.wait_done();
  PROF_MARK(slot, kQkv, 2);
  ph[kAttn].p.work([&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) attend_item(r, s, w.kv, qkv, r.attn->items[i], attn);
  });
  PROF_MARK(slot, kAttn, 1);
  ph[kAttn].p.wait_done();
  PROF_MARK(slot, kAttn, 2);
  if (ph[kO].p.has_work()) {
    for (int64_t t = 0; t < M; t++) own.attn.set_row(t, attn + t * qd);
    PROF_MARK(slot, kO, 0);
    ph[kO].p.work([&](int64_t n0, int64_t n1) {  // in place on h: an entry reads only itself
      gemm_rows(w.to, w.wo, w.po, qd, own.attn, r.h, s.hidden, w.o_bias, r.h, n0, n1);
    });
    PROF_MARK(slot, kO, 1);
  }
  ph[kO].p.wait_done();
  PROF_MARK(slot, kO, 2);
  if (ph[kGateUp].p.has_work()) {
    rms_norm_rows(r.h, s.hidden, w.ln2, M, s.hidden, s.eps, own.x.data(), ld);
    for (int64_t t = 0; t < M; t++) own.h.set_row(t, own.x.data() + t * ld);
    PROF_MARK(slot, kGateUp, 0);
    ph[kGateUp].p.work([&](int64_t j0, int64_t j1) {  // gate and up of columns [j0, j1) as [M, j1 - j0] tiles
      static thread_local std::vector<float> gate, up;
      const int64_t n = j1 - j0;
      gate.resize(M * n);
      up.resize(M * n);
      gemm_rows(w.tgu, w.wgu + j0 * rb_gu, w.pgu, s.hidden, own.h, gate.data(), n, nullptr, nullptr, 0, n);
      gemm_rows(w.tgu, w.wgu + (s.I + j0) * rb_gu, w.pgu, s.hidden, own.h, up.data(), n, nullptr, nullptr, 0, n);
      for (int64_t t = 0; t < M; t++) {
        float* a = gate.data() + t * n;  // act in place of gate
        silu_mul(a, up.data() + t * n, a, n);
        sc.a_act.set_blocks(t, a, j0 / kBlock, j1 / kBlock);
      }
    });
    PROF_MARK(slot, kGateUp, 1);
  }
  ph[kGateUp].p.wait_done();
  PROF_MARK(slot, kGateUp, 2);
  ph[kDown].p.work([&](int64_t n0, int64_t n1) {
    gemm_rows(w.td, w.wd, w.pd, s.I, sc.a_act, r.h, s.hidden, nullptr, r.h, n0, n1);
  });
  PROF_MARK(slot, kDown, 1);
  ph[kDown].p.wait_done();
  PROF_MARK(slot, kDown, 2);
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
  for (int64_t i = 0; i < n; i++)  // the layers' packed copies under q8 (the same bits, faster)
    layers.push_back(stack_layer(tb + i * kStackColumns, kv_half != 0, mode == Act::Q8));
  const Shape s{hidden, H, Hkv, D, I, float(eps)};
  const int nt = int(std::max<int64_t>(1, threads));
  AttnPlan plan;
  plan.groups = group_rows(slots, lens, M);
  plan.items = attn_items(plan.groups, Hkv, nt);
  const Rows r{reinterpret_cast<float*>(h), M, reinterpret_cast<const float*>(cos),
               reinterpret_cast<const float*>(sin), slots, lens, float(scale), &plan};
  // the tile's layout of x where a tile runs (AVX-512 or AVX2)
  const bool tile = M >= kQ16TileMinRows && have_rows_tile();
  static thread_local Scratch caller_sc;  // the caller's: reused across steps (no malloc per layer)
  Scratch& sc = caller_sc;  // a reference, so the helpers' task uses the caller's (not their own thread_local)
  sc.qkv.resize(M * (H + 2 * Hkv) * D);
  sc.attn.resize(M * H * D);
  sc.a_act.size(M, I, tile, mode);
  // Column chunks: qkv's a multiple of D (a chunk holds whole k / v heads), gate/up's of kBlock (whole act blocks).
  const int64_t nqkv = (H + 2 * Hkv) * D, step = std::lcm<int64_t>(8, D);
  const int64_t cq = (chunk_for(nqkv, nt) + step - 1) / step * step, ch = chunk_for(hidden, nt);
  const int64_t ci = (chunk_for(I, nt) + kBlock - 1) / kBlock * kBlock;
  std::unique_ptr<LinePhase[]> phases(new LinePhase[n * kPhases]);
  for (int64_t i = 0; i < n; i++) {
    LinePhase* ph = phases.get() + i * kPhases;
    ph[kQkv].p.reset(nqkv, cq);
    ph[kAttn].p.reset(int64_t(plan.items.size()), 1);
    ph[kO].p.reset(hidden, ch);
    ph[kGateUp].p.reset(I, ci);
    ph[kDown].p.reset(hidden, ch);
  }
  // One wake-up for the whole stack: the helpers stay in the task across layers, the phases keep them in step.
  const std::thread::id caller = std::this_thread::get_id();
#ifdef SGL_ROWS_PROFILE
  const int64_t t_call = RowsProfile::now();
  g_rows_profile.calls++, g_rows_profile.layers += n;
  static const char* names[kPhases] = {"qkv", "attn", "o", "gu", "down"};
  std::copy(names, names + kPhases, g_rows_profile.names);
#endif
  auto body = [&] {
    const int slot = std::this_thread::get_id() == caller ? 0 : 1;
#ifdef SGL_ROWS_PROFILE
    g_rows_profile.entry[slot] += RowsProfile::now() - t_call;
#endif
    static thread_local OwnActs own;
    own.x.resize(M * hidden);
    own.h.size(M, hidden, tile, mode);
    own.attn.size(M, H * D, tile, mode);
    for (int64_t i = 0; i < n; i++) run_layer_rows(r, layers[i], s, sc, own, phases.get() + i * kPhases, slot);
  };
  if (nt <= 1) body();
  else sgl_cpu::parallel_run(nt, body);
}
