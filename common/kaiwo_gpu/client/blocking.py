"""The blocking Python client: allocate, hold, release and inspect GPU shares.

Every call retries UNAVAILABLE and ABORTED with the same request (so Allocate replays by
request_id) until its deadline, and failures come back as the project's error tree with the
coordinator's own message.
"""

from __future__ import annotations

import builtins
import contextlib
import random
import threading
import time
from collections.abc import Callable, Generator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
import structlog

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
    new_request_id,
    quietly,
    retry_delays,
    with_lease,
)
from kaiwo_gpu.common.errors import FailedPreconditionError, KaiwoGpuError, NotFoundError
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.common.request_builder import build_request
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2

log = structlog.get_logger(__name__)
Reply = TypeVar("Reply")
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 64 * 1024 * 1024),)


def as_request(request: AllocationRequest | None, fields: Mapping[str, Any]) -> AllocationRequest:
    """The caller's request, or one built from keyword fields (`fraction=0.5, ttl="10m"`)."""
    if request is not None:
        if fields:
            raise TypeError("pass either an AllocationRequest or keyword fields, not both")
        return request
    options = dict(fields)
    return build_request(options.pop("request_id", None) or new_request_id(), **options)


class Client:
    """A connection to the coordinators at one gRPC target (`host:port`, `dns:///...`).

    Without a target or settings it uses $KAIWO_GPU_COORDINATOR, else 127.0.0.1:50051, so a
    command started by `kaiwo-gpu run` reaches the coordinator that placed it.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        settings: ClientSettings | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = client_settings(target, settings)
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self._closed = False
        self._channel = grpc.insecure_channel(self.settings.target, options=CHANNEL_OPTIONS)
        self._stub = allocation_pb2_grpc.AllocationServiceStub(self._channel)

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: Callable[..., Reply],
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
                return method(message, timeout=max(0.001, deadline - self._clock()))
            except grpc.RpcError as error:
                pause = next(delays)
                if not is_retryable(error) or self._clock() + pause >= deadline:
                    raise error_from_rpc(error) from None
                if retried is not None and may_have_reached_server(error):
                    retried.append(True)
            self._sleep(pause)

    def allocate(
        self, request: AllocationRequest | None = None, /, **fields: Any
    ) -> types_pb2.Allocation:
        """Places a request; resending the same request_id returns the same allocation."""
        message = allocate_message(as_request(request, fields))
        return self._call(self._stub.Allocate, message).allocation

    def release(
        self, allocation_id: str, *, timeout_s: float | None = None
    ) -> types_pb2.Allocation | None:
        """The released record, or None when a retried attempt had already released it."""
        retried: list[bool] = []
        message = allocation_pb2.ReleaseRequest(allocation_id=allocation_id)
        try:
            reply = self._call(self._stub.Release, message, timeout_s=timeout_s, retried=retried)
            return reply.allocation
        except NotFoundError:
            if retried:
                return None
            raise

    def keep_alive(self, allocation_id: str, *, timeout_s: float | None = None) -> datetime:
        """Renews the lease; returns when it will expire."""
        message = allocation_pb2.KeepAliveRequest(allocation_id=allocation_id)
        reply = self._call(self._stub.KeepAlive, message, timeout_s=timeout_s)
        return reply.expires_at.ToDatetime()

    def get(self, allocation_id: str) -> types_pb2.Allocation:
        message = allocation_pb2.GetAllocationRequest(allocation_id=allocation_id)
        return self._call(self._stub.GetAllocation, message).allocation

    def list(
        self, *, owner: str = "", node: str = "", labels: Mapping[str, str] | None = None
    ) -> list[types_pb2.Allocation]:
        """Every matching allocation, all pages."""
        found: list[types_pb2.Allocation] = []
        token = ""
        while True:
            message = list_message(owner, node, labels or {}, token)
            reply = self._call(self._stub.ListAllocations, message)
            found.extend(reply.allocations)
            token = reply.next_page_token
            if not token:
                return found

    def nodes(
        self, *, labels: Mapping[str, str] | None = None
    ) -> builtins.list[types_pb2.NodeStatus]:
        message = allocation_pb2.ListNodesRequest(labels=dict(labels or {}))
        return list(self._call(self._stub.ListNodes, message).nodes)

    def stats(self) -> allocation_pb2.GetClusterStatsResponse:
        return self._call(self._stub.GetClusterStats, allocation_pb2.GetClusterStatsRequest())

    def watch(
        self, *, owner: str = "", node: str = ""
    ) -> Generator[allocation_pb2.AllocationEvent, None, None]:
        """Every current allocation as ADDED, then each change, until the caller stops."""
        message = allocation_pb2.WatchAllocationsRequest(owner=owner, node=node)
        stream = self._stub.WatchAllocations(message)
        try:
            yield from stream
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
    ) -> HeldAllocation:
        """Allocates now and holds it: `with client.allocation(fraction=0.5) as held: ...`.

        The lease is renewed in the background and the allocation released on exit, also when
        the body raises. `on_lost` is called (from the renewal thread) if the lease is gone.
        """
        placed = self.allocate(with_lease(as_request(request, fields), default_ttl_s))
        return HeldAllocation(self, placed, on_lost)


class HeldAllocation(Holding):
    """An allocation whose lease a daemon thread renews until `release()` or context exit."""

    def __init__(
        self,
        client: Client,
        allocation: types_pb2.Allocation,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(allocation, on_lost)
        self._client = client
        self._stop = threading.Event()
        interval = keepalive_interval_s(allocation.request.ttl_seconds)
        self._renewer = threading.Thread(
            target=self._renew, args=(interval,), name=f"keepalive-{allocation.id}", daemon=True
        )
        self._renewer.start()

    def _renew(self, interval_s: float) -> None:
        failed = False
        while not self._stop.wait(0.2 if failed else interval_s):
            sent_at = self._clock()
            try:
                self._client.keep_alive(self.id, timeout_s=keepalive_timeout_s(interval_s))
            except Exception as error:
                if self._stop.is_set() or self._renewal_failed(error):
                    return  # released on purpose meanwhile, or the lease is gone
                failed = True
            else:
                self._renewed_at = sent_at
                failed = False

    def release(self, *, timeout_s: float | None = None) -> None:
        """Stops renewing and releases; a lease that already lapsed is not an error.

        A renewal in flight is not waited for: it stops at its next turn.
        """
        self._stop.set()
        if self._released:
            return
        self._released = True
        with contextlib.suppress(NotFoundError):
            self._client.release(self.id, timeout_s=timeout_s)

    def __enter__(self) -> HeldAllocation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except KaiwoGpuError as failure:
            if kind is None:
                raise
            # The body's exception matters more than a failed release; the lease still lapses.
            quietly(log.warning, "release failed", allocation_id=self.id, reason=failure.message)
