"""Lease reclaim: how long the capacity of allocations whose holders vanish takes to come back.

etcd revokes at most ~1,000 expired leases a second, so allocations on leases of their own
come back at that rate; a client session's allocations share one lease per TTL and come back
with it. A throwaway etcd (temp data dir, 127.0.0.1) and one `kaiwo-gpu coordinator`
subprocess over a static inventory (`--inventory`, or one written with enough MI300X GPUs:
each allocation is 100 millis, ten to a GPU). Two phases in one run, each starting empty:

1. baseline: `--baseline` allocations without a session (a lease each), the per-allocation
   design at a count it can afford. Their leases are renewed straight in etcd while they are
   made (one KeepAlive RPC per allocation would load the coordinator beyond the point), so
   they all expire together, as a vanished holder's would.
2. sessions: `--allocations` allocations spread over `--sessions` client sessions, renewed
   through the coordinator (one KeepAlive per shared lease) while they are made.

Both are made by `--concurrency` concurrent Allocate calls with `ttl_seconds` `--ttl`; then
renewing stops (the holders vanish) and the time from the last grant is measured until etcd
holds none of their keys, and until the coordinator's GetClusterStats shows no millis
allocated (the capacity is back for placements). The target: all back within TTL + 5 s. The
baseline's revocation rate (leases a second while they went) projects what leases of their
own would cost the sessions' count.

Run from the repository root:

    .venv/bin/python -m bench reclaim [--allocations 100000] [--baseline 10000] [--ttl 10]
        [--sessions 4] [--concurrency 32] [--inventory FILE] [--quick] [--json FILE]

Every loop is bounded by a count and a deadline (`--time-limit` for making each phase's
allocations, TTL + `--reclaim-limit` for their reclaim).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import os
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd.rpc import rpc_pb2 as rpc

from bench.allocate_calls import GPUS_PER_NODE, PER_GPU, Counter, write_inventory
from bench.lib import Figures, Outcome, local_cluster, positive_int, run_in_workdir
from bench.suites import SuiteSpec
from kaiwo_gpu.coordinator.state.keys import KeyKind, KeyLayout
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2

PREFIX = "/kaiwo-gpu/v1/"
FRACTION_MILLIS = 1000 // PER_GPU
CALL_TIMEOUT_S = 30.0
POLL_S = 0.1
PROBE_SHARE = 0.1
"""At most this share of the time goes to polls, so the probe does not slow what it times
(a GetClusterStats over 100,000 allocations takes the coordinator milliseconds)."""
TARGET_SLACK_S = 5.0
"""The target: every allocation's capacity back within TTL + this."""
ETCD_REVOKE_RATE = 1000
"""Leases a second etcd revokes at most (its leaseRevokeRate), for the expected figures."""
FAILURES_SHOWN = 3


@dataclass(slots=True)
class Made:
    """What one phase's Allocate calls made."""

    count: int = 0
    failures: list[str] = field(default_factory=list)
    first_at: float = 0.0
    last_at: float = 0.0
    by_lease: dict[int, str] = field(default_factory=dict)
    """One allocation id for each lease, to renew it by."""


@dataclass(frozen=True, slots=True)
class Reclaim:
    name: str
    allocations: int
    leases: int
    sessions: int
    ttl_s: int
    create_s: float
    etcd_s: float
    """From the last grant until etcd held none of the phase's allocation keys."""
    capacity_s: float
    """From the last grant until GetClusterStats showed no millis allocated."""
    revoking_s: float
    """From the first allocation etcd dropped to the last."""
    failures: int

    @property
    def target_s(self) -> float:
        return self.ttl_s + TARGET_SLACK_S

    @property
    def met(self) -> bool:
        """The capacity is back for placements: the coordinator's view has it."""
        return self.capacity_s <= self.target_s

    @property
    def etcd_met(self) -> bool:
        """etcd holds none of the allocations (the view may still be applying deletions)."""
        return self.etcd_s <= self.target_s

    @property
    def leases_per_s(self) -> float | None:
        """Leases revoked a second while they went; None when they went faster than the
        polls can tell (within two polls)."""
        return self.leases / self.revoking_s if self.revoking_s > 2 * POLL_S else None

    def figures(self) -> Figures:
        return {
            "allocations": self.allocations,
            "leases": self.leases,
            "sessions": self.sessions,
            "ttl_s": self.ttl_s,
            "create_s": self.create_s,
            "create_per_s": self.allocations / self.create_s if self.create_s > 0 else None,
            "etcd_reclaim_s": self.etcd_s,
            "capacity_reclaim_s": self.capacity_s,
            "revoking_s": self.revoking_s,
            "leases_revoked_per_s": self.leases_per_s,
            "target_s": self.target_s,
            "target_met": self.met,
            "etcd_target_met": self.etcd_met,
            "failures": self.failures,
        }


