"""The prefix cache: a radix tree over token ids whose nodes own KV slots (RadixAttention).

Invariants (checked by `check_integrity`):
  1. Every node but the root has a non-empty key and `len(value) == len(key)`; children are keyed by
     the first token of their key, and no two children share a first token.
  2. A lock on node n adds 1 to n and every ancestor, so lock_ref(parent) >= lock_ref(child).
  3. evictable_size == total length of nodes with lock_ref == 0; protected_size == the rest;
     their sum is the number of KV slots the tree owns.
  4. Only leaves with lock_ref == 0 are evicted, least recently used first.

`insert` returns how many leading tokens of the key were already cached: those slots of the caller
are duplicates that the caller frees (the tree keeps its own copy).

Namespaces: KV computed under a LoRA adapter differs from the base model's for the same tokens, so
`match_prefix` and `insert` take a `namespace` (None = the base model, else the adapter's uid) and
each namespace has its own root: two namespaces never share a node. Roots are the nodes without a
parent; they hold no tokens and are never evicted (an emptied adapter root is dropped).

    >>> from sgl.runtime.cache.allocator import SlotAllocator
    >>> alloc = SlotAllocator(16); tree = RadixCache(alloc)
    >>> tree.insert([1, 2, 3], alloc.alloc(3))
    0
    >>> m = tree.match_prefix([1, 2, 9]); len(m.slots)
    2
"""

from __future__ import annotations

import collections
import heapq
import itertools
from typing import NamedTuple, Optional

from sgl.runtime.cache.allocator import SlotAllocator

_clock = itertools.count()


class TreeNode:
    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "on_host")

    def __init__(self, key: list[int], value: list[int], parent: Optional["TreeNode"]) -> None:
        self.key = key
        self.value = value
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = next(_clock)
        self.on_host = False  # value holds host-tier slots (hiradix_cache.py); never locked, nor above a device node

    def __lt__(self, other: "TreeNode") -> bool:
        return self.last_access < other.last_access


class MatchResult(NamedTuple):
    slots: list[int]  # KV slots of the longest cached prefix
    node: TreeNode  # the deepest matched node (lock it while the slots are in use)


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Eviction(NamedTuple):
    """One evicted leaf: `path` is the token ids from the root to the leaf's end; the tree still holds
    `path[:kept]` (the leaf's parent), nothing under `path[:kept + 1]`. Read by a data-parallel router."""
    seq: int  # 0, 1, 2, ... per tree, never reused (a reader's cursor)
    path: list[int]
    kept: int


