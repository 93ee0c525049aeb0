"""The model architecture, as the forward pass needs it: one frozen dataclass for the Llama family and Gemma 3."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM"}


def _rope_scaling(d: dict[str, Any]) -> Optional[dict[str, Any]]:
    """`rope_scaling` (transformers < 5) or `rope_parameters` (transformers >= 5); None when plain RoPE."""
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return None
    return dict(rs)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: q/k/v projections carry a bias
    rope_scaling: Optional[dict[str, Any]] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3 only (gemma3.py): interleaved local (sliding-window) and global attention layers
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" | "full_attention"; () = all full
    sliding_window: Optional[int] = None  # W: a local layer's query at p sees keys p - W < k <= p
    rope_local_base_freq: Optional[float] = None  # rope theta of the local layers (global: rope_theta)
    query_pre_attn_scalar: Optional[float] = None  # attention scale = query_pre_attn_scalar ** -0.5

    def __post_init__(self) -> None:
        assert self.num_attention_heads % self.num_key_value_heads == 0, "GQA needs heads % kv_heads == 0"

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """From a transformers config object or a config.json dict."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        # NOTE: configs built in memory (tests) carry no `architectures`; fall back on `model_type`.
        archs = d.get("architectures") or [_MODEL_TYPES.get(d.get("model_type", ""), "LlamaForCausalLM")]
        arch = SUPPORTED_ARCHITECTURES.get(archs[0])
        if arch is None:
            raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        heads = d["num_attention_heads"]
        if arch == "gemma3":
            return _gemma3_from_hf(cls, d)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            rope_scaling=_rope_scaling(d),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's default interleave: every `pattern`-th layer is global, the others local (5:1)."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))


def _gemma3_from_hf(cls: type, d: dict[str, Any]) -> "ModelConfig":
    """Gemma3TextConfig (transformers 4.50+: rope_theta/rope_local_base_freq; 5.x: rope_parameters per layer type)."""
    rp = d.get("rope_parameters") or {}
    full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    theta = full.get("rope_theta", d.get("rope_theta", 1_000_000.0))
    local_theta = local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    scaling = d.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    layers = d["num_hidden_layers"]
    types = tuple(d.get("layer_types") or gemma3_layer_types(layers, d.get("sliding_window_pattern") or 6))
    return cls(
        architecture="gemma3",
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_bias=bool(d.get("attention_bias", False)),
        rope_scaling=dict(scaling) if scaling else None,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        layer_types=types,
        sliding_window=d.get("sliding_window"),
        rope_local_base_freq=float(local_theta),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or d.get("head_dim") or 256),
    )
