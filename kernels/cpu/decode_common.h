// What the fused decode kernels share (decode_layer.cpp: one token; decode_rows.cpp: a batch of rows): the
// per-row small ops, so every kernel gives a row the same bits (rms_norm.cpp's formula, RoPE "rotate half",
// the q16 / q8 activations of quant_q16.h / quant_q8_blocks.h), the run-time block type and activation mode.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "quant_common.h"
#include "quant_q16_tile.h"
#include "quant_q8_tile.h"
#include "attention_common.h"

namespace {

using Addr = std::uintptr_t;

// Per-thread scratch of the q16 activations of one row (reused across calls: no malloc per layer).
struct Act16 {
  std::vector<int16_t> q;
  std::vector<float> d, s;
  Q16Act view(int64_t k) const { return Q16Act{q.data(), d.data(), s.data(), k, k / kBlock}; }
};

// The fused kernels' activation modes: gemm's act_mode codes (quant_gemm.cpp; quant.py's _ACT_MODE).
enum class Act { Q8 = 1, Q16 = 2 };

inline Act act_mode(int64_t code) {
  if (code != 1 && code != 2) throw std::invalid_argument("decode kernels take act modes 1 (q8), 2 (q16)");
  return Act(code);
}

// Per-thread scratch of the q8 activations of one row.
struct Act8 {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> c;
  Q8BAct view(int64_t k) const { return Q8BAct{q.data(), d.data(), s.data(), c.data(), k, k / kBlock}; }
};

// One row's activations in the call's mode: set() quantizes x [k], gemv() runs columns against them.
struct ActRow {
  Act16 a16;
  Act8 a8;
  Act mode = Act::Q16;
  int64_t k = 0;
  void set(Act m, const float* x, int64_t kk) {
    mode = m, k = kk;
    if (mode == Act::Q8) quantize_act8(x, 1, k, a8.q, a8.d, a8.s, a8.c);
    else quantize_act16(x, 1, k, a16.q, a16.d, a16.s);
  }
  // packed: W is an oct-packed copy (quant_q8_zmm.h's pack_oct; q8 only) from a group's first row
  void gemv(QT t, const uint8_t* W, int64_t rb, int64_t count, float* out, const float* bias, const float* resid,
            bool packed = false) const;
};

// out[j] = silu(g[j]) * u[j] = g[j] / (1 + exp(-g[j])) * u[j], j < n (out may be g). On AVX2 8 at a time with
// attention_common.h's exp256 (within ~2e-7 relative of std::exp), the tail through the same code (padded to 8):
// a column's bits do not depend on where a thread's chunk of columns ends. The scalar std::exp loop it replaces was
// ~0.22 ms per row and decode step (30 layers x 1536 columns: ~3% of a q8 decode step, ~1/10 of a verify row's
// extra cost).
inline void silu_mul(const float* g, const float* u, float* out, int64_t n) {
#ifdef SGL_ATTN_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  const auto eight = [&](const float* gp, const float* up, float* op) {
    const __m256 x = _mm256_loadu_ps(gp);
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_storeu_ps(op, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(up)));
  };
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) eight(g + j, u + j, out + j);
  if (j < n) {
    float gb[8] = {}, ub[8] = {}, ob[8];
    std::copy(g + j, g + n, gb);
    std::copy(u + j, u + n, ub);
    eight(gb, ub, ob);
    std::copy(ob, ob + (n - j), out + j);
  }
#else
  for (int64_t j = 0; j < n; j++) out[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
#endif
}

// rms_norm.cpp's arithmetic (double sum of squares, (x * r) * w in float), one row.
inline void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* out) {
  double ss = 0.0;
  for (int64_t j = 0; j < n; j++) ss += double(x[j]) * double(x[j]);
  const float r = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
  for (int64_t j = 0; j < n; j++) out[j] = (x[j] * r) * w[j];
}

// rms_norm_row for M rows (x rows at stride ld, out rows at stride ldo), 4 rows at a time: each row's sum of
// squares in its own accumulator, in rms_norm_row's order, so every row gets rms_norm_row's bits; the 4 rows'
// add chains overlap (one row alone is a chain of n dependent double adds: ~0.6 us at n = 576).
inline void rms_norm_rows(const float* x, int64_t ld, const float* w, int64_t M, int64_t n, float eps, float* out,
                          int64_t ldo) {
  int64_t t = 0;
  for (; t + 4 <= M; t += 4) {
    double ss[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t j = 0; j < n; j++)
      for (int u = 0; u < 4; u++) {
        const double v = double(x[(t + u) * ld + j]);
        ss[u] += v * v;  // v * v is exact in double (24-bit mantissas): a contracted FMA gives the same sum
      }
    for (int u = 0; u < 4; u++) {
      const float r = float(1.0 / std::sqrt(ss[u] / double(n) + double(eps)));
      const float* xr = x + (t + u) * ld;
      float* o = out + (t + u) * ldo;
      for (int64_t j = 0; j < n; j++) o[j] = (xr[j] * r) * w[j];
    }
  }
  for (; t < M; t++) rms_norm_row(x + t * ld, w, n, eps, out + t * ldo);
}

