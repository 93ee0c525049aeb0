"""The hierarchical prefix cache (SGLang's HiCache idea): a radix tree whose cold nodes live in a host tier.

`--hierarchical-cache --host-cache-tokens N`. Where the plain tree evicts an unlocked LRU leaf (frees its
device slots), this one demotes it: its KV rows are copied to host slots and the node stays in the tree
with `on_host` set. A later request whose prefix runs into host nodes gets them promoted back (a copy
into fresh device slots, no prefill) before it is matched. When the host tier is full its own LRU leaves
are dropped for good. A request that computed the KV of a host node anyway (e.g. no device room to
promote) hands its fresh device slots to the node on insert, and the host copy is freed.

Invariants (on top of RadixCache's, `check_integrity`):
  1. A host node's children are host nodes (demotion goes leaf first, promotion root first), so a path
     from the root is device nodes, then host nodes.
  2. Host nodes are never locked; evictable/protected sizes count device tokens only, `host_size` the rest.
  3. The host pool's used slots are exactly the host nodes' values.

    >>> from sgl.runtime.cache.allocator import SlotAllocator
    >>> class Mover:
    ...     bytes_per_slot = 1
    ...     def swap_out(self, d, h): pass
    ...     def swap_in(self, h, d): pass
    >>> alloc = SlotAllocator(8); tree = HiRadixCache(alloc, HostPool(Mover(), 8))
    >>> tree.insert([1, 2, 3], alloc.alloc(3))
    0
    >>> tree.evict(3), tree.total_size, tree.host_size
    (3, 0, 3)
    >>> len(tree.match_prefix([1, 2, 3]).slots), tree.host_prefix_len([1, 2, 3])
    (0, 3)
    >>> tree.promote([1, 2, 3]), len(tree.match_prefix([1, 2, 3]).slots)
    (3, 3)
"""

from __future__ import annotations

import heapq
from typing import Optional

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.cache.host_pool import HostPool
from sgl.runtime.cache.radix_cache import MatchResult, RadixCache, TreeNode, _clock, _common_len


