"""What a request_id already made, as the view knows it (pure).

A request_id makes at most one allocation per owner: a retry of the same request gets
that allocation back; the same id with another request, or from the same owner after the
allocation was released (its tombstone), is refused, so a late duplicate never makes a
second allocation nobody will release. Another owner's released allocation does not hold
the id: Slurm's ids are predictable, and whoever allocated and released one first must not
make the real job's prolog fail. A live allocation holds its id for everyone (ids are
one key in etcd), but its id is named only to its own owner.
"""

from __future__ import annotations

from kaiwo_gpu.common.errors import AlreadyExistsError, FailedPreconditionError
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.coordinator.state.records import same_request
from kaiwo_gpu.coordinator.state.view_state import ALL_OWNERS, Tombstone, ViewState, owner_tag
from kaiwo_gpu.v1 import types_pb2


def reusable(released: Tombstone, request: AllocationRequest) -> bool:
    """Whether a request may take a released id anew: only when other owners released it
    (an older tombstone, which names no owner, or one of too many, holds it for everyone)."""
    tags = released.owner_tags
    return bool(tags) and ALL_OWNERS not in tags and owner_tag(request.owner) not in tags


def replay_of(state: ViewState, request: AllocationRequest) -> types_pb2.Allocation | None:
    """The allocation `request` already made, None if it made none, or an error when its
    request_id may not be used for it (released, bound to a removed record, or reused)."""
    released = state.released_requests.get(request.request_id)
    if released is not None and not reusable(released, request):
        made = f" ({released.allocation_id})" if released.allocation_id else ""
        raise AlreadyExistsError(
            f"request_id {request.request_id!r} already made an allocation{made} for this "
            "owner, which has been released; use a new request_id"
        )
    orphaned = state.orphaned_request(request.request_id)
    if orphaned is not None:
        raise FailedPreconditionError(
            f"request_id {request.request_id!r} is still bound to allocation {orphaned}, "
            f"whose record was removed from etcd by hand; use a new request_id or delete "
            f"{state.layout.request(request.request_id).decode()}"
        )
    allocation_id = state.allocation_by_request.get(request.request_id)
    record = state.allocations.get(allocation_id or "")
    if record is None:
        return None
    if record.request.owner != request.owner:  # named only to the owner who made it
        raise AlreadyExistsError(
            f"request_id {request.request_id!r} is in use by another owner; use a new request_id"
        )
    if not same_request(record.request, request):
        raise AlreadyExistsError(
            f"request_id {request.request_id!r} already made allocation {allocation_id} "
            "with a different request; use a new request_id"
        )
    return record
