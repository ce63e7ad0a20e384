"""Property tests: over random clusters and request streams, no strategy ever breaks a limit."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiwo_gpu.common.models import AllocationRequest, Health, Isolation
from kaiwo_gpu.common.units import MILLIS_PER_GPU, millis_for_compute_units, millis_for_memory
from kaiwo_gpu.coordinator.placement.cluster import Node, Telemetry
from kaiwo_gpu.coordinator.placement.engine import NoFit, Placement, Reason, check_gpu, place
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import SchedulerState

from .cluster_strategies import STRATEGIES, clusters, operations, released, requests, telemetry_for

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def assert_limits_hold(snapshot: ClusterSnapshot) -> None:
    """Recomputes every GPU's load from the allocations alone, not from derived usage."""
    millis: dict[str, int] = defaultdict(int)
    memory: dict[str, int] = defaultdict(int)
    units: dict[str, list[int]] = defaultdict(list)
    holders: dict[str, list[str]] = defaultdict(list)
    for allocation in snapshot.allocations.values():
        for share in allocation.shares:
            millis[share.gpu_uuid] += share.millis
            memory[share.gpu_uuid] += share.memory_mib
            units[share.gpu_uuid].extend(share.compute_units)
            holders[share.gpu_uuid].append(allocation.allocation_id)
    for gpu in snapshot.gpus:
        assert millis[gpu.uuid] <= MILLIS_PER_GPU, f"{gpu.uuid} over-committed in millis"
        assert memory[gpu.uuid] <= gpu.vram_mib, f"{gpu.uuid} over-committed in MiB"
        cus = units[gpu.uuid]
        assert len(cus) == len(set(cus)), f"{gpu.uuid} has a CU granted twice"
        assert all(0 <= cu < gpu.compute_units for cu in cus)
        ids = holders[gpu.uuid]
        blocking = [i for i in ids if snapshot.allocations[i].blocks_sharing]
        assert not blocking or len(ids) == 1, f"{gpu.uuid} shares a non-sharing allocation"
        masked = [i for i in ids if snapshot.allocations[i].isolation is Isolation.CU_MASK]
        assert not masked or len(masked) == len(ids), f"{gpu.uuid} mixes cu-mask and none"


def assert_placement_valid(
    request: AllocationRequest, snapshot: ClusterSnapshot, placement: Placement
) -> None:
    assert len(placement.grants) == request.count
    assert len({g.gpu.uuid for g in placement.grants}) == request.count
    assert {g.gpu.node for g in placement.grants} == {placement.node}
    node = snapshot.nodes[placement.node]
    assert node.schedulable
    assert node.has_labels(request.selector.node_labels)
    assert placement.node not in request.selector.exclude_nodes
    for grant in placement.grants:
        assert grant.gpu.health is not Health.UNHEALTHY
        if request.selector.gpu_models:
            assert grant.gpu.model in request.selector.gpu_models
        if request.fraction_millis is not None:
            assert grant.millis >= request.fraction_millis
        if request.memory_mib is not None:
            assert grant.memory_mib >= request.memory_mib
        if request.isolation is Isolation.CU_MASK:
            units = len(grant.compute_units)
            asked = request.fraction_millis or millis_for_memory(
                request.memory_mib or 0, grant.gpu.vram_mib
            )
            assert units * MILLIS_PER_GPU >= asked * grant.gpu.compute_units, "too few CUs"
            assert grant.millis == millis_for_compute_units(units, grant.gpu.compute_units)
        if request.isolation is Isolation.PARTITION:
            assert grant.gpu.is_partition
        if request.needs_idle_gpu:
            assert snapshot.usage[snapshot.position[grant.gpu.uuid]].holders == 0


def assert_no_fit_is_true(request: AllocationRequest, snapshot: ClusterSnapshot) -> None:
    """A refusal must be right: a full scan finds no node with `count` GPUs that fit."""
    fitting: dict[str, int] = defaultdict(int)
    for pos in range(len(snapshot.gpus)):
        if not isinstance(check_gpu(request, snapshot, pos), Reason):
            fitting[snapshot.gpus[pos].node] += 1
    assert all(n < request.count for n in fitting.values()), "the index missed a fitting node"


def run_stream(
    nodes: list[Node],
    ops: Sequence[AllocationRequest | int],
    telemetry: Mapping[str, Telemetry] | None = None,
) -> list[str]:
    snapshot = ClusterSnapshot.build(nodes, telemetry=telemetry or {})
    state = SchedulerState()
    trace: list[str] = []
    for step, op in enumerate(ops):
        if isinstance(op, int):
            snapshot = released(snapshot, op)
            continue
        decision = place(op, snapshot, state, STRATEGIES)
        again = place(op, snapshot, state, STRATEGIES)
        assert decision == again, "the engine is not deterministic"
        if isinstance(decision, NoFit):
            assert_no_fit_is_true(op, snapshot)
            assert decision.reasons, "a refusal must say why"
            trace.append(f"nofit {decision.message}")
            continue
        assert_placement_valid(op, snapshot, decision)
        snapshot = snapshot.with_allocation(decision.as_allocation(f"a{step}"))
        state = decision.state
        assert_limits_hold(snapshot)
        trace.append(f"{decision.node} {[g.gpu.index for g in decision.grants]}")
    return trace


@PROPERTY_SETTINGS
@given(clusters(), operations, st.data())
def test_no_strategy_breaks_a_limit(
    nodes: list[Node], ops: list[AllocationRequest | int], data: st.DataObject
) -> None:
    run_stream(nodes, ops, data.draw(telemetry_for(nodes)))


@PROPERTY_SETTINGS
@given(clusters(), operations, st.data())
def test_same_input_same_decisions(
    nodes: list[Node], ops: list[AllocationRequest | int], data: st.DataObject
) -> None:
    telemetry = data.draw(telemetry_for(nodes))
    assert run_stream(nodes, ops, telemetry) == run_stream(list(reversed(nodes)), ops, telemetry)


@PROPERTY_SETTINGS
@given(clusters(max_nodes=3, max_gpus=3), st.lists(requests(), min_size=1, max_size=25))
def test_filling_a_cluster_never_overcommits(
    nodes: list[Node], stream: list[AllocationRequest]
) -> None:
    """Without releases the cluster fills up: the refusals happen at the limits that matter."""
    run_stream(nodes, list(stream) * 3)
