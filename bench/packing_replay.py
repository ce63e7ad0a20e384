"""The replays of the packing benchmark and the offline bounds they are held against.

Protocol 1 offers a workload's tasks in arrival order with no departures until a share of GPU
capacity (130%) has been requested; protocol 2 replays creations and deletions in time order,
a refused task being dropped. Both drive the real engine (`place`, then `with_allocation`
with the state the placement returns), so what they measure is what the coordinator does.
"""

from __future__ import annotations

import gc
import heapq
import time
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bench.lib import Stats
from bench.packing_trace import Task, Workload, demand_until
from kaiwo_gpu.common.units import MILLIS_PER_GPU, MIN_FRACTION_MILLIS
from kaiwo_gpu.coordinator import (
    ClusterSnapshot,
    GpuShare,
    NoFit,
    PlacedAllocation,
    Reason,
    SchedulerState,
    place,
)
from kaiwo_gpu.coordinator.placement.engine import check_gpu

REQUESTED_LIMIT = 1.3
CURVE_STEP = 0.01
"""The curve of allocated against requested share keeps a point every this much requested."""


def idle_gpus(snapshot: ClusterSnapshot) -> int:
    return sum(1 for usage in snapshot.usage if usage.holders == 0)


def _stats(samples_ns: Sequence[int]) -> Stats | None:
    return Stats.of(samples_ns) if samples_ns else None


@dataclass(slots=True)
class Timings:
    """place() per placement and per refusal, and the snapshot update per commit, in ns."""

    placed_ns: list[int] = field(default_factory=list)
    refused_ns: list[int] = field(default_factory=list)
    update_ns: list[int] = field(default_factory=list)

    def placed(self) -> Stats | None:
        return _stats(self.placed_ns)

    def refused(self) -> Stats | None:
        return _stats(self.refused_ns)

    def decisions(self) -> Stats | None:
        return _stats(self.placed_ns + self.refused_ns)

    def update(self) -> Stats | None:
        return _stats(self.update_ns)


@dataclass(frozen=True, slots=True)
class ArrivalResult:
    """Protocol 1 for one strategy on one workload."""

    strategy: str
    requests: int
    refused: int
    capacity_millis: int
    requested_millis: int
    allocated_at_100: float  # share of capacity when 100% had been requested
    allocated_at_end: float  # ... when the limit (130%) had been requested
    idle_gpus: int
    curve: tuple[tuple[float, float], ...]  # (requested share, allocated share)
    timings: Timings
    snapshot: ClusterSnapshot

    @property
    def refused_share(self) -> float:
        return self.refused / max(1, self.requests)


@dataclass(frozen=True, slots=True)
class DepartureResult:
    """Protocol 2 for one strategy on one workload."""

    strategy: str
    requests: int
    refused: int
    time_averaged_allocated: float  # share of capacity over the arrival window
    peak_allocated: float
    window_s: float
    final_allocated_millis: int
    timings: Timings
    snapshot: ClusterSnapshot

    @property
    def refused_share(self) -> float:
        return self.refused / max(1, self.requests)


class _Replayer:
    """Places requests with one strategy, timing each decision and each commit."""

    def __init__(self, workload: Workload, strategy: str, ignore_gpu_spec: bool) -> None:
        self.snapshot = ClusterSnapshot.build(workload.nodes)
        self.state = SchedulerState()
        self.strategy = strategy
        self.ignore_gpu_spec = ignore_gpu_spec
        self.timings = Timings()
        self.allocated = 0
        self.serial = 0
        self.held: dict[str, int] = {}  # allocation id -> millis it holds

    def offer(self, task: Task) -> str | None:
        """The allocation id if the task was placed, else None."""
        self.serial += 1
        request = task.request(f"r-{self.serial:07d}", ignore_gpu_spec=self.ignore_gpu_spec)
        clock = time.perf_counter_ns
        start = clock()
        decision = place(request, self.snapshot, self.state, default_strategy=self.strategy)
        decided = clock()
        if isinstance(decision, NoFit):
            self.timings.refused_ns.append(decided - start)
            return None
        self.timings.placed_ns.append(decided - start)
        allocation = decision.as_allocation(f"a-{self.serial:07d}")
        start = clock()
        self.snapshot = self.snapshot.with_allocation(allocation)
        self.timings.update_ns.append(clock() - start)
        self.state = decision.state
        millis = sum(grant.millis for grant in decision.grants)
        self.held[allocation.allocation_id] = millis
        self.allocated += millis
        return allocation.allocation_id

    def release(self, allocation_id: str) -> None:
        self.allocated -= self.held.pop(allocation_id)
        self.snapshot = self.snapshot.without_allocation(allocation_id)


