"""What a /metrics scrape costs a full cluster's coordinator, and what it costs Allocate.

A throwaway etcd (temp dir, 127.0.0.1) and one `kaiwo-gpu coordinator` subprocess serving
`/metrics` on 127.0.0.1, its inventory N nodes x 8 MI300X (2,000 nodes by default: 16,000
GPUs, each a handful of series). First, idle: S scrapes one after another, timed, with the
body's size and series count. Then rounds of `--samples` sequential Allocate calls from one client
(each followed by an untimed Release), alternating by round which goes first: quiet (nothing
scrapes) and scraped (a thread scrapes without pause all through the round: the worst case,
which a real Prometheus, scraping every 15-60 s, meets only in bursts). Printed per mode:
Allocate p50, p99 and max (medians of the rounds), the scrapes the round saw and how long
they took, and scraped against quiet.

Run from the repository root:

    .venv/bin/python -m bench scrape [--nodes 2000] [--samples 500] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import os
import platform
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.allocate_calls import Sequential, timed, write_inventory
from bench.lib import SERVING_TIMEOUT_S, Figures, Outcome, Stats, positive_int, run_in_workdir
from bench.suites import SuiteSpec
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd, free_port
from kaiwo_gpu.v1 import allocation_pb2_grpc

PREFIX = "/bench-scrape/v1/"
SCRAPE_TIMEOUT_S = 60.0
MAX_SCRAPES = 10_000
"""A bound on one scraping thread's loop, whatever the round's length."""


PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "Accept-Encoding": "gzip",
}
"""What Prometheus asks for: OpenMetrics first, and gzip."""


def scrape(url: str) -> tuple[float, bytes]:
    """One scrape as Prometheus makes it: its time, and the body unzipped."""
    started = time.perf_counter()
    request = urllib.request.Request(url, headers=PROMETHEUS_HEADERS)
    with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as reply:
        body: bytes = reply.read()
        zipped = reply.headers.get("Content-Encoding") == "gzip"
    took = time.perf_counter() - started
    return took, gzip.decompress(body) if zipped else body


@dataclass
class Scraper:
    """A thread that scrapes `url` back to back until stopped (or MAX_SCRAPES, or an error)."""

    url: str
    durations_s: list[float] = field(default_factory=list)
    error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(SCRAPE_TIMEOUT_S)

    def _run(self) -> None:
        for _ in range(MAX_SCRAPES):
            if self._stop.is_set():
                return
            try:
                took, _ = scrape(self.url)
            except OSError as error:
                self.error = repr(error)
                return
            self.durations_s.append(took)


@dataclass(frozen=True, slots=True)
class Round:
    allocate: Stats
    scrapes: int
    scrape_mean_s: float


async def run_cluster(args: argparse.Namespace, workdir: Path) -> Outcome:
    inventory = workdir / "nodes.yaml"
    gpus = write_inventory(inventory, args.nodes)
    etcd = LocalEtcd(workdir / "etcd", host="127.0.0.1", log_path=workdir / "etcd.log")
    metrics = f"127.0.0.1:{free_port()}"
    url = f"http://{metrics}/metrics"
    coordinator = CoordinatorProcess(
        etcd.endpoint,
        PREFIX,
        inventory,
        workdir / "coordinator.log",
        extra_args=[f"--metrics-listen={metrics}"],
    )
    results: dict[str, list[Round]] = {"quiet": [], "scraped": []}
    try:
        etcd.start()
        coordinator.start()
        await coordinator.wait_serving(SERVING_TIMEOUT_S)
        idle: list[float] = []
        body = b""
        for _ in range(args.scrapes):
            took, body = await asyncio.to_thread(scrape, url)
            idle.append(took)
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        print(
            f"idle scrape of {args.nodes} nodes ({gpus} GPUs): {series} series, "
            f"{len(body) / 1e6:.1f} MB, median {statistics.median(idle):.3f} s "
            f"(min {min(idle):.3f}, max {max(idle):.3f}) over {len(idle)} scrapes",
            flush=True,
        )
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            client = Sequential(allocation_pb2_grpc.AllocationServiceStub(channel), "bench", 0)
            await client.warm(args.warmup, time.monotonic() + args.time_limit)
            offset = args.warmup
            for round_ in range(args.rounds):
                for mode in ("quiet", "scraped") if round_ % 2 == 0 else ("scraped", "quiet"):
                    scraper = Scraper(url)
                    if mode == "scraped":
                        scraper.start()
                    try:
                        samples = await timed(
                            args.samples,
                            time.monotonic() + args.time_limit,
                            functools.partial(lambda base, i: client.allocate(base + i), offset),
                        )
                    finally:
                        await asyncio.to_thread(scraper.stop)
                    if scraper.error:
                        raise RuntimeError(f"a scrape failed: {scraper.error}")
                    offset += args.samples
                    done = Round(
                        Stats.of(samples),
                        len(scraper.durations_s),
                        statistics.fmean(scraper.durations_s) if scraper.durations_s else 0.0,
                    )
                    results[mode].append(done)
                    print(
                        f"round {round_ + 1} {mode:<7}: Allocate p50 {done.allocate.p50_ms:.2f} "
                        f"ms p99 {done.allocate.p99_ms:.2f} ms max {done.allocate.max_ms:.1f} "
                        f"ms; {done.scrapes} scrapes of {done.scrape_mean_s:.3f} s mean",
                        flush=True,
                    )
    finally:
        coordinator.stop()
        etcd.stop()
    figures = report(results)
    figures.update(
        {
            "nodes": args.nodes,
            "gpus": gpus,
            "series": series,
            "body_bytes": len(body),
            "idle_scrape_median_s": statistics.median(idle),
            "idle_scrape_max_s": max(idle),
        }
    )
    return Outcome(0, figures)


def report(results: dict[str, list[Round]]) -> Figures:
    def median(mode: str, pick: str) -> float:
        return float(statistics.median(getattr(r.allocate, pick) for r in results[mode]))

    figures: Figures = {}
    print()
    print(f"{'mode':<8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  scrapes   (medians of rounds)")
    for mode in ("quiet", "scraped"):
        row = {
            "p50_ms": median(mode, "p50_ms"),
            "p99_ms": median(mode, "p99_ms"),
            "max_ms": median(mode, "max_ms"),
            "scrapes": sum(r.scrapes for r in results[mode]),
        }
        figures[mode] = row
        print(
            f"{mode:<8} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['max_ms']:>8.1f}  "
            f"{row['scrapes']:>7}"
        )
    quiet, scraped = figures["quiet"], figures["scraped"]
    assert isinstance(quiet, dict)
    assert isinstance(scraped, dict)
    ratios = {pick: scraped[pick] / quiet[pick] for pick in ("p50_ms", "p99_ms", "max_ms")}
    print()
    print(
        "scraped / quiet: "
        + ", ".join(f"{pick.removesuffix('_ms')} {ratio:.2f}x" for pick, ratio in ratios.items())
    )
    figures["scraped_over_quiet"] = ratios
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nodes", type=positive_int, default=2000, help="inventory nodes of 8 GPUs (2000)"
    )
    parser.add_argument("--scrapes", type=positive_int, default=5, help="idle scrapes timed (5)")
    parser.add_argument(
        "--samples", type=positive_int, default=500, help="timed Allocates per round (500)"
    )
    parser.add_argument("--warmup", type=positive_int, default=30, help="untimed first (30)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds of each mode (2)")
    parser.add_argument(
        "--time-limit", type=float, default=120.0, help="seconds a round may run (default 120)"
    )


def run(args: argparse.Namespace) -> Outcome:
    started = time.perf_counter()
    print(
        f"scrape benchmark: python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared by etcd, coordinator, client and scraper"
    )
    return run_in_workdir(functools.partial(run_cluster, args), started)


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={"nodes": 20, "scrapes": 2, "samples": 30, "warmup": 5, "rounds": 1, "time_limit": 30.0},
)
