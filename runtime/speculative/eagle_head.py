"""The EAGLE head: a one-layer, feature-level drafter (EAGLE-1/2's layout, or EAGLE-3's: below), with an
optional reduced draft vocabulary (EAGLE-3's d2t).

At sequence position i the head reads the embedding of token t_i and the target's last hidden state
f_{i-1} (the state that predicted t_i) and predicts f_i:

    x   = fc([embed(t_i); f_{i-1}])                       [H]   (EAGLE's order: embedding first)
    g_i = x + attn(x) ; g_i += mlp(rms_norm(g_i))         one Llama layer of the target's shape; as in
                                                          EAGLE-1 the layer has no input norm
    (g_i = rms_norm(g_i, norm) when the checkpoint has a final `norm.weight`, as EAGLE-3's do)
    logits over the draft vocabulary = g_i @ lm_head_rows^T, draft id d -> target id d2t[d]

Drafting runs the head autoregressively on its own predictions: (t_{n+1} := d_1, f_n := g_n) and so on.
The lm_head rows are the target's (its rows at the draft vocabulary's ids), unless the checkpoint
brings its own `lm_head.weight` (EAGLE-3). A reduced vocabulary keeps a draft step a small fraction
of a target step: the target's full lm_head (49k x 576) is ~15% of its step on the CPU.

EAGLE-3 (`aux_layers` set): the target's features are its outputs of a low, a middle and a high layer,
side by side (the runner keeps them: LlamaForCausalLM.capture_layers), reduced once by fc:

    f_{i-1} = fc([a_{i-1}; b_{i-1}; c_{i-1}])             [H]   (`reduce`)
    g_i = f_{i-1} + attn([rms_norm(embed(t_i), input_layernorm); rms_norm(f_{i-1}, hidden_norm)])
    g_i += mlp(rms_norm(g_i))                             q, k, v read 2H; the residual starts at the feature
    logits = rms_norm(g_i, norm) @ lm_head^T              (`logits_input`); g_i itself, pre-norm, is the next
                                                          draft step's feature

Weights load under EAGLE's published names (eagle_io.py maps them to these modules): fc.weight (fc.bias),
layers.0.self_attn.{q,k,v,o}_proj.weight, layers.0.mlp.{gate,up,down}_proj.weight,
layers.0.post_attention_layernorm.weight, optional norm.weight, d2t (int64 offsets: target id = d + d2t[d]),
lm_head.weight; EAGLE-1's layers.0.input_layernorm.weight (its layer skips it) and embed_tokens.weight (the
embedding is the target's) are accepted and ignored; EAGLE-3's layer is midlayer.*, with its two input norms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sgl.runtime.models.rotary import RotaryEmbedding, rope_inv_freq
from sgl.runtime.speculative.drafter import d2t_ids


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int  # the target's
    draft_vocab_size: int  # == vocab_size: no reduction
    rope_scaling: Optional[dict[str, Any]] = None
    fc_bias: bool = False
    attention_bias: bool = False
    final_norm: bool = False
    own_lm_head: bool = False  # the checkpoint carries lm_head.weight [draft_vocab_size, H]
    # EAGLE-3's layer (module docstring): fc reads the target's outputs of these layers (low, middle, high), the
    # layer's attention reads [input_layernorm(embed); hidden_norm(feature)]; () is EAGLE-1/2's head
    aux_layers: tuple[int, ...] = ()

    @property
    def eagle3(self) -> bool:
        return bool(self.aux_layers)

    @classmethod
    def from_target(cls, target: Any, draft_vocab_size: Optional[int] = None, **kw: Any) -> "EagleConfig":
        """The head of a target ModelConfig's shape (one of its layers)."""
        return cls(hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
                   num_attention_heads=target.num_attention_heads, num_key_value_heads=target.num_key_value_heads,
                   head_dim=target.head_dim, rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta,
                   max_position_embeddings=target.max_position_embeddings, vocab_size=target.vocab_size,
                   draft_vocab_size=draft_vocab_size or target.vocab_size, rope_scaling=target.rope_scaling,
                   attention_bias=target.attention_bias, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EagleConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["aux_layers"] = tuple(kw.get("aux_layers", ()))  # a JSON list
        return cls(**kw)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE. x [..., T, heads, D]; cos/sin [..., T, 1, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class _Attention(nn.Module):
    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        H, D = c.hidden_size, c.head_dim
        In = 2 * H if c.eagle3 else H  # EAGLE-3: q, k, v read [normed embedding; normed feature]
        self.q_proj = nn.Linear(In, c.num_attention_heads * D, bias=c.attention_bias)
        self.k_proj = nn.Linear(In, c.num_key_value_heads * D, bias=c.attention_bias)
        self.v_proj = nn.Linear(In, c.num_key_value_heads * D, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * D, H, bias=False)


class _Mlp(nn.Module):
    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class _Layer(nn.Module):
    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(c)
        self.mlp = _Mlp(c)
        self.post_attention_layernorm = nn.Parameter(torch.ones(c.hidden_size))
        if c.eagle3:
            self.input_layernorm = nn.Parameter(torch.ones(c.hidden_size))  # on the token's embedding
            self.hidden_norm = nn.Parameter(torch.ones(c.hidden_size))  # on the feature (fc's output or the head's own)


# attend(q [..., T, Hq, D], k [..., T, Hkv, D], v) -> [..., T, Hq, D]: the caller's causal attention
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class EagleHead(nn.Module):
    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        c = self.config = config
        # EAGLE-1/2: fc over [embedding; feature]; EAGLE-3: fc over the target's aux layers' states (`reduce`)
        fc_in = len(c.aux_layers) * c.hidden_size if c.eagle3 else 2 * c.hidden_size
        self.fc = nn.Linear(fc_in, c.hidden_size, bias=c.fc_bias)
        self.layers = nn.ModuleList([_Layer(c)])
        self.norm = nn.Parameter(torch.ones(c.hidden_size)) if c.final_norm else None
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False) if c.own_lm_head else None
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))  # target = d + d2t[d]
        inv_freq, self.rope_scale = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def draft_to_target(self) -> torch.Tensor:
        """[Vd] int64 target token id of each draft id."""
        return d2t_ids(self.d2t)

    def reduce(self, states: torch.Tensor) -> torch.Tensor:
        """The target's states as the head's features: EAGLE-3's fc over its aux layers' outputs [..., n * H]
        -> [..., H]; EAGLE-1/2's final-normed state as it is."""
        if not self.config.eagle3:
            return states
        qw = self._quant
        if qw is None:
            return self.fc(states)
        from sgl.runtime.models.native_weights import linear

        return linear(states.reshape(-1, states.shape[-1]).contiguous(), qw["fc"], self.fc.bias).reshape(
            *states.shape[:-1], -1)

    def logits_input(self, g: torch.Tensor) -> torch.Tensor:
        """What the draft lm_head reads of a head output: EAGLE-3's outputs are pre-norm (the next step's feature),
        its logits read them normed; EAGLE-1/2's outputs are both already."""
        return rms_norm(g, self.norm, self.config.rms_norm_eps) if self.config.eagle3 else g

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] -> cos, sin [..., T, 1, D]."""
        ang = positions.unsqueeze(-1).float() * self.inv_freq  # [..., T, D/2]
        ang = torch.cat([ang, ang], dim=-1).unsqueeze(-2)
        return ang.cos() * self.rope_scale, ang.sin() * self.rope_scale

    def slot_range(self, n: int) -> torch.Tensor:
        """int64 [0, n) (a view of a kept arange, grown by doubling): a head cache's slots as a KV pool's."""
        r = self.__dict__.get("_slot_range")
        if r is None or r.numel() < n:
            r = self.__dict__["_slot_range"] = torch.arange(max(n, 2 * (0 if r is None else r.numel()), 256))
        return r[:n]

    def quantize_for_inference(self, qtype: str = "q8_0") -> None:
        """Drafting reads every weight once per step, so on the CPU its cost is the bytes: keep the
        linears as `qtype` blocks for the quantized kernels (q/k/v and gate/up fused as the target's), with the
        packed copies of the process's activation mode (pack_for_act).
        Training and forward_train keep using the fp32 modules; drafts only need to be good, not exact."""
        from sgl.runtime.models.native_weights import fuse_rows, pack_for_act, to_linear

        a, m, c = self.layers[0].self_attn, self.layers[0].mlp, self.config

        def q(*ws: torch.Tensor) -> Any:
            return to_linear(fuse_rows([w.detach().float() for w in ws], qtype))

        bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
        self._quant = {"fc": q(self.fc.weight), "qkv": q(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                       "qkv_bias": bias, "o": q(a.o_proj.weight), "gate_up": q(m.gate_proj.weight, m.up_proj.weight),
                       "down": q(m.down_proj.weight)}
        pack_for_act([w for w in self._quant.values() if w is not None])
        # the fused kernel's layer reads [H] rows with no input norm (EAGLE-1's); EAGLE-3's reads [2H]: linears only
        self._fused = None if c.eagle3 else self._fused_layer()
        if self._fused is not None:  # the kernel's cos / signed-sin rows, the target's own tables
            self._rope_rows = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)

    _quant: Optional[dict[str, Any]] = None
    _fused: Optional[Any] = None  # the layer as DecodeLayerWeights for the fused CPU kernel (head_extend_fused)
    _rope_rows: Optional[RotaryEmbedding] = None

    def _fused_layer(self) -> Optional[Any]:
        """The quantized layer as sgl.kernels.cpu.decode_layer weights (no input norm, as EAGLE's layer), or None
        where the kernel cannot run it (no extension, weights that did not stay in blocks)."""
        from sgl.kernels.cpu import _ext
        from sgl.kernels.cpu.decode_layer import QTYPE_CODE, DecodeLayerWeights
        from sgl.kernels.cpu.quant import QuantWeight

        ext, qw, c = _ext.load(), self._quant, self.config
        assert qw is not None
        ws = [qw[n] for n in ("qkv", "o", "gate_up", "down")]
        if ext is None or not hasattr(ext, "decode_layer") or not all(
                type(w) is QuantWeight and w.qtype in QTYPE_CODE for w in ws):
            return None
        qkv, o, gate_up, down = ws
        return DecodeLayerWeights(None, self.layers[0].post_attention_layernorm.detach().float().contiguous(),
                                  float(c.rms_norm_eps), qkv, qw["qkv_bias"], o, None, gate_up, down,
                                  c.num_attention_heads, c.num_key_value_heads, c.head_dim)

    def block(self, embeds: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
              attend: Attend) -> torch.Tensor:
        """embeds, feats [..., T, H]; positions [..., T] -> predicted features [..., T, H]."""
        c, layer = self.config, self.layers[0]
        lead = embeds.shape[:-1]
        a, mlp, qw = layer.self_attn, layer.mlp, self._quant
        nq, nkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        if c.eagle3:  # the residual stream starts at the feature; attention reads both inputs, normed
            x = feats.contiguous()
            inp = torch.cat([rms_norm(embeds, layer.input_layernorm, c.rms_norm_eps),
                             rms_norm(feats, layer.hidden_norm, c.rms_norm_eps)], dim=-1)
        if qw is None:
            if not c.eagle3:
                x = inp = self.fc(torch.cat([embeds, feats], dim=-1))
            q, k, v = a.q_proj(inp), a.k_proj(inp), a.v_proj(inp)
        else:  # inference on [T, H] rows: the quantized kernels
            from sgl.runtime.models.native_weights import linear

            if not c.eagle3:
                x = inp = linear(torch.cat([embeds, feats], dim=-1), qw["fc"], self.fc.bias)
            qkv = linear(inp.contiguous(), qw["qkv"], qw["qkv_bias"])
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
        q = q.reshape(*lead, c.num_attention_heads, c.head_dim)
        k = k.reshape(*lead, c.num_key_value_heads, c.head_dim)
        v = v.reshape(*lead, c.num_key_value_heads, c.head_dim)
        cos, sin = self.rope(positions)
        o = attend(rotate(q, cos, sin), rotate(k, cos, sin), v).reshape(*lead, nq)
        if qw is None:
            h = x + a.o_proj(o)
            m = rms_norm(h, layer.post_attention_layernorm, c.rms_norm_eps)
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(m)) * mlp.up_proj(m))
        else:
            h = linear(o.contiguous(), qw["o"], residual=x)
            m = rms_norm(h, layer.post_attention_layernorm, c.rms_norm_eps)
            gate_up = linear(m, qw["gate_up"])
            inter = c.intermediate_size
            h = linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], qw["down"], residual=h)
        if c.eagle3:
            return h  # pre-norm: the next step's feature (logits_input norms it)
        return rms_norm(h, self.norm, c.rms_norm_eps) if self.norm is not None else h

    def forward_train(self, embeds: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Dense causal attention over [B, L] sequences (padding at the end is never attended)."""
        groups = self.config.num_attention_heads // self.config.num_key_value_heads

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

        return self.block(embeds, feats, positions, attend)

    def forward_unrolled(self, embeds: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                         depth: int) -> list[torch.Tensor]:
        """Training-time test (EAGLE-3's idea): the head's outputs at draft steps 1..depth, each
        position seeing what it would see while drafting. [B, L, H] inputs -> depth x [B, L, H].

        Step s's entry at position p reads (embed(t_p), g^{s-1}_{p-1}) (step s-1's output one position
        back; step 1 reads the target's feature) and attends to the true entries at positions
        <= p - (s-1) plus, for i = 2..s, step i's entry at position p - (s-i): while drafting, d_s's
        entry sits on top of the true context and of the drafted entries before it."""
        c = self.config
        groups = c.num_attention_heads // c.num_key_value_heads
        scale = c.head_dim ** -0.5
        L = embeds.shape[1]
        keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (k, v) [B, Hq, L, D]
        outs: list[torch.Tensor] = []
        for s in range(1, depth + 1):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: int = s) -> torch.Tensor:
                q = q.transpose(1, 2)  # [B, Hq, L, D]
                k, v = (t.transpose(1, 2).repeat_interleave(groups, 1) for t in (k, v))
                keys.append((k, v))
                k1, v1 = keys[0]
                sc = (q @ k1.transpose(-1, -2)) * scale  # [B, Hq, L, L]
                p = torch.arange(L)
                sc = sc.masked_fill(p.unsqueeze(0) > (p - (s - 1)).unsqueeze(1), float("-inf"))
                diag, vals = [], []
                for i in range(2, s + 1):  # step i's entry at p - (s - i): shift right by s - i
                    ki, vi = keys[i - 1]
                    sh = s - i
                    ki = F.pad(ki, (0, 0, sh, 0))[:, :, :L]
                    vals.append(F.pad(vi, (0, 0, sh, 0))[:, :, :L])
                    d = (q * ki).sum(-1, keepdim=True) * scale  # [B, Hq, L, 1]
                    diag.append(d.masked_fill((p < sh).view(1, 1, L, 1), float("-inf")))
                attn = torch.cat([sc] + diag, dim=-1).softmax(-1)
                o = attn[..., :L] @ v1
                for j, vi in enumerate(vals):
                    o = o + attn[..., L + j:L + j + 1] * vi
                return o.transpose(1, 2)

            prev = feats if s == 1 else F.pad(outs[-1], (0, 0, 1, 0))[:, :L]  # g^{s-1}_{p-1}; zeros at p = 0
            outs.append(self.block(embeds, prev, positions, attend))
        return outs


@dataclass
class HeadKV:
    """One sequence's keys/values in the head (rotated keys), positions [0, len) of its own context."""

    k: torch.Tensor  # [cap, Hkv, D]
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, c: EagleConfig, cap: int = 64) -> "HeadKV":
        z = torch.zeros(cap, c.num_key_value_heads, c.head_dim)
        return cls(z, z.clone())

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def reserve(self, n: int) -> None:
        """Room for n entries (the buffers grow by doubling; entries [0, length) kept)."""
        if n > self.k.shape[0]:
            cap = max(n, 2 * self.k.shape[0])
            self.k = torch.cat([self.k[: self.length], self.k.new_zeros(cap - self.length, *self.k.shape[1:])])
            self.v = torch.cat([self.v[: self.length], self.v.new_zeros(cap - self.length, *self.v.shape[1:])])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = self.length + k.shape[0]
        self.reserve(n)
        self.k[self.length:n] = k
        self.v[self.length:n] = v
        self.length = n


