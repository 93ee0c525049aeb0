"""Weighted fair admission across priority classes (realtime | standard | batch). No tensors here.

Each class has a virtual time: the prefill tokens admitted for it divided by its weight. The waiting
queue is served class by class, always from the class with waiting work whose virtual time is lowest,
so over any window the admitted prefill tokens of the classes with waiting work follow the weights
(`--priority-weights realtime=10,standard=5,batch=1`: 10/16, 5/16, 1/16). No class starves: its
virtual time stays put while it waits, and the others' grow past it.

A class that had no waiting work saves no credit: when it comes back its virtual time is raised to the
lowest virtual time of the classes that kept waiting (start-time fair queueing), so an idle class does
not lock the others out for as long as it was idle.

Within a class the scheduler's policy orders the requests (fcfs, lpm, priority).

    >>> fs = FairShare({"realtime": 10.0, "standard": 5.0, "batch": 1.0})
    >>> fs.charge("batch", 10); fs.charge("realtime", 10)
    >>> fs.vtime["batch"], fs.vtime["realtime"]
    (10.0, 1.0)
"""

from __future__ import annotations

from typing import Callable

from sgl.runtime.protocol import PRIORITY_CLASSES
from sgl.runtime.scheduler.request import Req

# Preemption order: a lower rank is preempted first; realtime (the highest) is never a victim of realtime.
CLASS_RANK = {c: len(PRIORITY_CLASSES) - 1 - i for i, c in enumerate(PRIORITY_CLASSES)}  # realtime 2 ... batch 0


class FairShare:
    def __init__(self, weights: dict[str, float]) -> None:
        assert set(weights) == set(PRIORITY_CLASSES) and all(w > 0 for w in weights.values())
        self.weights = dict(weights)
        self.vtime = {c: 0.0 for c in PRIORITY_CLASSES}
        self.admitted_tokens = {c: 0 for c in PRIORITY_CLASSES}  # prefill tokens admitted, ever (for stats/tests)
        self._active: set[str] = set()  # classes with waiting work at the previous `order`

    def charge(self, cls: str, tokens: int) -> None:
        """`tokens` prefill tokens of class `cls` were scheduled (a first piece or a later chunk)."""
        self.vtime[cls] += tokens / self.weights[cls]
        self.admitted_tokens[cls] += tokens

    def order(self, waiting: list[Req], within: Callable[[list[Req]], list[Req]]) -> list[Req]:
        """The waiting queue in admission order: classes interleaved by virtual time (each request
        counted at its pending prefill length), each class in `within`'s order."""
        queues: dict[str, list[Req]] = {}
        for r in waiting:
            queues.setdefault(r.priority_class, []).append(r)
        active = set(queues)
        kept = active & self._active
        if kept:
            floor = min(self.vtime[c] for c in kept)
            for c in active - kept:  # back from idle: no saved-up credit
                self.vtime[c] = max(self.vtime[c], floor)
        self._active = active
        if len(queues) == 1:
            return within(waiting)
        ordered = {c: within(q) for c, q in queues.items()}
        heads = {c: 0 for c in ordered}
        sim = {c: self.vtime[c] for c in ordered}
        out: list[Req] = []
        while heads:
            # ties: the more urgent class first
            c = min(heads, key=lambda k: (sim[k], -CLASS_RANK[k]))
            req = ordered[c][heads[c]]
            out.append(req)
            sim[c] += (1 if req.host_slots else max(req.pending_len, 1)) / self.weights[c]  # swap-in: no prefill
            heads[c] += 1
            if heads[c] == len(ordered[c]):
                del heads[c]
        return out
