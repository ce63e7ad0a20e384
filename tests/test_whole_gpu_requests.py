"""Several whole GPUs: the shortcuts for full clusters decide exactly what the walk decides."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiwo_gpu.common.models import AllocationRequest, Isolation
from kaiwo_gpu.coordinator.local.synthetic import synthetic_nodes
from kaiwo_gpu.coordinator.placement import engine
from kaiwo_gpu.coordinator.placement.cluster import GpuShare, PlacedAllocation
from kaiwo_gpu.coordinator.placement.engine import NoFit, place
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import BUILTIN_STRATEGIES

NODES = 24


@st.composite
def busy_clusters(draw: st.DrawFn) -> ClusterSnapshot:
    """24 nodes of 8 GPUs, each GPU idle or holding a tenth, most nodes with few idle."""
    nodes = synthetic_nodes(NODES, 8)
    held = []
    for node in nodes:
        idle = draw(st.sampled_from([0, 1, 2, 3, 8]))
        for gpu in node.gpus[idle:]:
            share = GpuShare(gpu.uuid, 100, 1024)
            held.append(PlacedAllocation(f"a-{gpu.uuid}", node.name, (share,)))
    return ClusterSnapshot.build(nodes, held)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    busy_clusters(),
    st.sampled_from([2, 4, 8]),
    st.sampled_from(sorted(BUILTIN_STRATEGIES)),
    st.sampled_from([Isolation.NONE, Isolation.EXCLUSIVE, Isolation.CU_MASK]),
)
def test_restricting_to_the_nodes_that_can_hold_it_changes_no_decision(
    snapshot: ClusterSnapshot, count: int, strategy: str, isolation: Isolation
) -> None:
    request = AllocationRequest(
        "whole", count=count, fraction_millis=1000, isolation=isolation, strategy=strategy
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "RESTRICTED_COST", 0)  # always restrict to the hosts
        restricted = place(request, snapshot)
        patch.setattr(engine, "RESTRICTED_COST", 10**9)  # never: walk the whole index
        walked = place(request, snapshot)
    assert restricted == walked
    assert place(request, snapshot) == walked


def test_a_sparse_host_is_found_among_many_busy_nodes() -> None:
    nodes = synthetic_nodes(NODES, 8)
    held = [
        PlacedAllocation(f"a-{gpu.uuid}", node.name, (GpuShare(gpu.uuid, 100, 1024),))
        for node in nodes[:-1]
        for gpu in node.gpus[3:]  # three idle GPUs on every node but the last
    ]
    snapshot = ClusterSnapshot.build(nodes, held)
    placed = place(AllocationRequest("eight", count=8, fraction_millis=1000), snapshot)
    assert not isinstance(placed, NoFit)
    assert placed.node == nodes[-1].name
    refused = place(AllocationRequest("nine", count=4, fraction_millis=1000), snapshot)
    assert not isinstance(refused, NoFit), "the idle node holds four too"
    busy = snapshot.with_allocation(placed.as_allocation("eight"))
    no_room = place(AllocationRequest("four", count=4, fraction_millis=1000), busy)
    assert isinstance(no_room, NoFit)
    assert "at most 3 on one node, 4 needed" in no_room.message
