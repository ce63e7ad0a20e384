"""An independent feasibility rule, written from the design notes and not from the engine.

The engine must place exactly when this oracle says some node has `count` GPUs that fit:
a refusal of something that fits, or a placement of something that does not, fails here.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiwo_gpu.common.models import AllocationRequest, Health, Isolation
from kaiwo_gpu.coordinator.placement.cluster import Gpu, Node, PlacedAllocation
from kaiwo_gpu.coordinator.placement.engine import NoFit, place
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot

from .cluster_strategies import STRATEGIES, clusters, requests


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fits(request: AllocationRequest, snapshot: ClusterSnapshot, gpu: Gpu, node: Node) -> bool:
    selector = request.selector
    if gpu.node in selector.exclude_nodes or gpu.uuid in selector.exclude_gpus:
        return False
    if selector.gpu_models and gpu.model not in selector.gpu_models:
        return False
    if any(dict(node.labels).get(k) != v for k, v in selector.node_labels):
        return False
    if not node.schedulable or gpu.health is Health.UNHEALTHY:
        return False
    holders: list[PlacedAllocation] = [
        a for a in snapshot.allocations.values() if any(s.gpu_uuid == gpu.uuid for s in a.shares)
    ]
    shares = [s for a in holders for s in a.shares if s.gpu_uuid == gpu.uuid]
    if any(a.blocks_sharing for a in holders):
        return False
    whole = request.isolation in (Isolation.EXCLUSIVE, Isolation.PARTITION)
    if (whole or not request.sharing or request.fraction_millis == 1000) and holders:
        return False
    if request.isolation is Isolation.PARTITION and gpu.compute_partition in ("", "SPX"):
        return False
    if whole:
        return (request.memory_mib or 0) <= gpu.vram_mib
    masked = [a.isolation is Isolation.CU_MASK for a in holders]
    if (request.isolation is Isolation.CU_MASK and not all(masked)) or (
        request.isolation is Isolation.NONE and any(masked)
    ):
        return False
    millis = request.fraction_millis or min(
        1000, max(1, ceil_div((request.memory_mib or 0) * 1000, gpu.vram_mib))
    )
    memory = request.memory_mib or millis * gpu.vram_mib // 1000
    if memory > gpu.vram_mib - sum(s.memory_mib for s in shares):
        return False
    if request.isolation is Isolation.CU_MASK:
        used = {cu for s in shares for cu in s.compute_units}
        return ceil_div(millis * gpu.compute_units, 1000) <= gpu.compute_units - len(used)
    return millis <= 1000 - sum(s.millis for s in shares)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.lists(requests(), min_size=1, max_size=40))
def test_engine_places_exactly_when_the_oracle_says_it_fits(
    nodes: list[Node], stream: list[AllocationRequest]
) -> None:
    snapshot = ClusterSnapshot.build(nodes)
    for step, request in enumerate(stream):
        decision = place(request, snapshot, strategies=STRATEGIES)
        per_node: dict[str, int] = defaultdict(int)
        for pos, gpu in enumerate(snapshot.gpus):
            if fits(request, snapshot, gpu, snapshot.node_of[pos]):
                per_node[gpu.node] += 1
        feasible = any(n >= request.count for n in per_node.values())
        assert feasible == (not isinstance(decision, NoFit)), (request, decision)
        if not isinstance(decision, NoFit):
            snapshot = snapshot.with_allocation(decision.as_allocation(f"a{step}"))
