"""The phases of the telemetry benchmark, and what the coordinator holds after each.

The coordinator is read only through ListNodes: per node, the telemetry of the latest batch
it ingested and `last_seen`. One snapshot opens and one closes the steady-state window;
after the senders stop, every node's last batch must show up (the drain check).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from bench.lib import CpuMeter, CpuUse
from bench.telemetry_load import CONTROL_TIMEOUT_S, Generators, Registered, Sent, Start
from bench.telemetry_nodes import batch_number, node_index
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc

REGISTER_TIMEOUT_S = 240.0  # for every node together
PROGRESS_EVERY_S = 10.0
ENDED_EVENTS = ("agent stream refused", "agent disconnected")
LIST_TIMEOUT_S = 30.0
LIST_CALLS = 5  # after the run, to show what the counting costs
DRAIN_TIMEOUT_S = 10.0
DRAIN_POLL_S = 0.25
TICK_MARGIN_S = 30.0  # generators stop on their own this long after the planned end


@dataclass(frozen=True, slots=True)
class Options:
    nodes: int
    gpus: int
    duration_s: float
    warmup_s: float
    processes: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    at_wall_s: float  # the coordinator's clock at the latest ingest before the snapshot
    batch: dict[str, int]  # node -> number of the latest batch ingested
    ingest_delay_s: dict[str, float]  # node -> last_seen - sampled_at of that batch
    call_s: float


async def snapshot(
    api: allocation_pb2_grpc.AllocationServiceAsyncStub, t0_wall_s: float, nodes: int
) -> Snapshot:
    started = time.perf_counter()
    reply = await api.ListNodes(allocation_pb2.ListNodesRequest(), timeout=LIST_TIMEOUT_S)
    call_s = time.perf_counter() - started
    batch: dict[str, int] = {}
    delay: dict[str, float] = {}
    latest = 0.0
    for node in reply.nodes:
        if not node.HasField("last_seen") or not node.gpus:
            continue
        telemetry = node.gpus[0].telemetry
        if not telemetry.HasField("sampled_at"):
            continue
        seen_s = node.last_seen.ToNanoseconds() / 1e9
        sampled_s = telemetry.sampled_at.ToNanoseconds() / 1e9
        batch[node.name] = batch_number(sampled_s, t0_wall_s, node_index(node.name), nodes)
        delay[node.name] = seen_s - sampled_s
        latest = max(latest, seen_s)
    return Snapshot(latest, batch, delay, call_s)


# --- the run ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Results:
    registered: list[Registered]
    registration: CpuUse
    steady: CpuUse
    opening: Snapshot
    closing: Snapshot
    sent: list[Sent]
    window_mono_s: tuple[float, float]
    drain_s: float | None
    undrained: list[str]
    list_cpu: CpuUse
    t0_wall_s: float
    ended: dict[str, int]  # coordinator log events that end a stream, by the window's end


def log_events(log_path: Path, event: str) -> int:
    """How many times the coordinator's JSON log names `event`."""
    try:
        return log_path.read_text(errors="replace").count(f'"event": "{event}"')
    except OSError:
        return 0


async def wait_registered(generators: Generators, log_path: Path, nodes: int) -> list[Registered]:
    """Every generator's registration report; progress (from the coordinator log) meanwhile."""
    replies = asyncio.ensure_future(generators.gather("registered", REGISTER_TIMEOUT_S))
    while True:
        done, _ = await asyncio.wait({replies}, timeout=PROGRESS_EVERY_S)
        if done:
            return [r for r in replies.result() if isinstance(r, Registered)]
        print(
            f"  registering: {log_events(log_path, 'agent registered')}/{nodes} so far",
            flush=True,
        )


async def measure(
    options: Options,
    generators: Generators,
    meter: CpuMeter,
    api: allocation_pb2_grpc.AllocationServiceAsyncStub,
    log_path: Path,
) -> Results:
    await generators.gather("ready", CONTROL_TIMEOUT_S)
    nodes = options.nodes
    begin_mono = time.monotonic() + 0.5
    t0_wall = time.time() + (begin_mono - time.monotonic())
    stop_by = begin_mono + REGISTER_TIMEOUT_S + options.warmup_s + options.duration_s
    mark = meter.mark()
    generators.send(Start(begin_mono, t0_wall, stop_by + TICK_MARGIN_S))
    registered = await wait_registered(generators, log_path, nodes)
    registration = meter.since(mark, "registration", sum(r.ok for r in registered))
    print(
        f"registered {registration.ops}/{nodes} nodes in {registration.wall_s:.1f} s",
        flush=True,
    )

    await asyncio.sleep(options.warmup_s)
    opening = await snapshot(api, t0_wall, nodes)
    mark = meter.mark()
    window_start = time.monotonic()
    await asyncio.sleep(options.duration_s)
    steady_cpu = meter.since(mark, "steady state", 0)
    window_end = time.monotonic()
    closing = await snapshot(api, t0_wall, nodes)
    ingested = sum(k - opening.batch[n] for n, k in closing.batch.items() if n in opening.batch)
    steady = CpuUse(steady_cpu.phase, ingested, steady_cpu.wall_s, steady_cpu.by_role)
    ended = {event: log_events(log_path, event) for event in ENDED_EVENTS}

    generators.send(("stop",))
    sent = [s for s in await generators.gather("sent", CONTROL_TIMEOUT_S) if isinstance(s, Sent)]
    stopped = time.monotonic()  # every generator has finished its last write
    last_k = {node: k for s in sent for node, k in s.last_k.items()}
    drain_s: float | None = None
    undrained = sorted(last_k)
    while time.monotonic() - stopped < DRAIN_TIMEOUT_S:
        final = await snapshot(api, t0_wall, nodes)
        undrained = [n for n, k in sorted(last_k.items()) if final.batch.get(n) != k]
        if not undrained:
            drain_s = time.monotonic() - stopped
            break
        await asyncio.sleep(DRAIN_POLL_S)
    mark = meter.mark()
    for _ in range(LIST_CALLS):
        await snapshot(api, t0_wall, nodes)
    list_cpu = meter.since(mark, "ListNodes, no load", LIST_CALLS)
    return Results(
        registered=registered,
        registration=registration,
        steady=steady,
        opening=opening,
        closing=closing,
        sent=sent,
        window_mono_s=(window_start, window_end),
        drain_s=drain_s,
        undrained=undrained,
        list_cpu=list_cpu,
        t0_wall_s=t0_wall,
        ended=ended,
    )
