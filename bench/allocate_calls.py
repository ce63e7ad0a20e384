"""The calls the allocate suite times: bare etcd txns, Allocate, Release and KeepAlive.

Every loop here is bounded by a count and by a deadline (time.monotonic()). This is the
suite's one module that imports the coordinator's internals (its etcd store, txn changes and
inventory parser); the rest of the suite names the store as `Store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import yaml

from bench.lib import Stats
from kaiwo_gpu.coordinator.state.changes import Put, Txn
from kaiwo_gpu.coordinator.state.inventory import load_inventory
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

BARE_PREFIX = "/bench-bare/v1/"
GPU_MODEL = "MI300X"
GPUS_PER_NODE = 8
FRACTION_MILLIS = 100
PER_GPU = 1000 // FRACTION_MILLIS  # 100-millis allocations one GPU holds (memory follows)
CALL_TIMEOUT_S = 10.0

Store = EtcdStore
"""The benchmark's own etcd client: the coordinator's store, for bare txns and revisions."""


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


def stats_of(samples_ns: Sequence[int]) -> Stats:
    if not samples_ns:
        raise SystemExit("a phase took no samples before its time limit; raise --time-limit")
    return Stats.of(samples_ns)


async def timed(
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
    return stats_of(await timed(samples, deadline, lambda _: bare.commit("GPU-seq")))


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
    return Throughput(len(latencies), 0, seconds, revisions, stats_of(latencies))


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
    return Throughput(
        len(latencies), len(counter.failures), seconds, revisions, stats_of(latencies)
    )


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


# --- KeepAlive of held allocations ------------------------------------------------------


def keepalive_request(allocation_id: str) -> allocation_pb2.KeepAliveRequest:
    return allocation_pb2.KeepAliveRequest(allocation_id=allocation_id)


@dataclass(frozen=True, slots=True)
class Renewer:
    """One client renewing the held allocations in turn (one renewal in flight at a time)."""

    api: AllocationServiceAsyncStub
    allocation_ids: Sequence[str]

    async def renew(self, i: int) -> None:
        allocation_id = self.allocation_ids[i % len(self.allocation_ids)]
        await self.api.KeepAlive(keepalive_request(allocation_id), timeout=CALL_TIMEOUT_S)


async def keepalive_throughput(
    apis: Sequence[AllocationServiceAsyncStub],
    store: EtcdStore,
    allocation_ids: Sequence[str],
    count: int,
    deadline: float,
) -> Throughput:
    """Every client renews until `count` renewals are issued or the deadline passes.

    Each client renews its own share of the held allocations, so no two renewals of one
    allocation are ever in flight together: a renewal that rewrote the record would
    otherwise lose its compare to the other, and use no revision.
    """
    clients = list(apis[: len(allocation_ids)])
    counter = Counter(count, deadline)
    latencies: list[int] = []

    async def client(c: int, api: AllocationServiceAsyncStub) -> None:
        mine = allocation_ids[c :: len(clients)]
        renewed = 0
        while counter.take() is not None:
            request = keepalive_request(mine[renewed % len(mine)])
            renewed += 1
            start = time.perf_counter_ns()
            try:
                await api.KeepAlive(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                counter.failures.append(f"{error.code().name}: {error.details()}")
                continue
            latencies.append(time.perf_counter_ns() - start)

    before = await store.revision()
    started = time.perf_counter()
    await asyncio.gather(*(client(c, api) for c, api in enumerate(clients)))
    seconds = time.perf_counter() - started
    revisions = await store.revision() - before
    if counter.failures:
        print(f"  {len(counter.failures)} failed, first: {counter.failures[0]}", flush=True)
    return Throughput(
        len(latencies), len(counter.failures), seconds, revisions, stats_of(latencies)
    )
