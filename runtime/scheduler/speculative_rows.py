"""The scheduler's side of speculative decoding: which decoding requests get a draft this step, and
the acceptance counters. No tensors.

A constrained request's chain draft is made to hold the text its grammar forces wherever the draft leads
into some (grammar_walk.with_forced_text): verification takes forced text as jump-forward would, all of it
or none (runtime/executor/verify.py), so a draft that ends inside it, or tokenizes it another way, would
stop its row there; completed, the row takes it and samples once after it, one step where jump-forward needs two.

A verify row holds [pending token(s)] + draft, one new KV slot per token (several pending tokens
after jump-forward: the forced text, then the drafts). After the step the scheduler keeps the slots
of the pending tokens and of the accepted drafts, and frees the rest at once: with `m` tokens
appended, the last pending token and d_1..d_{m-1} (which equal the appended t_0..t_{m-2}) keep
their slots; the last appended token becomes the new pending one. A tree draft is the same with
d_1..d_{m-1} the first m - 1 nodes of the accepted path (RowResult.draft_path): the pool is
token-slot based, so the request's slot table just takes those nodes' slots in path order (their K/V
were computed at the positions the path gives them) and the other nodes' slots go back to the pool.

The adaptive rule: a verify row of 1 + j tokens costs cost(j) decode steps (runtime/speculative/
verify_cost.py: timed on the engine's own model when it starts, then corrected by the batch-1 steps it runs,
`observe_step`), plus the drafter's own time per drafted token, the median of its recent `propose` calls, plus
what a drafting step costs the drafter whatever its length (`per_step`: EAGLE's catch-up, its head run over the
tokens produced since it last drafted, ~0.1 decode step on the default model; more for a request it has not
drafted for in a while: each token since costs it ~0.15 ms, a chat prompt's first call 3-8 ms). Each request keeps
an estimate a of its per-draft acceptance (`SpecLane.accept_prob`, an exponential average; it starts at the
drafter's `accept_prior`: NGRAM drafts only after a match, so its prior is higher than a head's) and asks for
the draft length j <= k that maximizes the expected tokens per step over the cost,
(1 - a^(j+1)) / (1 - a) / (cost(j) + j per_draft + per_step) (Leviathan et al.'s speedup): long drafts while it
copies (a near 1), short ones on chat, none when even the best draft does not pay.
A drafter that scores its drafts (Draft.scores; EAGLE: the head's probability of each token, which matches the
acceptance it sees) has each draft cut again, within that length, where its own expected tokens per cost peak
(`scored_cut`): a chain ends where the head turns unsure instead of at the request's average. Measured on
workloads (b) and (c) (benchmarks/speculative_history.md, "Drafts cut by their own scores"): about as many
accepted tokens from 23-34% fewer drafted ones. Asking such a drafter for longer drafts and letting the scores
choose did not pay: its extra head steps cost what the longer accepted chains saved.
A request that does not draft still learns its rate: the drafter proposes a *shadow* draft that is
not verified (no row, no KV), and the tokens the request then produces score it exactly as a verify
row would have (the longest draft prefix, or tree path, they follow). So a copy phase is found without
paying for a verify row. Shadows cost the drafter's time only (its catch-up included), kept under SHADOW_BUDGET
(1%) of a decode step on average: NGRAM drafts in microseconds and shadows k tokens every idle step; EAGLE's head (its
draft steps with their catch-up cost ~10% of a decode step per token here) shadows SHADOW_LEN tokens
every ~40th idle step. (At a 3% budget EAGLE ran 0.93x of no speculation on chat without drafting once.)
Measured on the default model (NGRAM, 1 thread): a fixed-length ladder (+2 after a full accept, as
Hugging Face's assisted generation) lost ~30% of the accepted tokens of copy phases, because
acceptance is bimodal (copying or not) and each copy phase restarted short; the EMA reaches a = 0.9
after two full accepts. `--speculative-always-draft` skips the rule (every row drafts k: tests).

Lanes. The rule can run several drafters in order (`--speculative-ngram-first`: NGRAM, then the model
drafter; `--speculative-ngram-corpus` adds CORPUS after NGRAM's); each is a lane with its own estimate per
request (`Req.spec_lanes`), its own time per drafted token and its own shadows, because their acceptance
differs by kind (an n-gram match that copies is right more often than a head's guess or a corpus phrase).
Shadows are per lane too (each under SHADOW_BUDGET). A request a lane drafts for is not offered to the next
lane in that step; one the lane keeps from drafting, or finds no draft for (NGRAM without a match), is. A
verify row teaches the lane that drafted it (`Req.spec_drafted_by`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sgl.runtime.config import ServerArgs
from sgl.runtime.metrics import record_spec_accept_length
from sgl.runtime.speculative.drafter import Draft, Drafter
from sgl.runtime.speculative.grammar_walk import with_forced_text
from sgl.runtime.speculative.prediction import prediction_drafter
from sgl.runtime.speculative.verify_cost import ObservedCost, VerifyCost, step_clock
from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.scheduler.request import BatchRow, Req, RowResult, SpecLane
from sgl.runtime.scheduler.stats import StepStats


@dataclass
class SpecStats:
    verify_ct: int = 0  # verify rows run (rows with a non-empty draft)
    draft_tokens: int = 0  # drafts proposed in those rows
    accepted_tokens: int = 0  # drafts the target accepted

    @property
    def accept_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def accept_length(self) -> float:
        """Mean tokens produced per verify row (accepted drafts + the target's own token)."""
        return (self.accepted_tokens + self.verify_ct) / self.verify_ct if self.verify_ct else 0.0

    def add(self, draft_len: int, accepted: int) -> None:
        self.verify_ct += 1
        self.draft_tokens += draft_len
        self.accepted_tokens += accepted

    def summary(self) -> dict[str, float]:
        return {"verify_ct": self.verify_ct, "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_tokens, "accept_rate": self.accept_rate}


PRIOR, EMA, DRIFT = 0.6, 0.5, 0.1  # default acceptance prior, weight of the newest row, pull back when idle
SHADOW_BUDGET, SHADOW_LEN = 0.01, 4  # shadow drafts' average cost per idle step (decode steps); their length if costly
# the drafter's time per drafted token: the median of its last DRAFT_TIME_WINDOW propose calls. Not an average: one
# slow call (a GIL wait or a page-fault burst under wall time, 2+ threads) made NGRAM's microsecond drafts look like
# milliseconds, the rule stopped asking for them, and with no calls the estimate never came back (workload (b), 2
# threads: NGRAM's lane verified 8 rows instead of ~850)
DRAFT_TIME_WINDOW = 15
# A lane timed on fewer calls than this shadows every idle step whatever its time says. The time is what decides how
# often it is timed again, so a first call that was slow for another reason kept a lane off for good: a full garbage
# collection (~120 ms after an `import transformers` beside the engine) landed in NGRAM's first call, its time per
# token read 1.3 decode steps, the next shadow was due after ~530 idle steps, and no row drafted again.
TIMED_CALLS = 3
# A batch-1 request verified this many steps in a row runs its next one without a draft: the decode step the verify
# rows are priced against (ObservedCost) is then timed now, on this context and in this minute. With drafts that are
# always right (a prediction) no decode step ran at all, and the rows were priced against the start-up one (~0.5% of
# a copy phase's tokens: one row in 17 yields 1 token instead of up to 1 + k).
DECODE_PROBE_EVERY = 16


def best_draft_len(a: float, k: int, cost: "VerifyCost | None" = None, per_draft: float = 0.0,
                   per_step: float = 0.0) -> int:
    """The j in 0..k maximizing expected tokens per step / (cost(j) + j * per_draft + per_step) for per-draft
    acceptance a."""
    cost = cost or VerifyCost.assumed()
    best, best_rate = 0, 1.0
    for j in range(1, k + 1):
        expected = j + 1.0 if a >= 1.0 else (1.0 - a ** (j + 1)) / (1.0 - a)
        rate = expected / (cost(j) + j * per_draft + per_step)
        if rate > best_rate:
            best, best_rate = j, rate
    return best


def scored_cut(draft: Draft, cost: "VerifyCost", sunk: float = 0.0) -> Draft:
    """The nodes of a scored draft (Draft.scores) that maximize expected tokens per step over the step's cost,
    (1 + sum of their path probabilities) / (cost(n) + sunk), `sunk` being what drafting it cost (decode steps):
    the n likeliest nodes, each node's ancestors first (a path probability never exceeds its parent's). Empty when
    no node pays for its place in the verify row."""
    probs = draft.path_probs()
    order = sorted(range(len(draft)), key=lambda j: (-probs[j], j))
    best, best_rate, expected = 0, 1.0 / (1.0 + sunk), 1.0
    for n, j in enumerate(order, 1):
        expected += probs[j]
        rate = expected / (cost(n) + sunk)
        if rate > best_rate:
            best, best_rate = n, rate
    return draft.subset(sorted(order[:best]))


def stop_below(cost: "VerifyCost", k: int, per_draft: float) -> float:
    """The path probability under which another drafted token cannot pay: it adds that many tokens to the step's
    expected ones (>= 1 per step) for at least the cheapest increment of cost(j) plus its own drafting time."""
    return max(0.0, min(cost(j + 1) - cost(j) for j in range(max(1, k))) + per_draft)


def _learn(st: SpecLane, prior: float, accepted: int, depth: int) -> None:
    """The estimate after one row (or scored shadow): the MLE of a per-level acceptance probability from it,
    `accepted` successes then one rejection unless the path reached the deepest level, averaged in."""
    observed = accepted / (accepted + (accepted < depth))
    before = prior if st.accept_prob is None else st.accept_prob
    st.accept_prob = (1 - EMA) * before + EMA * observed


def followed(draft: Draft, produced: Sequence[int]) -> tuple[int, bool]:
    """(drafts the produced tokens follow, final?): the longest chain prefix / tree path matching `produced`;
    final once a token left the draft or a leaf was reached (more tokens cannot change the count)."""
    parents = draft.parents if draft.parents is not None else list(range(-1, len(draft) - 1))
    node, n = -1, 0
    for tok in produced:
        kids = [c for c, p in enumerate(parents) if p == node]
        node = next((c for c in kids if draft.token_ids[c] == tok), -2)
        if node == -2:
            return n, True
        n += 1
    return n, not any(p == node for p in parents)


class _Lane:
    """One drafter and what the rule measured of it: its prior, its time per drafted token."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.name: str = drafter.name
        self.prior = float(getattr(drafter, "accept_prior", PRIOR))
        self.times: deque[float] = deque(maxlen=DRAFT_TIME_WINDOW)  # seconds per drafted token of recent calls
        self.catchups: deque[float] = deque(maxlen=DRAFT_TIME_WINDOW)  # seconds per request of recent steps' catch-up
        self.catchup_token: deque[float] = deque(maxlen=DRAFT_TIME_WINDOW)  # seconds per token of recent long ones
        self.stats = SpecStats()  # its verify rows

    @property
    def draft_seconds(self) -> float:
        """The drafter's time per drafted token: the median of its recent propose calls (0 before any)."""
        return statistics.median(self.times) if self.times else 0.0

    @property
    def catchup_seconds(self) -> float:
        """What a drafting step costs the drafter per request whatever it drafts (Drafter.catchup_seconds): the
        median of recent calls that caught up on at most a step's tokens."""
        return statistics.median(self.catchups) if self.catchups else 0.0


class SpeculativeRows:
    def __init__(self, args: ServerArgs, drafter: Drafter, cost: Optional[VerifyCost] = None,
                 lanes: Optional[Sequence[Drafter]] = None) -> None:
        """`drafter`: the algorithm's; `lanes`: every drafter in the order they are asked, `drafter` among them
        (module docstring; default: `drafter` alone)."""
        lanes = [drafter] if lanes is None else list(lanes)
        assert drafter in lanes and len({d.name for d in lanes}) == len(lanes), "one lane per drafter"
        self.lanes = [_Lane(d) for d in lanes]
        self.drafter = drafter
        self.k = args.speculative_num_draft_tokens
        self.max_batch = args.speculative_max_batch
        self.always = args.speculative_always_draft
        self.cost = cost or VerifyCost.assumed()  # the engine sets the measured one before serving
        self.observed: Optional[ObservedCost] = None  # the engine's: corrects `cost` by the steps it runs
        self.verified_in_a_row = 0  # batch-1 verify steps since the last batch-1 decode step (DECODE_PROBE_EVERY)
        self.stats = SpecStats()

    def report(self, s: StepStats) -> None:
        """The speculative counters of /server_info: totals, and per drafter (lane)."""
        sp = self.stats
        s.spec_verify_ct, s.spec_draft_tokens, s.spec_accepted_tokens = sp.verify_ct, sp.draft_tokens, sp.accepted_tokens
        s.spec_accept_rate, s.spec_accept_length = sp.accept_rate, sp.accept_length
        s.spec_per_drafter = {lane.name: lane.stats.summary() for lane in self.lanes}

    def steps(self, seconds: float) -> float:
        """`seconds` (step_clock) in decode steps (0 until a decode step is measured)."""
        return seconds / self.cost.decode_seconds if self.cost.decode_seconds > 0 else 0.0

    def per_draft(self, lane: _Lane) -> float:
        """The lane's time per drafted token in decode steps (0 until both are measured)."""
        return self.steps(lane.draft_seconds)

    def per_step(self, lane: _Lane, req: Req) -> float:
        """The lane's catch-up for `req` if it drafted now, in decode steps (0 until measured): a step's, plus the
        tokens past a step's it has not run over (its whole prompt before the first call)."""
        behind = len(req.fill_ids) - req.spec_lanes[lane.name].called_at - (self.k + 1)
        per_token = statistics.median(lane.catchup_token) if lane.catchup_token and behind > 0 else 0.0
        return self.steps(lane.catchup_seconds + per_token * max(0, behind))

    def observe_step(self, rows: Sequence[BatchRow], seconds: float) -> None:
        """The step of `rows` ran in `seconds` (step_clock): a batch-1 decode or verify step corrects the verify cost
        (verify_cost.ObservedCost), when the engine set `observed`."""
        if self.observed is None or len(rows) != 1 or not rows[0].sample:
            return
        row = rows[0]
        if row.extend_len == 1 + row.draft_len:  # not a prefill chunk, nor forced text before the drafts
            self.observed.add(row.draft_len, seconds)
            self.cost = self.observed.curve
            self.verified_in_a_row = self.verified_in_a_row + 1 if row.draft_len else 0

    def flush(self) -> None:
        """Drop what the drafters cache across requests (NGRAM's finished sequences), if anything."""
        for lane in self.lanes:
            flush = getattr(lane.drafter, "flush", None)  # optional: only cross-request drafters have one
            if flush is not None:
                flush()

    def drafts(self, decoding: Sequence[Req]) -> dict[Req, Draft]:
        """Non-empty drafts for some of `decoding` (requests with one pending token), or {}.

        No drafts when the batch is compute-bound (more rows than `--speculative-max-batch`): a
        verify row of 1 + k tokens then costs about 1 + k decode rows. The lanes are asked in order; a
        request one of them drafts for is not offered to the next."""
        if not decoding or len(decoding) > self.max_batch:
            return {}
        if self.observed is not None and not self.always and len(decoding) == 1 \
                and self.verified_in_a_row >= DECODE_PROBE_EVERY:
            return {}  # a decode step to price the rows against (DECODE_PROBE_EVERY)
        out: dict[Req, Draft] = {}
        left = list(decoding)
        for lane in self.lanes:
            serves = getattr(lane.drafter, "serves", None)  # optional: PREDICTION serves requests with a prediction
            got = self._lane_drafts(lane, left if serves is None else [r for r in left if serves(r)])
            out.update(got)
            left = [r for r in left if r not in got]
            if not left:
                break
        return out

    def _lane_drafts(self, lane: _Lane, decoding: Sequence[Req]) -> dict[Req, Draft]:
        """One lane's drafts for `decoding`. A draft never asks for more tokens than the request may still
        produce (t_0 plus the accepted path <= room): a tree is cut by depth. Requests the rule keeps from
        drafting may get a shadow draft (module docstring)."""
        want: dict[Req, int] = {}
        shadow: list[Req] = []
        if not decoding:
            return {}
        per_draft = self.per_draft(lane)
        step_catchup = self.steps(lane.catchup_seconds)
        scored = getattr(lane.drafter, "scores_drafts", False) and not self.always
        shadow_len = self.k if per_draft * self.k + step_catchup <= SHADOW_BUDGET else min(self.k, SHADOW_LEN)
        # until TIMED_CALLS calls are timed, shadow every idle step: the median of one or two calls is what they took
        timed = len(lane.times) >= TIMED_CALLS
        shadow_every = max(1, math.ceil((per_draft * shadow_len + step_catchup) / SHADOW_BUDGET)) if timed else 1
        per_step: dict[Req, float] = {}
        for req in decoding:
            st = req.spec_lanes.setdefault(lane.name, SpecLane())
            if st.accept_prob is None:
                st.accept_prob = lane.prior
            self._settle_shadow(req, lane)
            per_step[req] = self.per_step(lane, req)
            want[req] = self.k if self.always else best_draft_len(st.accept_prob, self.k, self.cost, per_draft,
                                                                   per_step[req])
            if want[req] == 0:
                st.accept_prob += DRIFT * (lane.prior - st.accept_prob)
                st.idle_steps += 1
                if st.shadow is None and st.idle_steps % shadow_every == 0:
                    shadow.append(req)
            else:
                st.idle_steps = 0
        asking = [r for r in decoding if want[r] > 0]
        out: dict[Req, Draft] = {}
        if not asking and not shadow:
            return out
        k = max([want[r] for r in asking] + ([shadow_len] if shadow else []))
        if scored:
            lane.drafter.stop_below = stop_below(self.cost, k, per_draft)
        clock = step_clock()  # the clock verify_cost.py times decode steps with
        t0 = clock()
        proposed = lane.drafter.propose(asking + shadow, k)
        catchup = getattr(lane.drafter, "catchup_seconds", None)  # (Drafter's docstring)
        spent = clock() - t0 - (catchup or 0.0)
        # a drafting step's catch-up: one over at most a step's tokens per request; a longer one (a request's first
        # call catches up on its whole prompt, one after idle steps on all of them) is timed per token
        tokens = getattr(lane.drafter, "catchup_tokens", 0)
        if catchup and tokens <= (self.k + 1) * len(proposed):
            lane.catchups.append(catchup / len(proposed))
        elif catchup:
            lane.catchup_token.append(catchup / tokens)
        for req in asking + shadow:
            req.spec_lanes[lane.name].called_at = len(req.fill_ids)
        # per drafted token: a scored chain may stop before k (stop_below)
        lane.times.append(max(0.0, spent) / (max([len(d) for d in proposed] + [1]) if scored else k))
        for req, draft in zip(asking + shadow, proposed):
            room = req.params.max_new_tokens - len(req.output_ids) - 1
            cut = draft.cut(max(0, room), want[req] or shadow_len)
            if scored and want[req] and cut.scores is not None:
                cut = scored_cut(cut, self.cost, per_draft * len(draft) + per_step[req])
            if want[req] and req.grammar is not None and cut.parents is None and len(cut):
                # NOTE: verified drafts only: a shadow is scored against the produced tokens, forced ones included
                cut = Draft(with_forced_text(req.grammar, cut.token_ids, max(0, room)))
            if not len(cut):
                continue
            if want[req]:
                out[req] = cut
                req.spec_drafted_by = lane.name
            else:
                req.spec_lanes[lane.name].shadow = (len(req.output_ids), cut)
        return out

    def _settle_shadow(self, req: Req, lane: _Lane) -> None:
        """Score the request's shadow draft of this lane once the tokens produced since decide it (module docstring)."""
        st = req.spec_lanes[lane.name]
        if st.shadow is None:
            return
        start, draft = st.shadow
        if len(req.output_ids) < start:  # rolled back (a grammar guard): nothing to score
            st.shadow = None
            return
        accepted, final = followed(draft, req.output_ids[start:])
        if final:
            st.shadow = None
            _learn(st, lane.prior, accepted, max(draft.depths()))

    def record(self, req: Req, draft_len: int, accepted: int, depth: Optional[int] = None) -> None:
        """One verify row ran: `accepted` of its `draft_len` drafts matched the target's tokens
        (`depth`: a tree's deepest level; a chain's is its length)."""
        record_spec_accept_length(1 + accepted)  # tokens this verify step produced
        lane = next((lane for lane in self.lanes if lane.name == req.spec_drafted_by), self.lanes[-1])
        st = req.spec_lanes.setdefault(lane.name, SpecLane())
        _learn(st, lane.prior, accepted, draft_len if depth is None else depth)
        st.drafted += draft_len
        st.accepted += accepted
        req.spec_verify_ct += 1
        req.spec_accepted_tokens += accepted
        self.stats.add(draft_len, accepted)
        lane.stats.add(draft_len, accepted)

    def trim_verify_row(self, allocator: SlotAllocator, row: BatchRow, res: RowResult, appended: int) -> None:
        """After a verify row's step (its new slots already in `req.slots`): keep the KV of the pending
        token(s) and the accepted drafts (a tree: its accepted path, in order), free the rejected
        drafts' slots now (module docstring)."""
        req = row.req
        assert req.slots[row.start:] == row.new_slots
        kept, freed = verify_row_slots(row, res, appended)
        allocator.free(freed)
        req.slots[row.start:] = kept
        depth = None if row.draft_parents is None else max(Draft(row.draft, row.draft_parents).depths())
        self.record(req, row.draft_len, len(res.next_token_ids), depth)


def verify_row_slots(row: BatchRow, res: RowResult, appended: int) -> tuple[list[int], list[int]]:
    """(kept, freed) of the row's new slots when `appended` of its produced tokens were kept (the
    pending tokens' slots stay even when nothing was appended: their K/V is valid)."""
    pending = row.extend_len - row.draft_len
    nodes = row.new_slots[pending:]
    keep = max(appended, 1) - 1  # accepted drafts whose tokens were appended (t_0..t_{m-2})
    # a chain's accepted drafts are its first nodes; a tree's are its accepted path
    path = list(range(keep)) if row.draft_parents is None else res.draft_path[:keep]
    kept = row.new_slots[:pending] + [nodes[c] for c in path]
    on_path = set(path)
    return kept, [s for c, s in enumerate(nodes) if c not in on_path]


def prediction_rows(args: ServerArgs, tokenizer: Any, vocab_size: Optional[int]) -> SpeculativeRows:
    """The rule over a PREDICTION lane alone: what a scheduler without --speculative-algorithm builds when the first
    request that carries a prediction arrives. Its verify cost is the assumed curve (the start-up measurement needs an
    empty pool), corrected by the steps it runs (1 thread, no tensor parallelism: as the engine's own)."""
    rows = SpeculativeRows(args, prediction_drafter(tokenizer, vocab_size))
    if args.tp_size == 1 and not args.speculative_always_draft:  # the engine's condition for its own rule
        rows.observed = ObservedCost(rows.cost)
    return rows


def make_speculative_rows(args: ServerArgs, drafter: Optional[Drafter], tokenizer: Any = None,
                          vocab_size: Optional[int] = None) -> Optional[SpeculativeRows]:
    """The rule over `drafter`'s lane and the lanes the flags add: the caller's prediction first (PREDICTION, with
    `tokenizer`; it serves only requests that carry one), the request's own text next (an NGRAM lane before a model
    drafter, `--speculative-ngram-first`), then the corpus (`--speculative-ngram-corpus`: CORPUS, its file read with
    `tokenizer`), then the model. `vocab_size`: the model's (default: the tokenizer's)."""
    if drafter is None:
        return None
    from sgl.runtime.speculative import make_corpus_drafter, make_ngram_drafter

    is_ngram = drafter.name == "NGRAM"
    lanes: list[Drafter] = []
    if tokenizer is not None:
        lanes.append(prediction_drafter(tokenizer, vocab_size))
    lanes += [drafter] if is_ngram else ([make_ngram_drafter(args)] if args.speculative_ngram_first else [])
    if args.speculative_ngram_corpus is not None:
        lanes.append(make_corpus_drafter(args, tokenizer))
    if not is_ngram:
        lanes.append(drafter)
    return SpeculativeRows(args, drafter, lanes=lanes)
