"""Grammar masks computed on the worker thread while the forward pass runs (ModelRunner's overlap)
against the synchronous path, on the default model: the same masks, step by step, hence the same
tokens; outputs still satisfy their constraints; jump-forward and aborts still work."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import torch

pytestmark = pytest.mark.timeout(600)

_WORKLOAD = json.loads((Path(__file__).resolve().parents[2] / "examples/data/person_extraction.json").read_text())
PERSON, PROMPT = _WORKLOAD["schema"], _WORKLOAD["prompt"]
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    from sgl.runtime.engine import Engine
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=16384, grammar_backend="llguidance")
    yield eng
    eng.shutdown()


class MaskRecorder:
    """Wraps the runner's `_bitmask` (the function both paths call) and keeps a copy of every mask
    with the thread that computed it. Instrumentation only: the real function does the work."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.inner = runner._bitmask
        self.masks: dict[str, list[torch.Tensor]] = {}  # rid -> its constrained rows' masks, step by step
        self.threads: set[str] = set()

    def __call__(self, rows: list, bases: list[int], num_positions: int) -> Any:
        out = self.inner(rows, bases, num_positions)  # VerifyMasks: a mask per sample position
        if out is not None:
            self.threads.add(threading.current_thread().name)
            for j, r in enumerate(rows):
                if r.req.grammar is not None:  # no drafts here: one position per row, at bases[j]
                    self.masks.setdefault(r.req.rid, []).append(out.bitmask[bases[j]].clone())
        return out

    def __enter__(self) -> "MaskRecorder":
        self.runner._bitmask = self
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.runner._bitmask  # back to the class's method


def _mixed_batch() -> tuple[list[str], list[dict]]:
    prompts = [PROMPT, PROMPT, "My phone number is ", "Tell me a story.", PROMPT]
    params = [
        {"json_schema": json.dumps(PERSON), "max_new_tokens": 96, "temperature": 0},
        {"json_schema": json.dumps(PERSON), "max_new_tokens": 96, "temperature": 1.0, "sampling_seed": 7},
        {"regex": PHONE, "max_new_tokens": 30, "temperature": 0.8, "sampling_seed": 1},
        {"max_new_tokens": 24, "temperature": 0.9, "sampling_seed": 3},  # unconstrained row in the batch
        {"json_schema": json.dumps(PERSON), "max_new_tokens": 96, "temperature": 0.7, "sampling_seed": 11},
    ]
    return prompts, params


def _run(engine: Any, overlap: bool) -> tuple[list[dict], MaskRecorder]:
    runner = engine.scheduler.runner
    runner.overlap_grammar = overlap
    try:
        engine.flush_cache()
        with MaskRecorder(runner) as rec:
            prompts, params = _mixed_batch()
            outs = engine.generate(prompts, params, rid=[f"{overlap}-{i}" for i in range(len(prompts))])
    finally:
        runner.overlap_grammar = True
    return outs, rec


def test_overlapped_masks_equal_synchronous(engine):
    sync_outs, sync_rec = _run(engine, overlap=False)
    over_outs, over_rec = _run(engine, overlap=True)
    assert sync_rec.threads == {"sgl-scheduler"}
    assert all(n.startswith("sgl-grammar-mask") for n in over_rec.threads), over_rec.threads
    # NOTE: per request, not per step: grammars compile asynchronously, so which step a request
    # joins (the batch composition) may differ between the two runs.
    assert [o["output_ids"] for o in sync_outs] == [o["output_ids"] for o in over_outs]
    constrained = [0, 1, 2, 4]
    assert sum(len(sync_rec.masks[f"False-{i}"]) for i in constrained) > 20
    for i in constrained:
        a, b = sync_rec.masks[f"False-{i}"], over_rec.masks[f"True-{i}"]
        assert len(a) == len(b), f"request {i}: {len(a)} vs {len(b)} masks"
        for step, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"request {i}: mask {step} differs"
    for o in (over_outs[0], over_outs[1], over_outs[4]):
        if o["meta_info"]["finish_reason"]["type"] == "stop":
            jsonschema.validate(json.loads(o["text"]), PERSON)
    assert re.fullmatch(PHONE, over_outs[2]["text"]), over_outs[2]["text"]
    assert engine.get_stats()["jump_forward_tokens"] > 0  # forced JSON keys still skip sampling


def test_abort_during_overlapped_constrained_decode(engine):
    stream = engine.generate(PROMPT, {"json_schema": json.dumps(PERSON), "max_new_tokens": 96,
                                      "temperature": 1.0, "sampling_seed": 5}, stream=True)
    other = {}
    t = threading.Thread(target=lambda: other.update(engine.generate(
        "My phone number is ", {"regex": PHONE, "max_new_tokens": 30, "temperature": 0})))
    t.start()
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()  # aborts the request while the other constrained row keeps decoding
    t.join(timeout=120)
    assert re.fullmatch(PHONE, other["text"]), other
    engine.wait_idle(timeout=60)
    engine.check_integrity()
