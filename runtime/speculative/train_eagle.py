"""Fit an EAGLE head (eagle_head.py) to self-distillation data (distill_data.py); run through
`python -m sgl.runtime.speculative.train --algorithm eagle`.

Per sequence t_0..t_L with the target's states f_0..f_L and greedy next tokens a_0..a_L, entry p reads
(embed(t_p), f_{p-1}) (a zero feature at p = 0, as the drafter's first entry) and learns
    g_p ~ f_p                        (smooth L1, EAGLE's feature regression)
    softmax(g_p W_d^T) ~ softmax(f_p W_d^T)   (EAGLE's token loss: cross-entropy against the target's
                                     distribution over the draft vocabulary, `--eagle-soft 1`; the share
                                     1 - soft is against its greedy choice a_p, not scored outside it)
g_p passes a final norm initialised to the target's (the states are final-normed). W_d are the target's lm_head rows of the draft vocabulary: the `--eagle-draft-vocab` tokens the target
chooses most often in the data (EAGLE-3's d2t), frozen. The layer starts from the target's last decoder
layer (same shape), fc from [0 | I] (the feature passed through) plus noise: both train faster than
random starts. Uniform noise on the input features (EAGLE's), and training the later draft steps on the head's
own states (`--eagle-depth`, EAGLE-3's training-time test: eagle_head.forward_unrolled), make it
robust to reading its own, imperfect, states when it drafts several tokens.
Reports the held-out top-1 accuracy of the first draft token (the acceptance rate of d_1 under greedy).
The defaults are the shipped head's. Measured on the default model (2 epochs over 61k tokens, held-out
first-token accuracy, one run each: differences under ~0.02 are noise): soft labels 0.252 vs the
argmax's 0.209 at token-loss weight 2 (half of each: 0.234; at weight 0.5: 0.218 vs 0.221); soft-label
weight 0.5 / 2 / 5: 0.218 / 0.252 / 0.201; lr 1e-3 / 2e-3 / 5e-3 (weight 2): 0.217 / 0.252 / 0.150.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sgl.runtime.speculative.distill_data import DistillData, draft_vocabulary
from sgl.runtime.speculative.drafter import d2t_offsets
from sgl.runtime.speculative.eagle_head import EagleConfig, EagleHead
from sgl.runtime.speculative.eagle_io import DEFAULT_HEAD, save_head


STEP_WEIGHT = 0.7  # loss weight of draft step s is STEP_WEIGHT ** (s - 1): the first token matters most


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("eagle")
    g.add_argument("--eagle-epochs", type=int, default=4)
    g.add_argument("--eagle-lr", type=float, default=2e-3)
    g.add_argument("--eagle-batch-size", type=int, default=4, help="sequences per optimizer step")
    g.add_argument("--eagle-draft-vocab", type=int, default=4096,
                   help="draft vocabulary size (0: the full vocabulary)")
    g.add_argument("--eagle-ce-weight", type=float, default=2.0, help="weight of the token loss vs the regression")
    g.add_argument("--eagle-depth", type=int, default=2,
                   help="draft steps trained (training-time test: step s reads the head's own step s-1 state)")
    g.add_argument("--eagle-soft", type=float, default=1.0,
                   help="share of the token loss against the target's distribution (soft labels; the rest: its argmax)")
    g.add_argument("--eagle-temperature", type=float, default=1.0, help="softmax temperature of the soft labels")
    g.add_argument("--eagle-noise", type=float, default=0.2, help="uniform feature noise, in units of the states' std")


def soft_label_loss(logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """EAGLE's classification loss: cross-entropy of the head's distribution against the TARGET's
    (softmax of the target's lm_head over its true state, both over the draft vocabulary), averaged over
    the positions where `mask` [B, L] holds. logits, target_logits [B, L, Vd]. For fixed targets it is
    minimised, at the target's entropy, by logits equal to the target's up to a constant per position:
    the head learns the target's whole ranking, not only its argmax (a hard label)."""
    p = F.softmax(target_logits / temperature, dim=-1)
    ce = -(p * F.log_softmax(logits / temperature, dim=-1)).sum(-1)  # [B, L]
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def init_head(target: Any, vocab_ids: torch.Tensor) -> EagleHead:
    """Our head for `target` (an fp32 LlamaForCausalLM): layer = the target's last, fc = [0 | I] + noise."""
    cfg = target.config
    # NOTE: a final norm (EAGLE-3's; EAGLE-1 has none) initialised to the target's: the regression
    # targets are final-normed states, and the target's last layer alone scales its input ~30x.
    head = EagleHead(EagleConfig.from_target(cfg, draft_vocab_size=len(vocab_ids), final_norm=True))
    w = target.hf_weights()
    last = f"model.layers.{cfg.num_hidden_layers - 1}"
    H = cfg.hidden_size
    with torch.no_grad():
        head.d2t.copy_(d2t_offsets(vocab_ids))
        layer = head.layers[0]
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, part).weight.copy_(w[f"{last}.self_attn.{part}.weight"])
        for part in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, part).weight.copy_(w[f"{last}.mlp.{part}.weight"])
        layer.post_attention_layernorm.copy_(w[f"{last}.post_attention_layernorm.weight"])
        head.norm.copy_(w["model.norm.weight"])
        head.fc.weight.normal_(0.0, 0.02)
        head.fc.weight[:, H:] += torch.eye(H)
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            if lin.bias is not None:
                lin.bias.zero_()
    return head


