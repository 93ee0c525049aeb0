"""Train MEDUSA heads by self-distillation (`python -m sgl.runtime.speculative.train --algorithm medusa`).

Head i learns, from the target's final-normed hidden state h_j at position j, the target's own greedy
token at position j + 1 + i (the token two or more steps ahead: argmax[j + 1 + i] of the distillation
data, runtime/speculative/distill_data.py). Only positions whose continuation the target wrote itself
count (j >= prompt_len - 1), as at decode time. The lm_head is the target's, frozen and shared; the
ResBlocks start as the identity (W = 0, b = 0: each head first predicts what the lm_head says for
t + 1, Medusa's initialization) and are fitted with AdamW on a cross-entropy whose softmax runs over
the heads' draft vocabulary (`--medusa-draft-vocab`, default 4,096: the tokens the data holds most often, saved
as the checkpoint's d2t, so drafting scores only those rows of the lm_head; 0: the whole vocabulary, the softmax
then over the tokens the target ever produced), each head weighted 0.8^i as in the paper.

Writes a Medusa folder (config.json + medusa_lm_head.safetensors, fp16: runtime/speculative/medusa.py)
and prints each head's top-1 accuracy on a held-out tenth of the sequences.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sgl.runtime.speculative.distill_data import draft_vocabulary
from sgl.runtime.speculative.drafter import d2t_offsets
from sgl.runtime.speculative.medusa import SHIPPED, MedusaHeads, save_medusa_heads


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("medusa")
    g.add_argument("--medusa-num-heads", type=int, default=3)
    g.add_argument("--medusa-num-layers", type=int, default=2, help="ResBlocks per head")
    g.add_argument("--medusa-epochs", type=int, default=4)
    g.add_argument("--medusa-batch-size", type=int, default=512)
    g.add_argument("--medusa-lr", type=float, default=1e-3)
    g.add_argument("--medusa-draft-vocab", type=int, default=4096,
                   help="draft vocabulary size (0: the full vocabulary, as published Medusa heads)")


def examples(data: Any, num_heads: int, seqs: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [N, H] float16, targets [N, num_heads] int64, -1 where past the sequence's end)."""
    hs, ts = [], []
    for s in seqs:
        tokens, hidden, argmax = data.sequence(s)
        n, p = tokens.shape[0], int(data.prompt_lens[s])
        first = p - 1  # the state that predicted the first answer token
        if n - first < 2:
            continue
        idx = torch.arange(first, n)  # positions j
        tgt = torch.full((idx.shape[0], num_heads), -1, dtype=torch.int64)
        for i in range(num_heads):
            src = idx + 1 + i
            ok = src < n
            tgt[ok, i] = argmax[src[ok]]
        hs.append(hidden[first:n])
        ts.append(tgt)
    return torch.cat(hs), torch.cat(ts)


def dense_lm_head(model: Any, hidden_size: int) -> torch.Tensor:
    """The target's output projection as a dense [H, V] float32 matrix (logits of the unit vectors)."""
    with torch.inference_mode():
        return model.compute_logits(torch.eye(hidden_size)).float().clone()


def accuracy(heads: MedusaHeads, lm_head_t: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Each head's top-1 accuracy against `targets` [N, heads] (-1: none), its argmax over its draft vocabulary."""
    out = []
    ids = heads.vocab_ids
    w = lm_head_t if ids is None else lm_head_t[:, ids]
    with torch.no_grad():
        feats = heads.features(hidden.float())  # [heads, N, H]
        for i in range(heads.num_heads):
            ok = targets[:, i] >= 0
            pred = (feats[i][ok] @ w).argmax(-1)
            pred = pred if ids is None else ids[pred]
            out.append(float((pred == targets[ok, i]).float().mean()) if ok.any() else 0.0)
    return out


def train(data: Any, target: Any, args: argparse.Namespace, log: Callable[[str], None]) -> str:
    """Fit the heads to `data` for `target` (the fp32 LlamaForCausalLM, as train.py hands every trainer);
    returns the written folder."""
    model, config = target, target.config
    num_heads = args.medusa_num_heads
    heads = MedusaHeads(num_heads, args.medusa_num_layers, config.hidden_size)
    for blocks in heads.blocks:
        for lin in blocks:
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    lm_head_t = dense_lm_head(model, config.hidden_size)  # [H, V]
    n_seq = data.num_sequences
    held = max(1, n_seq // 10)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n_seq, generator=g).tolist()
    train_h, train_t = examples(data, num_heads, order[held:])  # type: ignore[arg-type]
    test_h, test_t = examples(data, num_heads, order[:held])  # type: ignore[arg-type]
    if args.medusa_draft_vocab > 0:  # the drafter scores these rows only (saved as d2t)
        vocab = draft_vocabulary(data, args.medusa_draft_vocab, config.vocab_size)
        heads.d2t = d2t_offsets(vocab)
    else:
        vocab = torch.unique(data.argmax)  # [Vs]: the tokens the target ever produced
    remap = torch.full((config.vocab_size,), -1, dtype=torch.int64)
    remap[vocab] = torch.arange(vocab.shape[0])
    w_sub = lm_head_t[:, vocab].contiguous()  # [H, Vs]
    sub_t = torch.where(train_t >= 0, remap[train_t.clamp(min=0)], torch.full_like(train_t, -1))
    covered = float((remap[data.argmax] >= 0).float().mean())
    log(f"medusa: {train_h.shape[0]} training positions, {test_h.shape[0]} held out, softmax over {vocab.shape[0]} "
        f"tokens ({covered:.1%} of the target's choices); accuracy before: {[round(a, 3) for a in accuracy(heads, lm_head_t, test_h, test_t)]}")
    opt = torch.optim.AdamW(heads.parameters(), lr=args.medusa_lr, weight_decay=0.0)
    weights = [0.8 ** i for i in range(num_heads)]
    bs = args.medusa_batch_size
    steps = args.medusa_epochs * ((train_h.shape[0] + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0, step = time.monotonic(), 0
    for epoch in range(args.medusa_epochs):
        perm = torch.randperm(train_h.shape[0], generator=g)
        total = 0.0
        for b in range(0, train_h.shape[0], bs):
            sel = perm[b:b + bs]
            feats = heads.features(train_h[sel].float())  # [heads, B, H]
            loss = torch.zeros(())
            for i in range(num_heads):
                loss = loss + weights[i] * F.cross_entropy(feats[i] @ w_sub, sub_t[sel, i], ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * sel.shape[0]
            step += 1
        acc = accuracy(heads, lm_head_t, test_h, test_t)
        log(f"medusa: epoch {epoch + 1}/{args.medusa_epochs} loss {total / train_h.shape[0]:.3f}, held-out top-1 "
            f"per head {[round(a, 3) for a in acc]} ({time.monotonic() - t0:.0f} s, {step} steps)")
    out = args.out or str(SHIPPED)
    save_medusa_heads(heads, out, extra_config={"trained_by": "python -m sgl.runtime.speculative.train --algorithm medusa",
                                               "held_out_top1": [round(a, 4) for a in acc],
                                               "train_positions": int(train_h.shape[0])})
    return out