class RadixCache:
    disabled = False
    hierarchical = False  # HiRadixCache (hiradix_cache.py): demotes to a host tier instead of evicting
    EVICTION_LOG = 256  # evictions remembered for `evictions_since`; older ones are counted as lost

    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        self.evictions: collections.deque[Eviction] = collections.deque(maxlen=self.EVICTION_LOG)
        self.eviction_seq = 0
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode([], [], None)  # the base model's namespace
        self.root.lock_ref = 1  # the root is never evicted
        self.roots: dict[Optional[int], TreeNode] = {None: self.root}
        self.evictable_size = 0
        self.protected_size = 0

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def _root(self, namespace: Optional[int]) -> TreeNode:
        root = self.roots.get(namespace)
        if root is None:
            root = self.roots[namespace] = TreeNode([], [], None)
            root.lock_ref = 1
        return root

    # ---- lookup and insertion -------------------------------------------------------------
    def match_prefix(self, key: list[int], namespace: Optional[int] = None) -> MatchResult:
        node, slots = self._root(namespace), []
        now = next(_clock)
        while key:
            child = node.children.get(key[0])
            if child is None or not self._matchable(child):
                break
            child.last_access = now
            n = _common_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
                slots.extend(child.value)
                node = child
                break
            slots.extend(child.value)
            node, key = child, key[n:]
        return MatchResult(slots, node)

    @staticmethod
    def _matchable(node: TreeNode) -> bool:
        """A node whose KV a match may use (HiRadixCache: not one demoted to the host tier)."""
        return True

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split `child` after n tokens; returns the new upper node (which keeps child's locks)."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        upper = TreeNode(child.key[:n], child.value[:n], parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.on_host = child.on_host
        parent.children[upper.key[0]] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[child.key[0]] = child
        return upper

    def insert(self, key: list[int], slots: list[int], namespace: Optional[int] = None) -> int:
        """Insert key -> slots; returns the length of the prefix that was already cached."""
        assert len(key) == len(slots)
        node, done = self._root(namespace), 0
        now = next(_clock)
        while done < len(key):
            child = node.children.get(key[done])
            if child is None:
                new = TreeNode(key[done:], slots[done:], node)
                node.children[key[done]] = new
                self.evictable_size += len(new.key)
                return done
            child.last_access = now
            n = _common_len(child.key, key[done:])
            if n < len(child.key):
                child = self._split(child, n)
            node, done = child, done + n
        return done

    # ---- locking ---------------------------------------------------------------------------
    def lock(self, node: TreeNode) -> None:
        while node.parent is not None:  # up to (not including) its namespace's root
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: TreeNode) -> None:
        while node.parent is not None:
            assert node.lock_ref > 0, "unlock of an unlocked node"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node = node.parent  # type: ignore[assignment]

    # ---- eviction --------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from unlocked leaves, LRU first; returns slots freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0 and n.parent is not None]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self._log_eviction(leaf)
            self.allocator.free(leaf.value)
            freed += len(leaf.value)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        for ns in [ns for ns, root in self.roots.items() if ns is not None and not root.children]:
            del self.roots[ns]  # an adapter's emptied namespace
        return freed

    def _log_eviction(self, leaf: TreeNode) -> None:
        keys, node = [], leaf
        while node.parent is not None:
            keys.append(node.key)
            node = node.parent
        if node is not self.root:
            return  # NOTE: an adapter's namespace: the router tracks base-model prefixes only
        path = [t for k in reversed(keys) for t in k]
        self.evictions.append(Eviction(self.eviction_seq, path, len(path) - len(leaf.key)))
        self.eviction_seq += 1

    def evictions_since(self, cursor: int) -> tuple[list[Eviction], int, int]:
        """(evictions with seq >= cursor still in the log, how many fell out of the log, the next cursor).

        NOTE: safe from any thread (an HTTP handler must not wait for a long scheduler step): the seq is
        read first and the log copied in one C call under the GIL; retried if an append raced the copy."""
        while True:
            nxt = self.eviction_seq
            try:
                log = tuple(self.evictions)
                break
            except RuntimeError:  # deque mutated during iteration
                continue
        first = log[0].seq if log else nxt
        return [e for e in log if cursor <= e.seq < nxt], max(0, min(first, nxt) - cursor), nxt

    def _nodes(self) -> list[TreeNode]:
        out, stack = [], list(self.roots.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def check_integrity(self) -> None:
        evictable = protected = 0
        for n in self._nodes():
            if n.parent is None:  # a namespace root
                assert not n.key and not n.value and n.lock_ref == 1, "a root holds no tokens and stays locked"
                continue
            assert n.key and len(n.key) == len(n.value), "node key/value mismatch"
            assert n.parent.children.get(n.key[0]) is n, "broken parent link"
            if n.parent.parent is not None:
                assert n.parent.lock_ref >= n.lock_ref, "lock_ref must not grow downwards"
            if n.lock_ref == 0:
                evictable += len(n.key)
            else:
                protected += len(n.key)
        assert evictable == self.evictable_size, f"evictable {evictable} != {self.evictable_size}"
        assert protected == self.protected_size, f"protected {protected} != {self.protected_size}"

    def all_slots(self) -> list[int]:
        return [s for n in self._nodes() for s in n.value]


class NoPrefixCache(RadixCache):
    """--disable-radix-cache: nothing is ever matched or kept."""

    disabled = True

    def match_prefix(self, key: list[int], namespace: Optional[int] = None) -> MatchResult:
        return MatchResult([], self.root)

    def insert(self, key: list[int], slots: list[int], namespace: Optional[int] = None) -> int:
        return len(key)  # "all already cached": the caller frees every slot

    def evict(self, num_tokens: int) -> int:
        return 0
