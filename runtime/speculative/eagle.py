"""EAGLE: the feature-level drafter (runtime/speculative/eagle_head.py) inside the scheduler's step.

The target's runner hands over, after every step, the final-normed hidden states of the tokens each
row keeps (ModelRunner.capture_hidden + hidden_observer; for an EAGLE-3 head its outputs of three layers,
which `observe` reduces with the head's fc): `observe` files them per request by position. Per request the drafter keeps
    feats[p - feat_lo]   the target's state f_p for positions feat_lo <= p < feat_hi,
    kv                   the head's own keys/values, entry j at position base + j, computed from
                         (t_{base+j}, f_{base+j-1}), all true (drafted entries are dropped after use),
    tokens               the token of each entry.
`propose` (fill = t_0..t_n, t_n pending):
  1. keeps the longest prefix of the head's entries whose tokens still equal fill's (a rejected draft
     changed a token; `observe` also cuts entries whose feature was recomputed), then one batched
     extend adds the entries up to position n -> g_n -> d_1 = argmax over the draft vocabulary;
  2. k - 1 batched steps: the entry (d_j, g_{n+j-1}) at position n + j -> g_{n+j} -> d_{j+1};
  3. drops the drafted entries (positions > n): their features were the head's own.
After jump-forward the pending tokens end in forced text the target has not run yet (t_m..t_n, no
features past f_{m-1}): step 1 then stops at entry m, and the forced tokens are teacher-forced through
head steps over the head's own states (as drafted entries: entry (t_{m+i}, g_{m+i-1})), so the draft
starts after them; those entries are dropped with the drafted ones. A chain of k drafts then costs
n - m + k head steps; without this, rows after jump-forward had no draft at all.
Positions whose states the target never computed (a radix-cache hit on the prompt) have no features:
the head's context then starts at the first computed position (base = feat_lo), whose entry reads a
zero feature (it has no predecessor: the same at position 0, and in training).
Drafts are greedy over the head's logits (q one-hot), as drafter.py's verify rule assumes.
State is dropped when a request finishes (swept at the next observe/propose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from sgl.runtime.models.native_weights import embedding_rows, linear, pack_for_act, rows_as_linear
from sgl.runtime.scheduler.request import BatchRow, Req, RowResult
from sgl.runtime.speculative.drafter import Draft, draft_quantize
from sgl.runtime.speculative.eagle_head import EagleHead, HeadKV, head_extend, head_tree_step
from sgl.runtime.speculative.grammar_walk import GrammarWalk, grammar_walks
from sgl.runtime.speculative.verify_cost import step_clock


@dataclass
class _Seq:
    kv: HeadKV
    feats: torch.Tensor  # [cap, H] float32: f_p at row p - feat_lo
    feat_lo: int = 0
    feat_hi: int = 0  # positions [feat_lo, feat_hi) hold the target's states
    base: int = -1  # position of the head's entry 0 (-1: not started); its entry reads a zero feature
    tokens: list[int] = field(default_factory=list)  # token of each head entry (len == kv.length)

    def cut_entries(self, n: int) -> None:
        """Keep the first n head entries."""
        n = max(0, min(n, len(self.tokens)))
        del self.tokens[n:]
        self.kv.truncate(n)


class EagleDrafter:
    name = "EAGLE"
    accept_prior = 0.5  # per-draft acceptance before a request has any (speculative_rows.py)
    scores_drafts = True  # each node's score: the head's probability of its token (drafter.py)
    # Features older than the head's context needs are dropped (a request's buffer would otherwise
    # hold its whole sequence): kept from TRIM_MARGIN positions before the last true entry, the
    # buffer compacted once COMPACT_AT positions are droppable. A rollback (grammar backtracking)
    # past the kept window restarts the head's context there, as after a cache hit.
    TRIM_MARGIN, COMPACT_AT = 64, 256
    TREE_DEPTH = 4  # a tree's head steps when --speculative-num-steps is unset
    EMBED_CACHE = 8192  # embedding rows kept dequantized (fp32: 2.3 KB each on the default model, ~19 MB at most)
    # Most forced tokens teacher-forced through head steps before a draft (~0.3 ms each on the default model): a
    # longer forced text (a long const or key) rides without a draft, as before, rather than cost a step's worth
    FORCE_MAX = 16

    def __init__(self, head: EagleHead, target: Any, num_steps: Optional[int] = None,
                 quantize: Optional[str] = None, topk: int = 1) -> None:
        """`target`: the LlamaForCausalLM whose states the head reads (its embedding and lm_head rows);
        `num_steps`: at most this many head steps (a chain: drafted tokens; a tree: its depth, default
        TREE_DEPTH) per request and step; `quantize` ("q8_0"): the head's linears and draft lm_head rows in
        blocks for the CPU kernels (a draft step reads ~4x fewer bytes; measured in the README); `topk` > 1:
        draft a token tree (`_tree`)."""
        self.head = head
        self.num_steps = num_steps
        self.topk = topk
        self.target = target
        self.hidden_size = head.config.hidden_size
        self.d2t = head.draft_to_target  # [Vd] int64
        with torch.inference_mode():
            rows = head.lm_head.weight if head.lm_head is not None else embedding_rows(self.d2t, target.lm_head)
            self.lm_head = rows_as_linear(rows, quantize)  # the draft vocabulary's logits
            pack_for_act([self.lm_head])
            if quantize is not None:
                head.quantize_for_inference(quantize)
        self._seqs: dict[Req, _Seq] = {}
        self.catchup_seconds = 0.0  # the last propose's catch-up (Drafter.catchup_seconds)
        self.catchup_tokens = 0  # and the tokens it ran the head over, all requests' (Drafter.catchup_tokens)
        self.stop_below = 0.0  # a chain stops once every request's path probability is below this (Drafter)
        self._emb_rows: dict[int, torch.Tensor] = {}  # token id -> its fp32 embedding row (_embed)

    # -- the target's states, after each step (ModelRunner.hidden_observer) --------------------------
    def observe(self, rows: Sequence[BatchRow], results: Sequence[RowResult]) -> None:
        self._sweep()
        for row, res in zip(rows, results):
            h = res.hidden_states
            if h is None or h.shape[0] == 0:
                continue
            seq = self._seqs.get(row.req)
            if seq is None:
                seq = self._seqs[row.req] = _Seq(HeadKV.empty(self.head.config),
                                                 torch.zeros(max(64, 2 * h.shape[0]), self.hidden_size))
            start, m = row.start, h.shape[0]
            if not seq.feat_lo <= start <= seq.feat_hi:  # a gap (e.g. a cache hit): restart the context here
                seq.feat_lo = seq.feat_hi = start
                seq.base = -1
                seq.cut_entries(0)
            end = start + m
            if end - seq.feat_lo > seq.feats.shape[0]:
                grown = torch.zeros(max(end - seq.feat_lo, 2 * seq.feats.shape[0]), self.hidden_size)
                grown[: seq.feat_hi - seq.feat_lo] = seq.feats[: seq.feat_hi - seq.feat_lo]
                seq.feats = grown
            seq.feats[start - seq.feat_lo:end - seq.feat_lo] = self.head.reduce(h.float())  # EAGLE-3: fc here
            seq.feat_hi = end
            if seq.base >= 0:  # entries at positions > start read a feature just rewritten
                seq.cut_entries(start + 1 - seq.base)

    # -- drafting ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        self._sweep()
        if self.topk == 1:  # a chain's head steps are its tokens; a tree's (its depth) are capped in _tree
            k = min(k, self.num_steps or k)
        live: list[tuple[Req, _Seq, list[int], list[int]]] = []  # (req, seq, new tokens, their positions)
        forced: list[list[int]] = []  # per live request: pending tokens past its last feature (jump-forward text)
        for req in reqs:
            seq, n = self._seqs.get(req), len(req.fill_ids) - 1
            m = min(n, req.kv_len)  # the first pending token's entry: the last with a true feature (f_{m-1})
            if seq is None or seq.feat_hi < m or seq.feat_lo > m or k < 1 or n - m > self.FORCE_MAX:
                continue  # the state that predicted the first pending token is not there (or too much forced text)
            if seq.base < 0:
                seq.base = seq.feat_lo
            fill = req.fill_ids
            keep = 0
            limit = min(len(seq.tokens), m - seq.base)  # entry m is always recomputed: its g_m starts the draft
            while keep < limit and seq.tokens[keep] == fill[seq.base + keep]:
                keep += 1
            seq.cut_entries(keep)
            first = seq.base + keep
            if (first == seq.base < seq.feat_lo) or (first > seq.base and first - 1 < seq.feat_lo):
                seq.cut_entries(0)  # the features this context needs were trimmed: restart it
                seq.base = first = seq.feat_lo
            live.append((req, seq, fill[first:m + 1], list(range(first, m + 1))))
            forced.append(fill[m + 1:n + 1])
        drafts: dict[Req, list[int]] = {req: [] for req in reqs}
        scores: dict[Req, list[float]] = {req: [] for req in reqs}
        self.catchup_seconds, self.catchup_tokens = 0.0, 0
        if not live:
            return [Draft([]) for _ in reqs]
        # Step 1: catch up to the pending token; steps 2..k: one drafted entry each.
        clock = step_clock()
        t0 = clock()
        ids = [t for _, _, toks, _ in live for t in toks]
        pos = [p for _, _, _, ps in live for p in ps]
        feats = torch.cat([self._feats(seq, ps[0], ps[-1]) for _, seq, _, ps in live])
        counts = [len(toks) for _, _, toks, _ in live]
        for _, seq, toks, _ in live:
            seq.tokens += toks
        n_true = [len(seq.tokens) for _, seq, _, _ in live]
        g = head_extend(self.head, self._embed(ids), feats, torch.tensor(pos), [s.kv for _, s, _, _ in live], counts)
        last = torch.tensor(counts).cumsum(0) - 1
        g = g.index_select(0, last)  # [B, H]: g_m of each request
        positions = torch.tensor([ps[-1] for _, _, _, ps in live])
        if any(forced):
            g, positions = self._force(live, g, positions, forced)  # -> g_n
        self.catchup_seconds = clock() - t0
        self.catchup_tokens = sum(counts) + sum(len(f) for f in forced)
        if self.topk > 1:
            with grammar_walks([req for req, _, _, _ in live]) as walks:
                trees = {req: self._tree(seq, g[i:i + 1], int(positions[i]), k, walks[i])
                         for i, (req, seq, _, _) in enumerate(live)}
            for (_, seq, _, _), n in zip(live, n_true):
                seq.cut_entries(n)
                self._trim(seq)
            return [trees.get(req, Draft([])) for req in reqs]
        with grammar_walks([req for req, _, _, _ in live]) as walks:
            self._chain(live, g, positions, k, walks, drafts, scores)
        for (_, seq, _, _), n in zip(live, n_true):
            seq.cut_entries(n)  # drafted entries read the head's own features: never kept
            self._trim(seq)
        return [Draft(drafts[req], scores=scores[req]) for req in reqs]

    def _chain(self, live: list[tuple[Req, _Seq, list[int], list[int]]], g: torch.Tensor, positions: torch.Tensor,
               k: int, walks: list[Optional[GrammarWalk]], drafts: dict[Req, list[int]],
               scores: dict[Req, list[float]]) -> None:
        """Up to k greedy head steps for every live request (g [B, H]: g_n); a request with a grammar walk drafts the
        best token its matcher allows, and its draft ends where the matcher allows none of the draft vocabulary.
        Each token's score is the head's probability of it (over what the matcher allows); the chain stops early
        once every request's path probability is below `stop_below`."""
        stopped = [False] * len(live)
        path = [1.0] * len(live)
        for step in range(k):
            logits = linear(self.head.logits_input(g).contiguous(), self.lm_head)  # [B, Vd]
            for i, w in enumerate(walks):
                if w is not None and not stopped[i]:
                    masked = w.masked(logits[i], self.d2t)
                    if masked is None:
                        stopped[i] = True
                    else:
                        logits[i] = masked
            best = torch.softmax(logits, -1).max(-1)
            tok = self.d2t.index_select(0, best.indices)  # [B] target ids
            for i, ((req, _, _, _), t, p) in enumerate(zip(live, tok.tolist(), best.values.tolist())):
                if not stopped[i] and (walks[i] is None or walks[i].take(int(t))):
                    drafts[req].append(int(t))
                    scores[req].append(p)
                    path[i] *= p
                    stopped[i] = path[i] < self.stop_below
                else:
                    stopped[i] = True
            if step == k - 1 or all(stopped):
                break
            positions = positions + 1
            g = head_extend(self.head, self._embed(tok.tolist()), g, positions, [s.kv for _, s, _, _ in live],
                            [1] * len(live))

    def _force(self, live: list[tuple[Req, _Seq, list[int], list[int]]], g: torch.Tensor, positions: torch.Tensor,
               forced: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-force each live request's forced tokens through head steps (entry (t, g_prev) at the next
        position, batched over the requests that still have some); -> (g [B, H], positions [B]) at their last."""
        g, positions = g.clone(), positions.clone()
        for step in range(max(len(f) for f in forced)):
            rows = [i for i, f in enumerate(forced) if step < len(f)]
            index = torch.tensor(rows)
            positions[index] += 1
            out = head_extend(self.head, self._embed([forced[i][step] for i in rows]), g[index].contiguous(),
                              positions[index], [live[i][1].kv for i in rows], [1] * len(rows))
            g[index] = out
        return g, positions

    def _tree(self, seq: _Seq, g: torch.Tensor, n: int, budget: int, walk: Optional[GrammarWalk] = None) -> Draft:
        """A token tree of at most `budget` nodes after the pending token at position n (g [1, H]: g_n), EAGLE-2's
        way: each level expands the `topk` best frontier nodes by their `topk` likeliest children (one head step
        of topk rows, each attending to its own path: head_tree_step); every child is a candidate scored by its
        path's summed log-probability under the head; the tree is the `budget` best-scored candidates. A child
        never scores above its parent, so the chosen set holds every chosen node's ancestors. With a grammar
        `walk`, a node's children are the likeliest tokens the matcher allows after its path (the head's
        distribution renormalized over them); nodes without any are not candidates."""
        K, depth = self.topk, min(budget, self.num_steps or self.TREE_DEPTH)
        logp = self._node_logp(linear(self.head.logits_input(g).contiguous(), self.lm_head), walk, [[]])[0]
        top = logp.topk(min(K, logp.numel()))
        ids: list[int] = top.indices.tolist()  # draft-vocabulary ids of every candidate, in creation order
        parents: list[int] = [-1] * len(ids)
        scores: list[float] = top.values.tolist()
        frontier = list(range(len(ids)))
        feats = g.expand(len(frontier), -1)  # the state each frontier node's entry reads (its parent's output)
        anc_k = anc_v = None  # [F, t, Hkv, D]: the frontier nodes' ancestors' head entries
        for t in range(1, depth):
            emb = self._embed(self.d2t[torch.tensor([ids[f] for f in frontier])].tolist())
            pos = torch.full((len(frontier),), n + t, dtype=torch.int64)
            out, k, v = head_tree_step(self.head, emb, feats.contiguous(), pos, seq.kv, anc_k, anc_v)
            own_k = k[:, None] if anc_k is None else torch.cat([anc_k, k[:, None]], 1)
            own_v = v[:, None] if anc_v is None else torch.cat([anc_v, v[:, None]], 1)
            paths = [self._path(f, ids, parents) for f in frontier] if walk is not None else []
            child = self._node_logp(linear(self.head.logits_input(out).contiguous(), self.lm_head), walk,
                                    paths).topk(K, -1)  # [F, K]
            cand = torch.tensor([scores[f] for f in frontier])[:, None] + child.values  # [F, K] path scores
            first = len(ids)
            ids += child.indices.flatten().tolist()
            parents += [f for f in frontier for _ in range(K)]
            scores += cand.flatten().tolist()
            best = cand.flatten().topk(min(K, cand.numel())).indices  # the next frontier: K best of F x K
            rows = best // K
            frontier = [first + int(b) for b in best]
            feats, anc_k, anc_v = out[rows], own_k[rows], own_v[rows]
        finite = [j for j in range(len(ids)) if scores[j] > float("-inf")]  # -inf: the grammar allows no such node
        chosen = sorted(sorted(finite, key=lambda j: (-scores[j], j))[:budget])  # creation order
        index = {j: i for i, j in enumerate(chosen)}
        tokens = self.d2t[torch.tensor([ids[j] for j in chosen], dtype=torch.int64)].tolist()
        tree = [index[parents[j]] if parents[j] >= 0 else -1 for j in chosen]
        # a node's score: its token's probability under the head, given its parent (path log-probabilities' difference)
        own = [math.exp(scores[j] - (scores[parents[j]] if parents[j] >= 0 else 0.0)) for j in chosen]
        return Draft(tokens, tree if any(p != j - 1 for j, p in enumerate(tree)) else None, own)

    def _node_logp(self, logits: torch.Tensor, walk: Optional[GrammarWalk], paths: list[list[int]]) -> torch.Tensor:
        """[F, Vd] log-probabilities of the draft vocabulary at F nodes; with a grammar walk, node r's are
        renormalized over what the matcher allows after paths[r] (target ids), -inf elsewhere (all -inf: none)."""
        if walk is None:
            return torch.log_softmax(logits, -1)
        out = torch.full_like(logits, float("-inf"))
        for r, path in enumerate(paths):
            masked = walk.masked(logits[r], self.d2t) if walk.goto(path) else None
            if masked is not None:
                out[r] = torch.log_softmax(masked, -1)
        return out

    def _path(self, node: int, ids: list[int], parents: list[int]) -> list[int]:
        """The target ids from the first level down to `node` (ids: draft-vocabulary ids of the candidates)."""
        path: list[int] = []
        while node >= 0:
            path.append(ids[node])
            node = parents[node]
        return self.d2t[torch.tensor(path[::-1], dtype=torch.int64)].tolist()

    def _trim(self, seq: _Seq) -> None:
        keep_from = seq.base + len(seq.tokens) - 1 - self.TRIM_MARGIN
        drop = keep_from - seq.feat_lo
        if drop >= self.COMPACT_AT:
            kept = seq.feats[drop:seq.feat_hi - seq.feat_lo]
            seq.feats = torch.cat([kept, kept.new_zeros(max(64, kept.shape[0]), self.hidden_size)])
            seq.feat_lo = keep_from

    def _feats(self, seq: _Seq, first: int, last: int) -> torch.Tensor:
        """[last - first + 1, H]: f_{p-1} for the entries p = first..last; the context's first entry
        (p == base) has no predecessor and reads zeros (as in training, train_eagle.py)."""
        lo = seq.feat_lo
        if first > seq.base:
            return seq.feats[first - 1 - lo:last - lo]
        return torch.cat([seq.feats.new_zeros(1, self.hidden_size), seq.feats[first - lo:last - lo]])

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), H] fp32 rows of the target's embedding, each dequantized once (a head step's tokens are mostly
        the draft vocabulary's: dequantizing rows per call was ~0.13 ms of a ~0.8 ms step)."""
        rows = self._emb_rows
        missing = [t for t in dict.fromkeys(ids) if t not in rows]
        if missing:
            if len(rows) + len(missing) > self.EMBED_CACHE:
                rows.clear()
            for t, row in zip(missing, embedding_rows(torch.tensor(missing, dtype=torch.int64), self.target.embed).float()):
                rows[t] = row
        return torch.stack([rows[t] for t in ids])

    def _sweep(self) -> None:
        for req in [r for r in self._seqs if r.finished]:
            del self._seqs[req]

    @property
    def num_tracked(self) -> int:
        return len(self._seqs)