class _GcPaused:
    """The GC off for a timed replay (snapshots hold no cycles: refcounts free them)."""

    def __enter__(self) -> None:
        gc.collect()
        gc.disable()

    def __exit__(self, *_: object) -> None:
        gc.enable()


def replay_arrivals(
    workload: Workload,
    strategy: str,
    *,
    limit: float = REQUESTED_LIMIT,
    ignore_gpu_spec: bool = False,
) -> ArrivalResult:
    """Protocol 1: tasks in arrival order, none leaving, until `limit` x capacity is asked."""
    capacity = workload.capacity_millis
    replayer = _Replayer(workload, strategy, ignore_gpu_spec)
    tasks = demand_until(workload.tasks, limit * capacity)
    requested = 0
    at_100: float | None = None
    curve: list[tuple[float, float]] = [(0.0, 0.0)]
    refused = 0
    with _GcPaused():
        for task in tasks:
            if replayer.offer(task) is None:
                refused += 1
            requested += task.millis_total
            asked, allocated = requested / capacity, replayer.allocated / capacity
            if at_100 is None and asked >= 1.0:
                at_100 = allocated
            if asked >= curve[-1][0] + CURVE_STEP:
                curve.append((asked, allocated))
    end = replayer.allocated / capacity
    if curve[-1][0] < requested / capacity:
        curve.append((requested / capacity, end))
    return ArrivalResult(
        strategy=strategy,
        requests=len(tasks),
        refused=refused,
        capacity_millis=capacity,
        requested_millis=requested,
        allocated_at_100=end if at_100 is None else at_100,
        allocated_at_end=end,
        idle_gpus=idle_gpus(replayer.snapshot),
        curve=tuple(curve),
        timings=replayer.timings,
        snapshot=replayer.snapshot,
    )


def replay_departures(
    workload: Workload, strategy: str, *, ignore_gpu_spec: bool = False
) -> DepartureResult:
    """Protocol 2: creations and deletions in time order; a refused task is dropped.

    At equal times a deletion comes first (capacity is freed before it is asked for). The
    share allocated is averaged over the window from when 100% of capacity had been asked
    (before it, nothing contends) to the last creation.
    """
    capacity = workload.capacity_millis
    replayer = _Replayer(workload, strategy, ignore_gpu_spec)
    tasks = sorted(workload.tasks, key=lambda task: task.creation_s)
    departures: list[tuple[float, str]] = []  # (deletion time, allocation id), a heap
    refused = 0
    area = peak = 0.0
    asked = 0
    start: float | None = None  # the window's start
    now = 0.0

    def advance(when: float) -> None:
        nonlocal area, now
        if start is not None:
            area += replayer.allocated * (when - now)
        now = when

    with _GcPaused():
        for task in tasks:
            while departures and departures[0][0] <= task.creation_s:
                when, leaving = heapq.heappop(departures)
                advance(when)
                replayer.release(leaving)
            advance(task.creation_s)
            placed = replayer.offer(task)
            if placed is None:
                refused += 1
            elif task.deletion_s is not None:
                heapq.heappush(departures, (task.deletion_s, placed))
            peak = max(peak, replayer.allocated)
            asked += task.millis_total
            if start is None and asked >= capacity:
                start = now
        while departures:  # after the window: only to give everything back
            replayer.release(heapq.heappop(departures)[1])
    window = now - start if start is not None else 0.0
    averaged = area / (window * capacity) if window > 0 else 0.0
    return DepartureResult(
        strategy=strategy,
        requests=len(tasks),
        refused=refused,
        time_averaged_allocated=averaged,
        peak_allocated=peak / capacity,
        window_s=window,
        final_allocated_millis=replayer.allocated,
        timings=replayer.timings,
        snapshot=replayer.snapshot,
    )


