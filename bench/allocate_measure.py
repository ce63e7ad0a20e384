"""The phases of the allocate suite, in order; each is bounded by its count and --time-limit."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.allocate_calls import (
    CALL_TIMEOUT_S,
    BareTxns,
    Sequential,
    Throughput,
    allocate_throughput,
    bare_latency,
    bare_throughput,
    release_all,
    stats_of,
    timed,
)
from bench.lib import CpuMeter, Stats
from kaiwo_gpu.coordinator.state.store import EtcdStore

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

TTL_S = 60


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
