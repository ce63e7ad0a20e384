"""The strategy engine: `place(request, snapshot, state) -> Placement | NoFit`.

Pure: no I/O, no clock, no randomness. The strategy suggests candidates in its order; the
engine enforces every hard limit on each (health, schedulability, selector, sharing,
isolation, free millis, MiB and compute units), gathers `count` GPUs on one node, and when
nothing fits explains why with a count of GPUs per failed constraint.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from kaiwo_gpu.common.errors import InvalidArgumentError, NoCapacityError
from kaiwo_gpu.common.models import AllocationRequest, Health, Isolation
from kaiwo_gpu.common.units import (
    MILLIS_PER_GPU,
    compute_units_for_millis,
    format_fraction,
    memory_for_millis,
    millis_for_compute_units,
    millis_for_memory,
)
from kaiwo_gpu.coordinator.placement.cluster import Gpu, GpuKey, GpuShare, PlacedAllocation
from kaiwo_gpu.coordinator.placement.cumask import choose_compute_units
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import (
    BUILTIN_STRATEGIES,
    DEFAULT_STRATEGY,
    SchedulerState,
    Strategy,
)

INITIAL_STATE = SchedulerState()


class Reason(Enum):
    """Why a GPU cannot take a request, in the order the engine checks."""

    SELECTOR = "do not match the selector"
    NODE_UNSCHEDULABLE = "are on unschedulable nodes"
    UNHEALTHY = "are unhealthy"
    NOT_A_PARTITION = "are not hardware compute partitions"
    HELD_EXCLUSIVELY = "are held by a non-sharing allocation"
    NOT_IDLE = "are in use (an idle GPU is needed)"
    ISOLATION_MISMATCH = "hold shares of the other isolation (cu-mask and none do not mix)"
    TOO_SMALL = "have less VRAM in all than requested"
    LACKS_MILLIS = "lack compute share"
    LACKS_MEMORY = "lack memory"
    LACKS_COMPUTE_UNITS = "lack free compute units"
    TOO_FEW_ON_NODE = "fit, but no node has enough of them"


@dataclass(frozen=True, slots=True)
class Demand:
    """What a request takes from one particular GPU, after rounding to what it can grant."""

    millis: int
    memory_mib: int
    compute_units: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    gpu: Gpu
    millis: int
    memory_mib: int
    compute_units: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Placement:
    node: str
    grants: tuple[Grant, ...]
    strategy: str
    isolation: Isolation
    isolation_note: str
    sharing: bool
    state: SchedulerState

    def as_allocation(self, allocation_id: str) -> PlacedAllocation:
        return PlacedAllocation(
            allocation_id=allocation_id,
            node=self.node,
            shares=tuple(
                GpuShare(g.gpu.uuid, g.millis, g.memory_mib, g.compute_units) for g in self.grants
            ),
            isolation=self.isolation,
            sharing=self.sharing,
        )


@dataclass(frozen=True, slots=True)
class NoFit:
    reasons: tuple[tuple[Reason, int], ...]
    message: str

    def to_error(self) -> NoCapacityError:
        return NoCapacityError(self.message, ((r.name.lower(), n) for r, n in self.reasons))


def demand_on(request: AllocationRequest, gpu: Gpu) -> Demand:
    """The millis, MiB and CUs that `request` would be granted on `gpu`."""
    if request.isolation in (Isolation.EXCLUSIVE, Isolation.PARTITION):
        return Demand(MILLIS_PER_GPU, max(gpu.vram_mib, request.memory_mib or 0))
    if request.fraction_millis is not None:
        millis = request.fraction_millis
    else:
        assert request.memory_mib is not None  # the model guarantees one of the two
        millis = millis_for_memory(request.memory_mib, gpu.vram_mib)
    memory = (
        request.memory_mib
        if request.memory_mib is not None
        else memory_for_millis(millis, gpu.vram_mib)
    )
    if request.isolation is Isolation.CU_MASK:
        units = compute_units_for_millis(millis, gpu.compute_units)
        return Demand(millis_for_compute_units(units, gpu.compute_units), memory, units)
    return Demand(millis, memory)


def min_free_millis(request: AllocationRequest, snapshot: ClusterSnapshot) -> int:
    """A lower bound on the free millis any fitting GPU has, for the index to start from.

    Every allocation holds at least one milli, so a GPU with 1000 free millis is idle.
    """
    if request.needs_idle_gpu:
        return MILLIS_PER_GPU
    if request.fraction_millis is not None:
        return request.fraction_millis
    assert request.memory_mib is not None
    return millis_for_memory(request.memory_mib, max(1, snapshot.max_vram_mib))


def check_gpu(request: AllocationRequest, snapshot: ClusterSnapshot, pos: int) -> Demand | Reason:
    """The demand on GPU `pos` if it can take the request, else the first reason it cannot."""
    gpu = snapshot.gpus[pos]
    node = snapshot.node_of[pos]
    selector = request.selector
    if not selector.is_empty and (
        gpu.node in selector.exclude_nodes
        or (selector.nodes and gpu.node not in selector.nodes)
        or gpu.uuid in selector.exclude_gpus
        or (selector.gpu_models and gpu.model not in selector.gpu_models)
        or not node.has_labels(selector.node_labels)
    ):
        return Reason.SELECTOR
    if not node.schedulable:
        return Reason.NODE_UNSCHEDULABLE
    if gpu.health is Health.UNHEALTHY:
        return Reason.UNHEALTHY
    if request.isolation is Isolation.PARTITION and not gpu.is_partition:
        return Reason.NOT_A_PARTITION
    usage = snapshot.usage[pos]
    if usage.blocked:
        return Reason.HELD_EXCLUSIVELY
    if request.needs_idle_gpu and usage.holders:
        return Reason.NOT_IDLE
    # Work without a CU mask runs on every CU, so it would break the promise of cu-mask.
    if usage.cu_mask_holders if request.isolation is Isolation.NONE else usage.shared_holders:
        return Reason.ISOLATION_MISMATCH
    demand = demand_on(request, gpu)
    if demand.memory_mib > gpu.vram_mib:
        return Reason.TOO_SMALL
    if demand.millis > MILLIS_PER_GPU - usage.allocated_millis:
        return Reason.LACKS_MILLIS
    if demand.memory_mib > gpu.vram_mib - usage.allocated_memory_mib:
        return Reason.LACKS_MEMORY
    if demand.compute_units > snapshot.free_compute_units(pos):
        return Reason.LACKS_COMPUTE_UNITS
    return demand


def resolve_strategy(
    request: AllocationRequest, strategies: Mapping[str, Strategy], default: str
) -> Strategy:
    name = request.strategy or default
    strategy = strategies.get(name)
    if strategy is None:
        raise InvalidArgumentError("strategy", name, "one of " + ", ".join(sorted(strategies)))
    return strategy


def place(
    request: AllocationRequest,
    snapshot: ClusterSnapshot,
    state: SchedulerState = INITIAL_STATE,
    strategies: Mapping[str, Strategy] = BUILTIN_STRATEGIES,
    default_strategy: str = DEFAULT_STRATEGY,
) -> Placement | NoFit:
    """Places `request` on `count` GPUs of one node, or says why it cannot."""
    strategy = resolve_strategy(request, strategies, default_strategy)
    picked: dict[str, list[tuple[int, Demand]]] = {}
    seen: set[int] = set()
    gpu_count = len(snapshot.gpus)
    index = snapshot.index_for(request.isolation)
    for pos in strategy.candidates(snapshot, index, min_free_millis(request, snapshot), state):
        if pos in seen or not 0 <= pos < gpu_count:
            continue
        seen.add(pos)
        verdict = check_gpu(request, snapshot, pos)
        if isinstance(verdict, Reason):
            continue
        on_node = picked.setdefault(snapshot.gpus[pos].node, [])
        on_node.append((pos, verdict))
        if len(on_node) == request.count:
            return _placement(request, snapshot, state, strategy, on_node)
    return explain(request, snapshot)


def _placement(
    request: AllocationRequest,
    snapshot: ClusterSnapshot,
    state: SchedulerState,
    strategy: Strategy,
    chosen: list[tuple[int, Demand]],
) -> Placement:
    grants: list[Grant] = []
    for pos, demand in sorted(chosen, key=lambda item: item[0]):
        gpu = snapshot.gpus[pos]
        units: tuple[int, ...] = ()
        if demand.compute_units:
            found = choose_compute_units(
                snapshot.usage[pos].used_compute_units_mask, gpu.compute_units, demand.compute_units
            )
            assert found is not None, "check_gpu counted enough free compute units"
            units = found
        grants.append(Grant(gpu, demand.millis, demand.memory_mib, units))
    keys: tuple[GpuKey, ...] = tuple(g.gpu.key for g in grants)
    return Placement(
        node=grants[0].gpu.node,
        grants=tuple(grants),
        strategy=strategy.name,
        isolation=request.isolation,
        isolation_note=request.isolation_note,
        sharing=not request.blocks_sharing,
        state=strategy.advance(state, keys),
    )


def describe_demand(request: AllocationRequest) -> str:
    parts: list[str] = []
    if request.isolation in (Isolation.EXCLUSIVE, Isolation.PARTITION):
        parts.append(f"an idle GPU ({request.isolation.value})")
    else:
        if request.fraction_millis == MILLIS_PER_GPU:
            parts.append("a whole GPU")
        elif request.fraction_millis is not None:
            parts.append(f"{format_fraction(request.fraction_millis)} of a GPU")
        if request.memory_mib is not None:
            parts.append(f"{request.memory_mib} MiB")
    text = " and ".join(parts)
    if request.isolation is Isolation.CU_MASK:
        text += " (cu-mask)"
    return f"{request.count} GPUs on one node with {text} each" if request.count > 1 else text


def explain(request: AllocationRequest, snapshot: ClusterSnapshot) -> NoFit:
    """Counts, over the whole cluster, the first constraint each GPU fails (the error path)."""
    counts: Counter[Reason] = Counter()
    fitting_per_node: Counter[str] = Counter()
    for pos in range(len(snapshot.gpus)):
        verdict = check_gpu(request, snapshot, pos)
        if isinstance(verdict, Reason):
            counts[verdict] += 1
        else:
            fitting_per_node[snapshot.gpus[pos].node] += 1
    if fitting_per_node:
        counts[Reason.TOO_FEW_ON_NODE] = sum(fitting_per_node.values())
    reasons = tuple((reason, counts[reason]) for reason in Reason if counts[reason])
    wanted = describe_demand(request)
    if not snapshot.gpus:
        return NoFit((), f"no GPU can take {wanted}: the cluster has no GPUs")
    detail = ", ".join(f"{n} {reason.value}" for reason, n in reasons)
    if fitting_per_node:
        most = max(fitting_per_node.values())
        detail += f" (at most {most} on one node, {request.count} needed)"
    return NoFit(reasons, f"no GPU can take {wanted}: {detail}")