# --- offline bounds -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bound:
    """What any placement of a demand can reach, as shares of GPU capacity.

    `achievable` is the better of two offline packings made with the engine's rules:
    first-fit-decreasing, and fill-decreasing (GPU by GPU, each filled with the largest
    shares that still fit). FFD maximises GPUs filled, not share allocated: with more demand
    than capacity it gives every big share a GPU of its own and strands the gaps beside them,
    so on fractional demand it can pack less than best-fit online; fill-decreasing does not.
    """

    requested: float
    first_fit_decreasing: float
    fill_decreasing: float
    upper: float  # no placement can allocate more
    snapshots: tuple[ClusterSnapshot, ClusterSnapshot]  # FFD's, fill-decreasing's

    @property
    def achievable(self) -> float:
        return max(self.first_fit_decreasing, self.fill_decreasing)


def _decreasing(tasks: Sequence[Task]) -> list[Task]:
    return sorted(tasks, key=lambda task: (task.count, task.millis), reverse=True)


def first_fit_decreasing(
    workload: Workload,
    tasks: Sequence[Task],
    ignore_gpu_spec: bool,
) -> ClusterSnapshot:
    """The tasks, largest first (GPUs, then share), placed first-fit by the engine itself."""
    snapshot = ClusterSnapshot.build(workload.nodes)
    state = SchedulerState()
    for serial, task in enumerate(_decreasing(tasks)):
        request = task.request(f"ffd-{serial:07d}", ignore_gpu_spec=ignore_gpu_spec)
        decision = place(request, snapshot, state, default_strategy="first-fit")
        if isinstance(decision, NoFit):
            continue
        snapshot = snapshot.with_allocation(decision.as_allocation(f"ffd-a-{serial:07d}"))
        state = decision.state
    return snapshot


FIRST_CHOICES = 24
"""How many first shares least-slack filling tries per GPU (the largest and a spread below)."""


class _Pending:
    """The fractional shares not yet placed, per selector: distinct sizes and their counts."""

    def __init__(self, tasks: Sequence[Task], ignore_gpu_spec: bool) -> None:
        self.tasks: dict[tuple[frozenset[str], int], list[Task]] = {}
        for task in reversed(tasks):  # popped from the end: arrival order
            models = frozenset() if ignore_gpu_spec else task.gpu_models
            self.tasks.setdefault((models, task.millis), []).append(task)
        self.sizes: dict[frozenset[str], list[int]] = {}
        for models, millis in sorted(self.tasks):
            self.sizes.setdefault(models, []).append(millis)

    def groups_for(self, model: str) -> list[frozenset[str]]:
        return [models for models in self.sizes if not models or model in models]

    def largest_at_most(
        self,
        groups: Sequence[frozenset[str]],
        free: int,
        used: Mapping[tuple[frozenset[str], int], int],
    ) -> tuple[frozenset[str], int] | None:
        """The largest share <= free still pending (less what `used` took), and its group."""
        best: tuple[frozenset[str], int] | None = None
        for models in groups:
            sizes = self.sizes[models]
            at = bisect_right(sizes, free) - 1
            while at >= 0 and len(self.tasks[models, sizes[at]]) <= used.get(
                (models, sizes[at]), 0
            ):
                at -= 1
            if at >= 0 and (best is None or sizes[at] > best[1]):
                best = (models, sizes[at])
        return best

    def take(self, key: tuple[frozenset[str], int]) -> Task:
        task = self.tasks[key].pop()
        if not self.tasks[key]:
            del self.tasks[key]
            self.sizes[key[0]].remove(key[1])
            if not self.sizes[key[0]]:
                del self.sizes[key[0]]
        return task


