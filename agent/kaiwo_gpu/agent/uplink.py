"""The agent's link to a coordinator: one Connect stream, kept up for as long as it runs.

It registers the node, then sends one batch per interval and applies the coordinator's
directives (the interval, the allocations placed on this node). When the stream breaks
it tries the next coordinator address after a jittered exponential backoff, so a
restarted coordinator is not met by every agent at the same moment. Telemetry is
latest-wins: nothing is buffered while disconnected.

This module is the async shell: `uplink_state.UplinkState` decides, and `Uplink` performs
its commands and feeds it what the stream, the sampler and the clock report.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
import structlog

from kaiwo_gpu.agent.backend import PlacedShare
from kaiwo_gpu.agent.sampler import NodeSampler
from kaiwo_gpu.agent.uplink_state import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    ApplyPlacements,
    Backoff,
    BackoffOver,
    BatchSent,
    CloseStream,
    Command,
    Connect,
    DirectiveReceived,
    Event,
    Log,
    Sample,
    Sampled,
    SendBatch,
    Start,
    Stop,
    StreamEnded,
    StreamOpened,
    TickDue,
    TickFailed,
    UplinkState,
    UplinkStatus,
    WaitForTick,
)
from kaiwo_gpu.common import channels, credentials, tracing
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.keepalive import CHANNEL_OPTIONS, HEARTBEAT_S, MISSED_HEARTBEATS
from kaiwo_gpu.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger(__name__)
CONNECT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name + "/Connect"

OPEN_TIMEOUT_S = MISSED_HEARTBEATS * HEARTBEAT_S
"""How long opening a stream and writing Register may take: a coordinator frozen before the
agent came accepts the TCP connection and never finishes the HTTP/2 handshake."""
_NO_ANSWER = f"the coordinator did not take the stream in {OPEN_TIMEOUT_S:g}s (frozen?)"


ConnectCall: TypeAlias = (
    "grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.CoordinatorDirective]"
)


class Uplink:
    """Performs `UplinkState`'s commands; every task it starts reports back as an event."""

    def __init__(
        self,
        addresses: Sequence[str],
        register: agent_pb2.Register,
        sampler: NodeSampler,
        *,
        interval_ms: int = 1000,
        on_placements: Callable[[Mapping[str, PlacedShare]], None] = lambda shares: None,
        before_tick: Callable[[], None] = lambda: None,
        rng: random.Random | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        held: Credentials | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one coordinator address")
        self.addresses = tuple(addresses)
        self.credentials = held or Credentials()
        # Checked now, so a token that may not travel, or a file that cannot be read, stops
        # the agent at start rather than failing every connection.
        for address in self.addresses:
            credentials.authorization(self.credentials, address)
        channels.channel_credentials(self.credentials)
        self.register = register
        self.sampler = sampler
        self.on_placements = on_placements
        self.before_tick = before_tick
        self.rng = rng or random.Random()
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.status = UplinkStatus(interval_ms=interval_ms)
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._channel: grpc.aio.Channel | None = None
        self._call: ConnectCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tick: asyncio.Task[None] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Stays connected to some coordinator until `stop` is set."""
        if stop.is_set():
            return
        state = UplinkState(
            self.addresses,
            self.register.node,
            rng=self.rng,
            status=self.status,
            backoff_base_s=self.backoff_base_s,
            backoff_cap_s=self.backoff_cap_s,
        )
        self._events = asyncio.Queue()
        self._spawn(self._stop_on(stop))
        event: Event = Start(self._now())
        try:
            while True:
                for command in state.handle(event):
                    await self._perform(command)
                if state.finished:
                    return
                event = await self._events.get()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._close_stream(done_writing=False)

    async def _perform(self, command: Command) -> None:
        match command:
            case Connect(session=session, address=address):
                self._reader = self._spawn(self._follow(session, address))
            case Sample(session=session, wait_s=wait_s):
                self._spawn(self._sample(session, wait_s))
            case SendBatch(session=session, batch=batch):
                self._spawn(self._send(session, batch))
            case WaitForTick(session=session, until_s=until_s):
                self._tick = self._spawn(self._wake(until_s, functools.partial(TickDue, session)))
            case Backoff(delay_s=delay_s):
                self._spawn(self._wake(self._now() + delay_s, BackoffOver))
            case CloseStream(done_writing=done_writing):
                await self._close_stream(done_writing)
            case ApplyPlacements(session=session, shares=shares):
                try:
                    self.on_placements(shares)
                except Exception as error:
                    self._post(StreamEnded(session, self._now(), *self._failure(error)))
            case Log(level="info", message=message, fields=fields):
                log.info(message, **fields)
            case Log(message=message, fields=fields):
                log.warning(message, **fields)

    async def _follow(self, session: int, address: str) -> None:
        """One stream, from its opening to its end: a span (tracing on) for its life, and
        one for the registration; telemetry batches get none (a thousand nodes would make
        a thousand spans a second)."""
        attributes = {"rpc.system": "grpc", "kaiwo_gpu.node": self.register.node}
        with tracing.span(CONNECT, kind="client", attributes=attributes) as stream_span:
            try:
                self._channel = channels.open_aio_channel(
                    address, self.credentials, CHANNEL_OPTIONS
                )
                stub = agent_pb2_grpc.AgentServiceStub(self._channel)
                metadata = (
                    *tracing.injected(),
                    *credentials.authorization(self.credentials, address),
                )
                call = self._call = stub.Connect(metadata=metadata)
                with tracing.span("kaiwo_gpu.agent.register", attributes=attributes):
                    register = call.write(agent_pb2.AgentMessage(register=self.register))
                    try:  # a coordinator frozen before we came accepts TCP and never answers
                        await asyncio.wait_for(register, OPEN_TIMEOUT_S)
                    except TimeoutError:
                        call.cancel()
                        tracing.record_error(stream_span, "UNAVAILABLE", _NO_ANSWER)
                        self._post(StreamEnded(session, self._now(), "UNAVAILABLE", _NO_ANSWER))
                        return
                self._post(StreamOpened(session, self._now()))
                async for directive in call:
                    self._post(DirectiveReceived(session, directive))
            except Exception as error:
                code, details = self._failure(error)
                tracing.record_error(stream_span, code, details)
                self._post(StreamEnded(session, self._now(), code, details))
            else:
                self._post(StreamEnded(session, self._now()))

    async def _sample(self, session: int, wait_s: float) -> None:
        try:
            self.before_tick()
            batch = await self.sampler.sample(wait_s=wait_s)
        except Exception as error:
            self._post(TickFailed(session, self._now(), *self._failure(error)))
        else:
            self._post(Sampled(session, self._now(), batch))

    async def _send(self, session: int, batch: agent_pb2.TelemetryBatch) -> None:
        try:
            if self._call is None:
                raise RuntimeError("no stream to write the batch to")
            await self._call.write(agent_pb2.AgentMessage(telemetry=batch))
        except Exception as error:
            self._post(TickFailed(session, self._now(), *self._failure(error)))
        else:
            self._post(BatchSent(session, self._now()))

    async def _wake(self, until_s: float, event: Callable[[float], Event]) -> None:
        await asyncio.sleep(max(0.0, until_s - self._now()))
        self._post(event(self._now()))

    async def _stop_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._post(Stop())

    async def _close_stream(self, done_writing: bool) -> None:
        if self._tick is not None:
            self._tick.cancel()
        call, channel, reader = self._call, self._channel, self._reader
        self._call = self._channel = self._reader = self._tick = None
        if call is not None and done_writing:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.done_writing()
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if call is not None:
            call.cancel()
        if channel is not None:
            await channel.close()

    def _failure(self, error: Exception) -> tuple[str, str]:
        """The status and details an exception ends a stream with (call it in `except`)."""
        if isinstance(error, grpc.aio.AioRpcError):
            return error.code().name, error.details() or ""
        if isinstance(error, asyncio.InvalidStateError):  # the call ended mid-write
            return "CLOSED", "the coordinator closed the stream"
        # Anything else is a bug somewhere; an agent must outlive any one stream.
        log.exception("coordinator stream failed", node=self.register.node)
        return type(error).__name__, str(error)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _post(self, event: Event) -> None:
        self._events.put_nowait(event)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()
