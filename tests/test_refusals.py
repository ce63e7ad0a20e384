"""A refusal explained from class counts says exactly what a check of every GPU says."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiwo_gpu.common.models import AllocationRequest, Health, Selector
from kaiwo_gpu.coordinator.local.synthetic import synthetic_nodes
from kaiwo_gpu.coordinator.placement.cluster import GpuShare, Node, PlacedAllocation
from kaiwo_gpu.coordinator.placement.engine import NoFit, place
from kaiwo_gpu.coordinator.placement.refusals import explain
from kaiwo_gpu.coordinator.placement.rules import Reason, check_gpu
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot

from .cluster_strategies import STRATEGIES, clusters, operations, released, requests


def scanned(request: AllocationRequest, snapshot: ClusterSnapshot) -> dict[Reason, int]:
    """The reference: every GPU checked in full, the first reason it fails counted."""
    counts: Counter[Reason] = Counter()
    fitting: Counter[str] = Counter()
    for pos in range(len(snapshot.gpus)):
        verdict = check_gpu(request, snapshot, pos)
        if isinstance(verdict, Reason):
            counts[verdict] += 1
        else:
            fitting[snapshot.gpus[pos].node] += 1
    if fitting:
        counts[Reason.TOO_FEW_ON_NODE] = sum(fitting.values())
    return dict(+counts)


@st.composite
def selectors(draw: st.DrawFn, nodes: list[Node]) -> Selector:
    names = [node.name for node in nodes]
    uuids = [gpu.uuid for node in nodes for gpu in node.gpus]
    some_names = st.frozensets(st.sampled_from([*names, "elsewhere"]), max_size=3)
    return Selector(
        node_labels=draw(st.sampled_from([(), (("zone", "a"),), (("zone", "b"),)])),
        gpu_models=draw(st.sampled_from([frozenset(), frozenset({"MI300X", "TINY"})])),
        nodes=draw(st.just(frozenset()) | some_names),
        exclude_nodes=draw(st.just(frozenset()) | some_names),
        exclude_gpus=draw(st.just(frozenset()) | st.frozensets(st.sampled_from(uuids), max_size=3)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), operations, st.data())
def test_counted_refusals_equal_a_scan_of_every_gpu(
    nodes: list[Node], ops: list[AllocationRequest | int], data: st.DataObject
) -> None:
    snapshot = ClusterSnapshot.build(nodes)
    for step, op in enumerate(ops):
        if isinstance(op, int):
            snapshot = released(snapshot, op)
            continue
        probe = replace(data.draw(requests(step)), selector=data.draw(selectors(nodes)))
        assert dict(explain(probe, snapshot).reasons) == scanned(probe, snapshot)
        decision = place(op, snapshot, strategies=STRATEGIES)
        if not isinstance(decision, NoFit):
            snapshot = snapshot.with_allocation(decision.as_allocation(f"a{step}"))


def test_a_full_cluster_refuses_with_every_reason_counted() -> None:
    nodes = synthetic_nodes(4, 8)
    sick = replace(nodes[0].gpus[0], health=Health.UNHEALTHY)
    nodes[0] = replace(nodes[0], gpus=(sick, *nodes[0].gpus[1:]))
    nodes[1] = replace(nodes[1], schedulable=False)
    snapshot = ClusterSnapshot.build(nodes)
    for serial in range(200):
        decision = place(AllocationRequest(f"fill-{serial}", fraction_millis=700), snapshot)
        if isinstance(decision, NoFit):
            break
        snapshot = snapshot.with_allocation(decision.as_allocation(f"a{serial}"))
    refusal = explain(AllocationRequest("big", fraction_millis=500), snapshot)
    assert dict(refusal.reasons) == {
        Reason.NODE_UNSCHEDULABLE: 8,
        Reason.UNHEALTHY: 1,
        Reason.LACKS_MILLIS: 23,
    }
    assert refusal.message == (
        "no GPU can take 0.5 of a GPU: 8 are on unschedulable nodes, 1 are unhealthy, "
        "23 lack compute share"
    )
    # A node list is judged on its own GPUs; the rest fail the selector.
    only_zero = AllocationRequest(
        "mine", fraction_millis=500, selector=Selector(nodes=frozenset({nodes[0].name}))
    )
    assert dict(explain(only_zero, snapshot).reasons) == {
        Reason.SELECTOR: 24,
        Reason.UNHEALTHY: 1,
        Reason.LACKS_MILLIS: 7,
    }


def test_a_record_granting_no_millis_still_holds_its_gpu() -> None:
    """A record may state 0 millis (the wire allows it); it must count as a holder for the
    whole-GPU shortcuts exactly as the full check sees it (found by review)."""
    nodes = synthetic_nodes(1, 2)
    gpu = nodes[0].gpus[0]
    for memory in (0, 1024):
        odd = PlacedAllocation("odd", gpu.node, (GpuShare(gpu.uuid, 0, memory),))
        snapshot = ClusterSnapshot.build(nodes, [odd])
        assert snapshot.free_millis(0) < 1000, "a holder takes at least one milli"
        request = AllocationRequest("r", count=2, memory_mib=gpu.vram_mib)
        assert dict(explain(request, snapshot).reasons) == scanned(request, snapshot)
        decision = place(request, snapshot)
        assert isinstance(decision, NoFit)
        assert dict(decision.reasons) == scanned(request, snapshot)
