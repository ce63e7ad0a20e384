"""What the sync and asyncio clients share: settings, retry timing, error mapping, messages.

Both clients are thin I/O shells over these pieces, so they retry, time out and translate
errors the same way.
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import grpc
import structlog

from kaiwo_gpu.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    KaiwoGpuError,
    NotFoundError,
    error_from_status,
)
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.common.wire import request_to_proto
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

log = structlog.get_logger(__name__)

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


_IPV4_ADDRESS = re.compile(r"^(\d{1,3}\.){3}\d{1,3}:\d{1,5}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$")
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")


def coordinator_target(text: str, field: str = "coordinator") -> str:
    """A gRPC target from `host:port`, a gRPC URI, or a comma list (as agents take it).

    Several IPv4 addresses become one `ipv4:` target, so gRPC fails over between them; several
    names cannot (give one DNS name that resolves to every coordinator instead).
    """
    parts = [part.strip() for part in text.split(",") if part.strip()] if text else []
    if len(parts) == 1 and (parts[0].startswith(_GRPC_SCHEMES) or _HOST_PORT.match(parts[0])):
        return parts[0]
    if len(parts) > 1 and all(_IPV4_ADDRESS.match(part) for part in parts):
        return "ipv4:" + ",".join(parts)
    raise InvalidArgumentError(
        field,
        text,
        "host:port, a gRPC target (dns:///name:port) or IPv4 host:port,host:port,...",
    )


def client_settings(target: str | None, settings: ClientSettings | None) -> ClientSettings:
    """An explicit target wins, then the settings' target, then $KAIWO_GPU_COORDINATOR."""
    if settings is None:
        return ClientSettings(target=target or target_from_environment(os.environ))
    return replace(settings, target=target) if target else settings


def target_from_environment(environment: Mapping[str, str]) -> str:
    """$KAIWO_GPU_COORDINATOR when set and not empty, else the local default."""
    value = environment.get(COORDINATOR_VARIABLE, "").strip()
    return coordinator_target(value, f"${COORDINATOR_VARIABLE}") if value else DEFAULT_COORDINATOR


def retry_delays(policy: RetryPolicy, rng: random.Random) -> Iterator[float]:
    """Endless waits between attempts; the caller stops at its deadline."""
    ceiling = policy.initial_backoff_s
    while True:
        yield rng.uniform(0, ceiling)
        ceiling = min(policy.max_backoff_s, ceiling * policy.multiplier)


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def _status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Code and details of a failed call (a bare RpcError carries neither)."""
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return error.code(), error.details() or ""
    return grpc.StatusCode.UNKNOWN, ""


def may_have_reached_server(error: grpc.RpcError) -> bool:
    """False only when gRPC says it never connected, so the call cannot have taken effect."""
    return not _status(error)[1].startswith("failed to connect")


def error_from_rpc(error: grpc.RpcError) -> KaiwoGpuError:
    """The project's error for a failed call, carrying the server's own message."""
    code, details = _status(error)
    return error_from_status(code.name, details or f"the coordinator call failed ({code.name})")


def is_retryable(error: grpc.RpcError) -> bool:
    return _status(error)[0] in RETRYABLE_STATUSES


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


def keepalive_timeout_s(interval_s: float) -> float:
    """One renewal, retries included, may take until the next one is due: an answer that
    comes late still counts (a renewal the coordinator applied is not a failure)."""
    return interval_s


GRANT_VARIABLES = (
    "ROCR_VISIBLE_DEVICES",
    "HSA_CU_MASK",
    "KAIWO_GPU_ALLOCATION_ID",
    "KAIWO_GPU_NODE",
    "KAIWO_GPU_FRACTION_MILLIS",
    "KAIWO_GPU_MEMORY_LIMIT_MIB",
    "KAIWO_GPU_ISOLATION",
)
"""What a grant's environment may set; a new grant replaces all of them, so a mask or
device list inherited from another allocation never leaks into work started under this one."""


def launch_environment(
    inherited: Mapping[str, str], allocation: types_pb2.Allocation
) -> dict[str, str]:
    kept = {k: v for k, v in inherited.items() if k not in GRANT_VARIABLES}
    return {**kept, **allocation.environment}


def with_lease(request: AllocationRequest, default_ttl_s: int) -> AllocationRequest:
    """A held allocation needs a lease; keep the caller's TTL when it gave one."""
    if request.ttl_seconds is not None:
        return request
    return replace(request, ttl_seconds=default_ttl_s)


def quietly(action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Runs a log call or callback from a background thread or task; its failure (a closed
    stderr, a buggy callback) must not end the renewal or hide the loss."""
    try:
        action(*args, **kwargs)
    except Exception:  # nothing better to do with it from the background
        return


class Holding:
    """What a held allocation knows whoever renews it (a thread or a task): the grant, and
    whether its lease was lost and why."""

    def __init__(
        self,
        allocation: types_pb2.Allocation,
        on_lost: Callable[[str], None] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allocation = allocation
        self.lost_reason = ""
        self._on_lost = on_lost
        self._released = False
        self._clock = clock
        self._renewed_at = clock()  # when the last successful renewal (or the grant) was sent

    @property
    def id(self) -> str:
        return self.allocation.id

    @property
    def environment(self) -> dict[str, str]:
        return dict(self.allocation.environment)

    @property
    def lost(self) -> bool:
        return bool(self.lost_reason)

    def _renewal_failed(self, error: Exception) -> bool:
        """Notes a failed renewal; True when renewing is over (the lease is gone)."""
        if isinstance(error, NotFoundError | FailedPreconditionError):  # gone, or cannot renew
            self._lose(error.message)
            return True
        if isinstance(error, KaiwoGpuError):  # unreachable for now: the lease may outlast it
            ttl_s = self.allocation.request.ttl_seconds
            if ttl_s and self._clock() - self._renewed_at >= ttl_s:
                # etcd has dropped the lease by now, and the share may be someone else's.
                self._lose(f"no renewal succeeded for {ttl_s}s ({error.message})")
                return True
            reason = error.message
            quietly(log.warning, "lease renewal failed", allocation_id=self.id, reason=reason)
            return False
        self._lose(f"lease renewal stopped: {error!r}")  # e.g. the client was closed under it
        return True

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        quietly(log.warning, "allocation lost", allocation_id=self.id, reason=reason)
        if self._on_lost is not None:
            quietly(self._on_lost, reason)
