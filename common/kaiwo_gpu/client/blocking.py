"""The blocking Python client: allocate, hold, release and inspect GPU shares.

Every call retries UNAVAILABLE and ABORTED with the same request (so Allocate replays by
request_id) until its deadline, and failures come back as the project's error tree with the
coordinator's own message. The rules live in `retries`, `calls` and `lease`; this module
only performs them over a grpc channel and a renewal thread.
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


class Client(ClientCore[grpc.Channel]):
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
        super().__init__(
            target,
            settings,
            rng,
            clock,
            lambda dialled, held: channels.open_channel(dialled, held, CHANNEL_OPTIONS),
        )
        self._sleep = sleep

    def close(self) -> None:
        self._closed = True
        for channel in self._open_channels():
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, rpc: str, call: Call[ReplyT, ResultT]) -> ResultT:
        """Performs `call` through the stub's method `rpc`, each attempt on the coordinator
        the client uses at that moment."""
        attempts = self._attempts(call)
        with self._traced(rpc) as span:
            while True:
                used, stub = self._coordinator()
                method: Callable[..., ReplyT] = getattr(stub, rpc)
                try:
                    reply = method(
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
                self._sleep(decision.pause_s)

    def allocate(
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
        return self._run("Allocate", call)

    def release(
        self, allocation_id: str, *, timeout_s: float | None = None
    ) -> types_pb2.Allocation | None:
        """The released record, or None when a retried attempt had already released it."""
        return self._run("Release", calls.release(allocation_id, timeout_s))

    def keep_alive(self, allocation_id: str, *, timeout_s: float | None = None) -> datetime:
        """Renews the lease; returns when it will expire."""
        return self._run("KeepAlive", calls.keep_alive(allocation_id, timeout_s))

    def get(self, allocation_id: str) -> types_pb2.Allocation:
        return self._run("GetAllocation", calls.get(allocation_id))

    def list(
        self, *, owner: str = "", node: str = "", labels: Mapping[str, str] | None = None
    ) -> list[types_pb2.Allocation]:
        """Every matching allocation, all pages."""
        pages = calls.ListPages(owner, node, labels or {})
        while not pages.complete:
            pages.add(self._run("ListAllocations", pages.next_call()))
        return pages.found

    def nodes(
        self, *, labels: Mapping[str, str] | None = None
    ) -> builtins.list[types_pb2.NodeStatus]:
        return self._run("ListNodes", calls.nodes(labels or {}))

    def remove_node(self, node: str) -> types_pb2.NodeStatus:
        """Removes a node that has no agent and no allocations: the record as it was."""
        return self._run("RemoveNode", calls.remove_node(node))

    def stats(self) -> allocation_pb2.GetClusterStatsResponse:
        return self._run("GetClusterStats", calls.stats())

    def watch(
        self, *, owner: str = "", node: str = ""
    ) -> Generator[allocation_pb2.AllocationEvent, None, None]:
        """Every current allocation as ADDED, then each change, until the caller stops; a
        stream that fails moves the client on, as a call does (watch again to follow it)."""
        used, stub = self._coordinator()
        stream = stub.WatchAllocations(calls.watch_message(owner, node), metadata=self._metadata())
        with stream_failures_translated(stream, lambda failure: self._moved_on(failure, used)):
            yield from stream

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
        sent_at = self._clock()
        placed = self.allocate(held_request(request, fields, default_ttl_s))
        return HeldAllocation(self, placed, on_lost, granted_at=sent_at)


class HeldAllocation(Holding):
    """An allocation whose lease a daemon thread renews until `release()` or context exit."""

    def __init__(
        self,
        client: Client,
        allocation: types_pb2.Allocation,
        on_lost: Callable[[str], None] | None = None,
        *,
        granted_at: float | None = None,
    ) -> None:
        """Holds an allocation placed at `granted_at` on the client's clock (default: now)."""
        super().__init__(on_lost, client._clock)
        self._client = client
        self._stop = threading.Event()
        first = self._grant(allocation, self._clock() if granted_at is None else granted_at)
        self._renewer = threading.Thread(
            target=self._renew, args=(first,), name=f"keepalive-{allocation.id}", daemon=True
        )
        self._renewer.start()

    def _renew(self, step: RenewalStep) -> None:
        while isinstance(step, Renew) and not self._stop.wait(step.after_s):
            sent_at = self._clock()
            try:
                self._client.keep_alive(self.id, timeout_s=self._lease.renewal_timeout_s)
            except Exception as error:
                step = self._after_renewal(sent_at, error)
            else:
                step = self._after_renewal(sent_at, None)

    def release(self, *, timeout_s: float | None = None) -> None:
        """Stops renewing and releases; a lease that already lapsed is not an error.

        A renewal in flight is not waited for: it stops at its next turn.
        """
        self._stop.set()
        if self._lease.mark_released():
            with contextlib.suppress(NotFoundError):
                self._client.release(self.id, timeout_s=timeout_s)

    def __enter__(self) -> HeldAllocation:
        self._check_not_released()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._release_on_exit(body_raised=kind is not None):
            self.release()
