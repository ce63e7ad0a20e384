"""What the blocking and the asyncio client share over gRPC: the base that keeps settings,
randomness, the clock and each call's attempts, and the reading of a failed call.

The two clients add only their channel and the loops that perform the decisions of
`retries`, `calls` and `lease`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

from kaiwo_gpu.client.calls import Call
from kaiwo_gpu.client.retries import Attempts, Decision, Failure
from kaiwo_gpu.client.support import ClientSettings, client_settings
from kaiwo_gpu.common import keepalive
from kaiwo_gpu.common.errors import FailedPreconditionError
from kaiwo_gpu.common.names import escaped

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
def stream_failures_translated(stream: Cancellable) -> Iterator[None]:
    """A stream's failure as the project's error; the stream is cancelled however it ends."""
    try:
        yield
    except grpc.RpcError as error:
        raise failure_of(error).as_error() from None
    finally:
        stream.cancel()


class ClientCore:
    """What both clients keep besides their channel: settings, randomness and the clock, and
    whether they are closed; each call's attempts start here."""

    def __init__(
        self,
        target: str | None,
        settings: ClientSettings | None,
        rng: random.Random | None,
        clock: Callable[[], float],
    ) -> None:
        self.settings = client_settings(target, settings)
        self._rng = rng or random.Random()
        self._clock = clock
        self._closed = False

    def _attempts(self, call: Call[Any, Any]) -> Attempts:
        if self._closed:
            raise FailedPreconditionError("this client is closed")
        return Attempts(
            self.settings.retry,
            self._rng,
            started_at=self._clock(),
            timeout_s=call.timeout_s or self.settings.timeout_s,
            not_found_after_retry_is_done=call.result_if_done_before is not None,
        )

    def _after_failure(self, attempts: Attempts, error: grpc.RpcError) -> Decision:
        return attempts.failed(failure_of(error), self._clock())
