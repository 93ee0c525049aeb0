"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache.

Weights are fused at load time (gpt-fast style): q/k/v into one `qkv` matrix and gate/up into one
`gate_up` matrix, so a layer runs 4 matmuls. Hugging Face names go in through `load_weights`.

    >>> import torch
    >>> from sgl.runtime.models.config import ModelConfig
    >>> from sgl.runtime.executor.forward_batch import ForwardBatch
    >>> from sgl.runtime.executor.kv_cache import KVCache
    >>> cfg = ModelConfig(architecture="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
    ...                   rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
    ...                   tie_word_embeddings=True, attention_bias=False)
    >>> model = LlamaForCausalLM(cfg)
    >>> model.load_weights((n, torch.randn(shape)) for n, shape in model.hf_weight_shapes().items())
    >>> kv = KVCache.for_model(cfg, num_slots=16, dtype=torch.float32)
    >>> fb = ForwardBatch.from_lists(input_ids=[[1, 2, 3]], slot_tables=[[0, 1, 2]])
    >>> model.compute_logits(model.forward(fb, kv)[fb.last_token_indices]).shape
    torch.Size([1, 32])
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from sgl.kernels.cpu import _ext as _cpu_ext
from sgl.kernels.cpu import norm as _cpu_norm
from sgl.kernels.cpu.quant import Q16_MAX_ROWS, QuantWeight, get_act_quant, quant_linear
from sgl.kernels.dispatch import paged_attention  # Triton on CUDA, the torch reference on CPU
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.fused_decode import fused_step, split_decode_tails
from sgl.runtime.models.native_weights import (ArenaPlan, LinearWeight, Payload, RawBlocks, describe, embedding_rows,
                                               fuse_rows, linear, pack_into_arena, pack_quant_weights, to_linear)
from sgl.runtime.models.rotary import RopeTables, RotaryEmbedding
from sgl.runtime.models.weight_arena import pack_parameters

# Checkpoint entries that carry no weights of ours (recomputed from the config).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


