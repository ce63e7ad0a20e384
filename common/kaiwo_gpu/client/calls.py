"""The coordinator calls both clients make: each one's message, what of its reply the caller
gets, and its retry rules; and the paging of a listing.

The clients pass these to their one call loop, so a call is built and read the same way
whether it goes over grpc or grpc.aio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from google.protobuf.message import Message

from kaiwo_gpu.client.retries import AlreadyDone, GiveUp
from kaiwo_gpu.common import names
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.common.wire import request_to_proto
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

ReplyT = TypeVar("ReplyT")
ResultT = TypeVar("ResultT")
LIST_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Call(Generic[ReplyT, ResultT]):
    """One call: the message, what the caller gets from the reply, and its own time limit
    (None: the client's). `result_if_done_before` is for a release only: what it returns
    when a retry finds NOT_FOUND after an attempt that may have released it already."""

    message: Message
    result: Callable[[ReplyT], ResultT]
    timeout_s: float | None = None
    result_if_done_before: Callable[[], ResultT] | None = None

    def outcome(self, decision: GiveUp | AlreadyDone) -> ResultT:
        """What the call ends in when the retry rules stop it: its error, raised, or the
        result of a release an earlier attempt had done."""
        if isinstance(decision, AlreadyDone) and self.result_if_done_before is not None:
            return self.result_if_done_before()
        raise decision.error


def allocate(
    request: AllocationRequest, session: str = ""
) -> Call[allocation_pb2.AllocateResponse, types_pb2.Allocation]:
    """`session` ("" for none): the allocations of one session and TTL share a lease."""
    message = allocation_pb2.AllocateRequest(request=request_to_proto(request))
    if session:
        message.request.session = names.check_request_id(session, "session")
    return Call(message, lambda reply: reply.allocation)


def release(
    allocation_id: str, timeout_s: float | None
) -> Call[allocation_pb2.ReleaseResponse, types_pb2.Allocation | None]:
    message = allocation_pb2.ReleaseRequest(allocation_id=allocation_id)
    return Call(message, lambda reply: reply.allocation, timeout_s, lambda: None)


def keep_alive(
    allocation_id: str, timeout_s: float | None
) -> Call[allocation_pb2.KeepAliveResponse, datetime]:
    message = allocation_pb2.KeepAliveRequest(allocation_id=allocation_id)
    return Call(message, lambda reply: reply.expires_at.ToDatetime(), timeout_s)


def get(allocation_id: str) -> Call[allocation_pb2.GetAllocationResponse, types_pb2.Allocation]:
    message = allocation_pb2.GetAllocationRequest(allocation_id=allocation_id)
    return Call(message, lambda reply: reply.allocation)


def nodes(
    labels: Mapping[str, str],
) -> Call[allocation_pb2.ListNodesResponse, list[types_pb2.NodeStatus]]:
    message = allocation_pb2.ListNodesRequest(labels=dict(labels))
    return Call(message, lambda reply: list(reply.nodes))


def remove_node(node: str) -> Call[allocation_pb2.RemoveNodeResponse, types_pb2.NodeStatus]:
    """A node removal's NOT_FOUND is always an error, also after a retry: unlike an
    allocation id, a node name is typed by hand, and a typo must not read as "removed"."""
    message = allocation_pb2.RemoveNodeRequest(node=node)
    return Call(message, lambda reply: reply.node)


def stats() -> Call[allocation_pb2.GetClusterStatsResponse, allocation_pb2.GetClusterStatsResponse]:
    return Call(allocation_pb2.GetClusterStatsRequest(), lambda reply: reply)


def watch_message(owner: str, node: str) -> allocation_pb2.WatchAllocationsRequest:
    return allocation_pb2.WatchAllocationsRequest(owner=owner, node=node)


ListPage = Call[allocation_pb2.ListAllocationsResponse, allocation_pb2.ListAllocationsResponse]


class ListPages:
    """One listing, page by page, until the coordinator's page token runs out."""

    def __init__(self, owner: str, node: str, labels: Mapping[str, str]) -> None:
        self.found: list[types_pb2.Allocation] = []
        self.complete = False
        self._owner = owner
        self._node = node
        self._labels = dict(labels)
        self._token = ""

    def next_call(self) -> ListPage:
        message = allocation_pb2.ListAllocationsRequest(
            owner=self._owner,
            node=self._node,
            labels=self._labels,
            page_size=LIST_PAGE_SIZE,
            page_token=self._token,
        )
        return Call(message, lambda reply: reply)

    def add(self, reply: allocation_pb2.ListAllocationsResponse) -> None:
        self.found.extend(reply.allocations)
        self._token = reply.next_page_token
        self.complete = not self._token
