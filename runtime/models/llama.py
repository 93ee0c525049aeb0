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
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from sgl.kernels.dispatch import paged_attention  # Triton on CUDA, the torch reference on CPU
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.rotary import RopeTables, RotaryEmbedding
from sgl.runtime.models.weight_arena import pack_parameters

# Checkpoint entries that carry no weights of ours (recomputed from the config).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


def _param(*shape: int, dtype: torch.dtype, device: Union[str, torch.device]) -> nn.Parameter:
    # NOTE: uninitialized: load_weights fills every parameter or raises naming the missing ones.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: Union[str, torch.device]) -> None:
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
        self.input_layernorm = _param(hidden, **kw)
        self.qkv_t = _param(hidden, self.q_size + 2 * self.kv_size, **kw)  # columns: q | k | v
        # Qwen2 (and Llama with attention_bias) bias q/k/v; only Llama's attention_bias also biases o_proj
        self.qkv_bias: Optional[nn.Parameter] = _param(self.q_size + 2 * self.kv_size, **kw) if config.attention_bias else None
        self.o_t = _param(self.q_size, hidden, **kw)
        self.o_bias: Optional[nn.Parameter] = (
            _param(hidden, **kw) if config.attention_bias and config.architecture == "llama" else None
        )
        self.post_attention_layernorm = _param(hidden, **kw)
        self.gate_up_t = _param(hidden, 2 * config.intermediate_size, **kw)  # columns: gate | up
        self.down_t = _param(config.intermediate_size, hidden, **kw)

    def hf_weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """HF name -> the view of our storage it fills (in the checkpoint's [out, in] orientation)."""
        q, kv, inter = self.q_size, self.kv_size, self.intermediate_size
        qkv, gate_up = self.qkv_t.t(), self.gate_up_t.t()  # [out, in] views
        m = {
            f"{prefix}.input_layernorm.weight": self.input_layernorm,
            f"{prefix}.self_attn.q_proj.weight": qkv[:q],
            f"{prefix}.self_attn.k_proj.weight": qkv[q : q + kv],
            f"{prefix}.self_attn.v_proj.weight": qkv[q + kv :],
            f"{prefix}.self_attn.o_proj.weight": self.o_t.t(),
            f"{prefix}.post_attention_layernorm.weight": self.post_attention_layernorm,
            f"{prefix}.mlp.gate_proj.weight": gate_up[:inter],
            f"{prefix}.mlp.up_proj.weight": gate_up[inter:],
            f"{prefix}.mlp.down_proj.weight": self.down_t.t(),
        }
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
        if self.qkv_bias is None:
            qkv = torch.mm(x, self.qkv_t)  # [T, (H + 2 Hkv) D]
        else:
            qkv = torch.addmm(self.qkv_bias, x, self.qkv_t)
        # NOTE: basic slicing, not Tensor.split: same views, a fraction of the Python overhead.
        qk_cols = self.qk_v_sizes[0]
        qk, v = qkv[:, :qk_cols], qkv[:, qk_cols:]
        qk = rope.apply(qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim), rope_tables)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [T, H, D], [T, Hkv, D]: rotated in one pass
        kv.store(layer_id, fb.out_cache_loc, k, v.view(num_tokens, self.num_kv_heads, self.head_dim))
        o = paged_attention(q, kv.k_buffer(layer_id), kv.v_buffer(layer_id), fb.attn, self.scale)  # [T, H, D]
        h = torch.addmm(h, o.view(num_tokens, self.q_size), self.o_t)  # h + o_proj(o)
        if self.o_bias is not None:
            h = h + self.o_bias
        x = rms_norm(h, self.post_attention_layernorm, self.norm_consts)
        gate_up = torch.mm(x, self.gate_up_t)  # [T, 2I]
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        return torch.addmm(h, F.silu(gate).mul_(up), self.down_t)  # h + down_proj(silu(gate) * up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, consts: "NormConsts") -> torch.Tensor:
    """HF's RMSNorm, weight * x / sqrt(mean(x^2) + eps), in 4 ops (F.rms_norm runs ~20 on CPU).

    Computed as weight * sqrt(n) * x / hypot(|x|, sqrt(n * eps)), the same quantity since
    sqrt(mean(x^2) + eps) = sqrt(|x|^2 + n * eps) / sqrt(n). x: [T, n].
    """
    if x.dtype != torch.float32:  # as HF: normalize in fp32, cast, then scale by the weight
        return rms_norm(x.float(), consts.one, consts).to(x.dtype).mul_(weight)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [T, 1]
    return torch.addcdiv(consts.zero, x, torch.hypot(norm, consts.eps_n), value=consts.sqrt_n).mul_(weight)


class NormConsts(nn.Module):
    """0-dim constants of rms_norm on the model's device (Python floats would be wrapped per call)."""

    def __init__(self, hidden_size: int, eps: float, device: Union[str, torch.device]) -> None:
        super().__init__()
        self.sqrt_n = hidden_size**0.5
        for name, value in (("eps_n", (hidden_size * eps) ** 0.5), ("zero", 0.0), ("one", 1.0)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32, device=device), persistent=False)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, device="meta")  # shapes only; pack_parameters allocates below
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, dtype, device) for _ in range(config.num_hidden_layers))
        self.norm = _param(config.hidden_size, **kw)
        self.lm_head_t = _param(config.hidden_size, config.vocab_size, **kw)  # [hidden, V]
        if not config.tie_word_embeddings:
            self.embed_tokens = _param(config.vocab_size, config.hidden_size, **kw)
        # all weights in one huge-page buffer, in the order a forward pass reads them (weight_arena.py)
        self._weights_buffer = pack_parameters(self, dtype, device)
        self.norm_consts = NormConsts(config.hidden_size, config.rms_norm_eps, device)
        self.rope = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings, dtype, device
        )

    @property
    def embed_weight(self) -> torch.Tensor:
        """[V, hidden]. Tied: the embedding IS the output projection, read through a transposed view."""
        return self.lm_head_t.t() if self.config.tie_word_embeddings else self.embed_tokens

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Runs the batch's new tokens, writes their K/V into `kv`; returns [T, hidden] final-normed states."""
        self.rope.ensure(max(fb.seq_lens))
        rope_tables = self.rope.lookup(fb.positions)  # shared by all layers
        h = F.embedding(fb.input_ids, self.embed_weight)  # [T, hidden]
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, rope_tables, self.rope, fb, kv, i)  # NOTE: .forward skips nn.Module hook dispatch
        return rms_norm(h, self.norm, self.norm_consts)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        return torch.mm(hidden, self.lm_head_t).float()

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """Every Hugging Face weight name this model needs -> the view of our storage it fills."""
        m = {"model.embed_tokens.weight": self.embed_weight, "model.norm.weight": self.norm}
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
        if unexpected:
            raise ValueError(f"unexpected weights for {self.config.architecture}: {', '.join(sorted(unexpected)[:20])}"
                             + (f" (and {len(unexpected) - 20} more)" if len(unexpected) > 20 else ""))
        missing = sorted(set(targets) - loaded)
        if missing:
            raise ValueError(f"missing weights: {', '.join(missing[:20])}" + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""))
