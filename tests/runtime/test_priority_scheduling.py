"""Priority classes, weighted fair admission and swap preemption, driven by the fake runner (which checks
every KV read, the host tier's included): shares follow the weights, nothing starves, and a swapped
request resumes by a copy with the output an unpreempted run gives."""

from __future__ import annotations

import random

import pytest

from sgl.runtime.cache.host_pool import HostPool
from sgl.runtime.scheduler.request import ReqStatus

from .fake_runner import reference_output
from .test_scheduler import add, make_scheduler, run_to_end

CLASSES = ("realtime", "standard", "batch")


def make(pool: int, host: int = 0, **kw):  # noqa: ANN201 - the test_scheduler triple
    s, runner, done = make_scheduler(pool, **kw)
    if host:  # the fake runner is also the KV mover: give the scheduler a host tier around it
        s.swap = HostPool(runner, host if s.args.preemption_mode == "swap" else 0)
    return s, runner, done


def test_admitted_prefill_tokens_follow_the_weights_and_batch_finishes() -> None:
    # every step admits 64 prefill tokens (2 prompts of 32); all three classes queue 120 requests at once
    s, _, done = make(100_000, max_prefill_tokens=64, chunked_prefill_size=64, max_running_requests=256)
    rng = random.Random(0)
    for i in range(120):
        for c in CLASSES:
            add(s, f"{c}{i}", [rng.randrange(1, 97) for _ in range(32)], 1, priority_class=c)
    window = None
    while s.has_work:
        s.step()
        s.check_integrity()
        if window is None and any(n == 0 for n in s.stats.per_class_queues.values()):
            window = dict(s.fair.admitted_tokens)  # the first class ran dry: the window with all three ends
    assert window is not None
    total = sum(window.values())
    shares = {c: window[c] / total for c in CLASSES}
    for c, want in zip(CLASSES, (10 / 16, 5 / 16, 1 / 16)):
        assert abs(shares[c] - want) < 0.02, shares
    assert len(done) == 360  # batch included: every request finishes
    for rid, req in done.items():
        assert req.output_ids == reference_output(req.prompt_ids, 1), rid


def test_idle_class_saves_no_credit() -> None:
    """A class that had nothing waiting starts at the others' virtual time, not at 0."""
    s, _, _ = make(100_000, max_prefill_tokens=32, chunked_prefill_size=32)
    for i in range(40):
        add(s, f"b{i}", [1 + i % 90] * 32, 1, priority_class="batch")
    for _ in range(20):
        s.step()
    for i in range(40):
        add(s, f"r{i}", [2 + i % 90] * 32, 1, priority_class="realtime")
    before = dict(s.fair.admitted_tokens)
    for _ in range(11):
        s.step()
    got = {c: s.fair.admitted_tokens[c] - before[c] for c in CLASSES}
    assert got["batch"] >= 32, got  # batch keeps its 1/11 share after realtime arrives
    run_to_end(s)


