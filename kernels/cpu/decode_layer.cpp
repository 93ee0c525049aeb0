// One Llama decoder layer for ONE token (batch-1 decode) in one call, and the M = 1 GEMV, on the decode
// thread pool (thread_pool.h).
//
// decode_layer, for the token's residual stream h [hidden] (updated in place):
//   x = rms_norm(h) * ln1                         (each thread, redundantly: no barrier; ln1 null: x = h)
//   qkv = x @ Wqkv^T (+ qkv_bias)                 columns in chunks over the threads      | done
//   per kv head g (chunks): rope k_g, store k_g/v_g at slots[L - 1] (the new token's slot is the last), rope the G = H/Hkv query heads of g,
//   attention of those heads over slots[0..L) (the new token's slot included)             | done
//   h = (attn @ Wo^T (+ o_bias)) + h               columns in chunks                       | done
//   x = rms_norm(h) * ln2                          (each thread)
//   act[j] = silu(x @ Wgate_j) * (x @ Wup_j)       j in chunks (gate row j and up row I + j) | done
//   h = (act @ Wdown^T) + h                        columns in chunks                       | join
// Weights are GGUF blocks (Q4_0 / Q4_1 / Q8_0) in the layout of quant.py; qkv rows are [q | k | v] and
// gate_up rows [gate | up] (llama.py's fused layout). The matmuls use the q16 activations of quant_q16.h
// (the default act mode) or the q8 ones of quant_q8_blocks.h (act: 2 = q16, 1 = q8), the norm rms_norm.cpp's
// formula, RoPE "rotate half" with the [D] cos / signed-sin rows of the position (rotary.py), attention
// decode_attention.cpp's two-pass softmax: so the layer computes what llama.py's unfused path computes, up to float rounding.
// A column's arithmetic does not depend on the chunking (gemv_rows' / gemv_rows8's contracts), so the
// result is bit-identical for every thread count. Chunks are taken from an atomic counter and a phase ends
// when its chunks are done (thread_pool.h): on a loaded machine a descheduled thread's share is taken by
// the others, and the caller alone can run the whole layer.
// Why: the unfused layer is ~15 torch ops + 4 GEMV calls, each after a ~2 MB weight stream that evicts
// the caches (llama.py's note), and 4+ fork/joins; here the small ops run on cache-hot data, in one fork.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "quant_common.h"
#include "quant_q16.h"
#include "attention_common.h"
#include "decode_common.h"
#include "thread_pool.h"

