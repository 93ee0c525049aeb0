"""MEDUSA: k extra heads on the target's last hidden state draft a token tree (Cai et al., 2024).

Head i is `num_layers` ResBlocks, x + SiLU(W x + b), then an lm_head: the target's own (shared; our
self-distilled heads) or its own [V, H] matrix (the published Medusa-1 layout). From the final-normed
hidden state h_t of the token at index t (the state that predicted the pending token t + 1), head i
predicts the token at t + 2 + i. The draft is Medusa's static sparse tree: each choice (c_0, .., c_d)
is the node "the c_0-th best token of head 0, then the c_1-th best of head 1, ...", its parent the
choice without its last index (the tree verification of runtime/executor/verify.py accepts one path).

    >>> heads = MedusaHeads(num_heads=2, num_layers=1, hidden_size=8)
    >>> tree = build_tree([(0,), (1,), (0, 0), (0, 1)], [[7, 5], [3, 2]])
    >>> tree.token_ids, tree.parents
    ([7, 5, 3, 2], [-1, -1, 0, 0])

Checkpoints (`--speculative-draft-model-path DIR`): `DIR/config.json` with `medusa_num_heads`,
`medusa_num_layers` (as Medusa's repositories publish them) and `DIR/medusa_lm_head.safetensors`
with `{i}.{j}.linear.weight` [H, H], `{i}.{j}.linear.bias` [H] for head i's ResBlock j, and
optionally `{i}.{num_layers}.weight` [V, H], head i's own lm_head. Ours may carry `d2t` [Vd] int64, a draft
vocabulary (EAGLE-3's convention: draft id d is target id d + d2t[d]): the heads then score only those rows of the
target's lm_head. With the full 49k rows per head, a draft of three heads took 4.6 ms on the default model (q8,
1 thread), about half a decode step, and the adaptive rule never drafted; with 4,096 rows (the tokens the target
writes most often) 1.2 ms (the README's MEDUSA section).

The drafter needs the runner's hidden states: the runner (capture_hidden, hidden_observer) hands
each step's rows and their kept hidden states to `observe`, and a request without the state of
index len(fill_ids) - 2 (e.g. right after jump-forward text) gets no draft that step.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sgl.runtime.scheduler.request import BatchRow, Req, RowResult
from sgl.runtime.speculative.drafter import Draft, d2t_ids, draft_quantize
from sgl.runtime.speculative.grammar_walk import GrammarWalk, grammar_walks

# A small static tree for a CPU (every node costs a verify row): the top-3 of head 0, the top-2 of
# head 1 under the best head-0 token, and the greedy path three deep.
DEFAULT_CHOICES: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0))


SHIPPED = pathlib.Path(__file__).resolve().parent / "heads" / "smollm2-135m-instruct-medusa"


def shipped_heads_path(model_path: str) -> str:
    """The heads this repository ships (trained for the default model), or ValueError for other models."""
    if model_path != "default":
        raise ValueError(f"MEDUSA on {model_path!r} needs --speculative-draft-model-path (a Medusa heads folder; "
                         "train one with `python -m sgl.runtime.speculative.train --algorithm medusa`)")
    return str(SHIPPED)


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: Optional[int] = None,
                 own_lm_head: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_heads, self.num_layers, self.hidden_size = num_heads, num_layers, hidden_size
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Linear(hidden_size, hidden_size, dtype=dtype) for _ in range(num_layers))
            for _ in range(num_heads))
        self.lm_heads: Optional[nn.ParameterList] = None  # [V, H] per head, or None: the target's is shared
        self.d2t: Optional[torch.Tensor] = None  # [Vd] int64 offsets of a draft vocabulary (module docstring), or None
        if own_lm_head:
            assert vocab_size is not None
            self.lm_heads = nn.ParameterList(nn.Parameter(torch.zeros(vocab_size, hidden_size, dtype=dtype))
                                             for _ in range(num_heads))

    @property
    def vocab_ids(self) -> Optional[torch.Tensor]:
        """[Vd] int64 target ids of the draft vocabulary, or None (the whole vocabulary)."""
        return None if self.d2t is None else d2t_ids(self.d2t)

    def features(self, hidden: torch.Tensor, num_heads: Optional[int] = None) -> torch.Tensor:
        """hidden [N, H] -> [heads, N, H], the first `num_heads` heads' ResBlocks applied (all by default)."""
        out = []
        for blocks in list(self.blocks)[:num_heads]:
            x = hidden
            for lin in blocks:
                x = x + F.silu(lin(x))
            out.append(x)
        return torch.stack(out)

    def logits(self, hidden: torch.Tensor, shared_lm_head: Any, num_heads: Optional[int] = None) -> torch.Tensor:
        """[heads, N, V'] float32 of the first `num_heads` heads (all by default); `shared_lm_head([M, H]) -> [M, V']`
        is the target's compute_logits (V' = V), or its rows of the draft vocabulary (draft_lm_head)."""
        feats = self.features(hidden, num_heads)
        n = hidden.shape[0]
        if self.lm_heads is None:
            return shared_lm_head(feats.reshape(-1, self.hidden_size)).view(feats.shape[0], n, -1)
        return torch.stack([f @ w.t() for f, w in zip(feats, self.lm_heads)]).float()

    def state_dict_medusa(self) -> dict[str, torch.Tensor]:
        """The published layout's names (module docstring)."""
        out: dict[str, torch.Tensor] = {}
        for i, blocks in enumerate(self.blocks):
            for j, lin in enumerate(blocks):
                out[f"{i}.{j}.linear.weight"] = lin.weight.detach()
                out[f"{i}.{j}.linear.bias"] = lin.bias.detach()
            if self.lm_heads is not None:
                out[f"{i}.{self.num_layers}.weight"] = self.lm_heads[i].detach()
        if self.d2t is not None:
            out["d2t"] = self.d2t
        return out


