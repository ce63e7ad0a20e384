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
5. KeepAlive: the ttl 60 allocations are released (untimed), then N allocations with
   `ttl_seconds` 300 are made and held (default 1000); sequential KeepAlive calls from one
   client renew them in turn (after a warm-up); p50/p99. Then every concurrent client renews
   its own share of them until a fixed count is done (or the time limit passes);
   renewals/s. etcd's revision is read through this process's own store before and after
   each, with nothing else writing, so revisions per renewal is exact (1 while a renewal
   rewrites the allocation record, 0 once it renews the lease alone).

Then the ratios to the targets: Allocate p50 <= 1.25 x (gRPC health p50 + bare txn p50),
the floor of one RPC and one transaction; Allocate p99 <= 2.0 x bare txn p99; >= 2500
allocations/s from one coordinator process with 32 clients. etcd, the coordinator and this
client share the machine's cores, so the CPU each process used in each phase (from /proc) is
printed too, and the coordinator's CPU per allocation under load beside the targets: CPU per
operation carries over between machines better than wall time does.

Run from the repository root:

    .venv/bin/python -m bench allocate [--samples 500] [--warmup 50]
        [--allocations 4000] [--clients 32] [--nodes 64] [--time-limit 120]
        [--value-bytes 600] [--keepalive-allocations 1000] [--keepalives 4000]
        [--profile-coordinator FILE] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from bench.allocate_calls import (
    FRACTION_MILLIS,
    GPU_MODEL,
    GPUS_PER_NODE,
    PER_GPU,
    Store,
    write_inventory,
)
from bench.allocate_measure import Options, measure
from bench.allocate_report import figures, report
from bench.lib import CpuMeter, Outcome, local_cluster, positive_int, run_in_workdir
from bench.suites import SuiteSpec
from kaiwo_gpu.v1 import allocation_pb2_grpc

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

PREFIX = "/bench-allocate/v1/"


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


async def run_cluster(options: Options, workdir: Path) -> Outcome:
    # Sized so a throughput phase (which releases only when it is over) cannot fill the
    # cluster; the sequential phases release every allocation they make, and the ttl 60
    # allocations are released before the KeepAlive phase makes the ones it holds.
    needed = max(options.allocations, options.keepalive_held) + 2 * options.clients
    nodes = max(options.nodes, math.ceil(needed / (GPUS_PER_NODE * PER_GPU)) + 1)
    inventory = workdir / "nodes.yaml"
    gpus = write_inventory(inventory, nodes)

    profiler = ["-m", "cProfile", "-o", str(options.profile)] if options.profile else []
    store: Store | None = None
    channels: list[grpc.aio.Channel] = []
    async with local_cluster(workdir, PREFIX, inventory, python_args=profiler) as cluster:
        coordinator = cluster.coordinator
        try:
            store = Store([cluster.etcd.endpoint])
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
        "--keepalive-allocations",
        type=positive_int,
        default=1000,
        help="allocations held (ttl 300 s) and renewed in the KeepAlive phase, at least "
        "--clients (default 1000)",
    )
    parser.add_argument(
        "--keepalives",
        type=positive_int,
        default=4000,
        help="renewals in the concurrent KeepAlive row (default 4000)",
    )
    parser.add_argument(
        "--profile-coordinator",
        type=Path,
        default=None,
        metavar="FILE",
        help="run the coordinator under cProfile (slows it) and write its stats to FILE",
    )


def run(args: argparse.Namespace) -> Outcome:
    if args.keepalive_allocations < args.clients:
        raise SystemExit("--keepalive-allocations must be at least --clients")
    options = Options(
        samples=args.samples,
        warmup=args.warmup,
        allocations=args.allocations,
        clients=args.clients,
        nodes=args.nodes,
        time_limit_s=args.time_limit,
        value_bytes=args.value_bytes,
        keepalive_held=args.keepalive_allocations,
        keepalives=args.keepalives,
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
        "keepalive_allocations": 16,
        "keepalives": 100,
    },
)
