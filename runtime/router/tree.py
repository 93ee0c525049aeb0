"""An approximate radix tree of the TEXT each worker has cached (like sglang-router's cache-aware tree).

The router never sees a replica's real radix cache: it records the prompt text of every request it
routed to a worker, and forgets what the worker has probably evicted by pruning each worker's share
to at most `max_chars` characters, least recently used leaves first. Keys are characters, not token
ids: the router tokenizes nothing (it also fronts SGLang servers with other tokenizers).

Invariants: an edge label is non-empty; a node's `workers` maps worker -> last access time, and a
worker on a node is on every ancestor too; `chars[w]` == sum of edge lengths of nodes holding w.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class _Node:
    edge: str = ""
    parent: Optional["_Node"] = None
    children: dict[str, "_Node"] = field(default_factory=dict)  # first char of child.edge -> child
    workers: dict[str, float] = field(default_factory=dict)  # worker -> last access (monotonic)


class ApproxTree:
    def __init__(self, max_chars: int = 1 << 20) -> None:
        self.root = _Node()
        self.max_chars = max_chars
        self.chars: dict[str, int] = {}

    def insert(self, text: str, worker: str, now: Optional[float] = None) -> None:
        """Record that `worker` now caches `text` (and so every prefix of it)."""
        now = time.monotonic() if now is None else now
        node, i = self.root, 0
        node.workers[worker] = now
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = _Node(edge=text[i:], parent=node)
                node.children[text[i]] = child
            else:
                k = _common(child.edge, text, i)
                if k < len(child.edge):
                    child = self._split(child, k)
            if worker not in child.workers:
                self.chars[worker] = self.chars.get(worker, 0) + len(child.edge)
            child.workers[worker] = now
            node, i = child, i + len(child.edge)
        if self.chars.get(worker, 0) > self.max_chars:
            self.prune(worker, self.max_chars)

    def match(self, text: str) -> dict[str, int]:
        """worker -> length of the longest prefix of `text` that worker has (workers with 0 are absent)."""
        out: dict[str, int] = {}
        node, i = self.root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            k = _common(child.edge, text, i)
            for w in child.workers:
                out[w] = i + k
            if k < len(child.edge):
                break
            node, i = child, i + k
        return out

    def remove_worker(self, worker: str) -> None:
        self.prune(worker, 0)
        self.root.workers.pop(worker, None)
        self.chars.pop(worker, None)

    def prune(self, worker: str, limit: int) -> None:
        """Drop `worker`'s least recently used leaves until it holds at most `limit` characters."""
        leaves = [n for n in self._nodes() if worker in n.workers and n is not self.root
                  and not any(worker in c.workers for c in n.children.values())]
        while self.chars.get(worker, 0) > limit and leaves:
            leaves.sort(key=lambda n: n.workers[worker])
            leaf = leaves.pop(0)
            del leaf.workers[worker]
            self.chars[worker] -= len(leaf.edge)
            parent = leaf.parent
            if not leaf.workers and not leaf.children and parent is not None:
                del parent.children[leaf.edge[0]]
            if parent is not None and parent is not self.root and \
                    not any(worker in c.workers for c in parent.children.values()):
                leaves.append(parent)

    def forget(self, worker: str, prefix: str, before: float) -> int:
        """The worker evicted everything under `prefix`: drop it from every node whose text starts with
        `prefix` and that it last used before `before` (a newer use may have cached the text again).
        Returns the characters dropped."""
        if not prefix:
            return 0
        node, i = self.root, 0
        while i < len(prefix):
            child = node.children.get(prefix[i])
            if child is None or worker not in child.workers:
                return 0
            k = _common(child.edge, prefix, i)
            if i + k == len(prefix):  # prefix ends inside (or at the end of) child's edge
                off = len(prefix) - 1 - i  # child's edge from `off` on lies under prefix; before it: kept
                if off > 0:
                    self._split(child, off)  # child becomes the lower part
                node = child
                break
            if k < len(child.edge):
                return 0  # diverges: the worker holds nothing under prefix
            node, i = child, i + k
        dropped = 0
        for n in sorted(self._subtree(node), key=self._depth, reverse=True):  # children before parents
            stamp = n.workers.get(worker)
            # a node used since `before`, or with a child that keeps the worker, keeps it (ancestor invariant)
            if stamp is None or stamp >= before or any(worker in c.workers for c in n.children.values()):
                continue
            del n.workers[worker]
            dropped += len(n.edge)
        self._drop_empty(node)
        self.chars[worker] = self.chars.get(worker, 0) - dropped
        return dropped

    def _drop_empty(self, top: _Node) -> None:
        for n in sorted(self._subtree(top), key=self._depth, reverse=True):  # leaves first
            if not n.workers and not n.children and n.parent is not None:
                del n.parent.children[n.edge[0]]

    def _subtree(self, top: _Node) -> list[_Node]:
        out, stack = [], [top]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    @staticmethod
    def _depth(n: _Node) -> int:
        d = 0
        while n.parent is not None:
            n, d = n.parent, d + 1
        return d

    def size(self, worker: str) -> int:
        return self.chars.get(worker, 0)

    def _split(self, child: _Node, k: int) -> _Node:
        """Split `child`'s edge after k chars; returns the new upper node (same workers)."""
        parent = child.parent
        assert parent is not None and 0 < k < len(child.edge)
        upper = _Node(edge=child.edge[:k], parent=parent, workers=dict(child.workers))
        parent.children[upper.edge[0]] = upper
        child.edge, child.parent = child.edge[k:], upper
        upper.children[child.edge[0]] = child
        return upper

    def _nodes(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out


def _common(edge: str, text: str, start: int) -> int:
    """Length of the common prefix of `edge` and `text[start:]`."""
    n = min(len(edge), len(text) - start)
    k = 0
    while k < n and edge[k] == text[start + k]:
        k += 1
    return k