@torch.inference_mode()
def head_extend(head: EagleHead, embeds: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                caches: list[HeadKV], counts: list[int]) -> torch.Tensor:
    """Run new entries of several sequences (sequence-major: counts[b] rows of sequence b) against each
    one's cache, appending their keys/values. embeds/feats [T, H], positions [T] -> [T, H]."""
    if head._fused is not None and max(counts) <= FUSED_MAX_ENTRIES:
        return head_extend_fused(head, embeds, feats, positions, caches, counts)
    c = head.config
    groups = c.num_attention_heads // c.num_key_value_heads
    scale = c.head_dim ** -0.5

    hkv, d = c.num_key_value_heads, c.head_dim

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, Hq, D]
        o = 0
        for cache, n in zip(caches, counts):
            start = cache.length
            cache.append(k[o:o + n], v[o:o + n])
            keys = cache.k[: cache.length].transpose(0, 1)  # [Hkv, S, D]: views, no per-query-head copies
            vals = cache.v[: cache.length].transpose(0, 1)
            # query head h * groups + g reads kv head h (repeat_interleave's order): [Hkv, n * groups, D]
            qs = q[o:o + n].reshape(n, hkv, groups, d).permute(1, 0, 2, 3).reshape(hkv, n * groups, d)
            scores = torch.bmm(qs, keys.transpose(1, 2)) * scale  # [Hkv, n * groups, S]
            if n > 1:  # query j (at cache index start + j) sees keys <= start + j
                causal = torch.arange(cache.length) > (start + torch.arange(n)).repeat_interleave(groups).unsqueeze(1)
                scores = scores.masked_fill(causal, float("-inf"))
            att = torch.bmm(scores.softmax(-1), vals)  # [Hkv, n * groups, D]
            out[o:o + n] = att.reshape(hkv, n, groups, d).permute(1, 0, 2, 3).reshape(n, hkv * groups, d)
            o += n
        return out

    return head.block(embeds, feats, positions, attend)