class Etcd:
    """Counts a prefix's keys (count_only, no values) and renews leases, straight in etcd."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.client: Any = aetcd.Client(host=host, port=int(port), timeout=30)
        self.endpoint = endpoint

    async def count(self, prefix: bytes) -> int:
        request = rpc.RangeRequest(
            key=prefix, range_end=aetcd.utils.prefix_range_end(prefix), count_only=True
        )
        return int((await self.client.kvstub.Range(request, timeout=30)).count)

    async def refresh(self, lease_ids: list[int]) -> None:
        """Renews the leases over a connection of its own, closed after: an idle one would
        ping etcd, which answers pings without a stream with GOAWAY (too_many_pings)."""
        store = EtcdStore([self.endpoint])
        try:
            await store.refresh_leases(lease_ids)
        finally:
            await store.close()

    async def close(self) -> None:
        await self.client.close()


async def make(
    api: Any,
    made: Made,
    *,
    phase: str,
    count: int,
    ttl_s: int,
    sessions: list[str],
    concurrency: int,
    time_limit_s: float,
) -> None:
    """`count` Allocate calls from `concurrency` workers (fewer if the time limit passes),
    into `made` as they are answered."""
    counter = Counter(count, time.monotonic() + time_limit_s)

    async def worker() -> None:
        while (n := counter.take()) is not None:
            message = types_pb2.AllocationRequest(
                request_id=f"{phase}-{n}", fraction_millis=FRACTION_MILLIS, ttl_seconds=ttl_s
            )
            if sessions:
                message.session = sessions[n % len(sessions)]
            try:
                reply = await api.Allocate(
                    allocation_pb2.AllocateRequest(request=message), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as error:
                made.failures.append(f"Allocate {error.code().name}: {error.details()}")
                continue
            made.count += 1
            made.last_at = time.monotonic()
            made.by_lease.setdefault(reply.allocation.lease_id, reply.allocation.id)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def renew(api: Any, etcd: Etcd, made: Made, shared: bool) -> None:
    """Renews every lease made so far: a shared one through the coordinator (a KeepAlive of
    one of its allocations), the baseline's straight in etcd (a KeepAlive RPC for each of
    thousands of allocations would load the coordinator beyond the point)."""
    if not shared:
        await etcd.refresh(list(made.by_lease))
        return
    for allocation_id in list(made.by_lease.values()):
        try:
            request = allocation_pb2.KeepAliveRequest(allocation_id=allocation_id)
            await api.KeepAlive(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            made.failures.append(f"KeepAlive {error.code().name}: {error.details()}")


async def renewing(every_s: float, renew_once: Callable[[], Awaitable[None]]) -> None:
    """Renews every `every_s` until cancelled (the holders vanish)."""
    while True:
        await asyncio.sleep(every_s)
        await renew_once()


async def until(check: Callable[[], Awaitable[bool]], deadline: float) -> float | None:
    """monotonic() when `check` first holds, polled every POLL_S or less often (PROBE_SHARE);
    None past the deadline."""
    while (asked_at := time.monotonic()) < deadline:
        if await check():
            return time.monotonic()
        took_s = time.monotonic() - asked_at
        await asyncio.sleep(max(POLL_S - took_s, took_s * (1 / PROBE_SHARE - 1)))
    return None


async def run_phase(
    args: argparse.Namespace, etcd: Etcd, api: Any, *, name: str, count: int, sessions: list[str]
) -> Reclaim | None:
    """One phase: make (renewing meanwhile), vanish, measure; None if not all came back."""
    ttl_s = args.ttl
    made = Made(first_at=time.monotonic())
    renew_once = functools.partial(renew, api, etcd, made, bool(sessions))
    renewer = asyncio.create_task(renewing(max(ttl_s / 4, 0.25), renew_once))
    try:
        await make(
            api,
            made,
            phase=name,
            count=count,
            ttl_s=ttl_s,
            sessions=sessions,
            concurrency=args.concurrency,
            time_limit_s=args.time_limit,
        )
    finally:
        renewer.cancel()  # the holders vanish
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
    if made.failures:
        print(f"{name}: {len(made.failures)} calls failed: {'; '.join(made.failures[:3])}")
    if not made.count:
        return None
    prefix = KeyLayout(PREFIX).key(KeyKind.ALLOCATION, "")
    deadline = made.last_at + ttl_s + args.reclaim_limit
    first_drop: float | None = None

    async def etcd_empty() -> bool:
        nonlocal first_drop
        left = await etcd.count(prefix)
        if first_drop is None and left < made.count:
            first_drop = time.monotonic()
        return left == 0

    async def capacity_back() -> bool:
        request = allocation_pb2.GetClusterStatsRequest()
        stats = await api.GetClusterStats(request, timeout=CALL_TIMEOUT_S)
        return int(stats.allocated_millis) == 0

    etcd_done = await until(etcd_empty, deadline)
    capacity_done = await until(capacity_back, deadline) if etcd_done is not None else None
    if etcd_done is None or capacity_done is None:
        left = await etcd.count(prefix)
        print(f"{name}: {left} of {made.count} allocations still in etcd after the limit")
        return None
    return Reclaim(
        name=name,
        allocations=made.count,
        leases=len(made.by_lease),
        sessions=len(sessions),
        ttl_s=ttl_s,
        create_s=made.last_at - made.first_at,
        etcd_s=etcd_done - made.last_at,
        capacity_s=capacity_done - made.last_at,
        revoking_s=etcd_done - (first_drop if first_drop is not None else etcd_done),
        failures=len(made.failures),
    )


def report(baseline: Reclaim, shared: Reclaim) -> Figures:
    print()
    print(
        f"{'phase':<10} {'allocs':>7} {'leases':>7} {'make s':>7} {'made/s':>7} "
        f"{'etcd s':>7} {'back s':>7} {'over TTL':>8} {'leases/s':>9} {'etcd':>6} {'back':>6}"
    )
    for phase in (baseline, shared):
        print(
            f"{phase.name:<10} {phase.allocations:>7} {phase.leases:>7} {phase.create_s:>7.1f} "
            f"{phase.allocations / max(phase.create_s, 1e-9):>7.0f} {phase.etcd_s:>7.1f} "
            f"{phase.capacity_s:>7.1f} {phase.capacity_s - phase.ttl_s:>8.1f} "
            f"{_shown(phase.leases_per_s):>9} {_verdict(phase.etcd_met):>6} "
            f"{_verdict(phase.met):>6}"
        )
    print(
        "(etcd s / back s: from the last grant until etcd held none of the phase's "
        "allocations / until GetClusterStats showed no millis allocated; etcd, back: "
        f"within TTL + {TARGET_SLACK_S:g} s)"
    )
    measured = baseline.leases_per_s
    rate = measured if measured is not None else ETCD_REVOKE_RATE
    projected_s = shared.ttl_s + shared.allocations / rate
    expected_s = shared.ttl_s + shared.allocations / ETCD_REVOKE_RATE
    ratio = projected_s / shared.capacity_s if shared.capacity_s > 0 else math.inf
    print()
    print(
        f"baseline revoked {_shown(measured)} leases/s (etcd's limit: {ETCD_REVOKE_RATE}/s); "
        f"{shared.allocations} allocations on leases of their own would take "
        f"~{projected_s:.0f} s at {rate:.0f}/s ({expected_s:.0f} s at etcd's limit)"
    )
    print(
        f"sessions: {shared.allocations} allocations on {shared.leases} leases back in "
        f"{shared.capacity_s:.1f} s ({shared.etcd_s:.1f} s in etcd), {ratio:.1f}x sooner; "
        f"target TTL + {TARGET_SLACK_S:g} s = {shared.target_s:g} s: {_verdict(shared.met)} "
        f"({_verdict(shared.etcd_met)} in etcd)"
    )
    return {
        "baseline": baseline.figures(),
        "sessions": shared.figures(),
        "baseline_leases_revoked_per_s": measured,
        "projected_own_leases_reclaim_s": projected_s,
        "expected_own_leases_reclaim_s": expected_s,
        "speedup": ratio,
        "target_met": shared.met,
        "etcd_target_met": shared.etcd_met,
    }


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _shown(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0f}"


def inventory_for(path: Path, allocations: int) -> Path:
    nodes = math.ceil(allocations / (PER_GPU * GPUS_PER_NODE)) + 1
    write_inventory(path, nodes)
    return path


async def run_cluster(args: argparse.Namespace, workdir: Path) -> Outcome:
    inventory = args.inventory or inventory_for(
        workdir / "nodes.yaml", max(args.allocations, args.baseline)
    )
    async with local_cluster(workdir, PREFIX, inventory) as cluster:
        etcd = Etcd(cluster.etcd.endpoint)
        channel = grpc.aio.insecure_channel(
            cluster.coordinator.address,
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        try:
            await etcd.client.connect()
            api = allocation_pb2_grpc.AllocationServiceStub(channel)
            stats = await api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
            room = int(stats.capacity_millis) // FRACTION_MILLIS
            if room < max(args.allocations, args.baseline):
                print(f"the inventory holds {room} allocations of {FRACTION_MILLIS} millis")
                return Outcome(1)
            print(f"{stats.gpu_count} GPUs on {stats.node_count} nodes; ttl {args.ttl} s")
            baseline = await run_phase(
                args, etcd, api, name="baseline", count=args.baseline, sessions=[]
            )
            sessions = [f"bench-session-{n}" for n in range(args.sessions)]
            shared = await run_phase(
                args, etcd, api, name="sessions", count=args.allocations, sessions=sessions
            )
            if cluster.coordinator_exited() or baseline is None or shared is None:
                return Outcome(1)
            return Outcome(0, report(baseline, shared))
        finally:
            await channel.close()
            await etcd.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allocations",
        type=positive_int,
        default=100_000,
        help="allocations in client sessions (default 100000)",
    )
    parser.add_argument(
        "--baseline",
        type=positive_int,
        default=10_000,
        help="allocations on leases of their own, the baseline (default 10000)",
    )
    parser.add_argument(
        "--ttl", type=positive_int, default=10, help="ttl_seconds of each allocation (default 10)"
    )
    parser.add_argument(
        "--sessions", type=positive_int, default=4, help="client sessions (default 4)"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=32, help="concurrent Allocates (default 32)"
    )
    parser.add_argument(
        "--inventory",
        type=Path,
        default=None,
        help="a static inventory YAML (default: written with enough MI300X for the count)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=600.0,
        help="seconds each phase may spend allocating before it stops early (default 600)",
    )
    parser.add_argument(
        "--reclaim-limit",
        type=float,
        default=300.0,
        help="seconds past the TTL a phase waits for its capacity to come back (default 300)",
    )


def run(args: argparse.Namespace) -> Outcome:
    started = time.perf_counter()
    print(
        f"lease reclaim benchmark: python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.baseline} baseline allocations, {args.allocations} in "
        f"{args.sessions} sessions, ttl {args.ttl} s"
    )
    return run_in_workdir(functools.partial(run_cluster, args), started)


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={
        "allocations": 300,
        "baseline": 200,
        "ttl": 2,
        "sessions": 2,
        "concurrency": 16,
        "time_limit": 30.0,
        "reclaim_limit": 30.0,
    },
)