namespace {

struct Layer {
  float* h;
  LayerW w;
  float eps;
  int64_t hidden, H, Hkv, D, I;
  const float *cos, *sin;
  const int64_t* slots;
  int64_t L, out_slot;
  float scale;
  Act act;
};

// Attention of kv head g's query heads for the one token (keys/values of slots[0..L)); stores k/v first.
void attend_kv_head(const Layer& p, const float* qkv, int64_t g, float* attn, std::vector<float>& scores) {
  const int64_t D = p.D, G = p.H / p.Hkv, row = p.Hkv * D;
  static thread_local std::vector<float> q_roped;  // the G query heads after RoPE, then k_g
  q_roped.resize((G + 1) * D);
  float* qr = q_roped.data();
  rope(qkv + (p.H + g) * D, p.cos, p.sin, D, qr + G * D);
  p.w.kv.store_k(p.out_slot * row + g * D, qr + G * D, D);
  p.w.kv.store_v(p.out_slot * row + g * D, qkv + (p.H + p.Hkv + g) * D, D);
  scores.resize(G * (p.L + 1));
  for (int64_t i = 0; i < G; i++) rope(qkv + (g * G + i) * D, p.cos, p.sin, D, qr + i * D);
  p.w.kv.attend(qr, g, g + 1, G, D, p.slots, p.L, row, p.scale, scores.data(), attn + g * G * D);
}

void run_layer(const Layer& p, int threads) {
  const int64_t D = p.D, nqkv = (p.H + 2 * p.Hkv) * D, qd = p.H * D;
  static thread_local std::vector<float> qkv_s, attn_s, act_s;  // shared by the call's threads (caller-owned)
  qkv_s.resize(nqkv);
  attn_s.resize(qd);
  act_s.resize(p.I);
  float *qkv = qkv_s.data(), *attn = attn_s.data(), *act = act_s.data();
  sgl_cpu::Phase ph_qkv, ph_attn, ph_o, ph_gu, ph_down;
  ph_qkv.reset(nqkv, chunk_for(nqkv, threads));
  ph_attn.reset(p.Hkv, 1);
  ph_o.reset(p.hidden, chunk_for(p.hidden, threads));
  ph_gu.reset(p.I, chunk_for(p.I, threads));
  ph_down.reset(p.hidden, chunk_for(p.hidden, threads));
  const int64_t rb_qkv = row_bytes(p.w.tqkv, p.hidden), rb_o = row_bytes(p.w.to, qd);
  const int64_t rb_gu = row_bytes(p.w.tgu, p.hidden), rb_d = row_bytes(p.w.td, p.I);
  // Every thread walks the phases in order; it prepares a phase's input (its own copy of the normed and
  // quantized activations) only when the phase has work left, and waits for each phase to be done
  // before the next (the next phase reads all of its output).
  static sgl_cpu::AdaptiveSite site;
  const double work = double(rb_qkv * nqkv + rb_o * p.hidden + rb_gu * 2 * p.I + rb_d * p.hidden);  // weight bytes
  sgl_cpu::parallel_run_adaptive(threads, site, work, [&] {
    static thread_local std::vector<float> x, gate, up, scores;
    static thread_local ActRow a;
    x.resize(std::max({p.hidden, qd, p.I}));
    if (ph_qkv.has_work()) {
      if (p.w.ln1 != nullptr)
        rms_norm_row(p.h, p.w.ln1, p.hidden, p.eps, x.data());
      else  // no input norm (an EAGLE head's layer): the stream itself
        std::copy(p.h, p.h + p.hidden, x.data());
      a.set(p.act, x.data(), p.hidden);
      ph_qkv.work([&](int64_t n0, int64_t n1) {
        a.gemv(p.w.tqkv, p.w.wqkv + n0 * rb_qkv, rb_qkv, n1 - n0, qkv + n0,
               p.w.qkv_bias != nullptr ? p.w.qkv_bias + n0 : nullptr, nullptr, p.w.pqkv);
      });
    }
    ph_qkv.wait_done();
    // rope + KV store + attention, by kv head
    ph_attn.work([&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; g++) attend_kv_head(p, qkv, g, attn, scores);
    });
    ph_attn.wait_done();
    // o projection + residual (in place on h: a column reads only its own h entry)
    if (ph_o.has_work()) {
      a.set(p.act, attn, qd);
      ph_o.work([&](int64_t n0, int64_t n1) {
        a.gemv(p.w.to, p.w.wo + n0 * rb_o, rb_o, n1 - n0, p.h + n0,
               p.w.o_bias != nullptr ? p.w.o_bias + n0 : nullptr, p.h + n0, p.w.po);
      });
    }
    ph_o.wait_done();
    // gate/up + silu * up
    if (ph_gu.has_work()) {
      rms_norm_row(p.h, p.w.ln2, p.hidden, p.eps, x.data());
      a.set(p.act, x.data(), p.hidden);
      ph_gu.work([&](int64_t j0, int64_t j1) {
        gate.resize(j1 - j0);
        up.resize(j1 - j0);
        a.gemv(p.w.tgu, p.w.wgu + j0 * rb_gu, rb_gu, j1 - j0, gate.data(), nullptr, nullptr, p.w.pgu);
        a.gemv(p.w.tgu, p.w.wgu + (p.I + j0) * rb_gu, rb_gu, j1 - j0, up.data(), nullptr, nullptr, p.w.pgu);
        silu_mul(gate.data(), up.data(), act + j0, j1 - j0);
      });
    }
    ph_gu.wait_done();
    // down projection + residual
    if (ph_down.has_work()) {
      a.set(p.act, act, p.I);
      ph_down.work([&](int64_t n0, int64_t n1) {
        a.gemv(p.w.td, p.w.wd + n0 * rb_d, rb_d, n1 - n0, p.h + n0, nullptr, p.h + n0, p.w.pd);
      });
    }
    ph_down.wait_done();
  });
}

}  // namespace

namespace {

void check_shape(int64_t hidden, int64_t H, int64_t Hkv, int64_t D, int64_t I, int64_t L) {
  if (hidden <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || D <= 0 || D > 512 || D % 2 || I <= 0 || hidden % kBlock ||
      (H * D) % kBlock || I % kBlock || L < 1)
    throw std::invalid_argument("bad decode_layer shape");
}

const int64_t* checked_slots(Addr slots, int64_t L, int64_t num_slots) {
  const int64_t* sl = reinterpret_cast<const int64_t*>(slots);
  for (int64_t l = 0; l < L; l++)
    if (sl[l] < 0 || sl[l] >= num_slots) throw std::invalid_argument("decode_layer: slot out of range");
  return sl;
}

}  // namespace

