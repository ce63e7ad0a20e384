"""The asyncio Python client: the blocking client's calls, awaitable, on one grpc.aio channel.

Retries, deadlines, errors and lease renewal follow the same rules (`retries`, `calls`,
`lease`); this module only performs them over grpc.aio, with a task renewing a held lease.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc

from kaiwo_gpu.client import calls
from kaiwo_gpu.client.calls import Call, ReplyT, ResultT
from kaiwo_gpu.client.core import CHANNEL_OPTIONS, ClientCore, stream_failures_translated
from kaiwo_gpu.client.holding import Holding
from kaiwo_gpu.client.lease import Renew, RenewalStep
from kaiwo_gpu.client.retries import Retry
from kaiwo_gpu.client.support import DEFAULT_HELD_TTL_S, ClientSettings, as_request, held_request
from kaiwo_gpu.common import channels
from kaiwo_gpu.common.errors import FailedPreconditionError, NotFoundError
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.v1 import allocation_pb2, types_pb2


class AsyncClient(ClientCore[grpc.aio.Channel]):
    """`async with AsyncClient("127.0.0.1:50051") as client: await client.allocate(...)`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        settings: ClientSettings | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            target,
            settings,
            rng,
            clock,
            lambda dialled, held: channels.open_aio_channel(dialled, held, CHANNEL_OPTIONS),
        )
        self._sleep = sleep

    async def close(self) -> None:
        self._closed = True
        for channel in self._open_channels():
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, rpc: str, call: Call[ReplyT, ResultT]) -> ResultT:
        """Performs `call` through the stub's method `rpc`, each attempt on the coordinator
        the client uses at that moment."""
        attempts = self._attempts(call)
        with self._traced(rpc) as span:
            while True:
                used, stub = self._coordinator()
                method: Callable[..., Awaitable[ReplyT]] = getattr(stub, rpc)
                try:
                    reply = await method(
                        call.message,
                        timeout=attempts.timeout_s(self._clock()),
                        metadata=self._metadata(),
                    )
                    return call.result(reply)
                except grpc.RpcError as error:
                    decision = self._after_failure(attempts, error, used, span)
                except ValueError:  # "Cannot invoke RPC on closed channel!": close() won
                    if self._closed:
                        raise FailedPreconditionError("this client is closed") from None
                    raise
                if not isinstance(decision, Retry):
                    return call.outcome(decision)
                await self._sleep(decision.pause_s)

    async def allocate(
        self,
        request: AllocationRequest | None = None,
        /,
        *,
        session: str | None = None,
        **fields: Any,
    ) -> types_pb2.Allocation:
        """Places a request; resending the same request_id returns the same allocation.

        It shares one lease with the client's other allocations of its TTL (`session`:
        the client's own unless given; "" for a lease of its own), so they lapse together
        when this process stops renewing them."""
        call = calls.allocate(as_request(request, fields), self._session_for(session))
        return await self._run("Allocate", call)

    async def release(
        self, allocation_id: str, *, timeout_s: float | None = None
    ) -> types_pb2.Allocation | None:
        """The released record, or None when a retried attempt had already released it."""
        return await self._run("Release", calls.release(allocation_id, timeout_s))

    async def keep_alive(self, allocation_id: str, *, timeout_s: float | None = None) -> datetime:
        """Renews the lease; returns when it will expire."""
        return await self._run("KeepAlive", calls.keep_alive(allocation_id, timeout_s))

    async def get(self, allocation_id: str) -> types_pb2.Allocation:
        return await self._run("GetAllocation", calls.get(allocation_id))

    async def list(
        self, *, owner: str = "", node: str = "", labels: Mapping[str, str] | None = None
    ) -> list[types_pb2.Allocation]:
        """Every matching allocation, all pages."""
        pages = calls.ListPages(owner, node, labels or {})
        while not pages.complete:
            pages.add(await self._run("ListAllocations", pages.next_call()))
        return pages.found

    async def nodes(
        self, *, labels: Mapping[str, str] | None = None
    ) -> builtins.list[types_pb2.NodeStatus]:
        return await self._run("ListNodes", calls.nodes(labels or {}))

    async def remove_node(self, node: str) -> types_pb2.NodeStatus:
        """Removes a node that has no agent and no allocations: the record as it was."""
        return await self._run("RemoveNode", calls.remove_node(node))

    async def stats(self) -> allocation_pb2.GetClusterStatsResponse:
        return await self._run("GetClusterStats", calls.stats())

    async def watch(
        self, *, owner: str = "", node: str = ""
    ) -> AsyncGenerator[allocation_pb2.AllocationEvent, None]:
        """Every current allocation as ADDED, then each change, until the caller stops; a
        stream that fails moves the client on, as a call does (watch again to follow it)."""
        used, stub = self._coordinator()
        stream = stub.WatchAllocations(calls.watch_message(owner, node), metadata=self._metadata())
        with stream_failures_translated(stream, lambda failure: self._moved_on(failure, used)):
            async for event in stream:
                yield event

    def allocation(
        self,
        request: AllocationRequest | None = None,
        /,
        *,
        default_ttl_s: int = DEFAULT_HELD_TTL_S,
        on_lost: Callable[[str], None] | None = None,
        **fields: Any,
    ) -> AsyncHeldAllocation:
        """Holds an allocation: `held = await client.allocation(fraction=0.5)` allocates at
        once, `async with client.allocation(fraction=0.5) as held:` on entry (and releases on
        exit, also when the body raises). A task renews the lease; `on_lost` is called if the
        lease is gone.
        """
        return AsyncHeldAllocation(self, held_request(request, fields, default_ttl_s), on_lost)


class AsyncHeldAllocation(Holding):
    """An allocation, placed when first awaited or entered, whose lease a task renews until
    `release()` or context exit."""

    def __init__(
        self,
        client: AsyncClient,
        request: AllocationRequest,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(on_lost, client._clock)
        self.request = request
        self._client = client
        self._renewer: asyncio.Task[None] | None = None
        self._placing = asyncio.Lock()

    def __await__(self) -> Generator[Any, None, AsyncHeldAllocation]:
        return self._placed().__await__()

    async def _placed(self) -> AsyncHeldAllocation:
        """Allocates the first time; awaiting or entering again returns the same holding (one
        allocation and one renewal task however many tasks await it), until it is released."""
        async with self._placing:
            self._check_not_released()
            if self._renewer is None:
                sent_at = self._clock()
                first = self._grant(await self._client.allocate(self.request), sent_at)
                self._renewer = asyncio.create_task(self._renew(first), name=f"keepalive-{self.id}")
        return self

    async def _renew(self, step: RenewalStep) -> None:
        while isinstance(step, Renew):
            await asyncio.sleep(step.after_s)
            sent_at = self._clock()
            try:
                await self._client.keep_alive(self.id, timeout_s=self._lease.renewal_timeout_s)
            except Exception as error:
                step = self._after_renewal(sent_at, error)
            else:
                step = self._after_renewal(sent_at, None)

    async def release(self, *, timeout_s: float | None = None) -> None:
        """Stops renewing and releases; a lease that already lapsed is not an error.

        The renewal task is cancelled, not awaited, so a caller's own cancellation is never
        swallowed here.
        """
        if self._renewer is not None:
            self._renewer.cancel()
        if self._lease.mark_released():
            with contextlib.suppress(NotFoundError):
                # Shielded: a caller cancelled on its way out still gets its share released.
                await asyncio.shield(self._client.release(self.id, timeout_s=timeout_s))

    async def __aenter__(self) -> AsyncHeldAllocation:
        return await self._placed()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._release_on_exit(body_raised=kind is not None):
            await self.release()