def save_medusa_heads(heads: MedusaHeads, path: str, dtype: torch.dtype = torch.float16,
                      extra_config: Optional[dict[str, Any]] = None) -> None:
    from safetensors.torch import save_file

    d = pathlib.Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: (v if k == "d2t" else v.to(dtype)).contiguous() for k, v in heads.state_dict_medusa().items()},
              str(d / "medusa_lm_head.safetensors"))
    cfg = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
           "hidden_size": heads.hidden_size, **(extra_config or {})}
    (d / "config.json").write_text(json.dumps(cfg, indent=1))


def load_medusa_heads(path: str, hidden_size: int, vocab_size: int) -> MedusaHeads:
    """Read a Medusa checkpoint folder (module docstring); float32 in memory. ValueError names what is wrong."""
    from safetensors.torch import load_file

    d = pathlib.Path(path)
    cfg_path, w_path = d / "config.json", d / "medusa_lm_head.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"a Medusa checkpoint needs {cfg_path.name} and {w_path.name} in {d}")
    cfg = json.loads(cfg_path.read_text())
    if "medusa_num_heads" not in cfg:
        raise ValueError(f"{cfg_path}: no medusa_num_heads (not a Medusa config)")
    num_heads, num_layers = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
    tensors = load_file(str(w_path))
    own = f"0.{num_layers}.weight" in tensors
    heads = MedusaHeads(num_heads, num_layers, hidden_size, vocab_size, own_lm_head=own)
    d2t = tensors.pop("d2t", None)
    if d2t is not None:
        ids = d2t_ids(d2t) if d2t.dim() == 1 else None
        if ids is None or own or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"{w_path}: d2t must be 1-D offsets to target ids in [0, {vocab_size}) for heads that "
                             "share the target's lm_head")
        heads.d2t = d2t.long()
    want = {name: t.shape for name, t in heads.state_dict_medusa().items() if name != "d2t"}
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ValueError(f"{w_path}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, t in tensors.items():
        if t.shape != want[name]:
            raise ValueError(f"{w_path}: {name} is {tuple(t.shape)}, the target model needs {tuple(want[name])}")
    with torch.no_grad():
        for i, blocks in enumerate(heads.blocks):
            for j, lin in enumerate(blocks):
                lin.weight.copy_(tensors[f"{i}.{j}.linear.weight"])
                lin.bias.copy_(tensors[f"{i}.{j}.linear.bias"])
            if heads.lm_heads is not None:
                heads.lm_heads[i].copy_(tensors[f"{i}.{num_layers}.weight"])
    return heads.eval()


@dataclass(frozen=True)
class _Tree:
    token_ids: list[int]
    parents: list[int]


Ranking = Callable[[int, list[int]], Sequence[int]]  # (head i, a node's path of token ids) -> head i's tokens, best first


def build_tree(choices: Sequence[Sequence[int]], topk: Sequence[Sequence[int]],
               ranked: Optional[Ranking] = None) -> _Tree:
    """The static tree over one request's per-head top-k token ids (`topk[i]`: head i's, best first), or over
    `ranked(i, path)` (head i's ranking after the parent node's path: a grammar's masked ranking) when given.
    Choices deeper than the heads, whose rank is past the ranking, or whose parent is absent, are skipped."""
    index: dict[tuple[int, ...], int] = {}
    paths: dict[tuple[int, ...], list[int]] = {(): []}
    tokens: list[int] = []
    parents: list[int] = []
    for c in sorted((tuple(c) for c in choices), key=lambda c: (len(c), c)):
        depth = len(c)
        if depth > len(topk) or (depth > 1 and c[:-1] not in index):
            continue
        order = topk[depth - 1] if ranked is None else ranked(depth - 1, paths[c[:-1]])
        if c[-1] >= len(order):
            continue
        index[c] = len(tokens)
        tokens.append(int(order[c[-1]]))
        parents.append(index[c[:-1]] if depth > 1 else -1)
        paths[c] = paths[c[:-1]] + [tokens[-1]]
    return _Tree(tokens, parents)


class _HiddenRows:
    """The request's latest kept hidden states: rows for fill indices first .. first + len - 1."""

    def __init__(self, first: int, rows: torch.Tensor) -> None:
        self.first, self.rows = first, rows

    def at(self, index: int) -> Optional[torch.Tensor]:
        i = index - self.first
        return self.rows[i] if 0 <= i < self.rows.shape[0] else None


class MedusaDrafter:
    name = "MEDUSA"
    accept_prior = 0.4  # per-draft acceptance before a request has any: heads two+ tokens ahead guess less

    def __init__(self, heads: MedusaHeads, shared_lm_head: Any,
                 choices: Sequence[Sequence[int]] = DEFAULT_CHOICES) -> None:
        """`shared_lm_head([M, H]) -> [M, V']`: the target's compute_logits, or its rows of the heads' draft
        vocabulary (draft_lm_head: V' = that vocabulary's size)."""
        self.heads = heads
        self.shared_lm_head = shared_lm_head
        self.vocab_ids = heads.vocab_ids  # draft id -> target id, or None (logits over the whole vocabulary)
        self.choices = [tuple(c) for c in choices]
        self.branching = [1 + max((c[d] for c in self.choices if len(c) > d), default=0)
                          for d in range(heads.num_heads)]  # top-k taken from each head

    def observe(self, rows: Sequence[BatchRow], results: Sequence[RowResult]) -> None:
        """After each step (ModelRunner.hidden_observer): a row kept `hidden_states` [m, H], the
        states of fill indices row.start .. row.start + m - 1."""
        for row, res in zip(rows, results):
            if res.hidden_states is not None and res.hidden_states.shape[0] > 0:
                row.req.draft_state[self.name] = _HiddenRows(row.start, res.hidden_states)

    @torch.inference_mode()
    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        """At most `k` tree nodes per request (the first k choices, shallowest first)."""
        rows, have = [], []
        for j, req in enumerate(reqs):
            st = req.draft_state.get(self.name)
            h = st.at(len(req.fill_ids) - 2) if st is not None else None
            if h is not None:
                rows.append(h)
                have.append(j)
        out = [Draft([]) for _ in reqs]
        if not rows:
            return out
        choices = sorted(self.choices, key=lambda c: (len(c), c))[:k]
        depth = min(self.heads.num_heads, max(len(c) for c in choices))  # NOTE: each head costs an lm_head matmul
        logits = self.heads.logits(torch.stack(rows), self.shared_lm_head, depth)  # [depth, N, V']
        top = [self._target_ids(logits[i].topk(self.branching[i], dim=-1).indices).tolist() for i in range(depth)]
        with grammar_walks([reqs[j] for j in have]) as walks:
            for a, j in enumerate(have):
                ranked = None if walks[a] is None else self._grammar_ranking(walks[a], logits[:, a])
                tree = build_tree(choices, [top[i][a] for i in range(depth)], ranked)
                out[j] = Draft(tree.token_ids, tree.parents)
        return out

    def _target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.vocab_ids is None else self.vocab_ids[draft_ids]

    def _grammar_ranking(self, walk: GrammarWalk, logits: torch.Tensor) -> Ranking:
        """Head i's likeliest tokens that the request's matcher allows after a node's path (logits [depth, V])."""
        ids = self._target_ids(torch.arange(logits.shape[-1]))
        memo: dict[tuple[int, ...], list[int]] = {}

        def ranked(i: int, path: list[int]) -> list[int]:
            key = (i, *path)
            if key not in memo:
                masked = walk.masked(logits[i], ids) if walk.goto(path) else None
                if masked is None:
                    memo[key] = []
                else:
                    top = masked.topk(min(self.branching[i], masked.numel()))
                    memo[key] = [t for t, v in zip(ids[top.indices].tolist(), top.values.tolist()) if v > float("-inf")]
            return memo[key]

        return ranked


def draft_lm_head(heads: MedusaHeads, target: Any) -> Any:
    """The `shared_lm_head` MedusaDrafter calls for `heads` on `target` (a LlamaForCausalLM): the target's
    compute_logits, or, for heads with a draft vocabulary, its lm_head rows of those tokens (q8_0 blocks for the
    CPU kernels when the target is quantized, as EAGLE's draft lm_head)."""
    ids = heads.vocab_ids
    if ids is None or heads.lm_heads is not None:
        return target.compute_logits
    from sgl.runtime.models.native_weights import embedding_rows, linear, rows_as_linear

    with torch.inference_mode():
        w = rows_as_linear(embedding_rows(ids, target.lm_head), draft_quantize(target))
    return lambda x: linear(x, w).float()
