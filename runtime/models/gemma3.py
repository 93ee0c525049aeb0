"""Gemma 3 (text) over the same paged KV cache as the Llama family: what differs from llama.py.

* embeddings are scaled by sqrt(hidden) (in the model dtype, as transformers' ScaledWordEmbedding);
* RMSNorm multiplies by (1 + w) (Gemma's zero-centred weights), normalizing in float32; we store the
  effective factor 1 + w once at load;
* four norms per layer: input, post-attention (on the attention output, before the residual add),
  pre-feedforward and post-feedforward; plus q_norm/k_norm over each head's head_dim, before RoPE;
* GeGLU MLP: down(gelu_tanh(gate(x)) * up(x));
* attention scale query_pre_attn_scalar ** -0.5; layers interleave local (sliding-window W, RoPE base
  `rope_local_base_freq`) and global (full causal, RoPE base `rope_theta` with its scaling) attention.
  Every layer keeps all K/V in the pool; a local layer's attention reads only its window
  (AttentionMetadata built with `sliding_window`, once per step for all local layers).

Weights are float32/bfloat16 parameters (every GGUF block type is dequantized at load: gguf_loader.py).

    >>> from sgl.runtime.models.config import ModelConfig, gemma3_layer_types
    >>> from sgl.runtime.executor.forward_batch import ForwardBatch
    >>> from sgl.runtime.executor.kv_cache import KVCache
    >>> cfg = ModelConfig(architecture="gemma3", vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    ...                   rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=64,
    ...                   tie_word_embeddings=True, attention_bias=False, layer_types=gemma3_layer_types(2, 2),
    ...                   sliding_window=4, rope_local_base_freq=1e4, query_pre_attn_scalar=8.0)
    >>> model = Gemma3ForCausalLM(cfg)
    >>> model.load_weights((n, torch.randn(shape)) for n, shape in model.hf_weight_shapes().items())
    >>> kv = KVCache.for_model(cfg, num_slots=16, dtype=torch.float32)
    >>> fb = ForwardBatch.from_lists(input_ids=[[1, 2, 3]], slot_tables=[[0, 1, 2]])
    >>> model.compute_logits(model.forward(fb, kv)[fb.last_token_indices]).shape
    torch.Size([1, 32])
"""

from __future__ import annotations

from typing import Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

from sgl.kernels.attention import AttentionMetadata
from sgl.kernels.dispatch import paged_attention
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.rotary import RopeTables, RotaryEmbedding

SLIDING, FULL = "sliding_attention", "full_attention"
# our parameter -> its HF name suffix, per layer (norm factors are 1 + the HF weight)
_LAYER_NORMS = {
    "input_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
}


def gemma_rms_norm(x: torch.Tensor, factor: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Gemma3RMSNorm with `factor` = 1 + weight (float32): normalize in fp32, scale, cast back.
    x: [..., n]; factor: [n]."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * factor).to(x.dtype)


def _param(*shape: int, dtype: torch.dtype, device: Union[str, torch.device]) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, dtype: torch.dtype, device: Union[str, torch.device]) -> None:
        super().__init__()
        hidden, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.intermediate_size = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.sliding = layer_type == SLIDING
        self.scale = float(config.query_pre_attn_scalar or d) ** -0.5
        kw = dict(dtype=dtype, device=device)
        # NOTE: matrices stored transposed, [in, out], as in llama.py (x @ W_t: faster CPU GEMV)
        self.qkv_t = _param(hidden, self.q_size + 2 * self.kv_size, **kw)  # columns: q | k | v
        self.o_t = _param(self.q_size, hidden, **kw)
        self.gate_up_t = _param(hidden, 2 * self.intermediate_size, **kw)  # columns: gate | up
        self.down_t = _param(self.intermediate_size, hidden, **kw)
        for name in _LAYER_NORMS:  # float32 factors 1 + w, whatever the model dtype (Gemma norms in fp32)
            size = d if name in ("q_norm", "k_norm") else hidden
            setattr(self, name, _param(size, dtype=torch.float32, device=device))

    def linear_views(self, prefix: str) -> dict[str, torch.Tensor]:
        """HF linear weight name -> the [out, in] view of our storage it fills."""
        q, kv, inter = self.q_size, self.kv_size, self.intermediate_size
        qkv, gate_up = self.qkv_t.t(), self.gate_up_t.t()
        return {
            f"{prefix}.self_attn.q_proj.weight": qkv[:q],
            f"{prefix}.self_attn.k_proj.weight": qkv[q : q + kv],
            f"{prefix}.self_attn.v_proj.weight": qkv[q + kv :],
            f"{prefix}.self_attn.o_proj.weight": self.o_t.t(),
            f"{prefix}.mlp.gate_proj.weight": gate_up[:inter],
            f"{prefix}.mlp.up_proj.weight": gate_up[inter:],
            f"{prefix}.mlp.down_proj.weight": self.down_t.t(),
        }

    def forward(
        self, h: torch.Tensor, rope: RotaryEmbedding, tables: RopeTables, attn: AttentionMetadata,
        fb: ForwardBatch, kv: KVCache, layer_id: int,
    ) -> torch.Tensor:
        """h [T, hidden] -> [T, hidden]; writes this layer's K/V of the new tokens."""
        t = h.shape[0]
        x = gemma_rms_norm(h, self.input_norm, self.eps)
        qkv = x @ self.qkv_t  # [T, (H + 2 Hkv) D]
        if fb.lora is not None:  # LoRA (runtime/lora/): each adapter segment adds x @ A @ B, as in llama.py
            fb.lora.apply(qkv, x, layer_id, "qkv")
        q = gemma_rms_norm(qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim), self.q_norm, self.eps)
        k = gemma_rms_norm(
            qkv[:, self.q_size : self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim), self.k_norm, self.eps
        )
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        qk = rope.apply(torch.cat((q, k), 1), tables)  # [T, H + Hkv, D]
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        kv.store(layer_id, fb.out_cache_loc, k, v)
        o = paged_attention(q, kv.k_buffer(layer_id), kv.v_buffer(layer_id), attn, self.scale)  # [T, H, D]
        o = o.reshape(t, self.q_size)
        attn_out = o @ self.o_t  # [T, hidden]: LoRA deltas go in before Gemma's post-norms
        if fb.lora is not None:
            fb.lora.apply(attn_out, o, layer_id, "o")
        h = h + gemma_rms_norm(attn_out, self.post_attn_norm, self.eps)
        x = gemma_rms_norm(h, self.pre_ffw_norm, self.eps)
        gate_up = x @ self.gate_up_t  # [T, 2I]
        if fb.lora is not None:
            fb.lora.apply(gate_up, x, layer_id, "gate_up")
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        act = F.gelu(gate, approximate="tanh") * up
        mlp = act @ self.down_t
        if fb.lora is not None:
            fb.lora.apply(mlp, act, layer_id, "down")
        return h + gemma_rms_norm(mlp, self.post_ffw_norm, self.eps)