def _batches(data: DistillData, seqs: list[int], batch_size: int, max_len: int, shuffle: bool,
             ) -> list[list[int]]:
    """Sequence ids grouped by similar length (little padding), batch order shuffled."""
    order = sorted(seqs, key=lambda s: int(data.offsets[s + 1] - data.offsets[s]))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        groups = [groups[i] for i in torch.randperm(len(groups)).tolist()]
    return groups


def _tensors(data: DistillData, ids: list[int], embed: torch.Tensor, t2d: torch.Tensor, max_len: int,
             ) -> tuple[torch.Tensor, ...]:
    """Padded [B, L] batch: embeds, input feats, target feats, draft labels (-100 = not scored), positions."""
    lens = [min(int(data.offsets[s + 1] - data.offsets[s]), max_len) for s in ids]
    B, L, H = len(ids), max(lens), data.hidden.shape[1]
    emb, fin, fout = torch.zeros(B, L, H), torch.zeros(B, L, H), torch.zeros(B, L, H)
    labels = torch.full((B, L), -100, dtype=torch.int64)
    for b, (s, n) in enumerate(zip(ids, lens)):
        tok, hid, am = data.sequence(s)
        tok, hid, am = tok[:n], hid[:n].float(), am[:n]
        emb[b, :n] = embed[tok]
        fin[b, 1:n] = hid[:n - 1]
        fout[b, :n] = hid
        labels[b, :n] = t2d[am]
    pos = torch.arange(L).expand(B, L)
    return emb, fin, fout, labels, pos


