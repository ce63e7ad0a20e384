"""A fake AllocationService that fails on cue, for retry and failure paths a real one won't hit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2


class FlakyCoordinator(allocation_pb2_grpc.AllocationServiceServicer):
    """Fails Allocate `failures` times with `status`, then places (the first call after
    `first_delay_s`), or, with `hang_after_failures`, never answers again; Release answers the
    codes in `release` in turn (the last repeats; OK when empty), and so does RemoveNode
    (counted with the releases); KeepAlive renews, or fails with `keepalive_status` when one
    is given."""

    def __init__(
        self,
        failures: int,
        status: grpc.StatusCode,
        release: list[grpc.StatusCode],
        *,
        keepalive_status: grpc.StatusCode | None = None,
        first_delay_s: float = 0.0,
        hang_after_failures: bool = False,
    ) -> None:
        self.failures = failures
        self.hang_after_failures = hang_after_failures
        self.status = status
        self.release = release
        self.keepalive_status = keepalive_status
        self.first_delay_s = first_delay_s
        self.request_ids: list[str] = []
        self.release_calls = 0
        self.keepalive_calls = 0

    async def Allocate(self, request: Any, context: Any) -> allocation_pb2.AllocateResponse:
        self.request_ids.append(request.request.request_id)
        if len(self.request_ids) == 1 and self.first_delay_s:
            await asyncio.sleep(self.first_delay_s)
        if len(self.request_ids) <= self.failures:
            await context.abort(self.status, "etcd is unavailable")
        if self.hang_after_failures:
            await asyncio.Event().wait()  # until the client gives up and the call is cancelled
        return allocation_pb2.AllocateResponse(
            allocation=types_pb2.Allocation(
                id="a1",
                request_id=request.request.request_id,
                request=request.request,
                node="node-a",
                gpus=[types_pb2.GpuGrant(uuid="gpu-0", index=0, granted_millis=500)],
                environment={"KAIWO_GPU_ALLOCATION_ID": "a1", "ROCR_VISIBLE_DEVICES": "0"},
            )
        )

    async def Release(self, request: Any, context: Any) -> allocation_pb2.ReleaseResponse:
        self.release_calls += 1
        if self.release:
            code = self.release[min(self.release_calls, len(self.release)) - 1]
            if code is not grpc.StatusCode.OK:
                await context.abort(code, f"release failed with {code.name}")
        return allocation_pb2.ReleaseResponse(allocation=types_pb2.Allocation(id="a1"))

    async def RemoveNode(self, request: Any, context: Any) -> allocation_pb2.RemoveNodeResponse:
        await self.Release(request, context)
        return allocation_pb2.RemoveNodeResponse(node=types_pb2.NodeStatus(name=request.node))

    async def KeepAlive(self, request: Any, context: Any) -> allocation_pb2.KeepAliveResponse:
        self.keepalive_calls += 1
        if self.keepalive_status is not None:
            await context.abort(self.keepalive_status, "etcd is unavailable")
        return allocation_pb2.KeepAliveResponse(ttl_seconds=60)


def flaky(
    *,
    failures: int = 0,
    status: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    release: list[grpc.StatusCode] | None = None,
    keepalive_status: grpc.StatusCode | None = None,
    first_delay_s: float = 0.0,
    hang_after_failures: bool = False,
) -> FlakyCoordinator:
    # Only the RPCs under test are implemented; the others are never called.
    return FlakyCoordinator(  # type: ignore[abstract]
        failures,
        status,
        release or [],
        keepalive_status=keepalive_status,
        first_delay_s=first_delay_s,
        hang_after_failures=hang_after_failures,
    )


@contextlib.asynccontextmanager
async def serving(servicer: FlakyCoordinator) -> AsyncIterator[str]:
    server = grpc.aio.server()
    allocation_pb2_grpc.add_AllocationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