void decode_layer(Addr h, Addr ln1, Addr ln2, double eps, Addr wqkv, int64_t tqkv, Addr qkv_bias, Addr wo,
                  int64_t to, Addr o_bias, Addr wgu, int64_t tgu, Addr wd, int64_t td, int64_t hidden, int64_t H,
                  int64_t Hkv, int64_t D, int64_t I, Addr cos, Addr sin, Addr kbuf, Addr vbuf, int64_t num_slots,
                  Addr slots, int64_t L, double scale, int64_t kv_half, int64_t threads, int64_t act, Addr pqkv,
                  Addr po, Addr pgu, Addr pd) {
  check_shape(hidden, H, Hkv, D, I, L);
  const Act mode = act_mode(act);
  const int64_t* sl = checked_slots(slots, L, num_slots);
  LayerW w{reinterpret_cast<const float*>(ln1), reinterpret_cast<const float*>(ln2),
                 reinterpret_cast<const float*>(qkv_bias), reinterpret_cast<const float*>(o_bias),
                 reinterpret_cast<const uint8_t*>(wqkv), reinterpret_cast<const uint8_t*>(wo),
                 reinterpret_cast<const uint8_t*>(wgu), reinterpret_cast<const uint8_t*>(wd), block_qtype(tqkv),
                 block_qtype(to), block_qtype(tgu), block_qtype(td),
                 KVPool{reinterpret_cast<void*>(kbuf), reinterpret_cast<void*>(vbuf), kv_half != 0}};
  const int64_t copies[4] = {int64_t(pqkv), int64_t(po), int64_t(pgu), int64_t(pd)};
  use_packed(w, copies, mode == Act::Q8);
  const Layer p{reinterpret_cast<float*>(h), w, float(eps), hidden, H, Hkv, D, I, reinterpret_cast<const float*>(cos),
                reinterpret_cast<const float*>(sin), sl, L, sl[L - 1], float(scale), mode};
  run_layer(p, int(std::max<int64_t>(1, threads)));
}

// decode_layer for n layers in a row (the whole decoder stack of a batch-1 decode step: one Python -> C++
// call per step instead of one per layer). Layer i's weights and KV pool are row i of `table` (decode_layer.py's
// DecodeStack: decode_common.h's stack_layer reads it); the shapes, eps, position, slot table and KV element
// type are the same for every layer.
void decode_layers(Addr h, Addr table, int64_t n, double eps, int64_t hidden, int64_t H, int64_t Hkv, int64_t D,
                   int64_t I, Addr cos, Addr sin, int64_t num_slots, Addr slots, int64_t L, double scale,
                   int64_t kv_half, int64_t threads, int64_t act) {
  check_shape(hidden, H, Hkv, D, I, L);
  const Act mode = act_mode(act);
  const int64_t* sl = checked_slots(slots, L, num_slots);
  const int64_t* t = reinterpret_cast<const int64_t*>(table);
  std::vector<Layer> layers;
  layers.reserve(n);
  for (int64_t i = 0; i < n; i++)  // every row parsed (its qtypes checked) before the first layer runs
    layers.push_back(Layer{reinterpret_cast<float*>(h),
                           stack_layer(t + i * kStackColumns, kv_half != 0, mode == Act::Q8), float(eps),
                           hidden, H, Hkv, D, I, reinterpret_cast<const float*>(cos),
                           reinterpret_cast<const float*>(sin), sl, L, sl[L - 1], float(scale), mode});
  for (const Layer& p : layers) run_layer(p, int(std::max<int64_t>(1, threads)));
}

// y[N] = x[K] @ W^T (+ bias) (+ residual), one row, q16 or q8 activations (act 2 / 1), on the decode pool: the
// M = 1 path of quant_linear (the lm_head of a decode step: 49152 rows split over the threads). Bit-identical
// to gemm's path of the same mode.
void gemv(Addr x, Addr w, int64_t qtype, int64_t N, int64_t K, Addr out, Addr bias, Addr resid, int64_t threads,
          int64_t act) {
  const QT t = block_qtype(qtype);
  const Act mode = act_mode(act);
  if (N <= 0 || K <= 0 || K % kBlock) throw std::invalid_argument("bad gemv shape");
  ActRow a;
  a.set(mode, reinterpret_cast<const float*>(x), K);
  const uint8_t* W = reinterpret_cast<const uint8_t*>(w);
  float* o = reinterpret_cast<float*>(out);
  const float* b = reinterpret_cast<const float*>(bias);
  const float* r = reinterpret_cast<const float*>(resid);
  const int64_t rb = row_bytes(t, K);
  const int nt = int(std::max<int64_t>(1, threads));
  sgl_cpu::Phase phase;
  phase.reset(N, chunk_for(N, nt));
  static sgl_cpu::AdaptiveSite site;
  sgl_cpu::parallel_run_adaptive(nt, site, double(rb * N), [&] {
    phase.work([&](int64_t n0, int64_t n1) {
      a.gemv(t, W + n0 * rb, rb, n1 - n0, o + n0, b != nullptr ? b + n0 : nullptr, r != nullptr ? r + n0 : nullptr);
    });
    phase.wait_done();
  });
}
