"""What the sync and asyncio clients share: settings, retry timing, error mapping, messages.

Both clients are thin I/O shells over these pieces, so they retry, time out and translate
errors the same way.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import grpc

from kaiwo_gpu.common.errors import KaiwoGpuError, error_from_status
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.common.wire import request_to_proto
from kaiwo_gpu.v1 import allocation_pb2

DEFAULT_COORDINATOR = "127.0.0.1:50051"
COORDINATOR_VARIABLE = "KAIWO_GPU_COORDINATOR"
# A held allocation (context manager, `run`) always has a lease, so a holder that dies
# without releasing frees its share within this long.
DEFAULT_HELD_TTL_S = 120
# UNAVAILABLE: nothing was changed (or the change is replayed by request_id).
# ABORTED: the coordinator lost its conflict retries; the same request_id is safe to resend.
RETRYABLE_STATUSES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Full-jitter exponential backoff, bounded by the call's whole deadline."""

    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the coordinator is and how long one call may take, retries included."""

    target: str = DEFAULT_COORDINATOR
    timeout_s: float = 30.0
    retry: RetryPolicy = RetryPolicy()


def settings_from_environment(
    environment: Mapping[str, str], target: str | None = None, timeout_s: float | None = None
) -> ClientSettings:
    """An explicit target wins over $KAIWO_GPU_COORDINATOR, which wins over the default."""
    chosen = target or environment.get(COORDINATOR_VARIABLE) or DEFAULT_COORDINATOR
    if timeout_s is None:
        return ClientSettings(target=chosen)
    return ClientSettings(target=chosen, timeout_s=timeout_s)


def retry_delays(policy: RetryPolicy, rng: random.Random) -> Iterator[float]:
    """Endless waits between attempts; the caller stops at its deadline."""
    ceiling = policy.initial_backoff_s
    while True:
        yield rng.uniform(0, ceiling)
        ceiling = min(policy.max_backoff_s, ceiling * policy.multiplier)


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def error_from_rpc(error: grpc.RpcError) -> KaiwoGpuError:
    """The project's error for a failed call, carrying the server's own message."""
    code = error.code() if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
    details = error.details() if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
    name = code.name if code is not None else "UNKNOWN"
    return error_from_status(name, details or f"the coordinator call failed ({name})")


def is_retryable(error: grpc.RpcError) -> bool:
    return isinstance(error, grpc.Call | grpc.aio.AioRpcError) and (
        error.code() in RETRYABLE_STATUSES
    )


def allocate_message(request: AllocationRequest) -> allocation_pb2.AllocateRequest:
    return allocation_pb2.AllocateRequest(request=request_to_proto(request))


def list_message(
    owner: str, node: str, labels: Mapping[str, str], page_token: str
) -> allocation_pb2.ListAllocationsRequest:
    return allocation_pb2.ListAllocationsRequest(
        owner=owner, node=node, labels=dict(labels), page_size=1000, page_token=page_token
    )


def keepalive_interval_s(ttl_seconds: int) -> float:
    """A third of the lease, so two renewals in a row may fail before it lapses."""
    return max(0.5, min(60.0, ttl_seconds / 3))


def with_lease(request: AllocationRequest, default_ttl_s: int) -> AllocationRequest:
    """A held allocation needs a lease; keep the caller's TTL when it gave one."""
    if request.ttl_seconds is not None:
        return request
    return replace(request, ttl_seconds=default_ttl_s)
