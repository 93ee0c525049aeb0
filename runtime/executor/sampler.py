"""The sampler: the logits of the rows that need a next token -> tokens and their logprobs.

One call per step, in this order (a stage runs only if some row of the batch needs it):

    raw log-softmax (what we report) -> repetition penalty -> frequency/presence penalties ->
    logit_bias -> EOS/stop masks (min_new_tokens, ignore_eos) -> grammar bitmask ->
    greedy argmax | temperature -> top-k -> top-p (renormalized after top-k) -> min-p -> draw

Every sampled row draws ONE uniform number from its own `torch.Generator` and inverts the CDF of its
filtered distribution, so a seeded request gets the same tokens whatever else is in the batch and
wherever it sits. Top-k/top-p/min-p work on the ``K`` most likely tokens (`torch.topk`, far cheaper
than sorting 49k logits): ``K`` is the row's top_k if it has one, else 64, then 1024, then the whole
vocabulary, until the tokens left out provably fall outside its nucleus / min-p cut. ``K`` depends
only on the row itself. Rows with none of these filters invert the CDF over the whole vocabulary.
Greedy rows (temperature < 1e-6 or top_k == 1, as SGLang) take the argmax and draw nothing.

    >>> import torch
    >>> from sgl.runtime.protocol import SamplingParams
    >>> rows = [RowSamplingState.create(SamplingParams(temperature=0), [1, 2], frozenset({0}))]
    >>> res = sample(torch.tensor([[0.0, 3.0, 1.0]]), rows, None, [2])
    >>> res.token_ids, [round(x, 3) for x in res.logprobs], [[t for t, _ in top] for top in res.top_logprobs]
    ([1], [-0.17], [[1, 2]])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, Union

import torch

from sgl.kernels.bitmask import unpack_token_bitmask
from sgl.runtime.executor.logit_processors import process_logits
from sgl.runtime.executor.sampling_state import RowSamplingState

TopLogprobs = list[list[tuple[int, float]]]  # per row: [(token_id, logprob)], most likely first
_K_LADDER = (64, 1024)  # candidates tried for top-p/min-p rows without top-k, before the whole vocabulary
_LOGPROB_CHUNK = 512  # rows per chunk in logprobs_for_tokens (bounds the [rows, V] temporaries)


@dataclass
class SampleResult:
    token_ids: list[int]  # [B]; a failed row gets its smallest EOS id so shapes stay valid
    logprobs: list[Optional[float]]  # [B] raw log-softmax (before penalties/temperature/masks) at the token;
    # None for a row that did not ask (want_logprobs)
    top_logprobs: Optional[TopLogprobs]  # None if no row asked; else [B] lists, row i cut to its own k
    failed_rows: list[int] = field(default_factory=list)  # rows with no samplable token: abort them
    failure_messages: dict[int, str] = field(default_factory=dict)  # row -> why


class TokenLogprobs(NamedTuple):
    logprobs: list[float]  # [N]
    top_logprobs: Optional[TopLogprobs]  # None if top_k == 0


def sample(logits: torch.Tensor, rows: Sequence[RowSamplingState], token_bitmask: Optional[torch.Tensor] = None,
           top_logprobs_nums: Optional[Sequence[int]] = None,
           want_logprobs: Optional[Sequence[bool]] = None) -> SampleResult:
    """Choose one next token per row.

    logits: [B, V] float32 (not modified); rows: B states; token_bitmask: [B, ceil(V/32)] int32 or
    None (see `sgl.kernels.bitmask`); top_logprobs_nums: [B] how many top logprobs each row wants;
    want_logprobs: [B] which rows report their token's logprob (None: every row).
    """
    B, V = logits.shape
    if len(rows) != B:
        raise ValueError(f"{len(rows)} sampling states for {B} logits rows")
    nums = list(top_logprobs_nums) if top_logprobs_nums is not None else [0] * B
    if len(nums) != B:
        raise ValueError(f"{len(nums)} top_logprobs_nums for {B} logits rows")
    if want_logprobs is not None and len(want_logprobs) != B:
        raise ValueError(f"{len(want_logprobs)} want_logprobs for {B} logits rows")
    if B == 0:
        return SampleResult([], [], None)
    if logits.dtype != torch.float32:
        logits = logits.float()
    work = process_logits(logits, rows, token_bitmask)  # [B, V]
    row_max = work.amax(dim=-1)  # [B]
    bad = ~torch.isfinite(row_max)  # all masked (-inf), or nan/+inf logits
    failed = bad.nonzero().flatten().tolist() if bool(bad.any()) else []
    failed_set = set(failed)

    tokens = torch.empty(B, dtype=torch.long)  # [B]
    greedy = [i for i, r in enumerate(rows) if r.is_greedy and i not in failed_set]
    drawn = [i for i, r in enumerate(rows) if not r.is_greedy and i not in failed_set]
    if greedy:
        # NOTE: max().indices is ~3x faster than argmax() on CPU; both pick the first maximum.
        _put(tokens, greedy, _take(work, greedy, B).max(dim=-1).indices, B)
    if drawn:
        x = _take(work, drawn, B)  # [n, V]
        owned = x is not logits  # a private copy may be scaled in place
        _put(tokens, drawn, sample_rows(x, [rows[i] for i in drawn], inplace=owned), B)
    for i in failed:
        tokens[i] = rows[i].fallback_token_id

    # Reported logprobs are what the model says (raw logits), not the processed distribution.
    # NOTE: logsumexp instead of a full log_softmax: no [B, V] buffer unless top logprobs are asked; and only
    # for the rows that report logprobs (at 32 rows x 49k vocabulary the logsumexp was ~3% of a decode step).
    token_logprobs: list[Optional[float]] = [None] * B
    want = [i for i in range(B) if want_logprobs is None or want_logprobs[i] or nums[i] > 0]
    if want:
        sub = _take(logits, want, B)  # [W, V]
        chosen = sub.gather(1, _take(tokens, want, B).unsqueeze(1)).squeeze(1)  # [W]
        for i, lp in zip(want, (chosen - torch.logsumexp(sub, dim=-1)).tolist()):
            token_logprobs[i] = lp
    top = _top_logprobs(torch.log_softmax(logits, dim=-1), nums) if max(nums, default=0) > 0 else None
    messages = {i: _failure_message(logits[i], work[i], token_bitmask, i) for i in failed}
    return SampleResult(tokens.tolist(), token_logprobs, top, failed, messages)


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSamplingState], inplace: bool = False) -> torch.Tensor:
    """Temperature -> top-k -> top-p -> min-p -> one draw per row from its own generator.

    logits: [n, V] processed logits (each row has a finite maximum; may be scaled in place if
    `inplace`) -> token ids [n] long.
    """
    n, V = logits.shape
    # One uniform per row per step, from the row's own generator, whatever path the row takes.
    u = torch.tensor([torch.rand((), generator=r.generator, dtype=torch.float64).item() for r in rows],
                     dtype=torch.float64)  # [n]
    temps = torch.tensor([float(r.params.temperature) for r in rows])  # [n]
    out = torch.empty(n, dtype=torch.long)

    # Rows with top-k: topk on the logits (order is invariant under temperature), softmax over K.
    by_k: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        if 0 < r.params.top_k < V:
            by_k.setdefault(r.params.top_k, []).append(j)
    for K, js in sorted(by_k.items()):
        vals, idx = _take(logits, js, n).topk(K, dim=-1)  # [m, K] descending
        probs = torch.softmax(vals / _take(temps, js, n).unsqueeze(1), dim=-1)  # [m, K] renormalized
        sub = [rows[j] for j in js]
        _put(out, js, _draw_sorted(probs, idx, sub, _take(u, js, n)), n)

    # Other rows need the full softmax: plain rows draw from it, filtered rows climb the K ladder.
    full = [j for j, r in enumerate(rows) if not 0 < r.params.top_k < V]
    if not full:
        return out
    x = _take(logits, full, n)  # [f, V]
    t = _take(temps, full, n).unsqueeze(1)  # [f, 1]
    if bool((t != 1.0).any()):
        x = x.div_(t) if (inplace or x is not logits) else x / t
    probs = torch.softmax(x, dim=-1)  # [f, V]
    f = len(full)
    plain = [a for a, j in enumerate(full) if not _needs_filter(rows[j])]
    if plain:
        _put(out, [full[a] for a in plain],
             _inverse_cdf_blocked(_take(probs, plain, f), _take(u, [full[a] for a in plain], n)), n)
    ladder = {min(_K_LADDER[0], V): [a for a, j in enumerate(full) if _needs_filter(rows[j])]}
    while ladder:
        K = min(ladder)
        ags = ladder.pop(K)
        if not ags:
            continue
        js = [full[a] for a in ags]
        sub = [rows[j] for j in js]
        vals, idx = _take(probs, ags, f).topk(K, dim=-1)  # [m, K] descending
        # The K cover every survivor if the nucleus closed inside them (prefix mass > top_p) or the
        # K-th probability is already below the min-p threshold (or K is the whole vocabulary).
        top_p, min_p = _filter_params(sub)
        ok = (vals.sum(dim=-1) > top_p) | (vals[:, -1] < vals[:, 0] * min_p) | torch.tensor(K >= V)
        ok_list = ok.tolist()
        done = [a for a, good in enumerate(ok_list) if good]
        if done:
            tok = _draw_sorted(vals[ok], idx[ok], [sub[a] for a in done], _take(u, js, n)[ok], mass=1.0)
            _put(out, [js[a] for a in done], tok, n)
        retry = [ags[a] for a, good in enumerate(ok_list) if not good]
        if retry:
            ladder.setdefault(min(next((k for k in _K_LADDER if k > K), V), V), []).extend(retry)
    return out


def _needs_filter(r: RowSamplingState) -> bool:
    return r.params.top_p < 1.0 or r.params.min_p > 0.0


def _filter_params(rows: Sequence[RowSamplingState]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> top_p [m] (inf when unused), min_p [m]."""
    top_p = torch.tensor([r.params.top_p if r.params.top_p < 1.0 else float("inf") for r in rows])
    min_p = torch.tensor([float(r.params.min_p) for r in rows])
    return top_p, min_p


