"""The AllocationService over gRPC: validate at the edge, call the allocator, map errors.

Every `KaiwoGpuError` becomes the gRPC status it names, with its message; anything else is
logged and answered INTERNAL without internals. Records leave through `for_client`, which
adds what is derived from them (the grant's environment, the latest expiry known).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import grpc
import structlog

from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import KaiwoGpuError, UnavailableError
from kaiwo_gpu.common.identity import Identity
from kaiwo_gpu.common.wire import request_from_proto, session_from_proto
from kaiwo_gpu.coordinator.allocator import Allocator
from kaiwo_gpu.coordinator.api import permissions
from kaiwo_gpu.coordinator.api.callers import Callers, refused
from kaiwo_gpu.coordinator.api.queries import (
    cluster_stats,
    list_allocations,
    matches,
    node_statuses,
)
from kaiwo_gpu.coordinator.api.watchers import WatcherSlots, peer_address
from kaiwo_gpu.coordinator.instruments import request_outcome
from kaiwo_gpu.coordinator.state.node_removal import remove_node
from kaiwo_gpu.coordinator.state.records import for_client, timestamp
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2

log = structlog.get_logger(__name__)

Request = TypeVar("Request")
Reply = TypeVar("Reply")


def check_allocation_id(value: str) -> str:
    return names.check_allocation_id(value, "allocation_id")


Context = grpc.aio.ServicerContext[object, object]
Handler = Callable[[Any, Request, Context, Identity], Awaitable[Reply]]
Served = Callable[[Any, Request, Context], Awaitable[Reply]]


def _answered(handler: Handler[Request, Reply]) -> Served[Request, Reply]:
    """Identifies the caller for the handler, and answers a `KaiwoGpuError` with its status
    and message (a refusal logged with the caller), anything else with INTERNAL."""
    rpc = handler.__name__

    @functools.wraps(handler)
    async def answer(servicer: Any, request: Request, context: Context) -> Reply:
        caller: Identity | None = None
        try:
            caller = servicer.callers.identify(context)
            return await handler(servicer, request, context, caller)
        except KaiwoGpuError as error:
            refused(rpc, caller, error, context.peer())
            await context.abort(grpc.StatusCode[error.status_code], error.status_message)
        except Exception:
            log.exception("rpc failed", rpc=rpc)
            await context.abort(grpc.StatusCode.INTERNAL, f"{rpc} failed inside the coordinator")
        raise AssertionError("abort raises")  # pragma: no cover

    return answer


WATCH_WRITE_TIMEOUT_S = 10.0
"""How long an event may wait for its watcher to read before the watcher is ended."""


async def _write(context: Context, event: allocation_pb2.AllocationEvent) -> None:
    try:
        await asyncio.wait_for(context.write(event), WATCH_WRITE_TIMEOUT_S)
    except TimeoutError:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this watcher read nothing for {WATCH_WRITE_TIMEOUT_S:g}s; watch again to "
            "resynchronize",
        )


class AllocationServicer(allocation_pb2_grpc.AllocationServiceServicer):
    def __init__(
        self,
        allocator: Allocator,
        view: ClusterView,
        callers: Callers | None = None,
        space_warning: Callable[[], str] = lambda: "",
    ) -> None:
        self.allocator = allocator
        self.view = view
        self.callers = callers or Callers(None, client_certificates=False)
        self._space_warning = space_warning
        self._watchers = WatcherSlots()

    @staticmethod
    def _owned_by(caller: Identity, action: str) -> Callable[[types_pb2.Allocation], None]:
        """The check an allocation must pass before `caller` may `action` it."""
        return lambda record: permissions.check_owns(
            caller, record.request.owner, action, record.id
        )

    @staticmethod
    def _visible(caller: Identity) -> Callable[[types_pb2.Allocation], bool]:
        return lambda record: permissions.owns(caller, record.request.owner)

    async def _shown(self, records: Sequence[types_pb2.Allocation]) -> list[types_pb2.Allocation]:
        """Records as clients see them, each with the latest expiry known or asked of etcd
        (a lease renewed through another coordinator, or before a restart)."""
        expiries = await self.allocator.leases.expiries(records)
        return [for_client(r, e) for r, e in zip(records, expiries, strict=True)]

    @_answered
    async def Allocate(
        self,
        request: allocation_pb2.AllocateRequest,
        context: Context,
        caller: Identity,
    ) -> allocation_pb2.AllocateResponse:
        counted = self.allocator.instruments.requests
        try:
            asked = request_from_proto(request.request)
            session = session_from_proto(request.request)
            owner = permissions.owner_for(caller, asked.owner)
            # replace() validates the whole request again: only when the owner changes.
            parsed = asked if owner == asked.owner else replace(asked, owner=owner)
            # The session's lease is keyed by who is calling, so none can join another's.
            record, replayed = await self.allocator.allocate(
                parsed, holder=str(caller), session=session
            )
        except KaiwoGpuError as error:
            counted.labels(*request_outcome(error)).inc()
            raise
        counted.labels(*request_outcome(None, replayed)).inc()
        log.info(
            "allocated",
            identity=str(caller),
            owner=parsed.owner,
            request_id=parsed.request_id,
            allocation_id=record.id,
            node=record.node,
            replayed=replayed,
        )
        (shown,) = await self._shown([record])
        return allocation_pb2.AllocateResponse(allocation=shown, replayed=replayed)

    @_answered
    async def Release(
        self,
        request: allocation_pb2.ReleaseRequest,
        context: Context,
        caller: Identity,
    ) -> allocation_pb2.ReleaseResponse:
        counted = self.allocator.instruments.releases
        try:
            allocation_id = check_allocation_id(request.allocation_id)
            record = await self.allocator.release(
                allocation_id, check=self._owned_by(caller, "release")
            )
        except KaiwoGpuError as error:
            counted.labels("not_found" if error.status_code == "NOT_FOUND" else "failed").inc()
            raise
        counted.labels("released").inc()
        log.info(
            "released",
            identity=str(caller),
            owner=record.request.owner,
            allocation_id=record.id,
            node=record.node,
        )
        return allocation_pb2.ReleaseResponse(allocation=for_client(record))

    @_answered
    async def KeepAlive(
        self,
        request: allocation_pb2.KeepAliveRequest,
        context: Context,
        caller: Identity,
    ) -> allocation_pb2.KeepAliveResponse:
        expires_at, ttl_s = await self.allocator.keep_alive(
            check_allocation_id(request.allocation_id), check=self._owned_by(caller, "renew")
        )
        return allocation_pb2.KeepAliveResponse(expires_at=timestamp(expires_at), ttl_seconds=ttl_s)

    @_answered
    async def GetAllocation(
        self,
        request: allocation_pb2.GetAllocationRequest,
        context: Context,
        caller: Identity,
    ) -> allocation_pb2.GetAllocationResponse:
        allocation_id = check_allocation_id(request.allocation_id)
        await self.allocator.caught_up()
        record, _ = await self.allocator.record(allocation_id)
        self._owned_by(caller, "read")(record)
        expires_at = await self.allocator.leases.current_expiry(record)
        return allocation_pb2.GetAllocationResponse(allocation=for_client(record, expires_at))

    @_answered
    async def ListAllocations(
        self,
        request: allocation_pb2.ListAllocationsRequest,
        context: Context,
        caller: Identity,
    ) -> allocation_pb2.ListAllocationsResponse:
        permissions.check_listing(caller, request.owner)
        await self.allocator.caught_up()
        page, token = list_allocations(self.view.state, request, self._visible(caller))
        return allocation_pb2.ListAllocationsResponse(
            allocations=await self._shown(page), next_page_token=token
        )

    async def WatchAllocations(  # type: ignore[override]  # writes through context.write
        self,
        request: allocation_pb2.WatchAllocationsRequest,
        context: Context,
    ) -> None:
        """Every current allocation as ADDED, then changes as they happen. A renewal is not
        a change (it moves the lease alone): Get or List shows the later expiry. Watchers
        are admitted up to `WatcherSlots`' limits, and one that does not read its events
        (a write waits WATCH_WRITE_TIMEOUT_S) or falls SUBSCRIBER_QUEUE_LIMIT behind is
        ended with RESOURCE_EXHAUSTED: watch again to resynchronize."""
        caller: Identity | None = None
        try:
            caller = self.callers.identify(context)
            permissions.check_listing(caller, request.owner)
        except KaiwoGpuError as error:
            refused("WatchAllocations", caller, error, context.peer())
            await context.abort(grpc.StatusCode[error.status_code], error.status_message)
        assert caller is not None
        address = peer_address(context.peer())
        full = self._watchers.take(address)
        if full is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, full)
        try:
            await self._watch(request, context, caller)
        finally:
            self._watchers.give_back(address)

    async def _still_accepted(self, caller: Identity, context: Context) -> None:
        """Ends a watch whose caller's credentials are no longer accepted (a token taken
        out of the tokens file): it is identified again before each change it is sent."""
        try:
            now = self.callers.identify(context)
        except KaiwoGpuError as error:
            refused("WatchAllocations", caller, error, context.peer())
            await context.abort(grpc.StatusCode[error.status_code], error.status_message)
        if now != caller:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "this watch's credentials changed; watch again"
            )

    async def _watch(
        self,
        request: allocation_pb2.WatchAllocationsRequest,
        context: Context,
        caller: Identity,
    ) -> None:
        visible = self._visible(caller)
        await self.allocator.caught_up()
        # Subscribe and copy the current state in one step (no await between), so no
        # change can fall between the dump and the stream.
        subscription = self.view.subscribe()
        state = self.view.state
        current = [
            (record, state.allocation_revisions[allocation_id])
            for allocation_id, record in sorted(state.allocations.items())
            if matches(record, request.owner, request.node, {}) and visible(record)
        ]
        added = allocation_pb2.AllocationEvent.KIND_ADDED
        try:
            shown = await self._shown([record for record, _ in current])
            for allocation, (_, revision) in zip(shown, current, strict=True):
                await _write(
                    context,
                    allocation_pb2.AllocationEvent(
                        kind=added, allocation=allocation, revision=revision
                    ),
                )
            while True:
                queued = await subscription.queue.get()
                if queued is None:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "this watcher fell too far behind; watch again to resynchronize",
                    )
                elif matches(queued.allocation, request.owner, request.node, {}) and visible(
                    queued.allocation
                ):
                    await self._still_accepted(caller, context)
                    (allocation,) = await self._shown([queued.allocation])
                    await _write(
                        context,
                        allocation_pb2.AllocationEvent(
                            kind=queued.kind, allocation=allocation, revision=queued.revision
                        ),
                    )
        finally:
            self.view.unsubscribe(subscription)

    @_answered
    async def ListNodes(
        self,
        request: allocation_pb2.ListNodesRequest,
        context: Context,
        caller: Identity,
    ) -> allocation_pb2.ListNodesResponse:
        await self.allocator.caught_up()
        if not self.view.state.nodes and not self.view.connected:
            raise UnavailableError("the coordinator has not read the cluster from etcd yet")
        state = self.view.state
        return allocation_pb2.ListNodesResponse(
            nodes=list(
                node_statuses(
                    state.nodes, state.snapshot, request.labels, self.view.telemetry.reports
                )
            )
        )

    @_answered
    async def GetClusterStats(
        self,
        request: allocation_pb2.GetClusterStatsRequest,
        context: Context,
        caller: Identity,
    ) -> allocation_pb2.GetClusterStatsResponse:
        await self.allocator.caught_up()
        return cluster_stats(self.view.state, self._space_warning())

    @_answered
    async def RemoveNode(
        self,
        request: allocation_pb2.RemoveNodeRequest,
        context: Context,
        caller: Identity,
    ) -> allocation_pb2.RemoveNodeResponse:
        """An admin may remove a node that nothing uses."""
        permissions.check_admin(caller, "remove nodes")
        name = names.check_node_name(request.node, "node")
        await self.allocator.caught_up()
        record = await remove_node(self.allocator.store, self.view, name)
        log.info("node removed", identity=str(caller), node=name, gpus=len(record.gpus))
        return allocation_pb2.RemoveNodeResponse(node=record)
