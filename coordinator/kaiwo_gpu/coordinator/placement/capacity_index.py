"""Indexes over the GPUs that can take new work, so a decision need not scan the cluster.

Three views of the same open GPUs (healthy or degraded, on a schedulable node, not held by
a non-sharing allocation), each keyed by the GPU's position in canonical order:
- `by_free`, sorted by (free millis, free MiB): best-fit walks up from the demand, worst-fit
  down from the top;
- the entries in canonical order with the most free millis of each chunk of them: first-fit
  and round-robin find the next GPU at or after a position with enough share by skipping
  whole chunks;
- `by_load`, sorted by load score: load-balanced walks up from the idlest.
An index is never changed after it is built; `updated` returns a new one that shares every
chunk and run it did not touch (see persistent.py), so a commit costs O(k log n + n / 64).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kaiwo_gpu.common.units import MILLIS_PER_GPU
from kaiwo_gpu.coordinator.placement.persistent import CHUNK_BITS, ChunkedVector, SortedRuns

CLOSED = -1
BULK_CHANGES = 64
"""Above this many moved positions, and an eighth of the positions, a sorted order is
sorted afresh rather than edited: one C sort of n entries beats n/8 edits."""
SPARSE_SHARE = 16
"""Load-balanced sorts the GPUs with enough free share by load when fewer than one in this
many have it, instead of walking the whole load order past the GPUs without it."""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """What the index knows of one open GPU."""

    free_millis: int
    free_memory_mib: int
    load: int


def _free(entry: IndexEntry | None) -> int:
    return CLOSED if entry is None else entry.free_millis


@dataclass(frozen=True, slots=True)
class CapacityIndex:
    entries: ChunkedVector[IndexEntry | None]
    by_free: SortedRuns[tuple[int, int, int]]
    by_load: SortedRuns[tuple[int, int]]
    free: ChunkedVector[int]
    """Free millis per position, CLOSED where the GPU is not open: scanned by first-fit."""
    chunk_free: tuple[int, ...]
    """The most free millis in each chunk of `free`: whole chunks are skipped by it."""

    @staticmethod
    def build(entries: Iterable[IndexEntry | None]) -> CapacityIndex:
        vector = ChunkedVector(entries)
        opened = [(position, entry) for position, entry in enumerate(vector) if entry is not None]
        free = ChunkedVector(_free(entry) for entry in vector)
        return CapacityIndex(
            vector,
            SortedRuns((e.free_millis, e.free_memory_mib, p) for p, e in opened),
            SortedRuns((e.load, p) for p, e in opened),
            free,
            tuple(max(chunk) for chunk in free.chunks),
        )

    def updated(self, changes: dict[int, IndexEntry | None]) -> CapacityIndex:
        """A new index with the given positions replaced: O(k log n) plus the chunk tables."""
        free_out: list[tuple[int, int, int]] = []
        free_in: list[tuple[int, int, int]] = []
        load_out: list[tuple[int, int]] = []
        load_in: list[tuple[int, int]] = []
        for position, entry in changes.items():
            old = self.entries[position]
            if old is not None:
                free_out.append((old.free_millis, old.free_memory_mib, position))
                load_out.append((old.load, position))
            if entry is not None:
                free_in.append((entry.free_millis, entry.free_memory_mib, position))
                load_in.append((entry.load, position))
        free = self.free.replaced({p: _free(entry) for p, entry in changes.items()})
        chunk_free = list(self.chunk_free)
        for number in {position >> CHUNK_BITS for position in changes}:
            chunk_free[number] = max(free.chunks[number])
        return CapacityIndex(
            self.entries.replaced(changes),
            self.by_free.changed(free_out, free_in),
            self.by_load.changed(load_out, load_in),
            free,
            tuple(chunk_free),
        )

    def restricted_to(self, positions: Iterable[int], closed: CapacityIndex) -> CapacityIndex:
        """The index of only `positions` (the others closed), built from `closed`, an index of
        as many positions with none open: O(k log k + n / 64), not O(n)."""
        kept = {p: entry for p in positions if (entry := self.entries[p]) is not None}
        free = closed.free.replaced({p: entry.free_millis for p, entry in kept.items()})
        chunk_free = list(closed.chunk_free)
        for number in {position >> CHUNK_BITS for position in kept}:
            chunk_free[number] = max(free.chunks[number])
        return CapacityIndex(
            closed.entries.replaced(kept),
            SortedRuns((e.free_millis, e.free_memory_mib, p) for p, e in kept.items()),
            SortedRuns((e.load, p) for p, e in kept.items()),
            free,
            tuple(chunk_free),
        )

    def with_loads(self, loads: dict[int, int]) -> CapacityIndex:
        """A new index with the load scores of open positions replaced (a telemetry fold).

        Free capacity does not move, so only `by_load` changes: edited for a few positions,
        sorted afresh when many moved (one C sort beats thousands of edits)."""
        changed: dict[int, IndexEntry | None] = {}
        moved_out: list[tuple[int, int]] = []
        moved_in: list[tuple[int, int]] = []
        for position, load in loads.items():
            entry = self.entries[position]
            if entry is not None and entry.load != load:
                changed[position] = IndexEntry(entry.free_millis, entry.free_memory_mib, load)
                moved_out.append((entry.load, position))
                moved_in.append((load, position))
        if not changed:
            return self
        entries = self.entries.replaced(changed)
        if len(changed) > max(BULK_CHANGES, len(entries) // 8):
            by_load = SortedRuns(
                (entry.load, position)
                for position, entry in enumerate(entries)
                if entry is not None
            )
        else:
            by_load = self.by_load.changed(moved_out, moved_in)
        return CapacityIndex(entries, self.by_free, by_load, self.free, self.chunk_free)

    def first_at_least(self, start: int, min_free_millis: int) -> int:
        """The lowest position >= start whose GPU has min_free_millis free, or -1."""
        return next(self.canonical_at_least(start, len(self.free), min_free_millis), -1)

    def canonical_at_least(self, start: int, stop: int, min_free_millis: int) -> Iterator[int]:
        """Positions in start..stop-1 with min_free_millis free, in canonical order (first-fit
        and round-robin): whole chunks skipped by their maximum, the rest read in place."""
        chunks = self.free.chunks
        chunk_free = self.chunk_free
        stop = min(stop, len(self.free))
        if start >= stop:
            return
        for number in range(start >> CHUNK_BITS, ((stop - 1) >> CHUNK_BITS) + 1):
            if chunk_free[number] < min_free_millis:
                continue
            base = number << CHUNK_BITS
            chunk = chunks[number]
            low = max(start - base, 0)
            high = min(stop - base, len(chunk))
            if min_free_millis == MILLIS_PER_GPU:  # none has more free: idle GPUs, found in C
                at = low
                while True:
                    try:
                        at = chunk.index(MILLIS_PER_GPU, at, high)
                    except ValueError:
                        break
                    yield base + at
                    at += 1
            else:
                for at in range(low, high):
                    if chunk[at] >= min_free_millis:
                        yield base + at

    def least_free_at_least(self, min_free_millis: int) -> int:
        """The smallest free millis >= min_free_millis an open GPU has, or CLOSED: lets a
        walk over the distinct free levels jump from one to the next."""
        found = self.by_free.first_from((min_free_millis,))
        return CLOSED if found is None else found[0]

    def count_at_least(self, min_free_millis: int) -> int:
        """How many open GPUs have min_free_millis free, without walking them."""
        return self.by_free.count_from((min_free_millis,))

    def ascending_free(self, min_free_millis: int) -> Iterator[int]:
        """Positions with at least min_free_millis, tightest first (best-fit order)."""
        for _, _, position in self.by_free.ascending_from((min_free_millis,)):
            yield position

    def descending_free(self, min_free_millis: int) -> Iterator[int]:
        """Positions with at least min_free_millis, emptiest first (worst-fit order)."""
        for _, _, position in self.by_free.descending_to((min_free_millis,)):
            yield position

    def ascending_load(self, min_free_millis: int = 0) -> Iterator[int]:
        """Positions with at least min_free_millis, idlest first (load-balanced order).

        Where few GPUs have that much free, they are sorted by load rather than found by
        walking every open GPU in load order: a full cluster refuses in O(k log k), not O(n).
        """
        if self.count_at_least(min_free_millis) * SPARSE_SHARE < len(self.by_load):
            entries = self.entries
            fitting = sorted(
                (entries[p].load, p)  # type: ignore[union-attr]  # by_free holds open ones
                for p in self.ascending_free(min_free_millis)
            )
            for _, position in fitting:
                yield position
            return
        entries = self.entries
        for _, position in self.by_load:
            entry = entries[position]
            if entry is not None and entry.free_millis >= min_free_millis:
                yield position
