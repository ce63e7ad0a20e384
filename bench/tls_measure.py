"""The phases of the tls suite: one transport's warm clients, and what they measure per round.

Every loop is bounded by a count and by the phase's deadline (time.monotonic()); the calls
themselves are the allocate suite's (`bench.allocate_calls`), so both suites time the same
Allocate. Each phase appends one round's samples to its transport's `Samples`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from bench.allocate_calls import (
    CALL_TIMEOUT_S,
    Sequential,
    Store,
    Throughput,
    allocate_request,
    allocate_throughput,
    release_all,
    timed,
)
from bench.lib import CpuMeter, CpuUse, Stats
from kaiwo_gpu.common.channels import open_aio_channel
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
"""Channel options: without them gRPC shares one connection among the channels of a
process to one address, so N clients would be one connection and a new channel none."""
WARM_CONNECTIONS = 5


@dataclass(frozen=True, slots=True)
class Options:
    samples: int
    warmup: int
    rounds: int
    connections: int
    allocations: int
    clients: int
    nodes: int
    time_limit_s: float

    def deadline(self) -> float:
        return time.monotonic() + self.time_limit_s


@dataclass(frozen=True, slots=True)
class Transport:
    """A coordinator and the credentials a client presents to it (none: plaintext)."""

    name: str
    coordinator: CoordinatorProcess
    held: Credentials

    def channel(self) -> grpc.aio.Channel:
        """A new channel with a connection of its own; its files are read now, as a CLI
        process reads them."""
        return open_aio_channel(self.coordinator.address, self.held, OWN_CONNECTION)

    async def wait_serving(self, timeout_s: float) -> None:
        """Returns once health says SERVING over this transport."""
        await self.coordinator.wait_serving(timeout_s, self.held)


@dataclass(slots=True)
class Samples:
    """What one transport measured, one entry per round."""

    allocate_ns: list[list[int]] = field(default_factory=list)
    ready_ns: list[list[int]] = field(default_factory=list)
    first_reply_ns: list[list[int]] = field(default_factory=list)
    throughputs: list[Throughput] = field(default_factory=list)
    cpu: list[CpuUse] = field(default_factory=list)


def pooled(rounds: Sequence[Sequence[int]]) -> Stats:
    """Stats of every round's samples together."""
    samples = [sample for one in rounds for sample in one]
    if not samples:
        raise SystemExit("a phase took no samples before its time limit; raise --time-limit")
    return Stats.of(samples)


def _stub(channel: grpc.aio.Channel) -> AllocationServiceAsyncStub:
    return allocation_pb2_grpc.AllocationServiceStub(channel)


@dataclass(slots=True)
class Client:
    """One transport's warm connections, one per concurrent client; the first is also the
    sequential client."""

    transport: Transport
    channels: list[grpc.aio.Channel]
    store: Store
    meter: CpuMeter
    measured: Samples = field(default_factory=Samples)

    @staticmethod
    def open(transport: Transport, clients: int, store: Store) -> Client:
        meter = CpuMeter({"coordinator": [transport.coordinator.pid]}, this_process="client")
        channels = [transport.channel() for _ in range(clients)]
        return Client(transport, channels, store, meter)

    @property
    def apis(self) -> list[AllocationServiceAsyncStub]:
        return [_stub(channel) for channel in self.channels]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def warm(self, options: Options) -> None:
        """Untimed: connects every client, and runs each phase a little."""
        apis = self.apis
        await Sequential(apis[0], "warm-seq", 0).warm(options.warmup, options.deadline())
        await timed(min(options.warmup, WARM_CONNECTIONS), options.deadline(), self._connect)
        made: list[str] = []
        deadline = options.deadline()
        await allocate_throughput(apis, self.store, "warm-par", 2 * len(apis), deadline, made=made)
        await release_all(apis, made, deadline)

    async def sequential(self, options: Options, round_: int) -> None:
        client = Sequential(self.apis[0], f"seq{round_}", 0)
        self.measured.allocate_ns.append(
            await timed(options.samples, options.deadline(), client.allocate)
        )

    async def connections(self, options: Options, round_: int) -> None:
        self.measured.ready_ns.append([])
        first_replies = await timed(
            options.connections,
            options.deadline(),
            lambda i: self._connect(i, f"conn{round_}"),
        )
        self.measured.first_reply_ns.append(first_replies)

    async def _connect(self, i: int, name: str = "warm-conn") -> Awaitable[object]:
        """A new channel, connected, and its first Allocate; returns the Release and the
        close, to await after the clock stops."""
        start = time.perf_counter_ns()
        channel = self.transport.channel()
        api = _stub(channel)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):  # a refused handshake retries forever
                await channel.channel_ready()
            ready_ns = time.perf_counter_ns() - start
            request = allocate_request(f"{name}-{i:06d}", 0)
            reply = await api.Allocate(request, timeout=CALL_TIMEOUT_S)
        except BaseException:
            await channel.close()
            raise
        if self.measured.ready_ns:  # not while warming
            self.measured.ready_ns[-1].append(ready_ns)
        return _release_and_close(channel, api, reply.allocation.id)

    async def throughput(self, options: Options, round_: int) -> None:
        apis = self.apis
        made: list[str] = []
        mark = self.meter.mark()
        result = await allocate_throughput(
            apis, self.store, f"par{round_}", options.allocations, options.deadline(), made=made
        )
        self.measured.cpu.append(self.meter.since(mark, self.transport.name, result.done))
        self.measured.throughputs.append(result)
        await release_all(apis, made, options.deadline())

    def round_line(self, round_: int) -> str:
        allocate = Stats.of(self.measured.allocate_ns[round_])
        first = Stats.of(self.measured.first_reply_ns[round_])
        throughput = self.measured.throughputs[round_]
        name = f"{self.transport.name}:"
        return (
            f"round {round_ + 1} {name:<10} Allocate p50 {allocate.p50_ms:.3f} "
            f"p99 {allocate.p99_ms:.3f} ms; new connection + first Allocate p50 "
            f"{first.p50_ms:.3f} ms; x{len(self.channels)} clients {throughput.per_s:.0f}/s"
        )


async def _release_and_close(
    channel: grpc.aio.Channel, api: AllocationServiceAsyncStub, allocation_id: str
) -> None:
    try:
        await api.Release(
            allocation_pb2.ReleaseRequest(allocation_id=allocation_id), timeout=CALL_TIMEOUT_S
        )
    finally:
        await channel.close()


async def measure(options: Options, clients: Sequence[Client]) -> None:
    """Warms every transport, then runs the rounds: each phase for every transport in turn,
    the first of them alternating by round."""
    for client in clients:
        await client.warm(options)
    for round_ in range(options.rounds):
        order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
        for phase in (Client.sequential, Client.connections, Client.throughput):
            for client in order:
                await phase(client, options, round_)
        for client in clients:
            print(client.round_line(round_), flush=True)
