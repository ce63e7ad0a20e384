"""What the benchmark suites share: percentiles, CPU per process from /proc, a throwaway
cluster, and the figures a suite hands back for `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kaiwo_gpu.common import KaiwoGpuError
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd

HOST = "127.0.0.1"
SERVING_TIMEOUT_S = 60.0

Figures = dict[str, object]
"""What a suite measured, as JSON-ready values (the same numbers its tables print)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """A suite's exit status and its figures."""

    status: int
    figures: Figures = field(default_factory=dict)


# --- percentiles ------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


@dataclass(frozen=True, slots=True)
class Stats:
    """p50, p99, mean and max of durations measured in nanoseconds."""

    count: int
    p50_ns: float
    p99_ns: float
    mean_ns: float
    max_ns: float

    @staticmethod
    def of(samples_ns: Sequence[int]) -> Stats:
        ordered = sorted(samples_ns)
        return Stats(
            count=len(ordered),
            p50_ns=percentile(ordered, 0.50),
            p99_ns=percentile(ordered, 0.99),
            mean_ns=statistics.fmean(ordered),
            max_ns=ordered[-1],
        )

    def figures(self, unit: Literal["us", "ms"]) -> Figures:
        """count, p50, p99, mean and max in `unit`, the keys named with it."""
        per_unit_ns = 1000 if unit == "us" else 1_000_000
        return {
            "count": self.count,
            f"p50_{unit}": self.p50_ns / per_unit_ns,
            f"p99_{unit}": self.p99_ns / per_unit_ns,
            f"mean_{unit}": self.mean_ns / per_unit_ns,
            f"max_{unit}": self.max_ns / per_unit_ns,
        }

    @property
    def p50_ms(self) -> float:
        return self.p50_ns / 1e6

    @property
    def p99_ms(self) -> float:
        return self.p99_ns / 1e6

    @property
    def mean_ms(self) -> float:
        return self.mean_ns / 1e6

    @property
    def max_ms(self) -> float:
        return self.max_ns / 1e6

    @property
    def p50_us(self) -> float:
        return self.p50_ns / 1000

    @property
    def p99_us(self) -> float:
        return self.p99_ns / 1000

    @property
    def mean_us(self) -> float:
        return self.mean_ns / 1000

    @property
    def max_us(self) -> float:
        return self.max_ns / 1000


# --- CPU accounting ---------------------------------------------------------------------


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process from /proc; None where unavailable."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields 3.. of proc(5); utime, stime are 14, 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuMark:
    wall_s: float
    by_role: dict[str, float | None]  # CPU seconds so far


@dataclass(frozen=True, slots=True)
class CpuUse:
    phase: str
    ops: int
    wall_s: float
    by_role: dict[str, float | None]  # CPU seconds in the phase; None where unknown

    def share(self, role: str) -> float | None:
        """CPU of a role as a fraction of one core."""
        used = self.by_role.get(role)
        return used / self.wall_s if used is not None and self.wall_s > 0 else None

    def per_op_ms(self, role: str) -> float | None:
        used = self.by_role.get(role)
        return used * 1000 / self.ops if used is not None and self.ops else None

    @property
    def busy(self) -> float:
        """CPU of every role whose CPU is known, as a fraction of all the machine's cores."""
        known = [v for v in self.by_role.values() if v is not None]
        cpus = os.cpu_count() or 1
        return sum(known) / (self.wall_s * cpus) if self.wall_s > 0 else 0.0

    def figures(self) -> Figures:
        """CPU seconds, CPU ms per op and share of one core per role; busy of all cores."""
        return {
            "phase": self.phase,
            "ops": self.ops,
            "wall_s": self.wall_s,
            "cpu_s": dict(self.by_role),
            "cpu_ms_per_op": {role: self.per_op_ms(role) for role in self.by_role},
            "share_of_one_core": {role: self.share(role) for role in self.by_role},
            "busy": self.busy,
        }


@dataclass(slots=True)
class CpuMeter:
    """CPU used by this process and by other processes, by role, between a mark and now.

    `processes` maps each role to its pids; a role's CPU is unknown when one of its
    processes cannot be read. `this_process` names the role of this process.
    """

    processes: Mapping[str, Sequence[int | None]]
    this_process: str
    uses: list[CpuUse] = field(default_factory=list)

    def mark(self) -> CpuMark:
        wall_s = time.perf_counter()
        by_role: dict[str, float | None] = {}
        for role, pids in self.processes.items():
            used = [process_cpu_s(pid) for pid in pids]
            by_role[role] = None if None in used else sum(u or 0.0 for u in used)
        by_role[self.this_process] = time.process_time()
        return CpuMark(wall_s, by_role)

    def since(self, mark: CpuMark, phase: str, ops: int) -> CpuUse:
        now = self.mark()
        by_role: dict[str, float | None] = {}
        for role, after in now.by_role.items():
            before = mark.by_role[role]
            by_role[role] = None if after is None or before is None else after - before
        return CpuUse(phase, ops, now.wall_s - mark.wall_s, by_role)

    def record(self, mark: CpuMark, phase: str, ops: int) -> None:
        """`since`, kept in `uses`."""
        self.uses.append(self.since(mark, phase, ops))


# --- a throwaway etcd and coordinator ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalCluster:
    etcd: LocalEtcd
    coordinator: CoordinatorProcess

    @property
    def etcd_pid(self) -> int | None:
        return self.etcd.process.pid if self.etcd.process else None

    def coordinator_exited(self) -> bool:
        """True, after printing the end of its log, when the coordinator is gone."""
        if self.coordinator.alive():
            return False
        print(f"the coordinator exited early:\n{self.coordinator.log_tail()}")
        return True


@contextlib.asynccontextmanager
async def local_cluster(
    workdir: Path,
    prefix: str,
    inventory: Path | None,
    *,
    python_args: Sequence[str] = (),
    extra_args: Sequence[str] = (),
) -> AsyncIterator[LocalCluster]:
    """etcd (data and log in `workdir`) and a serving coordinator; both stopped on exit."""
    etcd = LocalEtcd(workdir / "etcd", host=HOST, log_path=workdir / "etcd.log")
    coordinator: CoordinatorProcess | None = None
    try:
        etcd.start()
        coordinator = CoordinatorProcess(
            etcd.endpoint,
            prefix,
            inventory,
            workdir / "coordinator.log",
            python_args=python_args,
            extra_args=extra_args,
        )
        coordinator.start()
        await coordinator.wait_serving(SERVING_TIMEOUT_S)
        yield LocalCluster(etcd, coordinator)
    finally:
        if coordinator is not None:
            coordinator.stop()
        etcd.stop()


def run_in_workdir(
    run: Callable[[Path], Coroutine[object, object, Outcome]], started_s: float
) -> Outcome:
    """Runs `run` in a temporary directory, then prints the time since `started_s`.

    Returns what `run` returns with `total_s` added to its figures, or status 1 (and no
    time) when etcd or the coordinator did not come up.
    """
    with tempfile.TemporaryDirectory(prefix="kaiwo-bench-") as workdir:
        try:
            outcome = asyncio.run(run(Path(workdir)))
        except KaiwoGpuError as error:
            print(f"benchmark aborted: {error.message}", file=sys.stderr)
            return Outcome(1, {"error": error.message})
    total_s = time.perf_counter() - started_s
    print(f"total {total_s:.1f} s")
    return Outcome(outcome.status, {**outcome.figures, "total_s": total_s})


# --- flags and tables -------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def print_header(header: str) -> None:
    """A table's column names, underlined."""
    print(header)
    print("-" * len(header))
