"""Random EAGLE-3 heads in their published layout (SpecForge's and SGLang's names), and a dense reference of
SGLang's EAGLE-3 layer computed from those tensors alone: tests/runtime/test_eagle3.py, tests/e2e/test_eagle_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F


def eagle3_tensors(H: int, heads: int, kv_heads: int, inter: int, vocab: int, draft_ids: list[int], n_aux: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """A random one-layer EAGLE-3 head under its published names (SpecForge / SGLang: midlayer.*, norm.weight, d2t
    offsets, t2d mask, a copy of the embedding)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return 0.3 * torch.randn(*shape, generator=g)

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(H, generator=g)

    D = H // heads
    t = {"fc.weight": w(H, n_aux * H), "norm.weight": norm(), "lm_head.weight": w(len(draft_ids), H),
         "embed_tokens.weight": w(vocab, H),
         "midlayer.input_layernorm.weight": norm(), "midlayer.hidden_norm.weight": norm(),
         "midlayer.post_attention_layernorm.weight": norm(),
         "midlayer.self_attn.q_proj.weight": w(heads * D, 2 * H),
         "midlayer.self_attn.k_proj.weight": w(kv_heads * D, 2 * H),
         "midlayer.self_attn.v_proj.weight": w(kv_heads * D, 2 * H),
         "midlayer.self_attn.o_proj.weight": w(H, heads * D),
         "midlayer.mlp.gate_proj.weight": w(inter, H), "midlayer.mlp.up_proj.weight": w(inter, H),
         "midlayer.mlp.down_proj.weight": w(H, inter)}
    ids = torch.tensor(draft_ids)
    t["d2t"] = ids - torch.arange(len(draft_ids))
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    t["t2d"] = t2d
    return t


def write_eagle3(folder: Path, tensors: dict[str, torch.Tensor], aux: Optional[tuple[int, ...]], vocab: int,
                 heads: int = 4, kv_heads: int = 2, **cfg: object) -> Path:
    """The folder SGLang's --speculative-draft-model-path takes: config.json (eagle_config's layer ids: `aux`, None
    for the default) and model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    H = tensors["fc.weight"].shape[0]
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
              "intermediate_size": tensors["midlayer.mlp.gate_proj.weight"].shape[0], "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "vocab_size": vocab,
              "draft_vocab_size": tensors["lm_head.weight"].shape[0], "max_position_embeddings": 256,
              "rope_theta": 10000.0, "tie_word_embeddings": False, **cfg}
    if aux is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux)}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def reference_logits(t: dict[str, torch.Tensor], embeds: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                     heads: int = 4, kv_heads: int = 2, eps: float = 1e-6, theta: float = 10000.0,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's EAGLE-3 layer over one sequence, densely (causal), from the published tensors: embeds, feats [L, H]
    (feats: the features, already fc'd or the head's own) -> (logits over the draft vocabulary [L, Vd], the
    pre-norm outputs [L, H])."""
    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    L, H = embeds.shape
    D = H // heads
    x = torch.cat([rms(embeds, t["midlayer.input_layernorm.weight"]), rms(feats, t["midlayer.hidden_norm.weight"])], -1)
    q = (x @ t["midlayer.self_attn.q_proj.weight"].T).view(L, heads, D)
    k = (x @ t["midlayer.self_attn.k_proj.weight"].T).view(L, kv_heads, D)
    v = (x @ t["midlayer.self_attn.v_proj.weight"].T).view(L, kv_heads, D)
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = positions.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]

    def rope(z: torch.Tensor) -> torch.Tensor:
        return z * cos + torch.cat([-z[..., D // 2:], z[..., :D // 2]], -1) * sin

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    h = feats + o.transpose(0, 1).reshape(L, H) @ t["midlayer.self_attn.o_proj.weight"].T
    m = rms(h, t["midlayer.post_attention_layernorm.weight"])
    h = h + (F.silu(m @ t["midlayer.mlp.gate_proj.weight"].T) * (m @ t["midlayer.mlp.up_proj.weight"].T)) \
        @ t["midlayer.mlp.down_proj.weight"].T
    return rms(h, t["norm.weight"]) @ t["lm_head.weight"].T, h
