"""Conversions between the records kept in etcd (v1 protobuf) and the engine's cluster model.

Records are the protobuf messages the API already speaks: a node is a `NodeStatus` without
usage, an allocation is the `Allocation` a client got back. Pure functions, no I/O.
"""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Isolation
from kaiwo_gpu.common.wire import (
    health_from_proto,
    isolation_from_proto,
    isolation_to_proto,
    moment_of,
    request_to_proto,
)
from kaiwo_gpu.coordinator.placement.cluster import (
    MAX_COMPUTE_UNITS,
    Gpu,
    GpuShare,
    Node,
    PlacedAllocation,
)
from kaiwo_gpu.coordinator.placement.engine import Placement
from kaiwo_gpu.coordinator.placement.environment import render_grant_environment
from kaiwo_gpu.v1 import types_pb2


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def node_from_record(record: types_pb2.NodeStatus) -> Node:
    gpus = tuple(
        Gpu(
            uuid=status.inventory.uuid,
            node=record.name,
            index=status.inventory.index,
            bdf=status.inventory.bdf,
            model=status.inventory.model,
            vram_mib=status.inventory.vram_mib,
            compute_units=status.inventory.compute_units,
            health=health_from_proto(status.health),
            health_reason=status.health_reason,
            compute_partition=status.inventory.compute_partition,
        )
        for status in record.gpus
    )
    return Node(
        name=record.name,
        gpus=gpus,
        labels=tuple(sorted(record.labels.items())),
        schedulable=record.schedulable,
        unschedulable_reason=record.unschedulable_reason,
    )


def placed_from_record(record: types_pb2.Allocation) -> PlacedAllocation:
    """What a stored allocation holds, read so that anything odd counts for more, not less.

    An isolation this version does not know blocks the GPU like `exclusive`, and a GPU named
    twice holds the sum: a record written by a newer or broken writer must never free
    capacity that someone else still holds.
    """
    try:
        isolation = isolation_from_proto(record.isolation)
    except InvalidArgumentError:
        isolation = Isolation.EXCLUSIVE
    sharing = record.request.sharing if record.request.HasField("sharing") else True
    blocks = not sharing or isolation in (Isolation.EXCLUSIVE, Isolation.PARTITION)
    shares: dict[str, GpuShare] = {}
    for grant in record.gpus:
        units = [cu for cu in grant.compute_units if cu < MAX_COMPUTE_UNITS]
        if len(units) < len(grant.compute_units):
            blocks = True  # a CU id no GPU has: hold the whole GPU rather than guess
        before = shares.get(grant.uuid, GpuShare(grant.uuid, 0, 0))
        shares[grant.uuid] = GpuShare(
            gpu_uuid=grant.uuid,
            millis=before.millis + grant.granted_millis,
            memory_mib=before.memory_mib + grant.granted_memory_mib,
            compute_units=(*before.compute_units, *units),
        )
    return PlacedAllocation(
        allocation_id=record.id,
        node=record.node,
        shares=tuple(shares.values()),
        isolation=isolation,
        sharing=not blocks,
    )


def allocation_record(
    request: AllocationRequest,
    placement: Placement,
    allocation_id: str,
    *,
    lease_id: int,
    created_at: datetime,
) -> types_pb2.Allocation:
    """The record committed to etcd (`for_client` adds what is derived from it).

    Its lease and expiry are filled in when the lease is granted, before the commit."""
    record = types_pb2.Allocation(
        id=allocation_id,
        request_id=request.request_id,
        request=request_to_proto(request),
        node=placement.node,
        gpus=[
            types_pb2.GpuGrant(
                uuid=grant.gpu.uuid,
                index=grant.gpu.index,
                bdf=grant.gpu.bdf,
                granted_millis=grant.millis,
                granted_memory_mib=grant.memory_mib,
                compute_units=grant.compute_units,
            )
            for grant in placement.grants
        ],
        isolation=isolation_to_proto(placement.isolation),
        isolation_note=placement.isolation_note,
        strategy=placement.strategy,
        state=types_pb2.ALLOCATION_STATE_ACTIVE,
        lease_id=lease_id,
        created_at=timestamp(created_at),
    )
    return record


def environment_of(record: types_pb2.Allocation) -> dict[str, str]:
    """The grant's environment, rendered from the record (it follows from the grant, so it
    is not stored; records written before this version still carry it, and get the same).
    A record of an isolation this version does not know keeps what it carries."""
    try:
        isolation = isolation_from_proto(record.isolation)
    except InvalidArgumentError:
        return dict(record.environment)
    devices = [
        (grant.index, grant.granted_millis, grant.granted_memory_mib, grant.compute_units)
        for grant in record.gpus
    ]
    return render_grant_environment(record.id, record.node, isolation, devices)


def for_client(
    record: types_pb2.Allocation, expires_at: datetime | None = None
) -> types_pb2.Allocation:
    """The record as the API answers with it: a copy with the derived fields filled in (the
    environment, and the latest expiry known when it is later than the grant's)."""
    shown = types_pb2.Allocation()
    shown.CopyFrom(record)
    shown.environment.clear()
    shown.environment.update(environment_of(record))
    if expires_at is not None:
        shown.expires_at.CopyFrom(timestamp(expires_at))
    elif shown.HasField("expires_at") and moment_of(shown.expires_at) is None:
        shown.ClearField("expires_at")  # no client could read it
    return shown


def same_request(stored: types_pb2.AllocationRequest, incoming: AllocationRequest) -> bool:
    """A retry must ask for the same thing; the stored request is already normalized."""
    return stored == request_to_proto(incoming)
