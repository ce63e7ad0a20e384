"""No record etcd can hold fails a read for everyone.

Hypothesis writes node and allocation records with any values their fields can carry (VRAM
and compute units down to 0 and up to the field's limit, grants of more than a GPU has, CU
ids past its count, timestamps past what a datetime holds, isolations no version knows),
loads them into a view state, and sends the state through the conversion of every read
RPC: ListNodes, GetClusterStats, ListAllocations, and the record as Get, List, Watch and an
Allocate replay show it (with the expiry a coordinator derives). Each answer must serialize,
show no more free capacity than the GPU has, and flag every GPU granted more than it has.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from kaiwo_gpu.common.units import MILLIS_PER_GPU
from kaiwo_gpu.coordinator.api.queries import cluster_stats, list_allocations, node_statuses
from kaiwo_gpu.coordinator.leases import Leases
from kaiwo_gpu.coordinator.metrics import ScrapeView, view_families
from kaiwo_gpu.coordinator.state.changes import Change, Store
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.records import for_client
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

LAYOUT = KeyLayout("/reads/v1/")
UINT32 = 2**32 - 1
UINT64 = 2**64 - 1
UUIDS = ("gpu-a", "gpu-b", "gpu-c")

sizes = st.one_of(st.integers(0, 4), st.integers(0, UINT32))
memory = st.one_of(st.integers(0, 1 << 20), st.integers(0, UINT64))

gpu_statuses = st.builds(
    lambda uuid, index, vram, units: types_pb2.GpuStatus(
        inventory=types_pb2.GpuInventory(
            uuid=uuid, index=index, model="MI210", vram_mib=vram, compute_units=units
        )
    ),
    st.sampled_from(UUIDS),
    st.integers(0, 3),
    memory,
    st.one_of(st.integers(0, 400), st.integers(0, UINT32)),
)

node_records = st.builds(
    lambda name, gpus, schedulable: types_pb2.NodeStatus(
        name=name, gpus=gpus, schedulable=schedulable
    ),
    st.sampled_from(("node-a", "node-b")),
    st.lists(gpu_statuses, max_size=3),
    st.booleans(),
)

grants = st.builds(
    lambda uuid, millis, mib, units: types_pb2.GpuGrant(
        uuid=uuid, granted_millis=millis, granted_memory_mib=mib, compute_units=units
    ),
    st.sampled_from((*UUIDS, "gpu-elsewhere")),
    st.one_of(st.integers(0, 2 * MILLIS_PER_GPU), st.integers(0, UINT32)),
    memory,
    st.lists(st.one_of(st.integers(0, 500), st.integers(0, UINT32)), max_size=6),
)

timestamps = st.builds(
    lambda seconds, nanos: {"seconds": seconds, "nanos": nanos},
    st.one_of(st.integers(0, 4_000_000_000), st.integers(-(2**63), 2**63 - 1)),
    st.integers(-(2**31), 2**31 - 1),
)

allocation_records = st.builds(
    lambda n, node, gpus, isolation, lease, expiry: types_pb2.Allocation(
        id=f"a{n}",
        request_id=f"r{n}",
        node=node,
        gpus=gpus,
        isolation=isolation,
        lease_id=lease,
        expires_at=expiry,
    ),
    st.integers(0, 5),
    st.sampled_from(("node-a", "node-b", "node-gone")),
    st.lists(grants, max_size=3),
    st.integers(0, 9),
    st.one_of(st.just(0), st.integers(1, 2**63 - 1)),
    st.one_of(st.none(), timestamps),
)


def _state(nodes: list[types_pb2.NodeStatus], allocations: list[types_pb2.Allocation]) -> ViewState:
    changes = [
        Change(LAYOUT.node(node.name), node.SerializeToString(), revision)
        for revision, node in enumerate(nodes, start=2)
    ] + [
        Change(LAYOUT.allocation(record.id), record.SerializeToString(), revision)
        for revision, record in enumerate(allocations, start=100)
    ]
    state = ViewState.load(LAYOUT, 1, [])
    state.apply(1000, changes)
    return state


@settings(max_examples=150, deadline=None)
@given(st.lists(node_records, max_size=3), st.lists(allocation_records, max_size=6))
def test_every_read_answers_for_any_records(
    nodes: list[types_pb2.NodeStatus], allocations: list[types_pb2.Allocation]
) -> None:
    state = _state(nodes, allocations)
    listed = allocation_pb2.ListNodesResponse(
        nodes=list(node_statuses(state.nodes, state.snapshot, {}, {}))
    )
    listed.SerializeToString()
    for node in listed.nodes:
        for gpu in node.gpus:
            assert gpu.free_millis <= MILLIS_PER_GPU
            assert gpu.free_compute_units <= gpu.inventory.compute_units
            assert gpu.free_memory_mib <= gpu.inventory.vram_mib
            if gpu.allocated_millis > MILLIS_PER_GPU or (
                gpu.allocated_memory_mib > gpu.inventory.vram_mib
            ):
                assert gpu.overcommit, gpu
    cluster_stats(state).SerializeToString()

    # A scrape, as every node's agent streamed to this coordinator: OpenMetrics's strict
    # parser refuses a series written twice (a record naming a GPU twice once did that).
    scraped = ScrapeView(
        nodes=dict(state.nodes),
        snapshot=state.snapshot,
        reports={},
        allocations=tuple(state.allocations.values()),
        connected=frozenset(state.nodes),
        revision=state.revision,
        watch_up=True,
        blocked=False,
        space_warning=False,
        at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    text = "".join(family.text for family in view_families(scraped)) + "# EOF\n"
    list(openmetrics_families(text))  # type: ignore[no-untyped-call]

    page, _ = list_allocations(state, allocation_pb2.ListAllocationsRequest(page_size=100))
    assert len(page) == len(state.allocations)
    leases = Leases(cast(Store, None), clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    for record in page:  # as Get, List, Watch and a replay show it
        shown = for_client(record, leases.known_expiry(record))
        allocation_pb2.ListAllocationsResponse(allocations=[shown]).SerializeToString()
