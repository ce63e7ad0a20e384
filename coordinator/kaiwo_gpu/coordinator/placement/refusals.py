"""Why a request cannot be placed: a count of GPUs per first failed rule, without a scan.

A full cluster refuses a large share of what it is asked, so a refusal must cost about
what a placement does. The snapshot counts its GPUs per class (rules.py: what the rules
read of a GPU apart from its free capacity); the class rules are judged once per class
and charged to every GPU of it. Of the GPUs whose class passes, only those the capacity
index holds with enough free millis for the request are checked one by one; every other
one lacks compute share. So the cost is the number of classes plus the number of
candidates the strategy walked anyway, not the number of GPUs. A selector that lists nodes
is judged on those nodes' GPUs alone; one that excludes nodes or GPUs subtracts theirs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kaiwo_gpu.common.errors import NoCapacityError
from kaiwo_gpu.common.models import AllocationRequest, Isolation
from kaiwo_gpu.common.units import MILLIS_PER_GPU, format_fraction
from kaiwo_gpu.coordinator.placement.rules import (
    Reason,
    capacity_verdict,
    check_gpu,
    class_reason,
    min_free_millis,
    selects_position,
)
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot


@dataclass(frozen=True, slots=True)
class NoFit:
    reasons: tuple[tuple[Reason, int], ...]
    message: str

    def to_error(self) -> NoCapacityError:
        return NoCapacityError(self.message, ((r.name.lower(), n) for r, n in self.reasons))


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
    """Counts, over the whole cluster, the first rule each GPU fails (the error path)."""
    if request.selector.nodes:
        listed = snapshot.positions_on(request.selector.nodes)
        counts, fitting = _count_positions(request, snapshot, listed)
        counts[Reason.SELECTOR] += len(snapshot.gpus) - len(listed)
    else:
        counts, fitting = _count_classes(request, snapshot)
    return _no_fit(request, snapshot, counts, fitting)


@dataclass(frozen=True, slots=True)
class Fitting:
    """GPUs that fit the request one by one, though no node has `count` of them."""

    total: int = 0
    most_on_a_node: int = 0

    @staticmethod
    def of(per_node: Counter[str]) -> Fitting:
        return Fitting(sum(per_node.values()), max(per_node.values(), default=0))


def _count_positions(
    request: AllocationRequest, snapshot: ClusterSnapshot, positions: Iterable[int]
) -> tuple[Counter[Reason], Fitting]:
    """Checks each of `positions` in full: the path of a selector that lists its nodes."""
    counts: Counter[Reason] = Counter()
    fitting_per_node: Counter[str] = Counter()
    for pos in positions:
        verdict = check_gpu(request, snapshot, pos)
        if isinstance(verdict, Reason):
            counts[verdict] += 1
        else:
            fitting_per_node[snapshot.gpus[pos].node] += 1
    return counts, Fitting.of(fitting_per_node)


def _count_classes(
    request: AllocationRequest, snapshot: ClusterSnapshot
) -> tuple[Counter[Reason], Fitting]:
    counts: Counter[Reason] = Counter()
    fitting_per_node: Counter[str] = Counter()
    # Labels matter only to a label selector; without one, the few label-less classes do.
    by_labels = bool(request.selector.node_labels)
    class_counts = Counter(snapshot.class_counts if by_labels else snapshot.kind_counts)
    excluded = _excluded_positions(request, snapshot)
    for pos in excluded:  # the selector's exclusions fail first, whatever their class
        gpu_class = snapshot.classes[pos]
        class_counts[gpu_class if by_labels else gpu_class.without_labels()] -= 1
    counts[Reason.SELECTOR] += len(excluded)
    passing = 0
    verdicts = {gpu_class: class_reason(request, gpu_class) for gpu_class in class_counts}
    for gpu_class, number in class_counts.items():
        reason = verdicts[gpu_class]
        if reason is None:
            passing += number
        elif number:
            counts[reason] += number
    # A GPU whose class passes is in the index unless nothing of it is free, so the ones
    # the index does not give here have less free share than the request takes anywhere.
    least_millis = min_free_millis(request, snapshot)
    if least_millis == MILLIS_PER_GPU and not excluded:
        idle_classes = [c for c, n in class_counts.items() if n and c.open_and_idle]
        if all(verdicts[c] is None for c in idle_classes):
            # Whole GPUs: an idle GPU whose class passes has all it could want free, so
            # every idle GPU fits and the counts per node are the snapshot's.
            by_count = snapshot.nodes_by_idle
            idle = sum(count * len(nodes) for count, nodes in by_count.items())
            counts[Reason.LACKS_MILLIS] += passing - idle
            return counts, Fitting(idle, max(by_count, default=0))
    checked = 0
    index = snapshot.index_for(request.isolation)
    for pos in index.ascending_free(least_millis):
        if pos in excluded or class_reason(request, snapshot.classes[pos]) is not None:
            continue
        checked += 1
        verdict = capacity_verdict(request, snapshot, pos)
        if isinstance(verdict, Reason):
            counts[verdict] += 1
        else:
            fitting_per_node[snapshot.gpus[pos].node] += 1
    counts[Reason.LACKS_MILLIS] += passing - checked
    return counts, Fitting.of(fitting_per_node)


def _excluded_positions(request: AllocationRequest, snapshot: ClusterSnapshot) -> set[int]:
    """Positions the selector's exclusion lists rule out (it lists no nodes here)."""
    selector = request.selector
    if not selector.exclude_nodes and not selector.exclude_gpus:
        return set()
    candidates = set(snapshot.positions_on(selector.exclude_nodes))
    candidates.update(
        pos for uuid in selector.exclude_gpus if (pos := snapshot.position.get(uuid)) is not None
    )
    return {pos for pos in candidates if not selects_position(request, snapshot.gpus[pos])}


def _no_fit(
    request: AllocationRequest, snapshot: ClusterSnapshot, counts: Counter[Reason], fitting: Fitting
) -> NoFit:
    if fitting.total:
        counts[Reason.TOO_FEW_ON_NODE] = fitting.total
    reasons = tuple((reason, counts[reason]) for reason in Reason if counts[reason])
    wanted = describe_demand(request)
    if not snapshot.gpus:
        return NoFit((), f"no GPU can take {wanted}: the cluster has no GPUs")
    detail = ", ".join(f"{n} {reason.value}" for reason, n in reasons)
    if fitting.total:
        detail += f" (at most {fitting.most_on_a_node} on one node, {request.count} needed)"
    return NoFit(reasons, f"no GPU can take {wanted}: {detail}")