def test_batch_is_not_starved_by_a_stream_of_realtime_requests() -> None:
    s, _, done = make(4000, host=2000, max_running_requests=6, chunked_prefill_size=16)
    rng = random.Random(1)
    batch = [[rng.randrange(1, 97) for _ in range(40)] for _ in range(12)]
    for i, p in enumerate(batch):
        add(s, f"b{i}", p, 24, priority_class="batch")
    step = 0
    while any(f"b{i}" not in done for i in range(len(batch))):
        assert step < 3000, "batch requests starved"
        add(s, f"r{step}", [rng.randrange(1, 97) for _ in range(12)], 6, priority_class="realtime")
        s.step()
        s.check_integrity()
        step += 1
    assert s.waiting or s.running, "the realtime stream was still running when batch finished"
    assert s.stats.num_preemptions_swap > 0
    run_to_end(s)
    for i, p in enumerate(batch):
        assert done[f"b{i}"].output_ids == reference_output(p, 24)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_realtime_arrival_preempts_the_newest_batch_request(mode: str) -> None:
    # a full batch by requests: two batch decoders hold the only two running places
    s, runner, done = make(1000, host=500, max_running_requests=2, preemption_mode=mode, disable_radix_cache=True)
    old = add(s, "old", list(range(1, 41)), 30, priority_class="batch")
    new = add(s, "new", list(range(41, 81)), 30, priority_class="batch")
    for _ in range(5):
        s.step()
    assert old.status == new.status == ReqStatus.RUNNING
    rt = add(s, "rt", [5, 6, 7], 3, priority_class="realtime")
    s.step()
    assert rt.status == ReqStatus.RUNNING and old.status == ReqStatus.RUNNING
    assert new.status == ReqStatus.WAITING and new.num_preemptions == 1
    assert bool(new.host_slots) == (mode == "swap") and new.slots == []
    s.check_integrity()
    run_to_end(s)
    for req in (old, new, rt):
        assert done[req.rid].output_ids == reference_output(req.prompt_ids, req.params.max_new_tokens)
    # swap resumes by a copy: every prompt token is computed once; recompute redoes "new"'s prompt and outputs
    prompts = 40 + 40 + 3
    if mode == "swap":
        assert s.stats.prefill_tokens_computed == prompts
        assert [d for d, _ in runner.swaps] == ["out", "in"] and runner.swaps[0][1] == 44  # 40 + 4 decoded
        assert s.stats.swap_out_bytes == s.stats.swap_in_bytes == 44
        assert s.stats.num_preemptions_swap == 1 and s.stats.num_preemptions_recompute == 0
    else:
        assert s.stats.prefill_tokens_computed > prompts and runner.swaps == []
        assert s.stats.num_preemptions_recompute == 1


def test_realtime_preempts_for_kv_and_never_preempts_realtime() -> None:
    s, _, done = make(130, host=200, max_running_requests=8, disable_radix_cache=True)
    b = add(s, "b", list(range(1, 91)), 20, priority_class="batch")
    r1 = add(s, "r1", list(range(61, 71)), 10, priority_class="realtime")
    for _ in range(4):
        s.step()
    r2 = add(s, "r2", list(range(1, 31)), 5, priority_class="realtime")  # 30 slots; 130 - 94 - 14 are free
    s.step()
    assert b.host_slots and r1.status == ReqStatus.RUNNING and r2.status == ReqStatus.RUNNING
    run_to_end(s)
    for req in (b, r1, r2):
        assert done[req.rid].output_ids == reference_output(req.prompt_ids, req.params.max_new_tokens)
    assert r1.num_preemptions == r2.num_preemptions == 0


def test_abort_of_a_swapped_request_frees_its_host_slots() -> None:
    s, _, done = make(1000, host=100, max_running_requests=1)
    b = add(s, "b", list(range(1, 21)), 50, priority_class="batch")
    s.step()
    s.step()
    add(s, "r", [1, 2], 3, priority_class="realtime")
    s.step()
    assert b.host_slots and s.swap.used == len(b.host_slots)
    s.abort("b")
    assert done["b"].finish_reason["type"] == "abort" and s.swap.used == 0
    run_to_end(s)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("config", [
    dict(host=60),  # a host tier too small for some victims: they fall back to recompute
    dict(host=2000, chunked_prefill_size=7, schedule_policy="lpm"),
    dict(host=2000, disable_radix_cache=True, max_running_requests=3),
    dict(host=2000, preemption_mode="recompute", schedule_policy="priority"),
])
def test_outputs_match_reference_with_classes_and_swaps(seed: int, config: dict) -> None:
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 97) for _ in range(rng.randrange(5, 40))] for _ in range(3)]
    work = [(rng.choice(systems) + [rng.randrange(1, 97) for _ in range(rng.randrange(1, 30))],
             rng.randrange(1, 20), rng.choice(CLASSES)) for _ in range(30)]
    pool = max(len(p) + m for p, m, _ in work) + rng.randrange(0, 60)
    s, _, done = make(pool, **config)
    aborted = set()
    for i, (prompt, max_new, cls) in enumerate(work):
        add(s, f"r{i}", prompt, max_new, priority_class=cls, priority=rng.randrange(3))
        if rng.random() < 0.4:
            s.step()
            s.check_integrity()
        if rng.random() < 0.05:
            victim = rng.choice(s.waiting + s.running) if s.has_work else None
            if victim is not None and s.abort(victim.rid):
                aborted.add(victim.rid)
    run_to_end(s)
    assert s.swap.used == 0
    for i, (prompt, max_new, _) in enumerate(work):
        if f"r{i}" not in aborted:
            assert done[f"r{i}"].output_ids == reference_output(prompt, max_new), f"r{i} differs"


