"""A model runner without a model, for scheduler tests: it checks the KV bookkeeping for real.

It remembers what (position, token) each KV slot was written with and asserts that every slot a
request reads holds its own token at its own position, so a cache or preemption bug that hands a
request the wrong KV fails loudly. The next token is a hash of the whole sequence so far, so a
correct scheduler gives the same outputs whatever the batching, caching or preemption.
"""

from __future__ import annotations

from sgl.runtime.scheduler.request import RowResult, ScheduledBatch

VOCAB = 97
EOS = 0


def next_token(seq: list[int]) -> int:
    h = 0
    for t in seq:
        h = (h * 31 + t + 7) % 1_000_003
    return 1 + h % (VOCAB - 1)  # never EOS: tests control length with max_new_tokens


def reference_output(prompt: list[int], max_new_tokens: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        t = next_token(seq)
        seq.append(t)
        out.append(t)
    return out


class FakeTokenizer:
    eos_token_ids = frozenset({EOS})

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in ids if not (skip_special_tokens and t == EOS))


class FakeHostTier:
    """A KV mover (runtime/cache/host_pool.py) for the fake runner: host slots record (position, token) like
    device slots, so a copy of the wrong rows fails the next read. One per host pool (swap, host cache)."""

    bytes_per_slot = 1

    def __init__(self, runner: "FakeRunner") -> None:
        self.runner = runner
        self.host: dict[int, tuple[int, int]] = {}

    def swap_out(self, device_slots: list[int], host_slots: list[int]) -> None:
        for d, h in zip(device_slots, host_slots, strict=True):
            self.host[h] = self.runner.kv[d]
        self.runner.swaps.append(("out", len(device_slots)))

    def swap_in(self, host_slots: list[int], device_slots: list[int]) -> None:
        for h, d in zip(host_slots, device_slots, strict=True):
            self.runner.kv[d] = self.host.pop(h)  # a host slot is read once: its next writer is another swap-out
        self.runner.swaps.append(("in", len(device_slots)))


class FakeRunner:
    """Also the scheduler's swap mover (through its own FakeHostTier)."""

    bytes_per_slot = 1

    def __init__(self) -> None:
        self.kv: dict[int, tuple[int, int]] = {}
        self.batches: list[list[tuple[str, int, int]]] = []  # per step: (rid, start, extend_len)
        self.verify_rows: list[tuple[str, int, int]] = []  # (rid, pending tokens, draft_len) of rows with drafts
        self.swaps: list[tuple[str, int]] = []  # ("out" | "in", number of slots), every host tier
        self._swap = FakeHostTier(self)

    def swap_out(self, device_slots: list[int], host_slots: list[int]) -> None:
        self._swap.swap_out(device_slots, host_slots)

    def swap_in(self, host_slots: list[int], device_slots: list[int]) -> None:
        self._swap.swap_in(host_slots, device_slots)

    def run(self, batch: ScheduledBatch) -> list[RowResult]:
        results = []
        self.batches.append([(r.req.rid, r.start, r.extend_len) for r in batch.rows])
        for row in batch.rows:
            req, fill = row.req, row.req.fill_ids
            n = row.extend_len - row.draft_len  # tokens of fill_ids; a verify row adds its drafts
            if row.draft_len:
                self.verify_rows.append((req.rid, n, row.draft_len))
            assert row.start == req.kv_len and row.input_ids[:n] == fill[row.start:row.start + n]
            assert len(row.new_slots) == row.extend_len
            for pos, slot in enumerate(req.slots):
                assert self.kv.get(slot) == (pos, fill[pos]), f"{req.rid}: slot {slot} at {pos} holds {self.kv.get(slot)}"
            for k, slot in enumerate(row.new_slots):
                self.kv[slot] = (row.start + k, row.input_ids[k])
            end = row.start + n
            res = RowResult(token_id=next_token(fill[:end]) if row.sample else None, logprob=-0.5)
            if row.sample:  # verify: the target's chain while it matches the drafts, then one more
                seq = fill[:end]
                for d in row.draft:
                    if next_token(seq) != d:
                        break
                    seq = seq + [d]
                    res.next_token_ids.append(next_token(seq))
                    res.next_logprobs.append(-0.5)
                    res.next_top_logprobs.append(None)
            res.prompt_logprobs = [-float(tid) for _, tid in row.logprob_targets]
            results.append(res)
        return results


class NoisyOracleDrafter:
    """Proposes the true continuation with random corruptions (the fake runner's targets), so
    verify rows accept some drafts and reject others."""

    name = "noisy-oracle"

    def __init__(self, seed: int, p_wrong: float = 0.3) -> None:
        import random

        self.rng = random.Random(seed)
        self.p_wrong = p_wrong
        self.proposed: list[int] = []  # draft lengths, for tests that want to see drafts happen

    def propose(self, reqs, k):  # noqa: ANN001, ANN201 - the Drafter protocol
        from sgl.runtime.speculative.drafter import Draft

        out = []
        for req in reqs:
            seq, draft = list(req.fill_ids), []
            for _ in range(self.rng.randrange(0, k + 1)):
                t = next_token(seq) if self.rng.random() > self.p_wrong else self.rng.randrange(1, VOCAB)
                draft.append(t)
                seq.append(t)
            self.proposed.append(len(draft))
            out.append(Draft(draft))
        return out