FUSED_MAX_ENTRIES = 64  # head_extend runs the fused kernels when no sequence has more new entries than this (a draft
# step, a catch-up: decode_rows' most rows); longer ones (a prompt's states) take the batched torch path


@torch.inference_mode()
def head_extend_fused(head: EagleHead, embeds: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                      caches: list[HeadKV], counts: list[int]) -> torch.Tensor:
    """head_extend through sgl.kernels.cpu.decode_layer: fc, then the layer in ONE kernel call per sequence (its
    attention over the sequence's cache as a KV pool whose slots are the entries 0..len, each new one's stored
    last) instead of ~25 torch ops: decode_layer for one entry, decode_rows for several (a catch-up: their rows in
    one pass, with the bits decode_layer gives each alone). Same math as the torch path (the quantized head's),
    another summation order: drafts only need to be good (the README's EAGLE section measures the step)."""
    from sgl.kernels.cpu.decode_layer import DecodeStack, decode_layer, decode_rows
    from sgl.kernels.cpu.norm import rms_norm as cpu_rms_norm
    from sgl.kernels.cpu.quant import get_act_quant
    from sgl.runtime.models.native_weights import linear

    c, qw, w, rope = head.config, head._quant, head._fused, head._rope_rows
    assert qw is not None and w is not None and rope is not None
    act = get_act_quant() if get_act_quant() in ("q16", "q8") else "q16"
    x = linear(torch.cat([embeds, feats], dim=-1), qw["fc"], head.fc.bias).contiguous()  # [T, H]
    rope.ensure(int(positions.max()) + 1)
    cos, sin = rope.cos, rope.sin_signed  # [N, D]
    scale = c.head_dim ** -0.5
    t = 0
    for cache, n in zip(caches, counts):
        cache.reserve(cache.length + n)
        if n == 1:
            p = int(positions[t])
            decode_layer(x[t:t + 1], w, cos[p], sin[p], cache.k, cache.v, head.slot_range(cache.length + 1), scale,
                         check=False, act=act)
        else:  # a catch-up: the entries as rows of one call, the weights read once (decode_layer per entry: n reads)
            pos = positions[t:t + n]
            slots = head.slot_range(cache.length + n)  # row j's list: entries 0..length + j, its own last
            decode_rows(x[t:t + n], DecodeStack((w,), (cache.k,), (cache.v,)), cos[pos].contiguous(),
                        sin[pos].contiguous(), torch.full((n,), slots.data_ptr(), dtype=torch.int64),
                        torch.arange(cache.length + 1, cache.length + n + 1), scale, act=act)
        cache.length += n
        t += n
    return cpu_rms_norm(x, head.norm.contiguous(), c.rms_norm_eps) if head.norm is not None else x


