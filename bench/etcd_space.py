"""etcd bytes per allocate+release pair: the history a pair leaves and the tombstone that stays.

A throwaway etcd (temp data dir, 127.0.0.1) and one `kaiwo-gpu coordinator` subprocess on a
small synthetic inventory. Measured, in this order, each phase starting from a compacted
and defragmented database, so etcd's file size is what the phase left:

1. floor (the baseline): N bare puts, from this process, of keys named like the tombstones
   (`<prefix>requests/<request id>` under a prefix the coordinator does not read) with an
   empty value: what remembering N request ids costs etcd at the least.
2. pairs: N sequential Allocate + Release calls through the coordinator (Slurm-like request
   ids and owners, a quarter GPU with cu-mask, optionally a TTL), each leaving a released
   request id (a tombstone) behind.

For each phase: etcd revisions, the growth of etcd's database before compaction (every
revision is kept until compaction: the history), and after compacting to the phase's last
revision and defragmenting (what stays: for the pairs, the tombstones). Then the key and
value sizes of one pair's writes, and the ratios of the pairs' figures to the floor's.

Run from the repository root:

    .venv/bin/python -m bench etcd-space [--pairs 3000] [--ttl 0] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd.rpc import rpc_pb2 as rpc

from bench.allocate_calls import write_inventory
from bench.lib import Figures, Outcome, local_cluster, positive_int, run_in_workdir
from bench.suites import SuiteSpec
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2

PREFIX = "/kaiwo-gpu/v1/"
FLOOR_PREFIX = "/kaiwo-gpx/v1/"
"""As long as PREFIX, so the floor's keys are exactly as long as the tombstones' keys."""
NODES = 4
FIRST_JOB = 1_000_000


def request_id(n: int) -> str:
    """A Slurm TaskProlog's request id for job n on node-00 of cluster `cluster`."""
    return f"slurm-cluster-{FIRST_JOB + n}-0-node-00"


@dataclass(frozen=True, slots=True)
class Space:
    revision: int
    db_bytes: int


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    count: int
    revisions: int
    history_bytes: int
    """Growth of etcd's file before compaction."""
    kept_bytes: int
    """Growth after compaction and defragmentation."""

    def per_item(self, value: int) -> float:
        return value / self.count if self.count else 0.0

    def figures(self) -> Figures:
        return {
            "count": self.count,
            "revisions_per_item": self.per_item(self.revisions),
            "history_bytes_per_item": self.per_item(self.history_bytes),
            "kept_bytes_per_item": self.per_item(self.kept_bytes),
        }


class Etcd:
    """The maintenance calls this benchmark needs, straight through aetcd."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.client: Any = aetcd.Client(host=host, port=int(port), timeout=30)

    async def space(self) -> Space:
        status = await self.client.maintenancestub.Status(rpc.StatusRequest(), timeout=30)
        return Space(int(status.header.revision), int(status.dbSize))

    async def value_size(self, key: bytes) -> int:
        found = await self.client.get(key)
        return len(found.value) if found is not None else 0

    async def compacted(self) -> Space:
        """Compacts to the current revision (waiting for it), defragments; the space after."""
        revision = (await self.space()).revision
        await self.client.compact(revision, physical=True)
        await self.client.maintenancestub.Defragment(rpc.DefragmentRequest(), timeout=60)
        return await self.space()


async def floor_phase(etcd: Etcd, count: int) -> Phase:
    start = await etcd.compacted()
    for n in range(count):
        await etcd.client.put(KeyLayout(FLOOR_PREFIX).request(request_id(n)), b"")
    written = await etcd.space()
    kept = await etcd.compacted()
    await etcd.client.delete_prefix(FLOOR_PREFIX.encode())
    return Phase(
        "floor: bare puts of tombstone-named keys, empty value",
        count,
        written.revision - start.revision,
        written.db_bytes - start.db_bytes,
        kept.db_bytes - start.db_bytes,
    )


async def pairs_phase(
    etcd: Etcd, api: Any, count: int, ttl_s: int, time_limit_s: float
) -> tuple[Phase, dict[str, tuple[int, int]]]:
    """N allocate+release pairs; the phase, and (key, value) sizes of the first pair's writes."""
    layout = KeyLayout(PREFIX)
    start = await etcd.compacted()
    sizes: dict[str, tuple[int, int]] = {}
    deadline = time.perf_counter() + time_limit_s
    done = 0
    for n in range(count):
        if time.perf_counter() > deadline:
            break
        request = types_pb2.AllocationRequest(
            request_id=request_id(n),
            fraction_millis=250,
            isolation_name="cu-mask",
            owner=f"slurm/{FIRST_JOB + n}",
            ttl_seconds=ttl_s,
        )
        made = (await api.Allocate(allocation_pb2.AllocateRequest(request=request))).allocation
        if n == 0:
            for what, key in (
                ("allocation record", layout.allocation(made.id)),
                ("request binding", layout.request(request.request_id)),
                ("GPU version key", layout.gpu(made.gpus[0].uuid)),
            ):
                sizes[what] = (len(key), await etcd.value_size(key))
        await api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.id))
        if n == 0:
            key = layout.request(request.request_id)
            sizes["tombstone"] = (len(key), await etcd.value_size(key))
        done += 1
    written = await etcd.space()
    kept = await etcd.compacted()
    phase = Phase(
        "pairs: Allocate + Release through the coordinator",
        done,
        written.revision - start.revision,
        written.db_bytes - start.db_bytes,
        kept.db_bytes - start.db_bytes,
    )
    return phase, sizes