def train(data: DistillData, target: Any, args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    cfg = target.config
    vocab_ids = draft_vocabulary(data, args.eagle_draft_vocab, cfg.vocab_size)
    t2d = torch.full((cfg.vocab_size,), -100, dtype=torch.int64)
    t2d[vocab_ids] = torch.arange(len(vocab_ids))
    covered = float((t2d[data.argmax] >= 0).float().mean())
    log(f"eagle: draft vocabulary {len(vocab_ids)} tokens covers {covered:.1%} of the target's choices")
    head = init_head(target, vocab_ids)
    w_draft = target.hf_weights()["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    w_draft = w_draft.detach().float()[vocab_ids].contiguous()  # [Vd, H], frozen
    embed = target.embed_weight.detach().float()
    S = data.num_sequences
    perm = torch.randperm(S).tolist()
    held = perm[: max(1, S // 20)]
    train_ids = perm[len(held):]
    max_len = 512
    std = float(data.hidden[:50_000].float().std())
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.eagle_lr, weight_decay=0.0)
    steps = args.eagle_epochs * math.ceil(len(train_ids) / args.eagle_batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    log(f"eagle: {len(train_ids)} train / {len(held)} held-out sequences, {steps} steps")
    log(f"eagle: before training, held-out first-token accuracy {evaluate(head, data, held, embed, t2d, w_draft):.3f}")
    out = Path(args.out) if args.out else DEFAULT_HEAD
    t0 = time.monotonic()
    for epoch in range(args.eagle_epochs):
        head.train()
        tot = n = 0.0
        for ids in _batches(data, train_ids, args.eagle_batch_size, max_len, shuffle=True):
            emb, fin, fout, labels, pos = _tensors(data, ids, embed, t2d, max_len)
            fin = fin + (torch.rand_like(fin) - 0.5) * (2 * args.eagle_noise * std)
            valid = (pos < torch.tensor([[min(int(data.offsets[s + 1] - data.offsets[s]), max_len)] for s in ids]))
            with torch.no_grad():  # the target's own logits over the draft vocabulary, from its true states
                target_logits = fout @ w_draft.t()  # [B, L, Vd]
            loss = torch.zeros(())
            for step, g in enumerate(head.forward_unrolled(emb, fin, pos, args.eagle_depth)):
                # step s + 1's entries exist from position s on (s drafted entries before them)
                g, f, lab, ok = g[:, step:], fout[:, step:], labels[:, step:], valid[:, step:]
                vloss = (F.smooth_l1_loss(g, f, reduction="none").mean(-1) * ok).sum() / ok.sum().clamp(min=1)
                logits = g @ w_draft.t()  # [B, L, Vd]
                hard = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
                soft = soft_label_loss(logits, target_logits[:, step:], ok, args.eagle_temperature)
                ploss = (1 - args.eagle_soft) * hard + args.eagle_soft * soft
                loss = loss + STEP_WEIGHT ** step * (vloss + args.eagle_ce_weight * ploss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            sched.step()
            tot += float(loss.detach())
            n += 1
            if n % 10 == 0:
                log(f"eagle: epoch {epoch + 1} step {n:.0f} loss {tot / n:.4f} ({time.monotonic() - t0:.0f} s)")
        acc = evaluate(head, data, held, embed, t2d, w_draft)
        log(f"eagle: epoch {epoch + 1}/{args.eagle_epochs} loss {tot / max(n, 1):.4f}, held-out first-token "
            f"accuracy {acc:.3f} ({time.monotonic() - t0:.0f} s)")
        # saved after every epoch: an interrupted run leaves a usable head
        save_head(head.eval(), out, {"trained_on": f"{len(data.tokens)} tokens, {S} sequences",
                                     "epochs": str(epoch + 1), "held_out_first_token_accuracy": f"{acc:.4f}"})
    chain = evaluate(head, data, held, embed, t2d, w_draft, depth=3)
    log("eagle: held-out chain acceptance (all of d_1..d_s right) " + ", ".join(
        f"s={i + 1}: {a:.3f}" for i, a in enumerate(chain)))
    return out


@torch.no_grad()
def evaluate(head: EagleHead, data: DistillData, seqs: list[int], embed: torch.Tensor, t2d: torch.Tensor,
             w_draft: torch.Tensor, depth: int = 1) -> "float | list[float]":
    """Share of answer positions whose draft token equals the target's choice: the first draft token
    (true features; a float), or each of draft steps 1..depth (a list; step s reads the head's own
    states as while drafting, and is right only where steps 1..s-1 were: the chain's acceptance)."""
    head.eval()
    hits, tot = [0] * depth, 0
    for ids in _batches(data, seqs, 16, 512, shuffle=False):
        emb, fin, _, labels, pos = _tensors(data, ids, embed, t2d, 512)
        preds = [(g @ w_draft.t()).argmax(-1) for g in head.forward_unrolled(emb, fin, pos, depth)]
        for b, s in enumerate(ids):
            p = int(data.prompt_lens[s]) - 1  # from the last prompt token: the answer's predictions
            n = min(int(data.offsets[s + 1] - data.offsets[s]), 512)
            ok = torch.ones(n - p - depth + 1, dtype=torch.bool) if n - p - depth + 1 > 0 else None
            if ok is None:
                continue
            for step in range(depth):  # d_{step+1} drafted from position q sits at q + step
                lab = labels[b, p + step:n - depth + 1 + step]
                ok = ok & (preds[step][b, p + step:n - depth + 1 + step] == lab) & (lab >= 0)
                hits[step] += int(ok.sum())
            tot += n - p - depth + 1
    accs = [h / max(tot, 1) for h in hits]
    return accs[0] if depth == 1 else accs
