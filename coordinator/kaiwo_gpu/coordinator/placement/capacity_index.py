"""Indexes over the GPUs that can take new work, so a decision need not scan the cluster.

Three views of the same open GPUs (healthy or degraded, on a schedulable node, not held by
a non-sharing allocation), each keyed by the GPU's position in canonical order:
- `by_free`, sorted by (free millis, free MiB): best-fit walks up from the demand, worst-fit
  down from the top;
- a max segment tree of free millis in canonical order: first-fit and round-robin find the
  next GPU at or after a position with enough share in O(log n);
- `by_load`, sorted by load score: load-balanced walks up from the idlest.
An index is never changed after it is built; `updated` returns a new one (copy on write).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CLOSED = -1
BULK_CHANGES = 64
"""Above this many moved positions, and an eighth of the positions, a sorted list is
sorted afresh rather than edited: one C sort of n entries beats n/8 edits that each shift
up to n of them."""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """What the index knows of one open GPU."""

    free_millis: int
    free_memory_mib: int
    load: int


@dataclass(frozen=True, slots=True)
class CapacityIndex:
    entries: tuple[IndexEntry | None, ...]
    by_free: list[tuple[int, int, int]]
    by_load: list[tuple[int, int]]
    tree: list[int]
    leaves: int

    @staticmethod
    def build(entries: Iterable[IndexEntry | None]) -> CapacityIndex:
        frozen = tuple(entries)
        leaves = 1
        while leaves < max(1, len(frozen)):
            leaves *= 2
        tree = [CLOSED] * (2 * leaves)
        by_free: list[tuple[int, int, int]] = []
        by_load: list[tuple[int, int]] = []
        for position, entry in enumerate(frozen):
            if entry is None:
                continue
            tree[leaves + position] = entry.free_millis
            by_free.append((entry.free_millis, entry.free_memory_mib, position))
            by_load.append((entry.load, position))
        for node in range(leaves - 1, 0, -1):
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
        by_free.sort()
        by_load.sort()
        return CapacityIndex(frozen, by_free, by_load, tree, leaves)

    def updated(self, changes: dict[int, IndexEntry | None]) -> CapacityIndex:
        """A new index with the given positions replaced; cost O(n) copy + O(k log n)."""
        entries = list(self.entries)
        by_free = list(self.by_free)
        by_load = list(self.by_load)
        tree = list(self.tree)
        for position, entry in changes.items():
            old = entries[position]
            if old is not None:
                del by_free[bisect_left(by_free, (old.free_millis, old.free_memory_mib, position))]
                del by_load[bisect_left(by_load, (old.load, position))]
            if entry is not None:
                insort(by_free, (entry.free_millis, entry.free_memory_mib, position))
                insort(by_load, (entry.load, position))
            entries[position] = entry
            node = self.leaves + position
            tree[node] = CLOSED if entry is None else entry.free_millis
            node //= 2
            while node:
                tree[node] = max(tree[2 * node], tree[2 * node + 1])
                node //= 2
        return CapacityIndex(tuple(entries), by_free, by_load, tree, self.leaves)

    def with_loads(self, loads: dict[int, int]) -> CapacityIndex:
        """A new index with the load scores of open positions replaced (a telemetry fold).

        Free capacity does not move, so only `by_load` changes: edited in place for a few
        positions, sorted afresh when many moved (one C sort beats thousands of insorts)."""
        entries = list(self.entries)
        moved: list[tuple[int, int, int]] = []  # (position, old load, new load)
        for position, load in loads.items():
            entry = entries[position]
            if entry is not None and entry.load != load:
                entries[position] = IndexEntry(entry.free_millis, entry.free_memory_mib, load)
                moved.append((position, entry.load, load))
        if not moved:
            return self
        if len(moved) > max(BULK_CHANGES, len(entries) // 8):
            by_load = sorted(
                (entry.load, position)
                for position, entry in enumerate(entries)
                if entry is not None
            )
        else:
            by_load = list(self.by_load)
            for position, old, new in moved:
                del by_load[bisect_left(by_load, (old, position))]
                insort(by_load, (new, position))
        return CapacityIndex(tuple(entries), self.by_free, by_load, self.tree, self.leaves)

    def first_at_least(self, start: int, min_free_millis: int) -> int:
        """The lowest position >= start whose GPU has min_free_millis free, or -1."""
        if start >= self.leaves:
            return -1
        tree = self.tree
        node = self.leaves + start
        while tree[node] < min_free_millis:
            while node & 1:
                node >>= 1
            if node == 0:
                return -1
            node += 1
        while node < self.leaves:
            node *= 2
            if tree[node] < min_free_millis:
                node += 1
        return node - self.leaves

    def ascending_free(self, min_free_millis: int) -> Iterator[int]:
        """Positions with at least min_free_millis, tightest first (best-fit order)."""
        by_free = self.by_free
        for i in range(bisect_left(by_free, (min_free_millis,)), len(by_free)):
            yield by_free[i][2]

    def descending_free(self, min_free_millis: int) -> Iterator[int]:
        """Positions with at least min_free_millis, emptiest first (worst-fit order)."""
        by_free = self.by_free
        stop = bisect_left(by_free, (min_free_millis,))
        for i in range(len(by_free) - 1, stop - 1, -1):
            yield by_free[i][2]

    def ascending_load(self) -> Iterator[int]:
        for _, position in self.by_load:
            yield position
