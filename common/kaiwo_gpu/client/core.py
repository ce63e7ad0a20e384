"""What the blocking and the asyncio client share over gRPC: the base that keeps settings,
randomness, the clock and each call's attempts, and the reading of a failed call.

The two clients add only their channel and the loops that perform the decisions of
`retries`, `calls` and `lease`.
"""

from __future__ import annotations

import contextlib
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import grpc

from kaiwo_gpu.client.calls import Call
from kaiwo_gpu.client.retries import (
    Attempts,
    Decision,
    Failure,
    GiveUp,
    try_another_coordinator,
)
from kaiwo_gpu.client.support import ClientSettings, client_settings, dial_targets
from kaiwo_gpu.common import credentials, keepalive, tracing
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import FailedPreconditionError
from kaiwo_gpu.common.names import escaped
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc

SERVICE = allocation_pb2.DESCRIPTOR.services_by_name["AllocationService"].full_name
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    *keepalive.CHANNEL_OPTIONS,
)


def failure_of(error: grpc.RpcError) -> Failure:
    """A failed call as the retry rules read it (a bare RpcError carries no status)."""
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        # The coordinator's words are data: escaped, none can drive a terminal it reaches.
        code, details = error.code(), escaped(error.details() or "")
    else:
        code, details = grpc.StatusCode.UNKNOWN, ""
    return Failure(code.name, details, reached_server=not details.startswith("failed to connect"))


class Cancellable(Protocol):
    def cancel(self) -> object: ...


@contextlib.contextmanager
def stream_failures_translated(
    stream: Cancellable, on_failure: Callable[[Failure], None] = lambda failure: None
) -> Iterator[None]:
    """A stream's failure as the project's error (told to `on_failure` first); the stream
    is cancelled however it ends."""
    try:
        yield
    except grpc.RpcError as error:
        failure = failure_of(error)
        on_failure(failure)
        raise failure.as_error() from None
    finally:
        stream.cancel()


ChannelT = TypeVar("ChannelT", grpc.Channel, grpc.aio.Channel)


class ClientCore(Generic[ChannelT]):
    """What both clients keep besides how they open a channel: settings, randomness and the
    clock, whether they are closed, and which of the target's coordinators they use; each
    call's attempts start here.

    A client stays with one coordinator (so it reads its own writes) until a call there
    fails in a way another might not (`try_another_coordinator`); then it moves to the next
    (`dial_targets`: a channel whose address list starts there, opened on first use and kept
    until the client closes), for the retry and the calls after it. With several
    coordinators an attempt has at most half the call's time, so even a short call gets a
    second attempt elsewhere.
    """

    def __init__(
        self,
        target: str | None,
        settings: ClientSettings | None,
        rng: random.Random | None,
        clock: Callable[[], float],
        open_channel: Callable[[str, Credentials], ChannelT],
    ) -> None:
        self.settings = client_settings(target, settings)
        # Read once, before any call: a token that may not travel fails here.
        self._authorization = credentials.authorization(
            self.settings.credentials, self.settings.target
        )
        self._rng = rng or random.Random()
        self._clock = clock
        self._closed = False
        self._open_channel: Callable[[str, Credentials], ChannelT] = open_channel
        self._targets = dial_targets(self.settings.target)
        self._current = 0
        self._channels: dict[int, ChannelT] = {}
        self._stubs: dict[int, Any] = {}
        self._lock = threading.Lock()  # renewal threads share the blocking client
        self.session = uuid.uuid4().hex
        """Sent with every Allocate that names none, so this client's allocations share a
        lease per TTL: a process that vanishes costs etcd one lease expiry, not one each."""

    def _coordinator(self) -> tuple[int, Any]:
        """The coordinator calls go to now, and its AllocationService stub."""
        with self._lock:
            if self._closed:  # never open a channel after close (a call racing it)
                raise FailedPreconditionError("this client is closed")
            index = self._current
            if index not in self._stubs:
                channel = self._open_channel(self._targets[index], self.settings.credentials)
                self._channels[index] = channel
                self._stubs[index] = allocation_pb2_grpc.AllocationServiceStub(channel)
            return index, self._stubs[index]

    def _session_for(self, given: str | None) -> str:
        return self.session if given is None else given

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the trace context and the bearer token, if any."""
        return (*tracing.injected(), *self._authorization)

    def _open_channels(self) -> list[ChannelT]:
        with self._lock:
            return list(self._channels.values())

    def _attempts(self, call: Call[Any, Any]) -> Attempts:
        if self._closed:
            raise FailedPreconditionError("this client is closed")
        return Attempts(
            self.settings.retry,
            self._rng,
            started_at=self._clock(),
            timeout_s=call.timeout_s or self.settings.timeout_s,
            not_found_after_retry_is_done=call.result_if_done_before is not None,
            alternatives=len(self._targets) > 1,
        )

    def _traced(self, rpc: str) -> contextlib.AbstractContextManager[Any]:
        """A client span for one call, retries included (nothing when tracing is off)."""
        return tracing.span(
            f"{SERVICE}/{rpc}",
            kind="client",
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": rpc},
        )

    def _after_failure(
        self, attempts: Attempts, error: grpc.RpcError, used: int, span: Any = None
    ) -> Decision:
        """The retry rules' decision, and the coordinator the client uses from now on. A
        call that ends in failure marks its span so."""
        failure = failure_of(error)
        decision = attempts.failed(failure, self._clock())
        if isinstance(decision, GiveUp):
            tracing.record_error(span, failure.status, failure.message)
        self._moved_on(failure, used)  # also when the call gives up: the next call goes on
        return decision

    def _moved_on(self, failure: Failure, used: int) -> None:
        """Moves the client to the next coordinator after a failure another might not have,
        unless another call already moved it off `used`."""
        if try_another_coordinator(failure):
            with self._lock:
                if self._current == used:
                    self._current = (used + 1) % len(self._targets)
