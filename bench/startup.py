"""Start-up time of the `kaiwo-gpu` commands that every Slurm task and `run` pays.

Method: each command line runs as a fresh process (`python -m kaiwo_gpu.cli.main ...`, what
the console script does) `--runs` times, interleaved with two baselines so that all see the
same noise: a bare `python -c pass`, and the floor of any Python gRPC client, a process that
imports grpcio and makes one gRPC health call to the same coordinator. The client commands
(`nodes`, `list`) make real calls to a throwaway etcd and coordinator; `--help` of a command
builds its parser (and imports what the command needs) without calling anyone. Figures: the
minimum and the median wall time of each, and each median's ratio to both baselines.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.allocate_calls import write_inventory
from bench.lib import Figures, Outcome, local_cluster, positive_int, print_header, run_in_workdir
from bench.suites import SuiteSpec

PREFIX = "/bench-startup/"
BARE = "python -c pass"
FLOOR = "python: grpc + one health call"
HEALTH_CALL = """\
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
"""
CLI = ("-m", "kaiwo_gpu.cli.main")


def commands(address: str) -> dict[str, Sequence[str]]:
    """Name -> the python arguments that run it; the coordinator at `address`."""
    target = f"--coordinator={address}"
    return {
        BARE: ("-c", "pass"),
        FLOOR: ("-c", HEALTH_CALL, address),
        "kaiwo-gpu --version": (*CLI, "--version"),
        "kaiwo-gpu nodes (one call)": (*CLI, "nodes", target, "-o", "json"),
        "kaiwo-gpu list (one call)": (*CLI, "list", target, "-o", "json"),
        "kaiwo-gpu run --help": (*CLI, "run", "--help"),
        "kaiwo-gpu allocate --help": (*CLI, "allocate", "--help"),
        "kaiwo-gpu coordinator --help": (*CLI, "coordinator", "--help"),
        "kaiwo-gpu --help": (*CLI, "--help"),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=positive_int, default=15, help="runs of each command")


def _wall_s(args: Sequence[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - started


def _report(samples: dict[str, list[float]]) -> Figures:
    bare, floor = statistics.median(samples[BARE]), statistics.median(samples[FLOOR])
    figures: Figures = {}
    print_header(f"{'command':<32} {'min ms':>8} {'median ms':>10} {'x bare':>7} {'x floor':>8}")
    for name, walls in samples.items():
        median, low = statistics.median(walls), min(walls)
        figures[name] = {
            "min_ms": round(low * 1000, 1),
            "median_ms": round(median * 1000, 1),
            "ratio_to_bare_python": round(median / bare, 2),
            "ratio_to_grpc_floor": round(median / floor, 2),
        }
        print(
            f"{name:<32} {low * 1000:>8.1f} {median * 1000:>10.1f}"
            f" {median / bare:>7.2f} {median / floor:>8.2f}"
        )
    return figures


async def run_cluster(options: argparse.Namespace, workdir: Path) -> Outcome:
    inventory = workdir / "nodes.yaml"
    write_inventory(inventory, 4)
    async with local_cluster(workdir, PREFIX, inventory) as cluster:
        lines = commands(cluster.coordinator.address)
        samples: dict[str, list[float]] = {name: [] for name in lines}
        for _ in range(options.runs):  # interleaved: a noisy moment hits every command alike
            for name, args in lines.items():
                samples[name].append(_wall_s(args))
        return Outcome(0, _report(samples))


def run(options: argparse.Namespace) -> Outcome:
    return run_in_workdir(functools.partial(run_cluster, options), time.perf_counter())


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={"runs": 3},
)