def make_eagle_drafter(path: Optional[str], runner: Any, num_steps: Optional[int] = None,
                       model_path: str = "default", topk: int = 1, eagle3: bool = False) -> EagleDrafter:
    """The head at `path` (None: the shipped head, for the default model only) over the runner's
    model; turns on the runner's hidden-state capture and subscribes to it. Either layout loads (the file
    decides); `eagle3` (--speculative-algorithm EAGLE3) insists on an EAGLE-3 head."""
    from sgl.runtime.speculative.eagle_io import DEFAULT_HEAD, load_head

    head_path = path or DEFAULT_HEAD
    if not path and (model_path != "default" or not DEFAULT_HEAD.exists()):
        raise ValueError(f"EAGLE on {model_path!r} needs --speculative-draft-model-path (an EAGLE head: "
                         "train one with `python -m sgl.runtime.speculative.train --algorithm eagle "
                         "--model-path ...`)")
    head = load_head(head_path, runner.config)
    if eagle3 and not head.config.eagle3:
        raise ValueError(f"{head_path} is an EAGLE-1/2 head (fc over [embedding; state], layers.0.*): "
                         "use --speculative-algorithm EAGLE for it")
    if head.config.eagle3:  # the runner hands over the target's outputs of these layers instead of its last state
        from sgl.runtime.models.llama import LlamaForCausalLM

        if not isinstance(runner.model, LlamaForCausalLM):
            raise ValueError(f"an EAGLE-3 head reads the target's intermediate states, which "
                             f"{type(runner.model).__name__} does not keep (Llama models in one process do; "
                             "not under --tp-size > 1)")
        runner.model.capture_layers = head.config.aux_layers
    drafter = EagleDrafter(head, runner.model, num_steps, draft_quantize(runner.model), topk)
    runner.capture_hidden = True
    runner.hidden_observer = drafter.observe
    return drafter