def test_metrics_per_class_and_preemption_counters() -> None:
    from sgl.runtime.metrics import ServerMetrics

    m = ServerMetrics()
    s, _, _ = make(1000, host=100, max_running_requests=1)
    add(s, "b", list(range(1, 21)), 50, priority_class="batch")
    s.step()
    add(s, "r", [1, 2], 3, priority_class="realtime")
    add(s, "r2", [3, 4], 3, priority_class="realtime")
    s.step()
    m.update_from_stats("m", vars(s.stats))
    m.update_from_stats("m", vars(s.stats))  # a second scrape adds only what grew since the first
    m.observe_first_token("m", 0.3, "realtime")
    text = m.render().decode()
    assert 'sgl:num_preemptions_total{mode="swap",model_name="m"} 1.0' in text
    assert 'sgl:swap_bytes_total{direction="out",model_name="m"} 20.0' in text  # the prompt's KV
    assert 'sgl:num_queue_reqs_by_class{model_name="m",priority_class="batch"} 1.0' in text
    assert 'sgl:num_queue_reqs_by_class{model_name="m",priority_class="realtime"} 1.0' in text
    assert 'sgl:host_kv_used_tokens{model_name="m"} 20.0' in text
    assert 'sgl:time_to_first_token_by_class_seconds_count{model_name="m",priority_class="realtime"} 1.0' in text
    run_to_end(s)


def test_latency_preemption_can_be_disabled() -> None:
    s, _, done = make(1000, host=100, max_running_requests=1, disable_latency_preemption=True)
    b = add(s, "b", list(range(1, 21)), 10, priority_class="batch")
    s.step()
    r = add(s, "r", [1, 2], 3, priority_class="realtime")
    s.step()
    assert b.status == ReqStatus.RUNNING and r.status == ReqStatus.WAITING
    run_to_end(s)
    assert s.stats.num_preemptions == 0 and done["r"].output_ids == reference_output([1, 2], 3)


@pytest.mark.parametrize("kw, field", [
    (dict(priority_weights="urgent=3"), "priority_weights"),
    (dict(priority_weights="batch=0"), "priority_weights"),
    (dict(priority_weights="realtime"), "priority_weights"),
    (dict(preemption_mode="drop"), "preemption_mode"),
    (dict(swap_space=-1.0), "swap_space"),
    (dict(swap_dir="/no/such/dir"), "swap_dir"),
    (dict(host_cache_tokens=0), "host_cache_tokens"),
])
def test_bad_flags_name_themselves(kw: dict, field: str) -> None:
    from sgl.runtime.config import ServerArgs

    with pytest.raises(ValueError, match=field):
        ServerArgs(**kw)


def test_partial_weights_keep_the_others_at_one() -> None:
    from sgl.runtime.config import ServerArgs

    assert ServerArgs(priority_weights="realtime=4").priority_weight_map == {"realtime": 4.0, "standard": 1.0, "batch": 1.0}


def test_a_step_that_admits_realtime_carries_no_lower_class_prefill() -> None:
    s, runner, done = make(5000, chunked_prefill_size=32)
    b = add(s, "b", list(range(1, 97)) * 2, 4, priority_class="batch")  # 192 tokens: 6 chunks
    d = add(s, "d", [7, 8, 9], 30, priority_class="standard")
    s.step()
    s.step()
    add(s, "r", [5, 6, 7, 8], 3, priority_class="realtime")
    s.step()
    step = runner.batches[-1]
    assert ("r", 0, 4) in step
    assert not [x for x in step if x[0] == "b"]  # the batch chunk waits one step
    assert [x for x in step if x[0] == "d" and x[2] == 1]  # decodes go on
    s.step()
    assert [x for x in runner.batches[-1] if x[0] == "b" and x[2] > 1]  # and it resumes
    run_to_end(s)
    assert done["b"].output_ids == reference_output(b.prompt_ids, 4)
    assert done["d"].output_ids == reference_output(d.prompt_ids, 30)
