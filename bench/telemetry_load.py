"""The load generator processes of the telemetry benchmark, and the parent's handle on them.

Each generator process (spawned with multiprocessing, so it imports this module as
`bench.telemetry_load` with the parent's `sys.path`, as `python -m bench` set it) serves its
share of the simulated nodes over a few channels: one `AgentService.Connect` stream per node,
a Register, then one TelemetryBatch per node per second on the nodes' schedule. A sender that
falls behind sends late batches at once (no skipping). The parent talks to the processes over
pipes: it sends `Start`, ("stop",) and ("close",); they answer ("ready",), `Registered` and
`Sent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import signal
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import grpc

from bench.telemetry_nodes import INTERVAL_S, NodeLoad
from kaiwo_gpu.v1 import agent_pb2

CONNECT_METHOD = "/kaiwo_gpu.v1.AgentService/Connect"
CHANNELS_PER_PROCESS = 4
REGISTER_CONCURRENCY = 32  # registrations in flight per generator process
CONTROL_TIMEOUT_S = 60.0  # for a generator to answer the parent
REGISTER_CALL_TIMEOUT_S = 60.0  # one node's Register write, and the Registered reply
LISTEN_TIMEOUT_S = 3600.0  # a generator waiting for its parent's next word
PIPE_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class GeneratorPlan:
    address: str
    process_index: int
    processes: int
    nodes: int
    gpus: int
    channels: int


@dataclass(frozen=True, slots=True)
class Start:
    t0_mono_s: float
    t0_wall_s: float
    stop_by_mono_s: float  # no batch is due after this, whatever the parent says


@dataclass(frozen=True, slots=True)
class Registered:
    ok: int
    failures: tuple[str, ...]
    first_start_mono_s: float
    last_done_mono_s: float
    latencies_s: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Sent:
    due_mono_s: array[float]
    done_mono_s: array[float]
    last_k: dict[str, int]  # node -> the last batch number it wrote
    stream_failures: tuple[str, ...]


def generator_main(plan: GeneratorPlan, conn: Connection) -> None:
    """Entry point of a generator process; the parent stops it (Ctrl-C is the parent's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        asyncio.run(_generate(plan, conn))


async def _generate(plan: GeneratorPlan, conn: Connection) -> None:
    await Generator(plan, conn).run()


async def receive(conn: Connection, timeout_s: float) -> object:
    """The next message on a pipe; TimeoutError after `timeout_s`, EOFError once it closed.

    Polled, not read in a thread, so cancelling it (Ctrl-C) takes effect at once.
    """
    deadline = time.monotonic() + timeout_s
    while not conn.poll():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no message in {timeout_s:g}s")
        await asyncio.sleep(PIPE_POLL_S)
    return conn.recv()


def _settle(registered: asyncio.Future[bool], *, ok: bool) -> None:
    if not registered.done():  # cancelled when the parent closes the generator early
        registered.set_result(ok)


@dataclass(slots=True)
class Generator:
    plan: GeneratorPlan
    conn: Connection
    started: asyncio.Future[Start] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    due: array[float] = field(default_factory=lambda: array("d"))
    done: array[float] = field(default_factory=lambda: array("d"))
    last_k: dict[str, int] = field(default_factory=dict)
    calls: list[grpc.aio.StreamStreamCall[bytes, agent_pb2.CoordinatorDirective]] = field(
        default_factory=list
    )
    senders: list[asyncio.Task[None]] = field(default_factory=list)
    stream_failures: list[str] = field(default_factory=list)
    register_failures: list[str] = field(default_factory=list)
    register_latencies: list[float] = field(default_factory=list)

    async def run(self) -> None:
        """Serves the parent until it says "close" (or goes away); then closes every stream."""
        plan = self.plan
        channels = [grpc.aio.insecure_channel(plan.address) for _ in range(plan.channels)]
        work: asyncio.Task[None] | None = None
        try:
            await asyncio.wait_for(
                asyncio.gather(*(channel.channel_ready() for channel in channels)),
                CONTROL_TIMEOUT_S,
            )
            self.conn.send(("ready",))
            work = asyncio.create_task(self._work(channels))
            await self._listen()
        finally:
            for task in (work, *self.senders):
                if task is not None:
                    task.cancel()
            await asyncio.gather(
                *(t for t in (work, *self.senders) if t is not None), return_exceptions=True
            )
            for call in self.calls:
                call.cancel()
            for channel in channels:
                await channel.close()

    async def _listen(self) -> None:
        """Start, stop and close from the parent; returns on "close" or when it is gone."""
        while True:
            try:
                message = await receive(self.conn, LISTEN_TIMEOUT_S)
            except (EOFError, OSError, TimeoutError):
                return
            if isinstance(message, Start) and not self.started.done():
                self.started.set_result(message)
            elif message == ("stop",):
                self.stop.set()
            elif message == ("close",):
                return

    async def _work(self, channels: Sequence[grpc.aio.Channel]) -> None:
        plan = self.plan
        try:
            loads = [
                NodeLoad(i, plan.nodes, plan.gpus)
                for i in range(plan.process_index, plan.nodes, plan.processes)
            ]
            start = await self.started
            gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
            registrations = [asyncio.get_running_loop().create_future() for _ in loads]
            self.senders = senders = [
                asyncio.create_task(
                    self._node(load, channels[n % len(channels)], gate, start, registered)
                )
                for n, (load, registered) in enumerate(zip(loads, registrations, strict=True))
            ]
            first = time.monotonic()
            oks = await asyncio.gather(*registrations)
            report = Registered(
                ok=sum(oks),
                failures=tuple(self.register_failures),
                first_start_mono_s=first,
                last_done_mono_s=time.monotonic(),
                latencies_s=tuple(self.register_latencies),
            )
            self.conn.send(("registered", report))
            await asyncio.gather(*senders)
            self.conn.send(
                ("sent", Sent(self.due, self.done, self.last_k, tuple(self.stream_failures)))
            )
        except Exception as error:
            self.conn.send(("error", f"generator {plan.process_index}: {error!r}"))
            raise

    async def _node(
        self,
        load: NodeLoad,
        channel: grpc.aio.Channel,
        gate: asyncio.Semaphore,
        start: Start,
        registered: asyncio.Future[bool],
    ) -> None:
        """Registers the node, then writes its batches on schedule until told to stop."""
        async with gate:
            began = time.monotonic()
            # Opened only now: the coordinator ends a stream with no Register in 10 s.
            connect: grpc.aio.StreamStreamMultiCallable[bytes, agent_pb2.CoordinatorDirective] = (
                channel.stream_stream(
                    CONNECT_METHOD,
                    request_serializer=None,
                    response_deserializer=agent_pb2.CoordinatorDirective.FromString,
                )
            )
            call = connect()
            self.calls.append(call)
            try:
                await asyncio.wait_for(call.write(load.register), REGISTER_CALL_TIMEOUT_S)
                reply = await asyncio.wait_for(call.read(), REGISTER_CALL_TIMEOUT_S)
            except (grpc.aio.AioRpcError, TimeoutError) as error:
                self.register_failures.append(f"{load.name}: {error!r}"[:300])
                _settle(registered, ok=False)
                return
            if not isinstance(reply, agent_pb2.CoordinatorDirective) or not reply.HasField(
                "registered"
            ):
                self.register_failures.append(f"{load.name}: first reply {reply!r}"[:300])
                _settle(registered, ok=False)
                return
            self.register_latencies.append(time.monotonic() - began)
            _settle(registered, ok=True)
        t0 = start.t0_mono_s
        first = max(0, math.ceil((time.monotonic() - t0 - load.offset_s) / INTERVAL_S))
        last = math.floor((start.stop_by_mono_s - t0 - load.offset_s) / INTERVAL_S)
        for k in range(first, last + 1):
            due = t0 + k * INTERVAL_S + load.offset_s
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stop.is_set():
                return
            try:
                await call.write(load.payload(k, load.due_wall_s(start.t0_wall_s, k)))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                details = (
                    f"{error.code().name} {error.details()}"
                    if isinstance(error, grpc.aio.AioRpcError)
                    else repr(error)
                )
                self.stream_failures.append(f"{load.name}: {details}")
                return
            self.due.append(due)
            self.done.append(time.monotonic())
            self.last_k[load.name] = k


class Generators:
    """The generator processes and their pipes; `close` always leaves none running."""

    def __init__(self, address: str, processes: int, nodes: int, gpus: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for p in range(processes):
            parent, child = context.Pipe()
            plan = GeneratorPlan(address, p, processes, nodes, gpus, CHANNELS_PER_PROCESS)
            process = context.Process(
                target=generator_main, args=(plan, child), name=f"generator-{p}", daemon=True
            )
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def send(self, message: object) -> None:
        for conn in self.conns:
            conn.send(message)

    async def gather(self, kind: str, timeout_s: float) -> list[object]:
        """The `kind` message of every generator, in process order."""
        replies = await asyncio.gather(*(receive(conn, timeout_s) for conn in self.conns))
        out: list[object] = []
        for p, reply in enumerate(replies):
            if isinstance(reply, tuple) and reply[0] == "error":
                raise RuntimeError(str(reply[1]))
            if not isinstance(reply, tuple) or reply[0] != kind:
                raise RuntimeError(f"generator {p} answered {reply!r}, not {kind!r}")
            out.append(reply[1] if len(reply) > 1 else None)
        return out

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()