// gemv_rows (quant_q16.h) / gemv_rows8 (quant_q8_tile.h) for the row's mode and a run-time block type (F16 is
// rejected before the parallel region).
inline void ActRow::gemv(QT t, const uint8_t* W, int64_t rb, int64_t count, float* out, const float* bias,
                          const float* resid, bool packed) const {
  with_block_qtype(t, [&](auto tc) {
    constexpr QT T = decltype(tc)::value;
    if (mode == Act::Q8 && packed) gemv_rows8<T, true>(W, rb, count, a8.view(k), out, bias, resid);
    else if (mode == Act::Q8) gemv_rows8<T>(W, rb, count, a8.view(k), out, bias, resid);
    else gemv_rows<T>(W, rb, count, a16.view(k), out, bias, resid);
  });
}

inline QT block_qtype(int64_t code) {
  switch (code) {
    case 0: return QT::Q4_0;
    case 1: return QT::Q4_1;
    case 2: return QT::Q8_0;
    default: throw std::invalid_argument("decode kernels take qtype codes 0 (q4_0), 1 (q4_1), 2 (q8_0)");
  }
}

// One decoder layer's weights and KV pool. A decoder stack passes them as the rows of decode_layer.py's
// DecodeStack table, int64 [n, kStackColumns] (built once per model): ln1, ln2, wqkv, tqkv, qkv_bias, wo, to,
// o_bias, wgu, tgu, wd, td, kbuf, vbuf (addresses, and block types as quant.py numbers them), then the addresses of
// wqkv, wo, wgu, wd's packed copies (quant.py's QuantWeight.pack("q8"): oct- or quad-packed; 0: none).
struct LayerW {
  const float *ln1, *ln2, *qkv_bias, *o_bias;
  const uint8_t *wqkv, *wo, *wgu, *wd;
  QT tqkv, to, tgu, td;
  KVPool kv;  // fp32 or fp16 entries
  // whether wqkv, wo, wgu, wd point at packed copies (stack_layer with packed: q8 activations read them)
  bool pqkv = false, po = false, pgu = false, pd = false;
};

constexpr int64_t kStackColumns = 18;

// Point w's weights at their packed copies (copies[i]: wqkv, wo, wgu, wd's, 0: none) when `packed` (q8
// activations: the copies give the same bits and read faster at every row count, quant.py's PACKED_ROWS_MEASURED).
inline void use_packed(LayerW& w, const int64_t* copies, bool packed) {
  if (!packed || !have_rows_tile()) return;
  const uint8_t** ws[4] = {&w.wqkv, &w.wo, &w.wgu, &w.wd};
  bool* flags[4] = {&w.pqkv, &w.po, &w.pgu, &w.pd};
  for (int i = 0; i < 4; i++)
    if (copies[i] != 0) *ws[i] = reinterpret_cast<const uint8_t*>(copies[i]), *flags[i] = true;
}

// Row `t` of the DecodeStack table (block_qtype rejects an unknown type before any layer runs), reading the weights'
// packed copies when `packed` (use_packed).
inline LayerW stack_layer(const int64_t* t, bool kv_half, bool packed) {
  LayerW w{reinterpret_cast<const float*>(t[0]), reinterpret_cast<const float*>(t[1]),
           reinterpret_cast<const float*>(t[4]), reinterpret_cast<const float*>(t[7]),
           reinterpret_cast<const uint8_t*>(t[2]), reinterpret_cast<const uint8_t*>(t[5]),
           reinterpret_cast<const uint8_t*>(t[8]), reinterpret_cast<const uint8_t*>(t[10]), block_qtype(t[3]),
           block_qtype(t[6]), block_qtype(t[9]), block_qtype(t[11]),
           KVPool{reinterpret_cast<void*>(t[12]), reinterpret_cast<void*>(t[13]), kv_half}};
  use_packed(w, t + 14, packed);
  return w;
}

// Chunk size of a phase of n output columns: about 4 chunks per thread (a late or slow thread's share is
// taken by the others), a multiple of 8 (whole q16 4-column and q8 8-column groups), at least 16 columns.
inline int64_t chunk_for(int64_t n, int threads) {
  return threads <= 1 ? n : std::max<int64_t>(16, (n / (4 * threads) + 7) / 8 * 8);
}

// RoPE "rotate half": out_j = x_j cos_j + x_{(j + D/2) % D} sin_signed_j.
inline void rope(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < D; j++) out[j] = x[j] * cos[j] + x[j < half ? j + half : j - half] * sin[j];
}

}  // namespace
