"""The asyncio Python client: the blocking client's calls, awaitable, on one grpc.aio channel.

Retries, deadlines and errors follow the same rules (client_support); a held allocation's
lease is renewed by a task instead of a thread.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
import structlog

from kaiwo_gpu.client.blocking import CHANNEL_OPTIONS, as_request
from kaiwo_gpu.client.support import (
    DEFAULT_HELD_TTL_S,
    ClientSettings,
    Holding,
    allocate_message,
    client_settings,
    error_from_rpc,
    is_retryable,
    keepalive_interval_s,
    keepalive_timeout_s,
    list_message,
    may_have_reached_server,
    quietly,
    retry_delays,
    with_lease,
)
from kaiwo_gpu.common.errors import FailedPreconditionError, KaiwoGpuError, NotFoundError
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2

log = structlog.get_logger(__name__)
Reply = TypeVar("Reply")


class AsyncClient:
    """`async with AsyncClient("127.0.0.1:50051") as client: await client.allocate(...)`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        settings: ClientSettings | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = client_settings(target, settings)
        self._rng = rng or random.Random()
        self._clock = clock
        self._closed = False
        self._channel = grpc.aio.insecure_channel(self.settings.target, options=CHANNEL_OPTIONS)
        self._stub = allocation_pb2_grpc.AllocationServiceStub(self._channel)

    async def close(self) -> None:
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self,
        method: Callable[..., Awaitable[Reply]],
        message: object,
        *,
        timeout_s: float | None = None,
        retried: list[bool] | None = None,
    ) -> Reply:
        if self._closed:
            raise FailedPreconditionError("this client is closed")
        deadline = self._clock() + (timeout_s or self.settings.timeout_s)
        delays = retry_delays(self.settings.retry, self._rng)
        while True:
            try:
                return await method(message, timeout=max(0.001, deadline - self._clock()))
            except grpc.RpcError as error:
                pause = next(delays)
                if not is_retryable(error) or self._clock() + pause >= deadline:
                    raise error_from_rpc(error) from None
                if retried is not None and may_have_reached_server(error):
                    retried.append(True)
            await asyncio.sleep(pause)

    async def allocate(
        self, request: AllocationRequest | None = None, /, **fields: Any
    ) -> types_pb2.Allocation:
        message = allocate_message(as_request(request, fields))
        return (await self._call(self._stub.Allocate, message)).allocation

    async def release(
        self, allocation_id: str, *, timeout_s: float | None = None
    ) -> types_pb2.Allocation | None:
        """The released record, or None when a retried attempt had already released it."""
        retried: list[bool] = []
        message = allocation_pb2.ReleaseRequest(allocation_id=allocation_id)
        try:
            reply = await self._call(
                self._stub.Release, message, timeout_s=timeout_s, retried=retried
            )
            return reply.allocation
        except NotFoundError:
            if retried:
                return None
            raise

    async def keep_alive(self, allocation_id: str, *, timeout_s: float | None = None) -> datetime:
        message = allocation_pb2.KeepAliveRequest(allocation_id=allocation_id)
        reply = await self._call(self._stub.KeepAlive, message, timeout_s=timeout_s)
        return reply.expires_at.ToDatetime()

    async def get(self, allocation_id: str) -> types_pb2.Allocation:
        message = allocation_pb2.GetAllocationRequest(allocation_id=allocation_id)
        return (await self._call(self._stub.GetAllocation, message)).allocation

    async def list(
        self, *, owner: str = "", node: str = "", labels: Mapping[str, str] | None = None
    ) -> list[types_pb2.Allocation]:
        found: list[types_pb2.Allocation] = []
        token = ""
        while True:
            message = list_message(owner, node, labels or {}, token)
            reply = await self._call(self._stub.ListAllocations, message)
            found.extend(reply.allocations)
            token = reply.next_page_token
            if not token:
                return found

    async def nodes(
        self, *, labels: Mapping[str, str] | None = None
    ) -> builtins.list[types_pb2.NodeStatus]:
        message = allocation_pb2.ListNodesRequest(labels=dict(labels or {}))
        return list((await self._call(self._stub.ListNodes, message)).nodes)

    async def stats(self) -> allocation_pb2.GetClusterStatsResponse:
        return await self._call(self._stub.GetClusterStats, allocation_pb2.GetClusterStatsRequest())

    async def watch(
        self, *, owner: str = "", node: str = ""
    ) -> AsyncGenerator[allocation_pb2.AllocationEvent, None]:
        """Every current allocation as ADDED, then each change, until the caller stops."""
        message = allocation_pb2.WatchAllocationsRequest(owner=owner, node=node)
        stream = self._stub.WatchAllocations(message)
        try:
            async for event in stream:
                yield event
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            stream.cancel()

    def allocation(
        self,
        request: AllocationRequest | None = None,
        /,
        *,
        default_ttl_s: int = DEFAULT_HELD_TTL_S,
        on_lost: Callable[[str], None] | None = None,
        **fields: Any,
    ) -> AsyncHeldAllocation:
        """`async with client.allocation(fraction=0.5) as held: ...`: allocates on entry,
        renews the lease in a task and releases on exit, also when the body raises."""
        wanted = with_lease(as_request(request, fields), default_ttl_s)
        return AsyncHeldAllocation(self, wanted, on_lost)


class AsyncHeldAllocation(Holding):
    """An allocation placed on entry whose lease a task renews until release or exit."""

    def __init__(
        self,
        client: AsyncClient,
        request: AllocationRequest,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(types_pb2.Allocation(), on_lost)
        self.request = request
        self._client = client
        self._renewer: asyncio.Task[None] | None = None

    async def _renew(self, interval_s: float) -> None:
        failed = False
        while True:
            await asyncio.sleep(0.2 if failed else interval_s)
            sent_at = self._clock()
            try:
                await self._client.keep_alive(self.id, timeout_s=keepalive_timeout_s(interval_s))
            except Exception as error:
                if self._renewal_failed(error):
                    return
                failed = True
            else:
                self._renewed_at = sent_at
                failed = False

    async def release(self, *, timeout_s: float | None = None) -> None:
        """Stops renewing and releases; a lease that already lapsed is not an error.

        The renewal task is cancelled, not awaited, so a caller's own cancellation is never
        swallowed here.
        """
        if self._renewer is not None:
            self._renewer.cancel()
        if self._released or not self.allocation.id:
            return
        self._released = True
        with contextlib.suppress(NotFoundError):
            # Shielded: a caller cancelled on its way out still gets its share released.
            await asyncio.shield(self._client.release(self.id, timeout_s=timeout_s))

    async def __aenter__(self) -> AsyncHeldAllocation:
        sent_at = self._clock()
        self.allocation = await self._client.allocate(self.request)
        self._renewed_at = sent_at
        interval = keepalive_interval_s(self.allocation.request.ttl_seconds)
        self._renewer = asyncio.create_task(self._renew(interval), name=f"keepalive-{self.id}")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self.release()
        except KaiwoGpuError as failure:
            if kind is None:
                raise
            # The body's exception matters more than a failed release; the lease still lapses.
            quietly(log.warning, "release failed", allocation_id=self.id, reason=failure.message)
