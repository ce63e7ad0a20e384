"""The AllocationService over gRPC: validate at the edge, call the allocator, map errors.

Every `KaiwoGpuError` becomes the gRPC status it names, with its message; anything else is
logged and answered INTERNAL without internals. Records leave through `for_client`, which
adds what is derived from them (the grant's environment, the latest expiry known).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import structlog

from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import KaiwoGpuError, UnavailableError
from kaiwo_gpu.common.wire import request_from_proto
from kaiwo_gpu.coordinator.allocator import Allocator
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
Handler = Callable[[Any, Request, Context], Awaitable[Reply]]


def _mapped_errors(handler: Handler[Request, Reply]) -> Handler[Request, Reply]:
    """Answers a `KaiwoGpuError` with its status and message, anything else with INTERNAL."""
    rpc = handler.__name__

    @functools.wraps(handler)
    async def answer(servicer: Any, request: Request, context: Context) -> Reply:
        try:
            return await handler(servicer, request, context)
        except KaiwoGpuError as error:
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
        space_warning: Callable[[], str] = lambda: "",
    ) -> None:
        self.allocator = allocator
        self.view = view
        self._space_warning = space_warning
        self._watchers = WatcherSlots()

    async def _shown(self, records: Sequence[types_pb2.Allocation]) -> list[types_pb2.Allocation]:
        """Records as clients see them, each with the latest expiry known or asked of etcd
        (a lease renewed through another coordinator, or before a restart)."""
        expiries = await self.allocator.leases.expiries(records)
        return [for_client(r, e) for r, e in zip(records, expiries, strict=True)]

    @_mapped_errors
    async def Allocate(
        self,
        request: allocation_pb2.AllocateRequest,
        context: Context,
    ) -> allocation_pb2.AllocateResponse:
        counted = self.allocator.instruments.requests
        try:
            parsed = request_from_proto(request.request)
            record, replayed = await self.allocator.allocate(parsed)
        except KaiwoGpuError as error:
            counted.labels(*request_outcome(error)).inc()
            raise
        counted.labels(*request_outcome(None, replayed)).inc()
        log.info(
            "allocated",
            request_id=parsed.request_id,
            allocation_id=record.id,
            node=record.node,
            replayed=replayed,
        )
        (shown,) = await self._shown([record])
        return allocation_pb2.AllocateResponse(allocation=shown, replayed=replayed)

    @_mapped_errors
    async def Release(
        self,
        request: allocation_pb2.ReleaseRequest,
        context: Context,
    ) -> allocation_pb2.ReleaseResponse:
        counted = self.allocator.instruments.releases
        try:
            record = await self.allocator.release(check_allocation_id(request.allocation_id))
        except KaiwoGpuError as error:
            counted.labels("not_found" if error.status_code == "NOT_FOUND" else "failed").inc()
            raise
        counted.labels("released").inc()
        log.info("released", allocation_id=record.id, node=record.node)
        return allocation_pb2.ReleaseResponse(allocation=for_client(record))

    @_mapped_errors
    async def KeepAlive(
        self,
        request: allocation_pb2.KeepAliveRequest,
        context: Context,
    ) -> allocation_pb2.KeepAliveResponse:
        expires_at, ttl_s = await self.allocator.keep_alive(
            check_allocation_id(request.allocation_id)
        )
        return allocation_pb2.KeepAliveResponse(expires_at=timestamp(expires_at), ttl_seconds=ttl_s)

    @_mapped_errors
    async def GetAllocation(
        self,
        request: allocation_pb2.GetAllocationRequest,
        context: Context,
    ) -> allocation_pb2.GetAllocationResponse:
        allocation_id = check_allocation_id(request.allocation_id)
        await self.allocator.caught_up()
        record, _ = await self.allocator.record(allocation_id)
        expires_at = await self.allocator.leases.current_expiry(record)
        return allocation_pb2.GetAllocationResponse(allocation=for_client(record, expires_at))

    @_mapped_errors
    async def ListAllocations(
        self,
        request: allocation_pb2.ListAllocationsRequest,
        context: Context,
    ) -> allocation_pb2.ListAllocationsResponse:
        await self.allocator.caught_up()
        page, token = list_allocations(self.view.state, request)
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
        address = peer_address(context.peer())
        refused = self._watchers.take(address)
        if refused is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            await self._watch(request, context)
        finally:
            self._watchers.give_back(address)

    async def _watch(
        self, request: allocation_pb2.WatchAllocationsRequest, context: Context
    ) -> None:
        await self.allocator.caught_up()
        # Subscribe and copy the current state in one step (no await between), so no
        # change can fall between the dump and the stream.
        subscription = self.view.subscribe()
        state = self.view.state
        current = [
            (record, state.allocation_revisions[allocation_id])
            for allocation_id, record in sorted(state.allocations.items())
            if matches(record, request.owner, request.node, {})
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
                elif matches(queued.allocation, request.owner, request.node, {}):
                    (allocation,) = await self._shown([queued.allocation])
                    await _write(
                        context,
                        allocation_pb2.AllocationEvent(
                            kind=queued.kind, allocation=allocation, revision=queued.revision
                        ),
                    )
        finally:
            self.view.unsubscribe(subscription)

    @_mapped_errors
    async def ListNodes(
        self,
        request: allocation_pb2.ListNodesRequest,
        context: Context,
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

    @_mapped_errors
    async def GetClusterStats(
        self,
        request: allocation_pb2.GetClusterStatsRequest,
        context: Context,
    ) -> allocation_pb2.GetClusterStatsResponse:
        await self.allocator.caught_up()
        return cluster_stats(self.view.state, self._space_warning())

    @_mapped_errors
    async def RemoveNode(
        self,
        request: allocation_pb2.RemoveNodeRequest,
        context: Context,
    ) -> allocation_pb2.RemoveNodeResponse:
        """Anyone may remove a node that nothing uses (until identity makes it admin's)."""
        name = names.check_node_name(request.node, "node")
        await self.allocator.caught_up()
        record = await remove_node(self.allocator.store, self.view, name)
        log.info("node removed", node=name, gpus=len(record.gpus))
        return allocation_pb2.RemoveNodeResponse(node=record)