class HiRadixCache(RadixCache):
    hierarchical = True

    def __init__(self, allocator: SlotAllocator, host: HostPool) -> None:
        assert host.host is not None, "the hierarchical cache needs a host pool"
        self.host = host
        super().__init__(allocator)

    def reset(self) -> None:
        super().reset()
        self.host_size = 0
        self.promoted_tokens = 0  # copied back from the host tier (prefill they saved)
        self.demoted_tokens = 0

    # ---- lookup: device nodes only; host nodes are promoted first -------------------------
    @staticmethod
    def _matchable(node: TreeNode) -> bool:
        return not node.on_host  # host nodes are promoted (copied back) before a match uses them

    def _host_path(self, key: list[int], namespace: Optional[int] = None) -> list[TreeNode]:
        """The host nodes `key` runs through after its device prefix (a partly matched one is split)."""
        node, out = self._root(namespace), []
        now = next(_clock)
        while key:
            child = node.children.get(key[0])
            if child is None:
                break
            n = _common_len(child.key, key)
            if child.on_host:
                child.last_access = now
                if n < len(child.key):
                    child = self._split(child, n)
                out.append(child)
            if n < len(child.key):
                break
            node, key = child, key[n:]
        return out

    def host_prefix_len(self, key: list[int], namespace: Optional[int] = None) -> int:
        """Tokens of `key` beyond its device prefix that the host tier holds (what `promote` copies)."""
        return sum(len(n.key) for n in self._host_path(key, namespace))

    def promote(self, key: list[int], namespace: Optional[int] = None) -> int:
        """Copy the host nodes on `key`'s path back to device slots, root first, while device slots last;
        returns the tokens promoted. The caller makes room first (and protects the path while it does)."""
        done = 0
        for node in self._host_path(key, namespace):
            slots = self.allocator.alloc(len(node.key))
            if slots is None:
                break
            self.host.swap_in(node.value, slots)  # frees the host slots
            node.value, node.on_host = slots, False
            self.host_size -= len(node.key)
            self.evictable_size += len(node.key)
            done += len(node.key)
        self.promoted_tokens += done
        return done

    # ---- insertion: a fresh device copy replaces a host copy ---------------------------------
    def insert(self, key: list[int], slots: list[int], namespace: Optional[int] = None) -> int:
        """As RadixCache.insert; returns the device-cached prefix length. Host nodes on the path adopt the
        caller's slots (its copies are not duplicates then: the host copies are freed instead)."""
        assert len(key) == len(slots)
        node, done = self._root(namespace), 0
        device_prefix: Optional[int] = None
        now = next(_clock)
        while done < len(key):
            child = node.children.get(key[done])
            if child is None:
                new = TreeNode(key[done:], slots[done:], node)
                node.children[key[done]] = new
                self.evictable_size += len(new.key)
                return done if device_prefix is None else device_prefix
            child.last_access = now
            n = _common_len(child.key, key[done:])
            if n < len(child.key):
                child = self._split(child, n)
            if child.on_host:
                device_prefix = done if device_prefix is None else device_prefix
                self.host.release(child.value)
                child.value, child.on_host = list(slots[done:done + n]), False
                self.host_size -= n
                self.evictable_size += n
            node, done = child, done + n
        return done if device_prefix is None else device_prefix

    # ---- eviction: demote to the host tier, drop from it ------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens device slots from unlocked device leaves, LRU first, demoting each to
        the host tier (dropping host LRU leaves for room); returns device slots freed."""
        leaves = [n for n in self._nodes() if self._device_leaf(n)]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            size = len(leaf.key)
            if not self.host.can_hold(size):
                self._evict_host(size - (self.host.size - self.host.used), keep=leaf)
            if self.host.can_hold(size):
                host = self.host.swap_out(leaf.value)
                self.allocator.free(leaf.value)
                leaf.value, leaf.on_host = host, True
                self.host_size += size
                self.demoted_tokens += size
            else:  # the host tier cannot take it: drop it with its host subtree
                self._drop_subtree(leaf)
            self.evictable_size -= size
            freed += size
            parent = leaf.parent
            assert parent is not None
            if self._device_leaf(parent):
                heapq.heappush(leaves, parent)
        return freed

    def _device_leaf(self, n: TreeNode) -> bool:
        return (n.parent is not None and not n.on_host and n.lock_ref == 0
                and all(c.on_host for c in n.children.values()))

    def _evict_host(self, num_tokens: int, keep: TreeNode) -> None:
        """Drop host leaves (LRU first, never `keep`'s subtree) until num_tokens host slots are free."""
        leaves = [n for n in self._nodes() if n.on_host and not n.children and not self._under(n, keep)]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            freed += len(leaf.key)
            self._drop_subtree(leaf)
            if parent.on_host and not parent.children and not self._under(parent, keep):
                heapq.heappush(leaves, parent)

    @staticmethod
    def _under(n: TreeNode, top: TreeNode) -> bool:
        while n is not None:
            if n is top:
                return True
            n = n.parent  # type: ignore[assignment]
        return False

    def _drop_subtree(self, node: TreeNode) -> None:
        """Remove `node` and its (host) descendants from the tree; host slots freed, device slots too."""
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n.on_host:
                self.host.release(n.value)
                self.host_size -= len(n.key)
            elif n is not node:
                raise AssertionError("a device node under a dropped node")
        if not node.on_host:
            self.allocator.free(node.value)
        parent = node.parent
        assert parent is not None
        del parent.children[node.key[0]]

    def drop_all(self) -> None:
        """flush_cache: everything goes, host tier included (nothing may be locked)."""
        for child in [c for root in self.roots.values() for c in root.children.values()]:
            assert child.lock_ref == 0, "flush with locked nodes"
            self._drop_all_below(child)

    def _drop_all_below(self, node: TreeNode) -> None:
        for c in list(node.children.values()):
            self._drop_all_below(c)
        if node.on_host:
            self.host.release(node.value)
            self.host_size -= len(node.key)
        else:
            self.allocator.free(node.value)
            self.evictable_size -= len(node.key)
        del node.parent.children[node.key[0]]  # type: ignore[union-attr]

    # ---- integrity ---------------------------------------------------------------------------
    def check_integrity(self) -> None:
        evictable = protected = host = 0
        for n in self._nodes():
            if n.parent is None:  # a namespace's root
                continue
            assert n.key and len(n.key) == len(n.value), "node key/value mismatch"
            assert n.parent is not None and n.parent.children.get(n.key[0]) is n, "broken parent link"
            if n.parent.parent is not None:
                assert n.parent.lock_ref >= n.lock_ref, "lock_ref must not grow downwards"
            if n.on_host:
                assert n.lock_ref == 0, "a host node is locked"
                assert all(c.on_host for c in n.children.values()), "a device node under a host node"
                host += len(n.key)
            elif n.lock_ref == 0:
                evictable += len(n.key)
            else:
                protected += len(n.key)
        assert evictable == self.evictable_size, f"evictable {evictable} != {self.evictable_size}"
        assert protected == self.protected_size, f"protected {protected} != {self.protected_size}"
        assert host == self.host_size, f"host {host} != {self.host_size}"
        self.host.check_integrity(host)

    def all_slots(self) -> list[int]:
        return [s for n in self._nodes() if not n.on_host for s in n.value]
