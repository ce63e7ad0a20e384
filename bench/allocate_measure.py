"""The phases of the allocate suite, in order; each is bounded by its count and --time-limit.

The KeepAlive phase comes last, so the phases before it measure what they always did.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.allocate_calls import (
    CALL_TIMEOUT_S,
    BareTxns,
    Renewer,
    Sequential,
    Store,
    Throughput,
    allocate_throughput,
    bare_latency,
    bare_throughput,
    keepalive_throughput,
    release_all,
    stats_of,
    timed,
)
from bench.lib import CpuMeter, Stats

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

TTL_S = 60
KEEPALIVE_TTL_S = 300  # outlives both KeepAlive parts (2 x --time-limit 120): none expires


def concurrent_phase(clients: int) -> str:
    """The name of the concurrent no-TTL Allocate phase, whose CPU the report reads."""
    return f"Allocate x{clients} clients"


@dataclass(frozen=True, slots=True)
class Options:
    samples: int
    warmup: int
    allocations: int
    clients: int
    nodes: int
    time_limit_s: float
    value_bytes: int
    keepalive_held: int
    keepalives: int
    profile: Path | None


@dataclass(frozen=True, slots=True)
class Renewals:
    """KeepAlives of the held allocations, and the etcd revisions they used."""

    held: int
    sequential: Stats
    sequential_revisions: int
    concurrent: Throughput

    @property
    def sequential_per_renewal(self) -> float:
        return self.sequential_revisions / self.sequential.count

    @property
    def concurrent_per_renewal(self) -> float:
        done = self.concurrent.done
        return self.concurrent.revisions / done if done else float("nan")


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
    renewals: Renewals


async def measure(
    options: Options,
    store: Store,
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
    await timed(options.warmup, deadline(), lambda _: health.Check(check, timeout=CALL_TIMEOUT_S))
    mark = meter.mark()
    health_stats = stats_of(
        await timed(
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
        sequential = Sequential(apis[0], name, ttl_s)
        mark = meter.mark()
        stats = stats_of(await timed(options.samples, deadline(), sequential.allocate))
        meter.record(mark, label, stats.count)
        rows.append((stats, int(statistics.median(sequential.record_bytes))))
        print(f"{label}: Allocate p50 {stats.p50_ms:.3f} ms", flush=True)

    await allocate_throughput(apis, store, "warm-par", len(apis) * 2, deadline())
    mark = meter.mark()
    made: list[str] = []
    concurrent = await allocate_throughput(
        apis, store, "par", options.allocations, deadline(), made=made
    )
    meter.record(mark, concurrent_phase(len(apis)), concurrent.done)
    print(f"Allocate x{len(apis)}: {concurrent.per_s:.0f}/s", flush=True)
    await release_all(apis, made, deadline())

    mark = meter.mark()
    leased_made: list[str] = []
    leased_concurrent = await allocate_throughput(
        apis, store, "par-ttl", options.allocations, deadline(), ttl_s=TTL_S, made=leased_made
    )
    meter.record(mark, f"Allocate x{len(apis)}, ttl {TTL_S}s", leased_concurrent.done)
    print(f"Allocate x{len(apis)}, ttl {TTL_S}s: {leased_concurrent.per_s:.0f}/s", flush=True)

    mark = meter.mark()
    bare_concurrent = await bare_throughput(bare, options.allocations, len(apis), deadline())
    meter.record(mark, f"bare etcd txn x{len(apis)} in flight", bare_concurrent.done)

    # Released first (untimed), so none of them expires, and writes, during the renewals.
    await release_all(apis, leased_made, deadline())
    renewals = await measure_keepalive(options, store, apis, meter, deadline)

    return Results(
        bare=bare_stats,
        health=health_stats,
        plain=rows[0][0],
        leased=rows[1][0],
        record_bytes=rows[0][1],
        concurrent=concurrent,
        leased_concurrent=leased_concurrent,
        bare_concurrent=bare_concurrent,
        renewals=renewals,
    )


async def measure_keepalive(
    options: Options,
    store: Store,
    apis: Sequence[AllocationServiceAsyncStub],
    meter: CpuMeter,
    deadline: Callable[[], float],
) -> Renewals:
    """KeepAlive of `keepalive_held` allocations with a lease: one client, then all of them.

    etcd's revision is read before and after each timed part, with nothing else writing,
    so the difference is exactly the revisions the renewals used.
    """
    held: list[str] = []
    await allocate_throughput(
        apis,
        store,
        "keep",
        options.keepalive_held,
        deadline(),
        ttl_s=KEEPALIVE_TTL_S,
        made=held,
    )
    if len(held) < len(apis):
        raise SystemExit(
            f"only {len(held)} allocations to keep alive for {len(apis)} clients; "
            "raise --time-limit or --keepalive-allocations"
        )
    renewer = Renewer(apis[0], held)
    await timed(options.warmup, deadline(), renewer.renew)
    before = await store.revision()
    mark = meter.mark()
    sequential = stats_of(await timed(options.samples, deadline(), renewer.renew))
    meter.record(mark, f"KeepAlive, ttl {KEEPALIVE_TTL_S}s", sequential.count)
    sequential_revisions = await store.revision() - before
    print(
        f"KeepAlive of {len(held)} held: p50 {sequential.p50_ms:.3f} ms, "
        f"{sequential_revisions / sequential.count:.2f} revisions per renewal",
        flush=True,
    )

    mark = meter.mark()
    concurrent = await keepalive_throughput(apis, store, held, options.keepalives, deadline())
    meter.record(mark, f"KeepAlive x{len(apis)} clients", concurrent.done)
    print(f"KeepAlive x{len(apis)}: {concurrent.per_s:.0f}/s", flush=True)
    return Renewals(len(held), sequential, sequential_revisions, concurrent)