class Gemma3ForCausalLM(nn.Module):
    """Same interface as LlamaForCausalLM (forward, compute_logits, hf_weights, load_weights); fp32 weights only."""

    native = False

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> None:
        super().__init__()
        assert config.architecture == "gemma3", config.architecture
        self.config, self.dtype = config, dtype
        types = config.layer_types or (FULL,) * config.num_hidden_layers
        assert len(types) == config.num_hidden_layers, "one layer type per layer"
        if SLIDING in types and not config.sliding_window:
            raise ValueError("Gemma 3 config has sliding_attention layers but no sliding_window")
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, ty, dtype, device) for ty in types)
        self.embed_tokens = _param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)  # [V, hidden]
        self.lm_head_w = (
            self.embed_tokens if config.tie_word_embeddings
            else _param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        )
        self.norm = _param(config.hidden_size, dtype=torch.float32, device=device)  # 1 + w
        # as transformers: a float32 scalar sqrt(hidden), cast to the weights' dtype
        self.embed_scale = torch.tensor(config.hidden_size**0.5).to(dtype)
        max_pos = config.max_position_embeddings
        self.rope_global = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, max_pos, dtype, device)
        self.rope_local = RotaryEmbedding(
            config.head_dim, config.rope_local_base_freq or 10_000.0, None, max_pos, dtype, device
        )

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """The batch's new tokens -> [T, hidden] final-normed states; writes their K/V into `kv`."""
        seq_max = max(fb.seq_lens)
        self.rope_global.ensure(seq_max)
        self.rope_local.ensure(seq_max)
        global_tables, local_tables = self.rope_global.lookup(fb.positions), self.rope_local.lookup(fb.positions)
        window = self.config.sliding_window
        local_attn = fb.attn
        if window is not None and seq_max > window:  # some query has keys outside its window
            local_attn = AttentionMetadata.build(fb.extend_lens, fb.seq_lens, fb.slot_tables, fb.input_ids.device, window)
        h = F.embedding(fb.input_ids, self.embed_tokens) * self.embed_scale  # [T, hidden]
        for i, layer in enumerate(self.layers):
            if layer.sliding:
                h = layer.forward(h, self.rope_local, local_tables, local_attn, fb, kv, i)
            else:
                h = layer.forward(h, self.rope_global, global_tables, fb.attn, fb, kv, i)
        return gemma_rms_norm(h, self.norm, self.config.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        return F.linear(hidden, self.lm_head_w).float()

    def _linear_views(self) -> dict[str, torch.Tensor]:
        m = {"model.embed_tokens.weight": self.embed_tokens}
        if not self.config.tie_word_embeddings:
            m["lm_head.weight"] = self.lm_head_w
        for i, layer in enumerate(self.layers):
            m.update(layer.linear_views(f"model.layers.{i}"))
        return m

    def _norm_factors(self) -> dict[str, torch.Tensor]:
        m = {"model.norm.weight": self.norm}
        for i, layer in enumerate(self.layers):
            m.update({f"model.layers.{i}.{hf}.weight": getattr(layer, ours) for ours, hf in _LAYER_NORMS.items()})
        return m

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """Every HF weight name -> the storage it fills (norm entries hold 1 + w, not w)."""
        return {**self._linear_views(), **self._norm_factors()}

    def hf_weight_shapes(self) -> dict[str, torch.Size]:
        return {name: dst.shape for name, dst in self.hf_weights().items()}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in (Gemma's norm weights w become factors 1 + w, in float32 as transformers
        computes them). Raises ValueError naming unexpected names, wrong shapes and missing names."""
        from sgl.runtime.models.llama import _check_names

        linears, norms = self._linear_views(), self._norm_factors()
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            dst = linears.get(name)
            if dst is None:
                dst = norms.get(name)
                if dst is None:
                    unexpected.append(name)
                    continue
                tensor = 1.0 + tensor.float()
            if dst.shape != tensor.shape:
                raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(name)
        _check_names("gemma3", unexpected, (set(linears) | set(norms)) - loaded)


# Gemma 3's chat template (the instruction-tuned models' tokenizer_config.json, text parts only), for GGUF
# files that carry none: turns are `<start_of_turn>{user|model}\n...<end_of_turn>\n`, a system message is
# prepended to the first user turn, and <end_of_turn> ends generation.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""