def _draw_sorted(probs: torch.Tensor, idx: torch.Tensor, rows: Sequence[RowSamplingState], u: torch.Tensor,
                 mass: Optional[float] = None) -> torch.Tensor:
    """top-p then min-p among candidates sorted by probability, then one draw per row.

    probs: [m, K] descending; idx: [m, K] their token ids; u: [m] float64 in [0, 1); mass: the total
    top_p is relative to (1.0 for a full-vocabulary softmax; None = the candidates' own sum, i.e.
    top-p on the distribution renormalized after top-k, as HF and flashinfer's "top_k_first").
    """
    top_p, min_p = _filter_params(rows)  # [m], [m]
    cs = probs.cumsum(dim=-1)  # [m, K]
    total = cs[:, -1] if mass is None else torch.full_like(top_p, mass)  # [m]
    # Nucleus: the smallest prefix whose mass reaches top_p = tokens whose EXCLUSIVE prefix mass
    # is <= top_p.
    keep = (cs - probs) <= (top_p * total).unsqueeze(1)  # [m, K]
    keep &= probs >= (probs[:, :1] * min_p.unsqueeze(1))  # min-p: relative to the most likely token
    pos = _inverse_cdf(probs * keep, u)  # [m]
    return idx.gather(1, pos.unsqueeze(1)).squeeze(1)