def report(floor: Phase, pairs: Phase, sizes: dict[str, tuple[int, int]]) -> Figures:
    print()
    print(f"{'phase':<52} {'count':>6} {'rev/item':>9} {'history B':>10} {'kept B':>8}")
    for phase in (floor, pairs):
        print(
            f"{phase.name:<52} {phase.count:>6} {phase.per_item(phase.revisions):>9.2f} "
            f"{phase.per_item(phase.history_bytes):>10.0f} {phase.per_item(phase.kept_bytes):>8.0f}"
        )
    print(
        "(history: etcd's file growth per item before compaction; kept: after compaction "
        "and defragmentation)"
    )
    print()
    print(f"{'one pair writes':<20} {'key B':>6} {'value B':>8}")
    for what, (key, value) in sizes.items():
        print(f"{what:<20} {key:>6} {value:>8}")
    history_ratio = pairs.per_item(pairs.history_bytes) / max(
        floor.per_item(floor.history_bytes), 1
    )
    kept_ratio = pairs.per_item(pairs.kept_bytes) / max(floor.per_item(floor.kept_bytes), 1)
    print()
    print(f"history per pair / floor's per key: {history_ratio:.2f}x")
    print(f"kept per pair (a tombstone) / floor's per key: {kept_ratio:.2f}x")
    return {
        "floor": floor.figures(),
        "pairs": pairs.figures(),
        "sizes": {what: {"key": key, "value": value} for what, (key, value) in sizes.items()},
        "history_ratio": history_ratio,
        "kept_ratio": kept_ratio,
    }


async def run_cluster(args: argparse.Namespace, workdir: Path) -> Outcome:
    inventory = workdir / "nodes.yaml"
    write_inventory(inventory, NODES)
    async with local_cluster(workdir, PREFIX, inventory) as cluster:
        etcd = Etcd(cluster.etcd.endpoint)
        channel = grpc.aio.insecure_channel(cluster.coordinator.address)
        try:
            await etcd.client.connect()
            floor = await floor_phase(etcd, args.pairs)
            api = allocation_pb2_grpc.AllocationServiceStub(channel)
            pairs, sizes = await pairs_phase(etcd, api, args.pairs, args.ttl, args.time_limit)
            if cluster.coordinator_exited():
                return Outcome(1)
            return Outcome(0, report(floor, pairs, sizes))
        finally:
            await channel.close()
            await etcd.client.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs", type=positive_int, default=3000, help="allocate+release pairs (default 3000)"
    )
    parser.add_argument(
        "--ttl", type=int, default=0, help="ttl_seconds of each allocation (default 0: none)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=300.0,
        help="seconds the pairs may run before they stop early (default 300)",
    )


def run(args: argparse.Namespace) -> Outcome:
    started = time.perf_counter()
    print(
        f"etcd space benchmark: python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.pairs} pairs, ttl {args.ttl}s"
    )
    return run_in_workdir(functools.partial(run_cluster, args), started)


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={"pairs": 200, "time_limit": 30.0},
)