def _greedy_fill(
    pending: _Pending,
    groups: Sequence[frozenset[str]],
    free: int,
    first: tuple[frozenset[str], int],
) -> list[tuple[frozenset[str], int]]:
    """`first`, then the largest pending share that fits, until none does."""
    chosen = [first]
    used = {first: 1}
    free -= first[1]
    for _ in range(MILLIS_PER_GPU // MIN_FRACTION_MILLIS):  # each share takes >= 100
        key = pending.largest_at_most(groups, free, used)
        if key is None:
            break
        chosen.append(key)
        used[key] = used.get(key, 0) + 1
        free -= key[1]
    return chosen


def fill_decreasing(
    workload: Workload, tasks: Sequence[Task], ignore_gpu_spec: bool
) -> ClusterSnapshot:
    """Whole GPUs first-fit-decreasing; then least-slack filling of each GPU in turn: of a
    few first shares (the largest and a spread below), the one whose greedy fill leaves the
    least free, the larger on a tie.

    The engine's `check_gpu` judges every share before it is committed.
    """
    snapshot = first_fit_decreasing(
        workload, [task for task in tasks if not task.fractional], ignore_gpu_spec
    )
    pending = _Pending([task for task in tasks if task.fractional], ignore_gpu_spec)
    serial = 0
    for pos in range(len(snapshot.gpus)):
        groups = pending.groups_for(snapshot.gpus[pos].model)
        free = snapshot.free_millis(pos)
        firsts = {
            (models, millis)
            for models in groups
            for millis in pending.sizes[models][
                :: -max(1, len(pending.sizes[models]) // FIRST_CHOICES)
            ]
            if millis <= free
        }
        if not firsts:
            continue
        best = min(
            (_greedy_fill(pending, groups, free, first) for first in firsts),
            key=lambda fill: (free - sum(millis for _, millis in fill), -fill[0][1]),
        )
        for key in best:
            serial += 1
            request = pending.take(key).request(
                f"fill-{serial:07d}", ignore_gpu_spec=ignore_gpu_spec
            )
            verdict = check_gpu(request, snapshot, pos)
            if isinstance(verdict, Reason):
                continue  # not this GPU after all (the engine knows more than free millis)
            share = GpuShare(snapshot.gpus[pos].uuid, verdict.millis, verdict.memory_mib)
            node = snapshot.gpus[pos].node
            snapshot = snapshot.with_allocation(
                PlacedAllocation(f"fill-a-{serial:07d}", node, (share,))
            )
    return snapshot


def upper_bound_millis(workload: Workload, tasks: Sequence[Task]) -> int:
    """min(capacity, demand of the tasks some node could hold, a one-big-share-per-GPU bound).

    A share over half a GPU cannot share a GPU with another such share, so at most one per
    GPU is placed: the big shares placed add up to at most the largest `GPUs` of them.
    """
    per_node_gpus = sorted((len(node.gpus) for node in workload.nodes), reverse=True)
    largest_node = per_node_gpus[0] if per_node_gpus else 0
    placeable = [task for task in tasks if task.count <= largest_node]
    demand = sum(task.millis_total for task in placeable)
    half = MILLIS_PER_GPU // 2
    big = sorted(
        (task.millis for task in placeable for _ in range(task.count) if task.millis > half),
        reverse=True,
    )
    small = sum(task.millis_total for task in placeable if task.millis <= half)
    one_big_per_gpu = sum(big[: workload.gpu_count]) + small
    return min(workload.capacity_millis, demand, one_big_per_gpu)


def offline_bound(workload: Workload, limit: float, *, ignore_gpu_spec: bool = False) -> Bound:
    """The bounds over the same demand protocol 1 offers up to `limit` x capacity."""
    capacity = workload.capacity_millis
    tasks = demand_until(workload.tasks, limit * capacity)
    ffd = first_fit_decreasing(workload, tasks, ignore_gpu_spec)
    fill = fill_decreasing(workload, tasks, ignore_gpu_spec)
    return Bound(
        requested=sum(task.millis_total for task in tasks) / capacity,
        first_fit_decreasing=ffd.allocated_millis() / capacity,
        fill_decreasing=fill.allocated_millis() / capacity,
        upper=upper_bound_millis(workload, tasks) / capacity,
        snapshots=(ffd, fill),
    )