@torch.inference_mode()
def head_tree_step(head: EagleHead, embeds: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                   cache: HeadKV, anc_k: Optional[torch.Tensor],
                   anc_v: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of a draft tree of ONE sequence: n frontier nodes (rows), node r attending to the sequence's
    true entries (cache, left unchanged), its ancestors' entries anc_k/anc_v[r] [n, t, Hkv, D] (t = its depth
    - 1; None at depth 1) and itself. embeds/feats [n, H], positions [n] -> (g [n, H], the nodes' keys and
    values [n, Hkv, D]): what head_extend computes for a chain, with each node's context its own path."""
    c = head.config
    hkv, groups, d = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
    scale = d ** -0.5
    entries: list[torch.Tensor] = []

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        entries.extend((k, v))
        n = q.shape[0]
        qg = q.reshape(n, hkv, groups, d)  # query head h * groups + g reads kv head h (repeat_interleave's order)
        keys, vals = cache.k[: cache.length], cache.v[: cache.length]  # [L, Hkv, D]
        own_k = k[:, None] if anc_k is None else torch.cat([anc_k, k[:, None]], 1)  # [n, t + 1, Hkv, D]
        own_v = v[:, None] if anc_v is None else torch.cat([anc_v, v[:, None]], 1)
        scores = torch.cat([torch.einsum("nhgd,lhd->nhgl", qg, keys),
                            torch.einsum("nhgd,nthd->nhgt", qg, own_k)], -1) * scale
        p = scores.softmax(-1)
        length = keys.shape[0]
        out = (torch.einsum("nhgl,lhd->nhgd", p[..., :length], vals)
               + torch.einsum("nhgt,nthd->nhgd", p[..., length:], own_v))
        return out.reshape(n, hkv * groups, d)

    g = head.block(embeds, feats, positions, attend)
    return g, entries[0], entries[1]
