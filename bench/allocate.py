"""Allocate round trip and throughput of one coordinator process, against a bare etcd txn.

A throwaway etcd (fsync on, temp data dir, 127.0.0.1) and one `kaiwo-gpu coordinator`
subprocess (JSON logs to a temp file) on a synthetic inventory sized so it never fills
(default 64 nodes x 8 MI300X). Measured, in this order:

1. bare txn: `EtcdStore.commit` from this process of a txn shaped like one allocation's
   commit (compare the mod revision of a GPU version key, put a ~600-byte record under a
   new key and rewrite the GPU key), sequentially; p50/p99.
2. gRPC floor: sequential health Checks to the coordinator (no etcd), for reading the rest.
3. Allocate: sequential Allocate calls (new request_id each, 100 millis, no TTL), each
   followed by an untimed Release; only the Allocate is timed. Then the same with
   `ttl_seconds` 60, which costs the coordinator an extra lease grant.
4. throughput: 32 concurrent clients (one channel each) Allocate without releasing until a
   fixed count is done (or the time limit passes); allocations/s, and how many etcd
   revisions (commits) the coordinator used. The allocations are then released (untimed)
   and the same runs with `ttl_seconds` 60 (a lease grant per allocation, granted
   concurrently per batch). For reference, the bare txn with 32 commits
   in flight from this process (one GPU key per worker, so none conflicts).

Then the ratios to the targets: Allocate p50 <= 1.5 x bare txn p50, Allocate p99 <= 2.0 x
bare txn p99, >= 1000 allocations/s per coordinator process. etcd, the coordinator and this
client share the machine's cores, so the CPU each process used in each phase (from /proc) is
printed too: CPU per operation carries over between machines better than wall time does.

Run from the repository root:

    .venv/bin/python -m bench allocate [--samples 500] [--warmup 50]
        [--allocations 4000] [--clients 32] [--nodes 64] [--time-limit 120]
        [--value-bytes 600] [--profile-coordinator FILE] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.lib import (
    CpuMeter,
    CpuUse,
    Figures,
    Outcome,
    Stats,
    local_cluster,
    positive_int,
    print_header,
    run_in_workdir,
)
from bench.suites import SuiteSpec
from kaiwo_gpu.coordinator.state.changes import Put, Txn
from kaiwo_gpu.coordinator.state.inventory import load_inventory
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

PREFIX = "/bench-allocate/v1/"
BARE_PREFIX = "/bench-bare/v1/"
GPU_MODEL = "MI300X"
GPUS_PER_NODE = 8
FRACTION_MILLIS = 100
PER_GPU = 1000 // FRACTION_MILLIS  # 100-millis allocations one GPU holds (memory follows)
TTL_S = 60
CALL_TIMEOUT_S = 10.0
TARGET_P50_RATIO = 1.5
TARGET_P99_RATIO = 2.0
TARGET_THROUGHPUT = 1000.0
CPU_ROLES = ("client", "coordinator", "etcd")  # this process first


@dataclass(frozen=True, slots=True)
class Throughput:
    done: int
    failed: int
    seconds: float
    revisions: int
    latency: Stats

    @property
    def per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class Counter:
    """Hands out indexes 0..limit-1 to concurrent workers until the limit or the deadline."""

    limit: int
    deadline: float
    issued: int = 0
    failures: list[str] = field(default_factory=list)

    def take(self) -> int | None:
        if self.issued >= self.limit or time.monotonic() > self.deadline:
            return None
        self.issued += 1
        return self.issued - 1


def _stats(samples_ns: Sequence[int]) -> Stats:
    if not samples_ns:
        raise SystemExit("a phase took no samples before its time limit; raise --time-limit")
    return Stats.of(samples_ns)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


async def _timed(
    samples: int, deadline: float, operation: Callable[[int], Awaitable[object]]
) -> list[int]:
    """Awaits operation(i) for i in range(samples) (fewer if the deadline passes), GC off.

    When operation's result is itself awaitable (a Release to undo an Allocate), it is
    awaited after the clock stops.
    """
    durations: list[int] = []
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i in range(samples):
            if time.monotonic() > deadline:
                break
            start = clock()
            after = await operation(i)
            durations.append(clock() - start)
            if isinstance(after, Awaitable):
                await after
    finally:
        gc.enable()
    return durations


# --- processes --------------------------------------------------------------------------


def write_inventory(path: Path, nodes: int) -> int:
    """Writes a YAML inventory of `nodes` x 8 MI300X; returns its GPU count (as parsed)."""
    width = max(2, len(str(nodes - 1)))
    path.write_text(
        yaml.safe_dump(
            {
                "nodes": [
                    {
                        "name": f"node-{n:0{width}d}",
                        "labels": {"kaiwo.ai/pool": "default"},
                        "gpus": [{"model": GPU_MODEL, "count": GPUS_PER_NODE}],
                    }
                    for n in range(nodes)
                ]
            }
        ),
        encoding="utf-8",
    )
    return sum(len(node.gpus) for node in load_inventory(path))


# --- bare etcd transactions -------------------------------------------------------------


class BareTxns:
    """Allocation-shaped txns straight through EtcdStore: one compare, two puts."""

    def __init__(self, store: EtcdStore, value_bytes: int) -> None:
        self.store = store
        self.value = os.urandom(value_bytes // 2 + 1).hex().encode()[:value_bytes]
        self.known: dict[bytes, int] = {}
        self.serial = 0

    async def commit(self, gpu: str) -> None:
        gpu_key = f"{BARE_PREFIX}gpus/{gpu}".encode()
        self.serial += 1
        record_key = f"{BARE_PREFIX}allocations/{self.serial:08d}".encode()
        result = await self.store.commit(
            Txn(
                expect_mod_revision=((gpu_key, self.known.get(gpu_key, 0)),),
                puts=(Put(record_key, self.value), Put(gpu_key, b"")),
                read_on_failure=(gpu_key,),
            )
        )
        if not result.succeeded:
            raise RuntimeError(f"bare txn on {gpu} conflicted; another writer on {BARE_PREFIX}?")
        self.known[gpu_key] = result.revision


async def bare_latency(bare: BareTxns, samples: int, deadline: float) -> Stats:
    return _stats(await _timed(samples, deadline, lambda _: bare.commit("GPU-seq")))


async def bare_throughput(bare: BareTxns, count: int, workers: int, deadline: float) -> Throughput:
    counter = Counter(count, deadline)
    latencies: list[int] = []

    async def worker(w: int) -> None:
        while counter.take() is not None:
            start = time.perf_counter_ns()
            await bare.commit(f"GPU-w{w:03d}")
            latencies.append(time.perf_counter_ns() - start)

    before = await bare.store.revision()
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    seconds = time.perf_counter() - started
    revisions = await bare.store.revision() - before
    return Throughput(len(latencies), 0, seconds, revisions, _stats(latencies))


# --- Allocate through the coordinator ---------------------------------------------------


def allocate_request(request_id: str, ttl_s: int) -> allocation_pb2.AllocateRequest:
    return allocation_pb2.AllocateRequest(
        request=types_pb2.AllocationRequest(
            request_id=request_id,
            fraction_millis=FRACTION_MILLIS,
            owner="bench/allocate-roundtrip",
            ttl_seconds=ttl_s,
        )
    )


@dataclass(slots=True)
class Sequential:
    """One client: Allocate (timed), then Release it (untimed), so the cluster never fills."""

    api: AllocationServiceAsyncStub
    name: str
    ttl_s: int
    record_bytes: list[int] = field(default_factory=list)

    async def allocate(self, i: int) -> Awaitable[object]:
        """One Allocate; returns the Release to await after the clock stops."""
        request_id = f"{self.name}-{i:06d}"
        reply = await self.api.Allocate(
            allocate_request(request_id, self.ttl_s), timeout=CALL_TIMEOUT_S
        )
        if reply.replayed:
            raise RuntimeError(f"request {request_id} was replayed; stale data in etcd?")
        self.record_bytes.append(reply.allocation.ByteSize())
        return self.api.Release(
            allocation_pb2.ReleaseRequest(allocation_id=reply.allocation.id),
            timeout=CALL_TIMEOUT_S,
        )

    async def warm(self, count: int, deadline: float) -> None:
        for i in range(count):
            if time.monotonic() > deadline:
                return
            await (await self.allocate(i))


async def allocate_throughput(
    apis: Sequence[AllocationServiceAsyncStub],
    store: EtcdStore,
    name: str,
    count: int,
    deadline: float,
    *,
    ttl_s: int = 0,
    made: list[str] | None = None,
) -> Throughput:
    """Every client allocates (no release) until `count` are issued or the deadline passes.

    The ids of what was allocated are appended to `made`, for releasing afterwards.
    """
    counter = Counter(count, deadline)
    latencies: list[int] = []

    async def client(api: AllocationServiceAsyncStub) -> None:
        while (i := counter.take()) is not None:
            start = time.perf_counter_ns()
            try:
                reply = await api.Allocate(
                    allocate_request(f"{name}-{i:06d}", ttl_s), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as error:
                counter.failures.append(f"{error.code().name}: {error.details()}")
                continue
            latencies.append(time.perf_counter_ns() - start)
            if made is not None:
                made.append(reply.allocation.id)

    before = await store.revision()
    started = time.perf_counter()
    await asyncio.gather(*(client(api) for api in apis))
    seconds = time.perf_counter() - started
    revisions = await store.revision() - before
    if counter.failures:
        print(f"  {len(counter.failures)} failed, first: {counter.failures[0]}", flush=True)
    return Throughput(len(latencies), len(counter.failures), seconds, revisions, _stats(latencies))


async def release_all(
    apis: Sequence[AllocationServiceAsyncStub], allocation_ids: list[str], deadline: float
) -> None:
    """Untimed: frees the cluster between throughput phases, so both see the same size."""
    pending = list(allocation_ids)

    async def client(api: AllocationServiceAsyncStub) -> None:
        while pending and time.monotonic() < deadline:
            request = allocation_pb2.ReleaseRequest(allocation_id=pending.pop())
            with contextlib.suppress(grpc.aio.AioRpcError):
                await api.Release(request, timeout=CALL_TIMEOUT_S)

    await asyncio.gather(*(client(api) for api in apis))


# --- report -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    value: float
    decimals: int
    wanted: str
    verdict: str


def _verdict(value: float, target: float, *, at_most: bool) -> str:
    ok = value <= target if at_most else value >= target
    return "PASS" if ok else "MISS"


def latency_rows(results: Results) -> list[tuple[str, Stats]]:
    return [
        ("bare etcd txn (1 compare, 2 puts)", results.bare),
        ("gRPC health Check (no etcd)", results.health),
        ("Allocate, no TTL", results.plain),
        (f"Allocate, ttl_seconds {TTL_S}", results.leased),
    ]


def throughput_rows(clients: int, results: Results) -> list[tuple[str, Throughput]]:
    return [
        (f"Allocate x{clients} clients", results.concurrent),
        (f"Allocate x{clients}, ttl {TTL_S}s", results.leased_concurrent),
        (f"bare etcd txn x{clients} in flight", results.bare_concurrent),
    ]


def targets(results: Results) -> list[Target]:
    p50 = results.plain.p50_ms / results.bare.p50_ms
    p99 = results.plain.p99_ms / results.bare.p99_ms
    per_s = results.concurrent.per_s
    return [
        Target(
            "Allocate p50 / bare txn p50",
            p50,
            2,
            f"<= {TARGET_P50_RATIO}",
            _verdict(p50, TARGET_P50_RATIO, at_most=True),
        ),
        Target(
            "Allocate p99 / bare txn p99",
            p99,
            2,
            f"<= {TARGET_P99_RATIO}",
            _verdict(p99, TARGET_P99_RATIO, at_most=True),
        ),
        Target(
            "allocations/s, one coordinator",
            per_s,
            0,
            f">= {TARGET_THROUGHPUT:.0f}",
            _verdict(per_s, TARGET_THROUGHPUT, at_most=False),
        ),
    ]


def print_latencies(rows: Sequence[tuple[str, Stats]], baseline: Stats) -> None:
    header = (
        f"{'operation':<34}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'max ms':>9}"
        f"{'p50/txn':>9}{'p99/txn':>9}"
    )
    print_header(header)
    for name, s in rows:
        print(
            f"{name:<34}{s.count:>6}{s.p50_ms:>9.3f}{s.p99_ms:>9.3f}{s.mean_ms:>9.3f}"
            f"{s.max_ms:>9.3f}{s.p50_ms / baseline.p50_ms:>9.2f}{s.p99_ms / baseline.p99_ms:>9.2f}"
        )


def print_throughputs(rows: Sequence[tuple[str, Throughput]]) -> None:
    header = (
        f"{'operation':<34}{'done':>6}{'failed':>7}{'s':>7}{'per s':>9}{'commits':>8}"
        f"{'per commit':>11}{'p50 ms':>9}{'p99 ms':>9}"
    )
    print_header(header)
    for name, t in rows:
        per_commit = t.done / t.revisions if t.revisions else float("nan")
        print(
            f"{name:<34}{t.done:>6}{t.failed:>7}{t.seconds:>7.2f}{t.per_s:>9.0f}{t.revisions:>8}"
            f"{per_commit:>11.1f}{t.latency.p50_ms:>9.3f}{t.latency.p99_ms:>9.3f}"
        )


def print_cpu(uses: Sequence[CpuUse]) -> None:
    def seconds(value: float | None) -> str:
        return f"{value:>8.2f}" if value is not None else f"{'?':>8}"

    def per_op(value_ms: float | None) -> str:
        return f"{value_ms:>8.3f}" if value_ms is not None else f"{'?':>8}"

    header = (
        f"{'phase':<34}{'ops':>6}{'wall s':>8}{'client':>8}{'coord':>8}{'etcd':>8}"
        f"{'client':>8}{'coord':>8}{'etcd':>8}{'busy':>6}"
    )
    print(f"{'':<34}{'':>6}{'':>8}{'--- CPU seconds ---':>24}{'--- CPU ms per op ---':>24}")
    print_header(header)
    for use in uses:
        used = "".join(seconds(use.by_role[role]) for role in CPU_ROLES)
        per_ops = "".join(per_op(use.per_op_ms(role)) for role in CPU_ROLES)
        print(f"{use.phase:<34}{use.ops:>6}{use.wall_s:>8.2f}{used}{per_ops}{use.busy:>6.0%}")


def print_targets(rows: Sequence[Target]) -> None:
    header = f"{'target':<34}{'value':>9}{'wanted':>10}  verdict"
    print_header(header)
    for row in rows:
        value = f"{row.value:.{row.decimals}f}"
        print(f"{row.name:<34}{value:>9}{row.wanted:>10}  {row.verdict}")


def report(options: Options, results: Results, meter: CpuMeter) -> None:
    clients = options.clients
    print()
    print(
        f"sequential latency, one client (Allocate records {results.record_bytes} B; "
        f"bare txn value {options.value_bytes} B; Allocate rows time the Allocate only)"
    )
    print_latencies(latency_rows(results), results.bare)
    print()
    print(
        f"throughput, {clients} concurrent (commits = etcd revisions used; "
        "p50/p99 = per-call latency under load)"
    )
    print_throughputs(throughput_rows(clients, results))
    print()
    print(
        "CPU used per phase (client = this process, coord = the coordinator process; "
        "busy = all three / all cores)"
    )
    print_cpu(meter.uses)
    print()
    print_targets(targets(results))


def figures(options: Options, results: Results, meter: CpuMeter) -> Figures:
    """What `report` prints, as JSON-ready values."""
    bare = results.bare
    return {
        "record_bytes": results.record_bytes,
        "value_bytes": options.value_bytes,
        "latency": [
            {
                "operation": name,
                **stats.figures("ms"),
                "p50_over_txn": stats.p50_ms / bare.p50_ms,
                "p99_over_txn": stats.p99_ms / bare.p99_ms,
            }
            for name, stats in latency_rows(results)
        ],
        "throughput": [
            {
                "operation": name,
                "done": t.done,
                "failed": t.failed,
                "seconds": t.seconds,
                "per_s": t.per_s,
                "commits": t.revisions,
                "per_commit": t.done / t.revisions if t.revisions else None,
                "p50_ms": t.latency.p50_ms,
                "p99_ms": t.latency.p99_ms,
            }
            for name, t in throughput_rows(options.clients, results)
        ],
        "cpu": [use.figures() for use in meter.uses],
        "targets": [
            {"target": t.name, "value": t.value, "wanted": t.wanted, "verdict": t.verdict}
            for t in targets(results)
        ],
    }


# --- main -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    samples: int
    warmup: int
    allocations: int
    clients: int
    nodes: int
    time_limit_s: float
    value_bytes: int
    profile: Path | None


@dataclass(frozen=True, slots=True)
class Results:
    bare: Stats
    health: Stats
    plain: Stats
    leased: Stats
    record_bytes: int
    concurrent: Throughput
    leased_concurrent: Throughput
    bare_concurrent: Throughput


async def measure(
    options: Options,
    store: EtcdStore,
    apis: Sequence[AllocationServiceAsyncStub],
    channel: grpc.aio.Channel,
    meter: CpuMeter,
) -> Results:
    """Every phase in turn; each is bounded by its count and by --time-limit."""

    def deadline() -> float:
        return time.monotonic() + options.time_limit_s

    bare = BareTxns(store, options.value_bytes)
    warm_until = deadline()
    for _ in range(options.warmup):
        if time.monotonic() > warm_until:
            break
        await bare.commit("GPU-seq")
    mark = meter.mark()
    bare_stats = await bare_latency(bare, options.samples, deadline())
    meter.record(mark, "bare etcd txn", bare_stats.count)
    print(f"bare txn: p50 {bare_stats.p50_ms:.3f} ms", flush=True)

    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest()
    await _timed(options.warmup, deadline(), lambda _: health.Check(check, timeout=CALL_TIMEOUT_S))
    mark = meter.mark()
    health_stats = _stats(
        await _timed(
            options.samples, deadline(), lambda _: health.Check(check, timeout=CALL_TIMEOUT_S)
        )
    )
    meter.record(mark, "gRPC health Check", health_stats.count)

    rows: list[tuple[Stats, int]] = []
    for name, ttl_s, label in (
        ("seq", 0, "Allocate+Release, no TTL"),
        ("ttl", TTL_S, f"Allocate+Release, ttl {TTL_S}s"),
    ):
        await Sequential(apis[0], f"warm-{name}", ttl_s).warm(options.warmup, deadline())
        timed = Sequential(apis[0], name, ttl_s)
        mark = meter.mark()
        stats = _stats(await _timed(options.samples, deadline(), timed.allocate))
        meter.record(mark, label, stats.count)
        rows.append((stats, int(statistics.median(timed.record_bytes))))
        print(f"{label}: Allocate p50 {stats.p50_ms:.3f} ms", flush=True)

    await allocate_throughput(apis, store, "warm-par", len(apis) * 2, deadline())
    mark = meter.mark()
    made: list[str] = []
    concurrent = await allocate_throughput(
        apis, store, "par", options.allocations, deadline(), made=made
    )
    meter.record(mark, f"Allocate x{len(apis)} clients", concurrent.done)
    print(f"Allocate x{len(apis)}: {concurrent.per_s:.0f}/s", flush=True)
    await release_all(apis, made, deadline())

    mark = meter.mark()
    leased_concurrent = await allocate_throughput(
        apis, store, "par-ttl", options.allocations, deadline(), ttl_s=TTL_S
    )
    meter.record(mark, f"Allocate x{len(apis)}, ttl {TTL_S}s", leased_concurrent.done)
    print(f"Allocate x{len(apis)}, ttl {TTL_S}s: {leased_concurrent.per_s:.0f}/s", flush=True)

    mark = meter.mark()
    bare_concurrent = await bare_throughput(bare, options.allocations, len(apis), deadline())
    meter.record(mark, f"bare etcd txn x{len(apis)} in flight", bare_concurrent.done)

    return Results(
        bare=bare_stats,
        health=health_stats,
        plain=rows[0][0],
        leased=rows[1][0],
        record_bytes=rows[0][1],
        concurrent=concurrent,
        leased_concurrent=leased_concurrent,
        bare_concurrent=bare_concurrent,
    )


async def run_cluster(options: Options, workdir: Path) -> Outcome:
    # Sized so a throughput phase (which releases only when it is over) cannot fill the
    # cluster; the sequential phases release every allocation they make.
    needed = options.allocations + 2 * options.clients
    nodes = max(options.nodes, math.ceil(needed / (GPUS_PER_NODE * PER_GPU)) + 1)
    inventory = workdir / "nodes.yaml"
    gpus = write_inventory(inventory, nodes)

    profiler = ["-m", "cProfile", "-o", str(options.profile)] if options.profile else []
    store: EtcdStore | None = None
    channels: list[grpc.aio.Channel] = []
    async with local_cluster(workdir, PREFIX, inventory, python_args=profiler) as cluster:
        coordinator = cluster.coordinator
        try:
            store = EtcdStore([cluster.etcd.endpoint])
            await store.connect()
            print(
                f"etcd {cluster.etcd.endpoint} (data in {workdir}), coordinator pid "
                f"{coordinator.pid} on {coordinator.address}, {nodes} nodes x {GPUS_PER_NODE} "
                f"{GPU_MODEL} = {gpus} GPUs",
                flush=True,
            )
            channels = [
                grpc.aio.insecure_channel(coordinator.address) for _ in range(options.clients)
            ]
            apis: list[AllocationServiceAsyncStub] = [
                allocation_pb2_grpc.AllocationServiceStub(channel) for channel in channels
            ]
            meter = CpuMeter(
                {"coordinator": [coordinator.pid], "etcd": [cluster.etcd_pid]},
                this_process="client",
            )
            results = await measure(options, store, apis, channels[0], meter)
            if cluster.coordinator_exited():
                return Outcome(1)
            report(options, results, meter)
            inventory_figures = {"nodes": nodes, "gpus": gpus}
            return Outcome(0, {"inventory": inventory_figures} | figures(options, results, meter))
        finally:
            for channel in channels:
                await channel.close()
            if store is not None:
                await store.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=500,
        help="timed sequential calls per latency row (default 500)",
    )
    parser.add_argument(
        "--warmup", type=_non_negative, default=50, help="untimed calls before each (default 50)"
    )
    parser.add_argument(
        "--allocations",
        type=positive_int,
        default=4000,
        help="allocations (and bare txns) in each throughput row (default 4000)",
    )
    parser.add_argument(
        "--clients", type=positive_int, default=32, help="concurrent clients (default 32)"
    )
    parser.add_argument(
        "--nodes",
        type=positive_int,
        default=64,
        help=f"inventory nodes of {GPUS_PER_NODE} {GPU_MODEL}, raised if too few (default 64)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=120.0,
        help="seconds each measured phase may run before it stops early (default 120)",
    )
    parser.add_argument(
        "--value-bytes",
        type=positive_int,
        default=600,
        help="size of the record the bare txn writes (default 600)",
    )
    parser.add_argument(
        "--profile-coordinator",
        type=Path,
        default=None,
        metavar="FILE",
        help="run the coordinator under cProfile (slows it) and write its stats to FILE",
    )


def run(args: argparse.Namespace) -> Outcome:
    options = Options(
        samples=args.samples,
        warmup=args.warmup,
        allocations=args.allocations,
        clients=args.clients,
        nodes=args.nodes,
        time_limit_s=args.time_limit,
        value_bytes=args.value_bytes,
        profile=args.profile_coordinator.resolve() if args.profile_coordinator else None,
    )
    started = time.perf_counter()
    print(
        f"allocate round-trip benchmark: python {platform.python_version()} on "
        f"{platform.machine()}, {os.cpu_count()} CPUs shared by etcd, coordinator and client; "
        f"{options.samples} sequential samples after {options.warmup} warm-up, "
        f"{options.allocations} allocations x {options.clients} clients, "
        f"{FRACTION_MILLIS} millis each"
    )
    return run_in_workdir(functools.partial(run_cluster, options), started)


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={
        "samples": 20,
        "warmup": 5,
        "allocations": 100,
        "clients": 4,
        "nodes": 2,
        "time_limit": 20.0,
    },
)
