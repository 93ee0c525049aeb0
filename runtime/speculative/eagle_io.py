"""Reading and writing EAGLE heads.

Two layouts load:
  - ours: ONE safetensors file, fp16 weights, the EagleConfig as JSON in the metadata ("eagle_config");
    the trained head for the default model ships as DEFAULT_HEAD (a file in the repo, package data of
    sgl.runtime: ~9 MB fp16, too small for a data package of its own, and it must match the default
    model's weights exactly, which the wheel pins).
  - EAGLE's published one (EAGLE-1/2 repositories): a folder with config.json (a LlamaConfig with
    num_hidden_layers 1) and model.safetensors or pytorch_model.bin holding fc.weight, layers.0.*.
    EAGLE-3's d2t and lm_head.weight are read when present; its fused three-layer input
    (midlayer.*, fc over 3H) is a different architecture and is refused with a message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from sgl.runtime.speculative.eagle_head import EagleConfig, EagleHead

DEFAULT_HEAD = Path(__file__).resolve().parent / "heads" / "smollm2-135m-instruct-eagle.safetensors"
_IGNORED = ("layers.0.input_layernorm.weight", "embed_tokens.weight", "t2d")


def save_head(head: EagleHead, path: Path, extra_meta: Optional[dict[str, str]] = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
               for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"eagle_config": json.dumps(head.config.to_dict()), **(extra_meta or {})})
    return path


def load_head(path: "str | Path", target_config: Any) -> EagleHead:
    """An fp32 EagleHead from `path` (our file, or an EAGLE folder), checked against the target."""
    path = Path(path)
    if path.is_dir():
        tensors = _read_folder_weights(path)
        config = _config_from_eagle(json.loads((path / "config.json").read_text()), tensors, target_config)
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        if "eagle_config" in meta:
            config = EagleConfig.from_dict(json.loads(meta["eagle_config"]))
        else:
            raise ValueError(f"{path}: no eagle_config in its metadata; pass the checkpoint's folder "
                             "(config.json + weights) for EAGLE's published layout")
    if any(k.startswith("midlayer.") for k in tensors):
        raise ValueError(f"{path}: an EAGLE-3 head (midlayer.*, fc over three hidden layers) is not supported; "
                         "EAGLE-1/2 heads (fc.weight, layers.0.*) are")
    if config.hidden_size != target_config.hidden_size or config.vocab_size != target_config.vocab_size:
        raise ValueError(f"{path}: head for hidden size {config.hidden_size} / vocabulary {config.vocab_size}, "
                         f"target has {target_config.hidden_size} / {target_config.vocab_size}")
    head = EagleHead(config)
    state = {k: v for k, v in tensors.items() if k not in _IGNORED}
    missing, unexpected = head.load_state_dict({k: v.float() if v.is_floating_point() else v.long()
                                                for k, v in state.items()}, strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected EAGLE weights: {', '.join(sorted(unexpected)[:20])}")
    if missing := [m for m in missing if m != "d2t"]:  # no d2t: the identity map (full vocabulary)
        raise ValueError(f"{path}: missing EAGLE weights: {', '.join(sorted(missing)[:20])}")
    return head.eval().requires_grad_(False)


def _read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: neither model.safetensors nor pytorch_model.bin")


def _config_from_eagle(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], target: Any) -> EagleConfig:
    """An EagleConfig from EAGLE's config.json; what it does not say comes from the weights present."""
    H = int(cfg.get("hidden_size", target.hidden_size))
    heads = int(cfg.get("num_attention_heads", target.num_attention_heads))
    vocab = int(cfg.get("vocab_size", target.vocab_size))
    draft_vocab = int(cfg.get("draft_vocab_size") or (tensors["d2t"].numel() if "d2t" in tensors else vocab))
    return EagleConfig(
        hidden_size=H, intermediate_size=int(cfg.get("intermediate_size", target.intermediate_size)),
        num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or H // heads), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling=cfg.get("rope_scaling"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", target.max_position_embeddings)),
        vocab_size=vocab, draft_vocab_size=draft_vocab, fc_bias="fc.bias" in tensors,
        attention_bias="layers.0.self_attn.q_proj.bias" in tensors, final_norm="norm.weight" in tensors,
        own_lm_head="lm_head.weight" in tensors)