def _inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p: [m, K] unnormalized non-negative weights (each row has mass); u: [m] in [0, 1).
    Returns [m] positions: the first j with cumsum(p)[j] > u * sum(p)."""
    m, K = p.shape
    cdf = p.cumsum(dim=-1)  # [m, K] float32, non-decreasing
    v = (u * cdf[:, -1].double()).float().unsqueeze(1)  # [m, 1]
    pos = torch.searchsorted(cdf, v, right=True).squeeze(1).clamp_max_(K - 1)  # [m]
    # NOTE: rounding can push v up to the total mass; step back to the last token with mass.
    zero = p.gather(1, pos.unsqueeze(1)).squeeze(1) <= 0
    if bool(zero.any()):
        for j in zero.nonzero().flatten().tolist():
            pos[j] = (p[j] > 0).nonzero().max()
    return pos


def _inverse_cdf_blocked(p: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """`_inverse_cdf` over a whole vocabulary without a [m, V] cumsum: pick a block of `block`
    tokens by the cumulative block masses, then the token inside it. p: [m, V]; u: [m] -> [m]."""
    m, V = p.shape
    if V % block or V <= block:
        return _inverse_cdf(p, u)
    blocks = p.view(m, V // block, block)  # [m, nb, block]
    bcdf = blocks.sum(dim=-1).cumsum(dim=-1)  # [m, nb]
    v = (u * bcdf[:, -1].double()).float().unsqueeze(1)  # [m, 1]
    b = torch.searchsorted(bcdf, v, right=True).clamp_max_(V // block - 1)  # [m, 1]
    before = torch.where(b > 0, bcdf.gather(1, (b - 1).clamp_min(0)), torch.zeros(()))  # [m, 1]
    inner = blocks.gather(1, b.unsqueeze(2).expand(m, 1, block)).squeeze(1)  # [m, block]
    icdf = inner.cumsum(dim=-1)  # [m, block]
    j = torch.searchsorted(icdf, v - before, right=True).clamp_max_(block - 1)  # [m, 1]
    pos = (b * block + j).squeeze(1)  # [m]
    # NOTE: block sums and in-block cumsums round differently; land on a token with mass.
    zero = p.gather(1, pos.unsqueeze(1)).squeeze(1) <= 0
    if bool(zero.any()):
        for r in zero.nonzero().flatten().tolist():
            nz = (p[r] > 0).nonzero().flatten()
            pos[r] = nz[torch.searchsorted(nz, pos[r]).clamp_max(len(nz) - 1)]
    return pos


def logprobs_for_tokens(logits: torch.Tensor, token_ids: Union[torch.Tensor, Sequence[int]],
                        top_k: int = 0) -> TokenLogprobs:
    """Raw log-softmax at given tokens (prompt logprobs) and, if top_k > 0, the top_k per row.

    logits: [N, V]; token_ids: [N].

    >>> lp = logprobs_for_tokens(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), [0, 1], top_k=1)
    >>> [round(x, 4) for x in lp.logprobs], [[t for t, _ in row] for row in lp.top_logprobs]
    ([-0.6931, -0.3133], [[0], [1]])
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)  # [N]
    N = logits.shape[0]
    if ids.shape[0] != N:
        raise ValueError(f"{ids.shape[0]} token ids for {N} logits rows")
    lps: list[float] = []
    tops: Optional[TopLogprobs] = [] if top_k > 0 else None
    for s in range(0, N, _LOGPROB_CHUNK):
        chunk = torch.log_softmax(logits[s:s + _LOGPROB_CHUNK].float(), dim=-1)  # [n, V]
        lps += chunk.gather(1, ids[s:s + _LOGPROB_CHUNK].unsqueeze(1)).squeeze(1).tolist()
        if tops is not None:
            tops += _top_logprobs(chunk, [top_k] * chunk.shape[0])
    return TokenLogprobs(lps, tops)


