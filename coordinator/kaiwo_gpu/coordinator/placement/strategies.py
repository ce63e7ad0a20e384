"""Placement strategies: each ranks candidate GPUs; the engine decides what is feasible.

A strategy yields GPU positions in its order of preference, lazily, from the snapshot's
capacity index, so the engine stops as soon as it has enough GPUs that fit. A strategy may
yield GPUs that do not fit (the index only knows free millis): the engine re-checks every
candidate. Strategies register by name in a StrategyRegistry.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from kaiwo_gpu.coordinator.placement.capacity_index import CapacityIndex
from kaiwo_gpu.coordinator.placement.cluster import GpuKey
from kaiwo_gpu.coordinator.placement.fragmentation import EMPTY_MIX, DemandMix, FragmentationAware
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot


@dataclass(frozen=True, slots=True)
class SchedulerState:
    """State that outlives one decision, passed in and returned explicitly (no globals)."""

    round_robin_after: GpuKey | None = None
    demand_mix: DemandMix = EMPTY_MIX
    """Recent request shapes, recorded by the engine for every placement (frag-aware)."""


class Strategy(Protocol):
    @property
    def name(self) -> str: ...

    def candidates(
        self,
        snapshot: ClusterSnapshot,
        index: CapacityIndex,
        min_free_millis: int,
        state: SchedulerState,
    ) -> Iterator[int]:
        """GPU positions in order of preference; only those with >= min_free_millis matter.

        `index` holds the GPUs open to the request's kind of isolation.
        """
        ...

    def advance(self, state: SchedulerState, chosen: tuple[GpuKey, ...]) -> SchedulerState:
        """The state after a placement on `chosen` GPUs."""
        ...


class _Stateless:
    name = ""

    def advance(self, state: SchedulerState, chosen: tuple[GpuKey, ...]) -> SchedulerState:
        return state


class FirstFit(_Stateless):
    """The first GPU in (node, index) order that fits: packs the front of the cluster."""

    name = "first-fit"

    def candidates(
        self,
        snapshot: ClusterSnapshot,
        index: CapacityIndex,
        min_free_millis: int,
        state: SchedulerState,
    ) -> Iterator[int]:
        return index.canonical_at_least(0, len(snapshot.gpus), min_free_millis)


class BestFit(_Stateless):
    """The tightest GPU that fits (least free share, then least free memory): packs tightly."""

    name = "best-fit"

    def candidates(
        self,
        snapshot: ClusterSnapshot,
        index: CapacityIndex,
        min_free_millis: int,
        state: SchedulerState,
    ) -> Iterator[int]:
        return index.ascending_free(min_free_millis)


class WorstFit(_Stateless):
    """The emptiest GPU (most free share, then memory): spreads work; ties go to the last GPU."""

    name = "worst-fit"

    def candidates(
        self,
        snapshot: ClusterSnapshot,
        index: CapacityIndex,
        min_free_millis: int,
        state: SchedulerState,
    ) -> Iterator[int]:
        return index.descending_free(min_free_millis)


class RoundRobin:
    """The next GPU that fits after the one placed on last, wrapping around the cluster."""

    name = "round-robin"

    def candidates(
        self,
        snapshot: ClusterSnapshot,
        index: CapacityIndex,
        min_free_millis: int,
        state: SchedulerState,
    ) -> Iterator[int]:
        total = len(snapshot.gpus)
        cursor = state.round_robin_after
        start = 0 if cursor is None else bisect_right(snapshot.keys, cursor)
        yield from index.canonical_at_least(start, total, min_free_millis)
        yield from index.canonical_at_least(0, min(start, total), min_free_millis)

    def advance(self, state: SchedulerState, chosen: tuple[GpuKey, ...]) -> SchedulerState:
        return replace(state, round_robin_after=max(chosen)) if chosen else state


class LoadBalanced(_Stateless):
    """The least loaded GPU by live telemetry and allocations: avoids the busiest and hottest."""

    name = "load-balanced"

    def candidates(
        self,
        snapshot: ClusterSnapshot,
        index: CapacityIndex,
        min_free_millis: int,
        state: SchedulerState,
    ) -> Iterator[int]:
        return index.ascending_load(min_free_millis)


class StrategyRegistry(Mapping[str, Strategy]):
    """Strategies by name; `with_strategy` returns a new registry, so none is shared mutably."""

    def __init__(self, strategies: Iterable[Strategy] = ()) -> None:
        self._by_name: dict[str, Strategy] = {}
        for strategy in strategies:
            if strategy.name in self._by_name:
                raise ValueError(f"strategy {strategy.name!r} registered twice")
            self._by_name[strategy.name] = strategy

    def with_strategy(self, strategy: Strategy) -> StrategyRegistry:
        return StrategyRegistry([*self._by_name.values(), strategy])

    def __getitem__(self, name: str) -> Strategy:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


BUILTIN_STRATEGIES = StrategyRegistry(
    [FirstFit(), BestFit(), WorstFit(), RoundRobin(), LoadBalanced(), FragmentationAware()]
)
DEFAULT_STRATEGY = "best-fit"
