"""Incremental snapshots equal snapshots built from scratch."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.coordinator.local.synthetic import synthetic_nodes
from kaiwo_gpu.coordinator.placement.capacity_index import BULK_CHANGES
from kaiwo_gpu.coordinator.placement.cluster import Gpu, GpuShare, Node, PlacedAllocation, Telemetry
from kaiwo_gpu.coordinator.placement.engine import NoFit, place
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot

from .cluster_strategies import (
    STRATEGIES,
    clusters,
    operations,
    released,
    requests,
    telemetry_readings,
)


def same(a: ClusterSnapshot, b: ClusterSnapshot) -> bool:
    return (
        dict(a.allocations) == dict(b.allocations)
        and a.usage == b.usage
        and a.shared_index == b.shared_index
        and a.cu_mask_index == b.cu_mask_index
        and a.classes == b.classes
        and dict(a.class_counts) == dict(b.class_counts)
        and dict(a.kind_counts) == dict(b.kind_counts)
        and dict(a.idle_by_node) == dict(b.idle_by_node)
        and {c: set(nodes) for c, nodes in a.nodes_by_idle.items()}
        == {c: set(nodes) for c, nodes in b.nodes_by_idle.items()}
        and {pos: set(h) for pos, h in enumerate(a.holders)}
        == {pos: set(h) for pos, h in enumerate(b.holders)}
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), operations)
def test_incremental_snapshots_equal_rebuilt_ones(
    nodes: list[Node], ops: list[AllocationRequest | int]
) -> None:
    snapshot = ClusterSnapshot.build(nodes)
    for step, op in enumerate(ops):
        if isinstance(op, int):
            snapshot = released(snapshot, op)
        else:
            decision = place(op, snapshot, strategies=STRATEGIES)
            if isinstance(decision, NoFit):
                continue
            snapshot = snapshot.with_allocation(decision.as_allocation(f"a{step}"))
        assert same(snapshot, ClusterSnapshot.build(nodes, snapshot.allocations.values()))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), operations)
def test_batched_changes_equal_one_by_one_changes(
    nodes: list[Node], ops: list[AllocationRequest | int]
) -> None:
    """`with_changes` (the view's path) lands where with/without_allocation do."""
    one_by_one = ClusterSnapshot.build(nodes)
    batched = one_by_one
    upserts: list[PlacedAllocation] = []
    removals: list[str] = []
    for step, op in enumerate(ops):
        if isinstance(op, int):
            if not one_by_one.allocations:
                continue
            victim = sorted(one_by_one.allocations)[op % len(one_by_one.allocations)]
            one_by_one = one_by_one.without_allocation(victim)
            upserts = [a for a in upserts if a.allocation_id != victim]
            removals.append(victim)
        else:
            decision = place(op, one_by_one, strategies=STRATEGIES)
            if isinstance(decision, NoFit):
                continue
            placed = decision.as_allocation(f"a{step}")
            one_by_one = one_by_one.with_allocation(placed)
            upserts.append(placed)
        if step % 3 == 2:  # flush every few steps, as watch responses arrive
            batched = batched.with_changes(upserts, removals)
            upserts, removals = [], []
    batched = batched.with_changes(upserts, removals)
    assert same(batched, one_by_one)


def _gpu(node: str, index: int) -> Gpu:
    return Gpu(f"{node}-{index}", node, index, "0000:01:00.0", "MI300X", 1000, 10)


def test_with_allocation_replaces_a_record_with_the_same_id() -> None:
    snapshot = ClusterSnapshot.build([Node("n", (_gpu("n", 0),))])
    first = PlacedAllocation("a", "n", (GpuShare("n-0", 300, 100),))
    second = PlacedAllocation("a", "n", (GpuShare("n-0", 500, 200),))
    after = snapshot.with_allocation(first).with_allocation(second)
    assert after.usage[0].allocated_millis == 500
    assert after.usage[0].holders == 1
    assert snapshot.usage[0].allocated_millis == 0, "snapshots are never changed in place"


def test_allocations_on_vanished_gpus_are_kept_but_count_nowhere() -> None:
    gone = PlacedAllocation("a", "n", (GpuShare("gone", 300, 100),))
    snapshot = ClusterSnapshot.build([Node("n", (_gpu("n", 0),))], [gone])
    assert "a" in snapshot.allocations
    assert snapshot.usage[0].allocated_millis == 0
    assert dict(snapshot.without_allocation("a").allocations) == {}


def test_duplicate_gpu_uuids_are_refused() -> None:
    gpu = _gpu("n", 0)
    with pytest.raises(ValueError, match="unique"):
        ClusterSnapshot.build([Node("n", (gpu,)), Node("m", (gpu,))])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.data())
def test_telemetry_updates_equal_a_snapshot_built_with_the_final_readings(
    nodes: list[Node], data: st.DataObject
) -> None:
    """Readings arrive in batches (some forgotten again); the load index must end up as if
    the snapshot had been built with the last readings, placements included."""
    uuids = [gpu.uuid for node in nodes for gpu in node.gpus]
    snapshot = ClusterSnapshot.build(nodes)
    for request in data.draw(st.lists(requests(), max_size=4)):
        decision = place(request, snapshot, strategies=STRATEGIES)
        if not isinstance(decision, NoFit):
            snapshot = snapshot.with_allocation(decision.as_allocation(f"a-{request.request_id}"))
    batches = data.draw(
        st.lists(
            st.dictionaries(st.sampled_from(uuids), st.none() | telemetry_readings, max_size=4),
            max_size=6,
        )
    )
    final: dict[str, Telemetry] = {}
    for batch in batches:
        snapshot = snapshot.with_telemetry(batch)
        for uuid, reading in batch.items():
            if reading is None:
                final.pop(uuid, None)
            else:
                final[uuid] = reading
    rebuilt = ClusterSnapshot.build(nodes, snapshot.allocations.values(), final)
    assert dict(snapshot.telemetry) == final
    assert same(snapshot, rebuilt)


def test_a_fold_of_many_readings_at_once_equals_a_fresh_build() -> None:
    """More moved GPUs than BULK_CHANGES rebuild the load order instead of editing it."""
    nodes = synthetic_nodes(24, 8)
    uuids = [gpu.uuid for node in nodes for gpu in node.gpus]
    assert len(uuids) > BULK_CHANGES
    snapshot = ClusterSnapshot.build(nodes)
    for n, request in enumerate(AllocationRequest(f"r{n}", fraction_millis=250) for n in range(40)):
        decision = place(request, snapshot)
        assert not isinstance(decision, NoFit)
        snapshot = snapshot.with_allocation(decision.as_allocation(f"a{n}"))
    readings = {
        uuid: Telemetry(gfx_activity_percent=(7 * n) % 101, socket_power_w=100.0 + n)
        for n, uuid in enumerate(uuids)
    }
    folded = snapshot.with_telemetry(readings).with_telemetry({uuids[0]: None, uuids[5]: None})
    final = {u: r for u, r in readings.items() if u not in (uuids[0], uuids[5])}
    assert same(folded, ClusterSnapshot.build(nodes, snapshot.allocations.values(), final))
    assert [pos for _, pos in folded.shared_index.by_load] != [
        pos for _, pos in snapshot.shared_index.by_load
    ]