def _param(*shape: int, dtype: torch.dtype, device: Union[str, torch.device]) -> nn.Parameter:
    # NOTE: uninitialized: load_weights fills every parameter or raises naming the missing ones.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class LlamaDecoderLayer(nn.Module):
    # The layer's linear weights as plain attributes (LinearWeight): in fp32 mode views of the *_t
    # parameters (bind_linears); in native mode QuantWeights or fp32 fallbacks (load_native_weights).
    LINEARS = ("qkv", "o", "gate_up", "down")
    # Tensor parallelism (sgl.runtime.distributed.sharding): a sharded layer's o and down give partial
    # sums that `all_reduce` completes; only the `residual_here` rank adds the residual (and o's bias).
    all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    residual_here: bool = True

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: Union[str, torch.device], native: bool = False
    ) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.intermediate_size = config.intermediate_size
        self.scale = head_dim**-0.5
        self.qk_v_sizes = (self.q_size + self.kv_size, self.kv_size)  # qkv columns: [q | k] and v
        self.q_k_heads = (self.num_heads, self.num_kv_heads)
        self.norm_consts = NormConsts(hidden, config.rms_norm_eps, device)
        kw = dict(dtype=dtype, device="meta")  # shapes only: LlamaForCausalLM packs all parameters into one buffer
        # NOTE: matrices are stored transposed, [in, out]: x @ W_t is ~13% faster than F.linear(x, W)
        # for MKL's batch-1 GEMV on CPU (memory-bound decode), and no slower for prefill GEMMs.
        self.hidden_size, self.native = hidden, native
        self.input_layernorm = _param(hidden, **kw)
        if not native:
            self.qkv_t = _param(hidden, self.q_size + 2 * self.kv_size, **kw)  # columns: q | k | v
        # Qwen2 (and Llama with attention_bias) bias q/k/v; only Llama's attention_bias also biases o_proj
        self.qkv_bias: Optional[nn.Parameter] = _param(self.q_size + 2 * self.kv_size, **kw) if config.attention_bias else None
        if not native:
            self.o_t = _param(self.q_size, hidden, **kw)
        self.o_bias: Optional[nn.Parameter] = (
            _param(hidden, **kw) if config.attention_bias and config.architecture == "llama" else None
        )
        self.post_attention_layernorm = _param(hidden, **kw)
        if not native:
            self.gate_up_t = _param(hidden, 2 * config.intermediate_size, **kw)  # columns: gate | up
            self.down_t = _param(config.intermediate_size, hidden, **kw)

    def bind_linears(self) -> None:
        """fp32 mode, after packing: each of LINEARS aliases its [in, out] parameter."""
        for name in self.LINEARS:
            self.__dict__[name] = getattr(self, f"{name}_t")

    def linear_parts(self, prefix: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], int]]:
        """LINEARS name -> (its HF weight names in row order, each part's rows N, the columns K)."""
        hidden, q, kv, inter = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        return {
            "qkv": ((f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"), (q, kv, kv), hidden),
            "o": ((f"{attn}.o_proj.weight",), (hidden,), q),
            "gate_up": ((f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"), (inter, inter), hidden),
            "down": ((f"{mlp}.down_proj.weight",), (hidden,), inter),
        }

    def hf_weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """HF name -> the view of our storage it fills (in the checkpoint's [out, in] orientation)."""
        q, kv, inter = self.q_size, self.kv_size, self.intermediate_size
        m = {
            f"{prefix}.input_layernorm.weight": self.input_layernorm,
            f"{prefix}.post_attention_layernorm.weight": self.post_attention_layernorm,
        }
        if not self.native:
            qkv, gate_up = self.qkv_t.t(), self.gate_up_t.t()  # [out, in] views
            m.update({
                f"{prefix}.self_attn.q_proj.weight": qkv[:q],
                f"{prefix}.self_attn.k_proj.weight": qkv[q : q + kv],
                f"{prefix}.self_attn.v_proj.weight": qkv[q + kv :],
                f"{prefix}.self_attn.o_proj.weight": self.o_t.t(),
                f"{prefix}.mlp.gate_proj.weight": gate_up[:inter],
                f"{prefix}.mlp.up_proj.weight": gate_up[inter:],
                f"{prefix}.mlp.down_proj.weight": self.down_t.t(),
            })
        if self.qkv_bias is not None:
            m[f"{prefix}.self_attn.q_proj.bias"] = self.qkv_bias[:q]
            m[f"{prefix}.self_attn.k_proj.bias"] = self.qkv_bias[q : q + kv]
            m[f"{prefix}.self_attn.v_proj.bias"] = self.qkv_bias[q + kv :]
        if self.o_bias is not None:
            m[f"{prefix}.self_attn.o_proj.bias"] = self.o_bias
        return m

    def forward(
        self,
        h: torch.Tensor,  # [T, hidden] residual stream
        rope_tables: RopeTables,
        rope: RotaryEmbedding,
        fb: ForwardBatch,
        kv: KVCache,
        layer_id: int,
    ) -> torch.Tensor:
        # NOTE: batch-1 decode streams ~14 MB of weights per layer, which evicts the CPU caches, so
        # every small op after a matmul runs cold (~5-10x its warm cost): keep the op count low.
        num_tokens = h.shape[0]
        x = rms_norm(h, self.input_layernorm, self.norm_consts)
        qkv = linear(x, self.qkv, self.qkv_bias)  # [T, (H + 2 Hkv) D]
        if fb.lora is not None:  # LoRA: each adapter segment adds x @ A @ B after the shared base matmul
            fb.lora.apply(qkv, x, layer_id, "qkv")
        # NOTE: basic slicing, not Tensor.split: same views, a fraction of the Python overhead.
        qk_cols = self.qk_v_sizes[0]
        qk, v = qkv[:, :qk_cols], qkv[:, qk_cols:]
        qk = rope.apply(qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim), rope_tables)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [T, H, D], [T, Hkv, D]: rotated in one pass
        kv.store(layer_id, fb.out_cache_loc, k, v.view(num_tokens, self.num_kv_heads, self.head_dim))
        o = paged_attention(q, kv.k_buffer(layer_id), kv.v_buffer(layer_id), fb.attn, self.scale)  # [T, H, D]
        o = o.view(num_tokens, self.q_size)
        h = self._row_parallel(o, self.o, self.o_bias, h)  # h + o_proj(o)
        if fb.lora is not None:
            fb.lora.apply(h, o, layer_id, "o")
        x = rms_norm(h, self.post_attention_layernorm, self.norm_consts)
        gate_up = linear(x, self.gate_up)  # [T, 2I]
        if fb.lora is not None:
            fb.lora.apply(gate_up, x, layer_id, "gate_up")
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        act = F.silu(gate).mul_(up)
        h = self._row_parallel(act, self.down, None, h)  # h + down_proj(silu(gate) * up)
        if fb.lora is not None:
            fb.lora.apply(h, act, layer_id, "down")
        return h

    def _row_parallel(
        self, x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor], h: torch.Tensor
    ) -> torch.Tensor:
        """h + x @ W^T (+ bias); sharded: this rank's partial sum, completed by the all-reduce."""
        if self.all_reduce is None:
            return linear(x, w, bias, residual=h)
        return self.all_reduce(linear(x, w, bias, residual=h if self.residual_here else None))


_CPU_NORM_MAX_ROWS = 64  # decode-sized batches take the C++ norm; prefill chunks keep the torch ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, consts: "NormConsts", decode_rows: bool = False) -> torch.Tensor:
    """HF's RMSNorm, weight * x / sqrt(mean(x^2) + eps), in 4 ops (F.rms_norm runs ~20 on CPU).

    Computed as weight * sqrt(n) * x / hypot(|x|, sqrt(n * eps)), the same quantity since
    sqrt(mean(x^2) + eps) = sqrt(|x|^2 + n * eps) / sqrt(n). x: [T, n]. `decode_rows`: x's rows ran as decode rows
    and take the C++ norm at any T, which gives each row the bits it gets alone (a verify step of 72 rows, or a
    decode row beside a long prompt chunk, must get a decode step's bits; the torch ops' differ by an ulp).
    """
    if x.dtype != torch.float32:  # as HF: normalize in fp32, cast, then scale by the weight
        return rms_norm(x.float(), consts.one, consts).to(x.dtype).mul_(weight)
    if ((x.shape[0] <= _CPU_NORM_MAX_ROWS or decode_rows) and x.is_cpu and x.dim() == 2 and x.is_contiguous()
            and weight.dim() == 1 and weight.dtype == torch.float32 and _cpu_ext.load()):
        return _cpu_norm.rms_norm(x, weight, consts.eps)  # one C++ call (decode: the 4 ops below run cold)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [T, 1]
    return torch.addcdiv(consts.zero, x, torch.hypot(norm, consts.eps_n), value=consts.sqrt_n).mul_(weight)


class NormConsts(nn.Module):
    """0-dim constants of rms_norm on the model's device (Python floats would be wrapped per call)."""

    def __init__(self, hidden_size: int, eps: float, device: Union[str, torch.device]) -> None:
        super().__init__()
        self.sqrt_n = hidden_size**0.5
        self.eps = eps
        for name, value in (("eps_n", (hidden_size * eps) ** 0.5), ("zero", 0.0), ("one", 1.0)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32, device=device), persistent=False)


class LlamaForCausalLM(nn.Module):
    """native=True: the linear weights (and the embedding) are not parameters but LinearWeights in
    their GGUF block formats, filled by `load_native_weights` (float32 activations only); norms and
    biases stay float32 parameters. native=False: every weight is a `dtype` parameter (`load_weights`)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        native: bool = False,
    ) -> None:
        super().__init__()
        if native and (dtype != torch.float32 or torch.device(device).type != "cpu"):
            raise ValueError("native weights run on the CPU with float32 activations (dtype float32, device cpu)")
        self.config = config
        self.dtype = dtype
        self.native = native
        # Tensor parallelism: the lm_head holds this rank's vocab rows; this gathers the logit columns.
        self.gather_vocab: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        kw = dict(dtype=dtype, device="meta")  # shapes only; pack_parameters allocates below
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, dtype, device, native) for _ in range(config.num_hidden_layers)
        )
        self.norm = _param(config.hidden_size, **kw)
        if not native:
            self.lm_head_t = _param(config.hidden_size, config.vocab_size, **kw)  # [hidden, V]
            if not config.tie_word_embeddings:
                self.embed_tokens = _param(config.vocab_size, config.hidden_size, **kw)
        # all weights in one huge-page buffer, in the order a forward pass reads them (weight_arena.py)
        self._weights_buffer = pack_parameters(self, dtype, device)
        if not native:
            for layer in self.layers:
                layer.bind_linears()
            # LinearWeights of the output projection ([hidden, V]) and the embedding table ([V, hidden] rows)
            self.lm_head: LinearWeight = self.lm_head_t
            self.embed: LinearWeight = self.lm_head_t if config.tie_word_embeddings else self.embed_tokens.t()
        self.norm_consts = NormConsts(config.hidden_size, config.rms_norm_eps, device)
        self.rope = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings, dtype, device
        )

    @property
    def embed_weight(self) -> torch.Tensor:
        """[V, hidden]. Tied: the embedding IS the output projection, read through a transposed view."""
        return self.lm_head_t.t() if self.config.tie_word_embeddings else self.embed_tokens

    # Layers whose outputs a forward keeps (EAGLE-3 heads read the target's states after a low, a middle and a
    # high layer): after each forward `captured` holds them side by side, [T, len(capture_layers) * hidden], in
    # this order; () keeps none (captured None).
    capture_layers: tuple[int, ...] = ()
    captured: Optional[torch.Tensor] = None

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Runs the batch's new tokens, writes their K/V into `kv`; returns [T, hidden] final-normed states."""
        self.rope.ensure(max(fb.seq_lens))
        split = split_decode_tails(self, fb, kv)  # generated and final prompt tokens as decode rows (fused_decode.py)
        if split is None:
            h, self.captured = self._layers(fb, kv)
            return rms_norm(h, self.norm, self.norm_consts, decode_rows=fb.generated_only)
        head, tail, head_rows, tail_rows = split
        h = torch.empty(fb.num_tokens, self.config.hidden_size, dtype=torch.float32, device=fb.input_ids.device)
        kept = None if not self.capture_layers else h.new_empty(fb.num_tokens, len(self.capture_layers) * h.shape[1])
        for part, rows in ((head, head_rows), (tail, tail_rows)):
            if part is not None:
                h[rows], aux = self._layers(part, kv)
                if kept is not None:
                    kept[rows] = aux
        self.captured = kept
        out = torch.empty_like(h)
        for part, rows in ((head, head_rows), (tail, tail_rows)):
            if part is not None:
                out[rows] = rms_norm(h[rows], self.norm, self.norm_consts, decode_rows=part is tail)
        return out

    def _layers(self, fb: ForwardBatch, kv: KVCache) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The embedding and every decoder layer: ([T, hidden] before the final norm, the capture_layers'
        outputs [T, len(capture_layers) * hidden] or None). With layers to keep, the stack runs in segments
        that end at them."""
        h = embedding_rows(fb.input_ids, self.embed)  # [T, hidden]
        fused = fused_step(self, h, fb, kv)  # native decode: the layers in C++ (fused_decode.py)
        rope_tables = self.rope.lookup(fb.positions, matrices=fused is None)  # shared by all layers
        kept: dict[int, torch.Tensor] = {}
        lo = 0
        for hi in sorted({i + 1 for i in self.capture_layers} | {len(self.layers)}):  # one segment when none is kept
            if fused is not None:
                h = fused(h, rope_tables, lo, hi)
            else:
                for i in range(lo, hi):  # NOTE: .forward skips nn.Module hook dispatch
                    h = self.layers[i].forward(h, rope_tables, self.rope, fb, kv, i)
            if hi - 1 in self.capture_layers:
                kept[hi - 1] = h.clone()  # NOTE: the fused kernels run in place on h
            lo = hi
        aux = torch.cat([kept[i] for i in self.capture_layers], -1) if self.capture_layers else None
        return h, aux

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        act = get_act_quant()
        if isinstance(self.lm_head, QuantWeight) and act in ("q16", "q8"):
            # q16 (q8) as a batch-1 decode step's lm_head, in calls of up to 64 rows (decode batches, verify rows,
            # the first token of prompts): each row's logits get the bits it gets alone (quant_q16_tile.h,
            # quant_q8_tile.h). Past 64 rows too (8 requests verifying 8 drafts each are 72): a q16 call of more
            # rows would run fp32 activations, and greedy output with speculation would not be the output without it.
            self._pack_lm_head(act)
            hidden = hidden.contiguous()
            logits = torch.empty(hidden.shape[0], self.lm_head.shape[0], dtype=torch.float32, device=hidden.device)
            for r0 in range(0, hidden.shape[0], Q16_MAX_ROWS):
                r1 = min(hidden.shape[0], r0 + Q16_MAX_ROWS)
                quant_linear(hidden[r0:r1], self.lm_head, out=logits[r0:r1], act_quant=act)
        else:
            logits = linear(hidden, self.lm_head).float()
        return logits if self.gather_vocab is None else self.gather_vocab(logits)

    def _pack_lm_head(self, act: str) -> None:
        """Give the lm_head its packed copy for the activation mode `act`, once per mode and lm_head (QuantWeight.pack:
        the same bits, a batch-1 lm_head ~2x faster; README "The lm_head from a packed copy"). It costs the lm_head's
        bytes once more (29 MB on the default model); the embedding lookups keep reading the GGUF rows."""
        done = self.__dict__.setdefault("_lm_head_packed", set())
        if (id(self.lm_head), act) not in done and getattr(self, "pack_weights", True):
            done.add((id(self.lm_head), act))
            pack_into_arena([self.lm_head], act)  # NOTE: no copy where it cannot run: quant_linear reads the GGUF rows

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """Every Hugging Face weight name this model needs -> the view of our storage it fills."""
        m = {"model.norm.weight": self.norm}
        if not self.native:
            m["model.embed_tokens.weight"] = self.embed_weight
            if not self.config.tie_word_embeddings:
                m["lm_head.weight"] = self.lm_head_t.t()
        for i, layer in enumerate(self.layers):
            m.update(layer.hf_weights(f"model.layers.{i}"))
        return m

    def hf_weight_shapes(self) -> dict[str, torch.Size]:
        """HF name -> the shape the checkpoint tensor must have."""
        return {name: dst.shape for name, dst in self.hf_weights().items()}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in (cast to our dtype), fusing q/k/v and gate/up.

        Raises ValueError naming unexpected names, wrong shapes and, at the end, missing names.
        With tied embeddings a `lm_head.weight` entry is accepted and ignored.
        """
        targets = self.hf_weights()
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if _IGNORED.search(name) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            dst = targets.get(name)
            if dst is None:
                unexpected.append(name)
                continue
            if dst.shape != tensor.shape:
                raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(name)
        _check_names(self.config.architecture, unexpected, set(targets) - loaded)

    def _linear_parts(self) -> dict[tuple[object, str], tuple[tuple[str, ...], tuple[int, ...], int]]:
        """(owner, attribute) of every native LinearWeight -> (HF part names, their rows N, columns K)."""
        cfg = self.config
        out: dict[tuple[object, str], tuple[tuple[str, ...], tuple[int, ...], int]] = {}
        for i, layer in enumerate(self.layers):
            for name, parts in layer.linear_parts(f"model.layers.{i}").items():
                out[layer, name] = parts
        table = (("model.embed_tokens.weight",), (cfg.vocab_size,), cfg.hidden_size)
        out[self, "embed"] = table
        if not cfg.tie_word_embeddings:
            out[self, "lm_head"] = (("lm_head.weight",), (cfg.vocab_size,), cfg.hidden_size)
        return out

    @torch.no_grad()
    def load_native_weights(self, weights: Iterable[tuple[str, Payload]], quantize: Optional[str] = None,
                            part_qtypes: Optional[dict[str, str]] = None) -> list[str]:
        """Native mode: build each LinearWeight from its parts as they arrive (fuse_rows: raw GGUF blocks
        stay as they are; with `quantize` fp32 parts are quantized), copy norms and biases.
        `part_qtypes` (HF name -> the qtype of its raw blocks, from a GGUF header): the arena is laid out
        first and each weight's blocks are copied from the file straight into it (ArenaPlan).

        Same errors as load_weights. Returns the linear weights that had to stay fp32 ("name (types)").
        """
        assert self.native, "load_native_weights needs LlamaForCausalLM(..., native=True)"
        targets = self.hf_weights()  # norms and biases
        groups = self._linear_parts()
        slots = [(layer, name) for layer in self.layers for name in layer.LINEARS] + [(self, "embed")]
        if not self.config.tie_word_embeddings:
            slots.append((self, "lm_head"))
        arena = ArenaPlan(slots, groups, part_qtypes) if part_qtypes is not None and quantize is None else None
        part_of = {part: (key, rows, k) for key, (parts, all_rows, k) in groups.items() for part, rows in zip(parts, all_rows)}
        pending: dict[tuple[object, str], dict[str, Payload]] = {}
        loaded: set[str] = set()
        unexpected: list[str] = []
        fp32_kept: list[str] = []
        for name, payload in weights:
            if _IGNORED.search(name) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            if name in part_of:
                key, rows, k = part_of[name]
                if tuple(payload.shape) != (rows, k):
                    raise ValueError(f"weight {name}: checkpoint shape {tuple(payload.shape)}, model expects {(rows, k)}")
                parts = pending.setdefault(key, {})
                parts[name] = payload
                loaded.add(name)
                if len(parts) == len(groups[key][0]):  # all parts in: build, and let the parts go
                    ordered = [parts[p] for p in groups[key][0]]
                    weight = arena.fill(key, ordered) if arena is not None else None
                    if weight is None:
                        weight = to_linear(fuse_rows(ordered, quantize))
                    if isinstance(weight, torch.Tensor):
                        fp32_kept.append(f"{groups[key][0][0]} ({', '.join(sorted({describe(p) for p in parts.values()}))})")
                    owner, attr = key
                    owner.__dict__[attr] = weight
                    del pending[key]
                continue
            dst = targets.get(name)
            if dst is None:
                unexpected.append(name)
                continue
            tensor = payload.to_float() if isinstance(payload, RawBlocks) else payload
            if dst.shape != tensor.shape:
                raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(name)
        _check_names(self.config.architecture, unexpected, (set(targets) | set(part_of)) - loaded)
        planned = arena is not None and arena.holds_all(slots)
        self._weights_buffer_native = arena.buffer if planned else pack_quant_weights(slots)
        if self.config.tie_word_embeddings:
            self.__dict__["lm_head"] = self.embed  # one table: rows for the lookup, the matrix for the logits
        return fp32_kept


def _check_names(architecture: str, unexpected: list[str], missing: set[str]) -> None:
    """Raise ValueError naming (the first 20 of) the checkpoint's unexpected and the model's missing weights."""
    def listed(names: list[str]) -> str:
        return ", ".join(names[:20]) + (f" (and {len(names) - 20} more)" if len(names) > 20 else "")
    if unexpected:
        raise ValueError(f"unexpected weights for {architecture}: {listed(sorted(unexpected))}")
    if missing:
        raise ValueError(f"missing weights: {listed(sorted(missing))}")
