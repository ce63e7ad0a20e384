"""Persistent sequences for snapshots: a new version shares all but the parts that changed.

A snapshot is never changed after it is built, and the view derives one per batch of commits.
Copying a tuple of 10,000 entries per commit costs more than the decision it serves, so the
per-GPU columns are chunked: changing k positions copies k chunks and the table of chunks,
O(k * CHUNK + n / CHUNK) instead of O(n). The sorted orders of the capacity index are runs of
sorted items, chunked the same way.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any, Generic, Protocol, Self, TypeVar, overload

T = TypeVar("T")

CHUNK_BITS = 6
CHUNK = 1 << CHUNK_BITS
"""Positions per chunk: at 10,000 GPUs a change copies one 64-entry chunk and a 157-entry table."""
_MASK = CHUNK - 1


class ChunkedVector(Sequence[T]):
    """An immutable sequence whose `replaced` copies only the chunks it changes."""

    __slots__ = ("_chunks", "_length")

    def __init__(self, items: Iterable[T] = ()) -> None:
        values = tuple(items)
        self._chunks: tuple[tuple[T, ...], ...] = tuple(
            values[start : start + CHUNK] for start in range(0, len(values), CHUNK)
        )
        self._length = len(values)

    @property
    def chunks(self) -> tuple[tuple[T, ...], ...]:
        """The chunks, CHUNK positions each (the last may be shorter), for scans by chunk."""
        return self._chunks

    def replaced(self, changes: Mapping[int, T]) -> ChunkedVector[T]:
        """A new vector with the positions in `changes` replaced (each within 0..len-1)."""
        if not changes:
            return self
        chunks = list(self._chunks)
        copied: dict[int, list[T]] = {}
        for position, value in changes.items():
            if not 0 <= position < self._length:
                raise IndexError(f"position {position} outside 0..{self._length - 1}")
            index = position >> CHUNK_BITS
            chunk = copied.get(index)
            if chunk is None:
                chunk = copied[index] = list(chunks[index])
            chunk[position & _MASK] = value
        for index, chunk in copied.items():
            chunks[index] = tuple(chunk)
        vector: ChunkedVector[T] = ChunkedVector.__new__(ChunkedVector)
        vector._chunks = tuple(chunks)
        vector._length = self._length
        return vector

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[T]:
        return chain.from_iterable(self._chunks)

    @overload
    def __getitem__(self, position: int) -> T: ...

    @overload
    def __getitem__(self, position: slice) -> tuple[T, ...]: ...

    def __getitem__(self, position: int | slice) -> T | tuple[T, ...]:
        if isinstance(position, slice):
            return tuple(self)[position]
        if position < 0:
            position += self._length
        if not 0 <= position < self._length:
            raise IndexError(f"position {position} outside 0..{self._length - 1}")
        return self._chunks[position >> CHUNK_BITS][position & _MASK]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkedVector):
            return self._length == other._length and self._chunks == other._chunks
        if isinstance(other, Sequence):
            pairs = zip(self, other, strict=True)
            return len(other) == self._length and all(a == b for a, b in pairs)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to sequences of the same items

    def __repr__(self) -> str:
        return f"ChunkedVector({list(self)!r})"


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Ordered)

RUN = 128
"""Items per run after a split; a run splits when an edit takes it past twice this."""


class SortedRuns(Generic[K]):
    """An immutable sorted sequence of distinct items, stored as runs of sorted tuples.

    `changed` removes and inserts any number of items and copies only the runs it touches
    and the table of runs. Items must be distinct (the index's items end in a position).
    """

    __slots__ = ("_firsts", "_length", "_runs")

    def __init__(self, items: Iterable[K] = ()) -> None:
        """`items` in any order: they are sorted here."""
        ordered = sorted(items)
        self._runs: tuple[tuple[K, ...], ...] = tuple(
            tuple(ordered[start : start + RUN]) for start in range(0, len(ordered), RUN)
        )
        self._firsts: tuple[K, ...] = tuple(run[0] for run in self._runs)
        self._length = len(ordered)

    def changed(self, removals: Iterable[K], insertions: Iterable[K]) -> Self:
        """A new sequence without `removals` (each must be present) and with `insertions`."""
        runs: list[Sequence[K]] = list(self._runs)
        firsts: list[K] = list(self._firsts)
        copied: dict[int, list[K]] = {}  # run number -> its edited copy
        length = self._length

        def editable(item: K) -> tuple[int, list[K]]:
            number = max(0, bisect_right(firsts, item) - 1)
            run = copied.get(number)
            if run is None:
                run = copied[number] = list(runs[number])
                runs[number] = run
            return number, run

        for item in removals:
            number, run = editable(item)
            at = bisect_left(run, item)
            if at == len(run) or run[at] != item:
                raise KeyError(f"{item!r} is not in the sequence")
            del run[at]
            length -= 1
            if at == 0 and run:
                firsts[number] = run[0]  # an emptied run keeps its old first: still in order
        for item in insertions:
            if not runs:
                runs.append([])
                firsts.append(item)
            number, run = editable(item)
            at = bisect_right(run, item)
            run.insert(at, item)
            length += 1
            if at == 0:
                firsts[number] = item
        if not copied:
            return self
        result = type(self).__new__(type(self))
        result._length = length
        if all(0 < len(copied[number]) <= 2 * RUN for number in copied):
            for number, run in copied.items():  # the common case: no run emptied or split
                runs[number] = tuple(run)
            result._runs = tuple(runs)  # type: ignore[arg-type]  # every run is a tuple now
            result._firsts = tuple(firsts)
            return result
        packed: list[tuple[K, ...]] = []
        for items in runs:
            if len(items) > 2 * RUN:
                packed.extend(tuple(items[s : s + RUN]) for s in range(0, len(items), RUN))
            elif items:
                packed.append(tuple(items))
        result._runs = tuple(packed)
        result._firsts = tuple(run[0] for run in packed)
        return result

    def ascending_from(self, low: Any) -> Iterator[K]:
        """Every item >= low, smallest first (`low` compares with items: a prefix tuple)."""
        runs = self._runs
        number = max(0, bisect_right(self._firsts, low) - 1)
        for i in range(number, len(runs)):
            run = runs[i]
            yield from run[bisect_left(run, low) if i == number else 0 :]

    def descending_to(self, low: Any) -> Iterator[K]:
        """Every item >= low, largest first."""
        runs = self._runs
        stop = max(0, bisect_right(self._firsts, low) - 1)
        for i in range(len(runs) - 1, stop - 1, -1):
            run = runs[i]
            start = bisect_left(run, low) if i == stop else 0
            for j in range(len(run) - 1, start - 1, -1):
                yield run[j]

    def first_from(self, low: Any) -> K | None:
        """The smallest item >= low, or None: a bisect, no iterator."""
        runs = self._runs
        number = max(0, bisect_right(self._firsts, low) - 1)
        while number < len(runs):
            run = runs[number]
            at = bisect_left(run, low)
            if at < len(run):
                return run[at]
            number += 1
        return None

    def count_from(self, low: Any) -> int:
        """How many items are >= low, without walking them."""
        runs = self._runs
        if not runs:
            return 0
        number = max(0, bisect_right(self._firsts, low) - 1)
        run = runs[number]
        return len(run) - bisect_left(run, low) + sum(len(r) for r in runs[number + 1 :])

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[K]:
        return chain.from_iterable(self._runs)

    def __eq__(self, other: object) -> bool:
        """Equal when the items are: how they are split into runs does not matter."""
        if not isinstance(other, SortedRuns):
            return NotImplemented
        if self._length != other._length:
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SortedRuns({list(self)!r})"
