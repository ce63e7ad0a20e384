"""Answers to the read RPCs (list, nodes, stats), read off the view's state as it is (pure)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import Health
from kaiwo_gpu.common.units import MILLIS_PER_GPU
from kaiwo_gpu.common.wire import health_to_proto
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.state.agent_reports import NodeReport
from kaiwo_gpu.coordinator.state.records import timestamp
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

DEFAULT_PAGE_SIZE = 500
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
"""The largest values the answers' counters hold: sums over records etcd holds are clamped
to them, so no record, however wrong, can fail a read for everyone."""
MAX_PAGE_SIZE = 5000


def matches(record: types_pb2.Allocation, owner: str, node: str, labels: Mapping[str, str]) -> bool:
    if owner and record.request.owner != owner:
        return False
    if node and record.node != node:
        return False
    return all(record.request.labels.get(k) == v for k, v in labels.items())


def _everything(record: types_pb2.Allocation) -> bool:
    return True


def list_allocations(
    state: ViewState,
    query: allocation_pb2.ListAllocationsRequest,
    visible: Callable[[types_pb2.Allocation], bool] = _everything,
) -> tuple[list[types_pb2.Allocation], str]:
    """One page of the stored records the caller may see, in id order, and the token of the
    next page ("" at the end: the token is the last id of this page)."""
    if query.page_size > MAX_PAGE_SIZE:
        raise InvalidArgumentError("page_size", query.page_size, f"0-{MAX_PAGE_SIZE}")
    size = query.page_size or DEFAULT_PAGE_SIZE
    if query.page_token:  # a token is the last id of the page before; garbage is an error
        names.check_allocation_id(query.page_token, "page_token")
    chosen = sorted(
        (
            record
            for allocation_id, record in state.allocations.items()
            if allocation_id > query.page_token
            and matches(record, query.owner, query.node, query.labels)
            and visible(record)
        ),
        key=lambda record: record.id,
    )
    page = chosen[:size]
    return page, page[-1].id if len(chosen) > size else ""


def node_statuses(
    nodes: Mapping[str, types_pb2.NodeStatus],
    snapshot: ClusterSnapshot,
    labels: Mapping[str, str],
    reports: Mapping[str, NodeReport],
) -> Iterable[types_pb2.NodeStatus]:
    """Nodes as placement sees them (a node whose agent is gone is unschedulable), with
    usage per GPU and the latest telemetry this coordinator received from its agent."""
    for name in sorted(nodes):
        record = nodes[name]
        if any(record.labels.get(k) != v for k, v in labels.items()):
            continue
        status = types_pb2.NodeStatus()
        status.CopyFrom(record)
        placed = snapshot.nodes.get(name)
        if placed is not None:
            status.schedulable = placed.schedulable
            status.unschedulable_reason = placed.unschedulable_reason
        else:
            status.schedulable = False
            status.unschedulable_reason = "its GPU UUIDs clash with another node's"
        report = reports.get(name)
        if report is not None:
            status.last_seen.CopyFrom(timestamp(report.received_at))
        for gpu_status in status.gpus:
            if report is not None and (sample := report.samples.get(gpu_status.inventory.uuid)):
                gpu_status.telemetry.CopyFrom(sample.telemetry)
            pos = snapshot.position.get(gpu_status.inventory.uuid)
            if pos is None or snapshot.gpus[pos].node != name:
                continue  # not placed, or placed as another node's (a UUID clash)
            gpu = snapshot.gpus[pos]
            usage = snapshot.usage[pos]
            gpu_status.health = health_to_proto(gpu.health)
            # Clamped: one over-granted GPU must not fail the answer for the whole cluster.
            gpu_status.allocated_millis = min(usage.allocated_millis, UINT32_MAX)
            gpu_status.allocated_memory_mib = min(usage.allocated_memory_mib, UINT64_MAX)
            gpu_status.free_millis = max(0, MILLIS_PER_GPU - usage.allocated_millis)
            gpu_status.free_memory_mib = max(0, gpu.vram_mib - usage.allocated_memory_mib)
            gpu_status.free_compute_units = snapshot.free_compute_units(pos)
            gpu_status.allocation_count = min(usage.holders, UINT32_MAX)
            gpu_status.overcommit = usage.excess_over(gpu.vram_mib, gpu.compute_units)
        yield status


def cluster_stats(
    state: ViewState, etcd_space_warning: str = ""
) -> allocation_pb2.GetClusterStatsResponse:
    snapshot = state.snapshot
    by_strategy = Counter(record.strategy for record in state.allocations.values())
    return allocation_pb2.GetClusterStatsResponse(
        node_count=len(snapshot.nodes),
        schedulable_node_count=sum(1 for node in snapshot.nodes.values() if node.schedulable),
        gpu_count=len(snapshot.gpus),
        healthy_gpu_count=sum(1 for gpu in snapshot.gpus if gpu.health is Health.HEALTHY),
        capacity_millis=len(snapshot.gpus) * MILLIS_PER_GPU,
        allocated_millis=min(UINT64_MAX, snapshot.allocated_millis()),
        capacity_memory_mib=min(UINT64_MAX, sum(gpu.vram_mib for gpu in snapshot.gpus)),
        allocated_memory_mib=min(
            UINT64_MAX, sum(usage.allocated_memory_mib for usage in snapshot.usage)
        ),
        allocation_count=len(state.allocations),
        allocations_by_strategy=dict(by_strategy),
        etcd_space_warning=etcd_space_warning,
    )
