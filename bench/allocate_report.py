"""The tables of the allocate suite, and the same figures for `--json`.

Latency rows are read as ratios to the bare etcd txn measured in the same run. The targets:
Allocate p50 <= 1.25 x the floor (gRPC health p50 + bare txn p50: one RPC and one
transaction, which no design with a network hop can beat), Allocate p99 <= 2.0 x bare txn
p99 and >= 2500 allocations/s from one coordinator process with 32 clients. Beside them,
the coordinator's CPU per allocation under load, which carries over between machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.allocate_calls import Throughput
from bench.allocate_measure import (
    KEEPALIVE_TTL_S,
    TTL_S,
    Options,
    Renewals,
    Results,
    concurrent_phase,
)
from bench.lib import CpuMeter, CpuUse, Figures, Stats, print_header

TARGET_FLOOR_RATIO = 1.25
TARGET_P99_RATIO = 2.0
TARGET_THROUGHPUT = 2500.0
CPU_ROLES = ("client", "coordinator", "etcd")  # this process first


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
        (f"KeepAlive, ttl_seconds {KEEPALIVE_TTL_S}", results.renewals.sequential),
    ]


def throughput_rows(clients: int, results: Results) -> list[tuple[str, Throughput]]:
    return [
        (f"Allocate x{clients} clients", results.concurrent),
        (f"Allocate x{clients}, ttl {TTL_S}s", results.leased_concurrent),
        (f"bare etcd txn x{clients} in flight", results.bare_concurrent),
        (f"KeepAlive x{clients} clients", results.renewals.concurrent),
    ]


def revision_rows(clients: int, renewals: Renewals) -> list[tuple[str, int, int, int, float]]:
    """(operation, renewals, failed, revisions, revisions per renewal)."""
    sequential, concurrent = renewals.sequential, renewals.concurrent
    return [
        (
            "KeepAlive, one client",
            sequential.count,
            0,
            renewals.sequential_revisions,
            renewals.sequential_per_renewal,
        ),
        (
            f"KeepAlive x{clients} clients",
            concurrent.done,
            concurrent.failed,
            concurrent.revisions,
            renewals.concurrent_per_renewal,
        ),
    ]


def floor_ms(results: Results) -> float:
    """One RPC plus one transaction: the least an Allocate can take, in this run."""
    return results.health.p50_ms + results.bare.p50_ms


def coordinator_ms_per_allocation(clients: int, meter: CpuMeter) -> float | None:
    """The coordinator's CPU per allocation in the concurrent no-TTL phase (None: unread)."""
    phase = concurrent_phase(clients)
    use = next((use for use in meter.uses if use.phase == phase), None)
    return use.per_op_ms("coordinator") if use is not None else None


def targets(results: Results) -> list[Target]:
    floor = results.plain.p50_ms / floor_ms(results)
    p99 = results.plain.p99_ms / results.bare.p99_ms
    per_s = results.concurrent.per_s
    return [
        Target(
            "Allocate p50 / (health + txn p50)",
            floor,
            2,
            f"<= {TARGET_FLOOR_RATIO}",
            _verdict(floor, TARGET_FLOOR_RATIO, at_most=True),
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


# --- tables -----------------------------------------------------------------------------


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
        per_commit = f"{t.done / t.revisions:>11.1f}" if t.revisions else f"{'-':>11}"
        print(
            f"{name:<34}{t.done:>6}{t.failed:>7}{t.seconds:>7.2f}{t.per_s:>9.0f}{t.revisions:>8}"
            f"{per_commit}{t.latency.p50_ms:>9.3f}{t.latency.p99_ms:>9.3f}"
        )


def print_revisions(rows: Sequence[tuple[str, int, int, int, float]]) -> None:
    header = f"{'operation':<34}{'renewals':>9}{'failed':>7}{'revisions':>10}{'per renewal':>12}"
    print_header(header)
    for name, renewals, failed, revisions, per_renewal in rows:
        print(f"{name:<34}{renewals:>9}{failed:>7}{revisions:>10}{per_renewal:>12.3f}")


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


def print_targets(
    rows: Sequence[Target], floor: float, clients: int, coordinator_ms: float | None
) -> None:
    header = f"{'target':<34}{'value':>9}{'wanted':>10}  verdict"
    print_header(header)
    for row in rows:
        value = f"{row.value:.{row.decimals}f}"
        print(f"{row.name:<34}{value:>9}{row.wanted:>10}  {row.verdict}")
    shown = f"{coordinator_ms:.3f} ms" if coordinator_ms is not None else "?"
    print(f"floor = health p50 + bare txn p50 = {floor:.3f} ms")
    print(f"coordinator CPU per allocation, Allocate x{clients} clients: {shown}")


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
        f"etcd revisions per KeepAlive ({results.renewals.held} allocations held, ttl "
        f"{KEEPALIVE_TTL_S}s, renewed in turn; etcd's revision read before and after, "
        "nothing else writing)"
    )
    print_revisions(revision_rows(clients, results.renewals))
    print()
    print(
        "CPU used per phase (client = this process, coord = the coordinator process; "
        "busy = all three / all cores)"
    )
    print_cpu(meter.uses)
    print()
    print_targets(
        targets(results),
        floor_ms(results),
        clients,
        coordinator_ms_per_allocation(clients, meter),
    )


# --- figures ----------------------------------------------------------------------------


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
        "keepalive": {
            "held": results.renewals.held,
            "ttl_s": KEEPALIVE_TTL_S,
            "revisions": [
                {
                    "operation": name,
                    "renewals": renewals,
                    "failed": failed,
                    "revisions": revisions,
                    "per_renewal": per_renewal,
                }
                for name, renewals, failed, revisions, per_renewal in revision_rows(
                    options.clients, results.renewals
                )
            ],
        },
        "cpu": [use.figures() for use in meter.uses],
        "floor_ms": floor_ms(results),
        "coordinator_cpu_ms_per_allocation": coordinator_ms_per_allocation(options.clients, meter),
        "targets": [
            {"target": t.name, "value": t.value, "wanted": t.wanted, "verdict": t.verdict}
            for t in targets(results)
        ],
    }