def _top_logprobs(logprobs: torch.Tensor, nums: Sequence[int]) -> TopLogprobs:
    """logprobs: [B, V] raw log-softmax; nums: [B] -> per row [(token, logprob)] descending, cut to nums[i]."""
    B, V = logprobs.shape
    want = [i for i, k in enumerate(nums) if k > 0]
    out: TopLogprobs = [[] for _ in range(B)]
    if not want:
        return out
    k = min(max(nums), V)
    vals, ids = _take(logprobs, want, B).topk(k, dim=-1)  # [R, k] descending
    vals, ids = vals.tolist(), ids.tolist()
    for r, i in enumerate(want):
        n = min(nums[i], k)
        out[i] = list(zip(ids[r][:n], vals[r][:n]))
    return out


def _failure_message(raw: torch.Tensor, work: torch.Tensor, bitmask: Optional[torch.Tensor], i: int) -> str:
    """Why row i has no samplable token (raw, work: [V]). Only runs for failed rows."""
    if not bool(torch.isfinite(raw).all()):
        return "the model produced non-finite logits (nan/inf)"
    if bool(torch.isnan(work).any()) or bool((work == float("inf")).any()):
        return "penalties or logit_bias produced non-finite logits (nan/inf)"
    if bitmask is not None:
        allowed = int(unpack_token_bitmask(bitmask[i:i + 1], raw.shape[0]).sum())
        if allowed == 0:
            return "the grammar allows no next token"
        return (f"no token can be sampled: the grammar allows {allowed} token(s), all of them masked by "
                f"min_new_tokens / ignore_eos (EOS, stop_token_ids) or logit_bias")
    return "no token can be sampled: every token is masked (min_new_tokens / ignore_eos / logit_bias)"


def _take(t: torch.Tensor, idx: list[int], n: int) -> torch.Tensor:
    """t[idx] along dim 0, without a copy when idx is all n rows in order."""
    return t if len(idx) == n and idx == list(range(n)) else t[torch.tensor(idx, dtype=torch.long)]


def _put(out: torch.Tensor, idx: list[int], values: torch.Tensor, n: int) -> None:
    """out[idx] = values along dim 0."""
    if len(idx) == n and idx == list(range(n)):
        out.copy_(values)
    else:
        out[torch.tensor(idx, dtype=torch.long)] = values
