"""The agent's link to a coordinator: one Connect stream, kept up for as long as it runs.

It registers the node, then sends one batch per interval and applies the coordinator's
directives (the interval, the allocations placed on this node). When the stream breaks
it tries the next coordinator address after a jittered exponential backoff, so a
restarted coordinator is not met by every agent at the same moment. Telemetry is
latest-wins: nothing is buffered while disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import structlog

from kaiwo_gpu.agent.backend import PlacedShare
from kaiwo_gpu.agent.sampler import NodeSampler
from kaiwo_gpu.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger(__name__)

MIN_INTERVAL_MS = 100
MAX_INTERVAL_MS = 60_000
STEADY_SESSION_S = 30.0
"""A session shorter than this does not reset the backoff (two agents sharing a node name,
or a coordinator that refuses us, must not turn into a reconnect storm)."""
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def backoff_delay(attempt: int, rng: random.Random, base_s: float, cap_s: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return rng.uniform(0.0, min(cap_s, base_s * 2 ** min(attempt, 30)))


def placed_shares(placed: agent_pb2.PlacedAllocations) -> dict[str, PlacedShare]:
    """What the allocations hold per GPU UUID of this node."""
    shares: dict[str, PlacedShare] = {}
    for allocation in placed.allocations:
        for grant in allocation.gpus:
            before = shares.get(grant.uuid, PlacedShare(0, 0, 0))
            shares[grant.uuid] = PlacedShare(
                millis=before.millis + grant.granted_millis,
                memory_mib=before.memory_mib + grant.granted_memory_mib,
                allocations=before.allocations + 1,
            )
    return shares


@dataclass
class UplinkStatus:
    """What the uplink has seen; tests and logs read it."""

    coordinator: str = ""
    connected: bool = False
    registrations: int = 0
    batches_sent: int = 0
    interval_ms: int = 1000
    last_error: str = ""
    placed: Mapping[str, PlacedShare] = field(default_factory=dict)


class Uplink:
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
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 10.0,
    ) -> None:
        if not addresses:
            raise ValueError("at least one coordinator address")
        self.addresses = tuple(addresses)
        self.register = register
        self.sampler = sampler
        self.on_placements = on_placements
        self.before_tick = before_tick
        self.rng = rng or random.Random()
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.status = UplinkStatus(interval_ms=interval_ms)

    async def run(self, stop: asyncio.Event) -> None:
        """Stays connected to some coordinator until `stop` is set."""
        loop = asyncio.get_running_loop()
        attempt = 0
        turn = 0
        while not stop.is_set():
            address = self.addresses[turn % len(self.addresses)]
            registered_before = self.status.registrations
            started = loop.time()
            try:
                await self._session(address, stop)
            except grpc.aio.AioRpcError as error:
                self._ended(address, error.code().name, error.details() or "")
            except asyncio.InvalidStateError:  # the coordinator ended the call mid-write
                self._ended(address, "CLOSED", "the coordinator closed the stream")
            except Exception as error:  # an agent must outlive any one stream
                log.exception("coordinator stream failed", node=self.register.node)
                self._ended(address, type(error).__name__, str(error))
            finally:
                self.status.connected = False
            if stop.is_set():
                return
            # Next time, the next address: this one did not answer, or it ended our stream
            # (a coordinator that is stopping closes its streams).
            turn += 1
            if (
                self.status.registrations > registered_before
                and loop.time() - started >= STEADY_SESSION_S
            ):
                attempt = 0  # it worked for a while: start the backoff over
            delay = backoff_delay(attempt, self.rng, self.backoff_base_s, self.backoff_cap_s)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _ended(self, address: str, status: str, details: str) -> None:
        self.status.last_error = f"{status}: {details}"
        log.warning(
            "coordinator stream ended",
            node=self.register.node,
            coordinator=address,
            status=status,
            error=details,
        )

    async def _session(self, address: str, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(address, options=KEEPALIVE_OPTIONS) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
            await call.write(agent_pb2.AgentMessage(register=self.register))
            registered = asyncio.Event()
            directives = asyncio.create_task(self._follow(call, address, registered))
            try:
                await self._stream(call, stop, registered, directives)
            finally:
                if not directives.done():
                    directives.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await directives
                call.cancel()

    async def _stream(
        self,
        call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.CoordinatorDirective],
        stop: asyncio.Event,
        registered: asyncio.Event,
        directives: asyncio.Task[None],
    ) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set() and not directives.done():
                interval_s = self.status.interval_ms / 1000
                self.before_tick()
                batch = await self.sampler.sample(wait_s=interval_s / 2)
                if directives.done():  # the stream ended while the GPUs were read
                    break
                if registered.is_set():  # a batch before the answer could race a refusal
                    await call.write(agent_pb2.AgentMessage(telemetry=batch))
                    self.status.batches_sent += 1
                next_tick = max(next_tick + interval_s, loop.time())
                await asyncio.wait(
                    {stopping, directives},
                    timeout=next_tick - loop.time(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            stopping.cancel()
        if directives.done():
            directives.result()  # the coordinator ended the stream: raise its status
            return
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.done_writing()

    async def _follow(
        self,
        call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.CoordinatorDirective],
        address: str,
        registered: asyncio.Event,
    ) -> None:
        async for directive in call:
            body = directive.WhichOneof("body")
            if body == "registered":
                self._set_interval(directive.registered.sample_interval_ms)
                self.status.coordinator = address
                self.status.connected = True
                self.status.registrations += 1
                registered.set()
                log.info(
                    "registered with coordinator",
                    node=self.register.node,
                    coordinator=address,
                    coordinator_id=directive.registered.coordinator_id,
                    interval_ms=self.status.interval_ms,
                )
            elif body == "set_sample_interval":
                self._set_interval(directive.set_sample_interval.sample_interval_ms)
            elif body == "placed_allocations":
                shares = placed_shares(directive.placed_allocations)
                self.status.placed = shares
                self.on_placements(shares)

    def _set_interval(self, interval_ms: int) -> None:
        if interval_ms:
            self.status.interval_ms = min(max(interval_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS)
