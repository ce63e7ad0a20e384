"""A bounded, seeded allocate/release load for the concurrency and restart tests.

Each client retries UNAVAILABLE and ABORTED with the same request_id (that is what makes
retries safe) and records what the coordinators said, for the audit to check against etcd.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import grpc

from kaiwo_gpu.v1 import allocation_pb2, types_pb2

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
Reply = TypeVar("Reply")
FRACTIONS = (100, 150, 250, 300, 500, 750, 1000)
MEMORIES = (0, 0, 1024, 8192, 32768)


@dataclass
class LoadResult:
    allocated: dict[str, str] = field(default_factory=dict)  # request_id -> allocation id
    released: set[str] = field(default_factory=set)
    refused: int = 0
    retries: int = 0
    operations: int = 0
    served_by: dict[int, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    @property
    def live(self) -> set[str]:
        return set(self.allocated.values()) - self.released


def _random_request(rng: random.Random, request_id: str) -> types_pb2.AllocationRequest:
    """Mostly time-shared fractions; some cu-mask, non-sharing and two-GPU requests."""
    kind = rng.random()
    message = types_pb2.AllocationRequest(
        request_id=request_id,
        fraction_millis=rng.choice(FRACTIONS),
        memory_mib=rng.choice(MEMORIES),
    )
    if kind < 0.2:
        message.isolation = types_pb2.ISOLATION_CU_MASK
    elif kind < 0.3:
        message.sharing = False
    elif kind < 0.35:
        message.count = 2
    return message


async def _with_retries(
    call: Callable[[], Awaitable[Reply]], result: LoadResult, deadline: float
) -> tuple[Reply | None, grpc.StatusCode | None]:
    """(reply, None) or (None, final status code); retries transient failures until deadline."""
    while True:
        try:
            return await call(), None
        except grpc.aio.AioRpcError as error:
            if error.code() in RETRYABLE and time.monotonic() < deadline:
                result.retries += 1
                await asyncio.sleep(0.05)
                continue
            return None, error.code()


async def run_client(
    worker: int,
    apis: Sequence[AllocationServiceAsyncStub],
    operations: int,
    result: LoadResult,
    *,
    seed: int,
    time_limit_s: float,
    pause_s: float = 0.0,
) -> None:
    rng = random.Random(seed * 1000 + worker)
    held: list[str] = []
    deadline = time.monotonic() + time_limit_s
    for op in range(operations):
        if time.monotonic() > deadline:
            return
        pick = rng.randrange(len(apis))
        api = apis[pick]
        result.operations += 1
        if held and rng.random() < 0.45:
            allocation_id = held.pop(rng.randrange(len(held)))
            release = allocation_pb2.ReleaseRequest(allocation_id=allocation_id)
            released, code = await _with_retries(
                functools.partial(api.Release, release), result, deadline
            )
            if released is not None or code is grpc.StatusCode.NOT_FOUND:
                # NOT_FOUND after a retry: the first attempt released it before failing.
                result.released.add(allocation_id)
            else:
                result.unexpected.append(f"release {allocation_id}: {code}")
        else:
            request_id = f"w{worker}-{op}"
            message = allocation_pb2.AllocateRequest(request=_random_request(rng, request_id))
            message.request.owner = f"worker-{worker}"
            reply, code = await _with_retries(
                functools.partial(api.Allocate, message), result, deadline
            )
            if reply is not None:
                result.allocated[request_id] = reply.allocation.id
                result.served_by[pick] = result.served_by.get(pick, 0) + 1
                held.append(reply.allocation.id)
            elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                result.refused += 1
            else:
                result.unexpected.append(f"allocate {request_id}: {code}")
        if pause_s:
            await asyncio.sleep(pause_s)
