"""Scored drafts (runtime/speculative/drafter.py Draft.scores): a drafter's estimate per node that the target takes
it. The adaptive rule cuts a scored draft where its expected tokens per cost peak (speculative_rows.scored_cut) and
tells the drafter where to stop (stop_below); EAGLE scores its chains and trees with the head's probabilities.
Outputs stay the reference's (the fake runner checks every one)."""

from __future__ import annotations

import pytest
import torch

from sgl.runtime.config import ServerArgs
from sgl.runtime.executor.model_runner import ModelRunner
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.request import Req
from sgl.runtime.scheduler.scheduler import Scheduler
from sgl.runtime.scheduler.speculative_rows import scored_cut, stop_below
from sgl.runtime.speculative.drafter import Draft
from sgl.runtime.speculative.eagle import EagleDrafter
from sgl.runtime.speculative.verify_cost import VerifyCost

from .test_adaptive_draft import AskedDrafter, run
from .test_eagle import random_head
from .test_speculative_verify import Tok, tiny_model

SLOPED = VerifyCost(((0, 1.0), (1, 1.1), (8, 1.8)), 0.01, "measured")  # each drafted token 0.1 of a step


def test_a_scored_draft_keeps_the_nodes_that_pay() -> None:
    chain = Draft([5, 6, 7, 8], scores=[0.95, 0.9, 0.1, 0.9])  # path probabilities 0.95, 0.855, 0.0855, 0.077
    assert chain.path_probs() == pytest.approx([0.95, 0.855, 0.0855, 0.07695])
    assert scored_cut(chain, SLOPED) == Draft([5, 6], scores=[0.95, 0.9])  # rates 1.77, 2.34, 2.22, 2.12
    assert len(scored_cut(chain, SLOPED, sunk=5.0)) == 4  # beside what drafting it cost, every row is cheap
    assert len(scored_cut(Draft([5, 6], scores=[0.05, 0.9]), SLOPED)) == 0  # 1.05 tokens for 1.1 steps: none
    # a tree: the likeliest nodes, each with its ancestors (path probabilities 0.6, 0.3, 0.54, 0.03)
    tree = Draft([5, 6, 7, 8], [-1, -1, 0, 0], [0.6, 0.3, 0.9, 0.05])
    assert scored_cut(tree, SLOPED) == Draft([5, 6, 7], [-1, -1, 0], [0.6, 0.3, 0.9])
    assert scored_cut(Draft([5, 7, 9], [-1, 0, 1], [0.9, 0.9, 0.9]), SLOPED).parents is None  # a path stays a chain


def test_cutting_a_scored_draft_keeps_its_scores() -> None:
    assert Draft([5, 6, 7], scores=[0.5, 0.4, 0.3]).cut(2) == Draft([5, 6], scores=[0.5, 0.4])
    assert Draft([5, 6, 7], scores=[0.5, 0.4, 0.3]).cut(8) == Draft([5, 6, 7], scores=[0.5, 0.4, 0.3])
    tree = Draft([5, 6, 7, 8], [-1, 0, -1, 2], [0.5, 0.4, 0.3, 0.2])
    assert tree.cut(1) == Draft([5, 7], [-1, -1], [0.5, 0.3])
    assert tree.cut(2, max_nodes=3) == Draft([5, 6, 7], [-1, 0, -1], [0.5, 0.4, 0.3])
    with pytest.raises(AssertionError):
        Draft([5, 6], scores=[0.5])
    # the path probability under which a token cannot pay: the cheapest row increment plus its drafting time
    assert stop_below(SLOPED, 4, 0.05) == pytest.approx(0.15)


class ScoredOracle(AskedDrafter):
    """The oracle's draft, scored sure for its first two tokens and hopeless after (a head unsure past them)."""

    scores_drafts = True

    def __init__(self) -> None:
        super().__init__(right=True, prior=0.9)
        self.stop_below = 0.0
        self.floors: list[float] = []

    def propose(self, reqs, k):  # noqa: ANN001, ANN201 - the Drafter protocol
        self.floors.append(self.stop_below)
        return [Draft(d.token_ids, scores=[0.99, 0.99, 0.01, 0.01][: len(d)]) for d in super().propose(reqs, k)]


def test_the_rule_cuts_scored_drafts_where_they_stop_paying() -> None:
    drafter = ScoredOracle()
    s, req = run(drafter, SLOPED)  # the request's estimate (0.9) asks for all 4 tokens; the scores keep 2
    lane = next(lane for lane in s.spec.lanes if lane.drafter is drafter)  # (PREDICTION's lane comes first)
    assert lane.stats.verify_ct > 10 and lane.stats.draft_tokens <= 2 * lane.stats.verify_ct
    assert lane.stats.accepted_tokens == lane.stats.draft_tokens  # the 2 kept are the right ones
    assert drafter.floors and all(f == pytest.approx(stop_below(SLOPED, 4, s.spec.per_draft(lane)), abs=0.05)
                                  for f in drafter.floors[1:])
    unscored = AskedDrafter(right=True, prior=0.9)
    s2, _ = run(unscored, SLOPED)
    asked = next(lane for lane in s2.spec.lanes if lane.drafter is unscored)
    assert asked.stats.draft_tokens > 3 * asked.stats.verify_ct  # unscored: 4 per row


def test_drafts_carry_the_heads_probabilities() -> None:
    """Each chain token's score is the head's probability of it, a tree node's its probability given its parent;
    a chain stops once its path probability is under `stop_below` (speculative_rows.scored_cut reads them)."""
    model = tiny_model(3)
    head = random_head(model.config, seed=2)
    req = Req(rid="x", prompt_ids=[2, 3, 4, 5, 0, 3, 1, 2], params=SamplingParams(temperature=0, max_new_tokens=3),
              arrival=0)
    drafters = [EagleDrafter(head, model), EagleDrafter(head, model, topk=3, num_steps=3)]
    for drafter in drafters:  # the target's states of the 8 tokens: one prefill through a runner
        runner = ModelRunner(model, model.config, 64, frozenset({99}))
        runner.capture_hidden, runner.hidden_observer = True, drafter.observe
        sch = Scheduler(ServerArgs(), runner, OutputProcessor(Tok(frozenset({99}))), 64, lambda r: None)
        sch.add_request(req)
        sch.step()
        req = Req(rid="x", prompt_ids=req.prompt_ids, params=req.params, arrival=0)
    chain, trees = drafters
    r1, r2 = next(iter(chain._seqs)), next(iter(trees._seqs))
    line = chain.propose([r1], 4)[0]
    assert len(line) == 4 and line.scores is not None and len(line.scores) == 4
    assert all(0.0 < p <= 1.0 for p in line.scores)
    with torch.inference_mode():  # the first token's score: the head's softmax at the pending token
        first = chain.propose([r1], 1)[0]
    assert first.token_ids == line.token_ids[:1] and first.scores == pytest.approx(line.scores[:1])
    chain.stop_below = 1.5  # every path is under it from the first token on: that token, then no more head steps
    assert chain.propose([r1], 4)[0] == first
    chain.stop_below = 0.0
    tree = trees.propose([r2], 7)[0]
    probs = tree.path_probs()
    assert tree.scores is not None and all(0.0 < p <= 1.0 for p in tree.scores)
    assert all(probs[j] <= probs[p] + 1e-9 for j, p in enumerate(tree.parents) if p >= 0)
    level1 = [probs[j] for j, p in enumerate(tree.parents) if p < 0]
    assert line.scores[0] == pytest.approx(max(level1), rel=1e-4)  # the chain's first token is the tree's likeliest
