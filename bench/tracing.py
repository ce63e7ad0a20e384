"""What tracing costs an Allocate: the coordinator with no OTEL_* set, against the same with
an OTLP exporter to a local receiver, in alternating rounds of the same run.

A throwaway etcd (temp dir, 127.0.0.1), and for each round one `kaiwo-gpu coordinator`
subprocess on a small synthetic inventory: once with tracing off (nothing in its
environment) and once on (`OTEL_TRACES_EXPORTER=otlp` to an OTLP receiver in this process,
the collector's TraceService from opentelemetry-proto, counting the spans it receives),
which of the two goes first alternating by round. Each round makes N sequential Allocate
calls from one client (a new request_id each, 100 millis, no TTL), each followed by an
untimed Release; only the Allocate is timed. The client here sends no trace context, so
each Allocate is a trace of its own: the server span, the decision and the etcd
transaction. Printed per mode: Allocate p50 and p99 (median over the rounds), the
coordinator's CPU per allocate+release pair from /proc, and the overhead of tracing on
against off.

Run from the repository root:

    .venv/bin/python -m bench tracing [--samples 1000] [--rounds 3] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.allocate_calls import Sequential, timed, write_inventory
from bench.lib import (
    SERVING_TIMEOUT_S,
    Figures,
    Outcome,
    Stats,
    positive_int,
    process_cpu_s,
    run_in_workdir,
)
from bench.suites import SuiteSpec
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.v1 import allocation_pb2_grpc

PREFIX = "/bench-tracing/v1/"
NODES = 4


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(
            len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans
        )
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ (which a coordinator subprocess inherits) for the block."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, before in saved.items():
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


async def one_round(
    workdir: Path, etcd: LocalEtcd, inventory: Path, name: str, args: argparse.Namespace
) -> tuple[Stats, float]:
    """One coordinator's Allocate latency and CPU ms per allocate+release pair."""
    coordinator = CoordinatorProcess(
        etcd.endpoint, PREFIX, inventory, workdir / f"coordinator-{name}.log"
    )
    coordinator.start()
    try:
        await coordinator.wait_serving(SERVING_TIMEOUT_S)
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            client = Sequential(allocation_pb2_grpc.AllocationServiceStub(channel), name, 0)
            deadline = time.monotonic() + args.time_limit
            await client.warm(args.warmup, deadline)
            cpu_before = process_cpu_s(coordinator.pid)
            samples = await timed(
                args.samples, deadline, lambda i: client.allocate(args.warmup + i)
            )
            cpu_after = process_cpu_s(coordinator.pid)
        cpu_ms = (
            (cpu_after - cpu_before) * 1000 / len(samples)
            if cpu_before is not None and cpu_after is not None and samples
            else float("nan")
        )
        return Stats.of(samples), cpu_ms
    finally:
        # In a thread: its last spans are exported on the way out, to this loop's receiver.
        await asyncio.to_thread(coordinator.stop)


async def run_cluster(args: argparse.Namespace, workdir: Path) -> Outcome:
    inventory = workdir / "nodes.yaml"
    write_inventory(inventory, NODES)
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    etcd = LocalEtcd(workdir / "etcd", host="127.0.0.1", log_path=workdir / "etcd.log")
    tracing_on = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "500",  # ms: export while the round runs
    }
    results: dict[str, list[tuple[Stats, float]]] = {"off": [], "on": []}
    try:
        etcd.start()
        for round_ in range(args.rounds):
            # Alternating which goes first, so neither always meets the bigger etcd.
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                with environment(tracing_on if mode == "on" else {}):
                    results[mode].append(
                        await one_round(workdir, etcd, inventory, f"{mode}{round_}", args)
                    )
                stats, cpu_ms = results[mode][-1]
                print(
                    f"round {round_ + 1} tracing {mode:<3}: Allocate p50 {stats.p50_ms:.3f} ms "
                    f"p99 {stats.p99_ms:.3f} ms, coordinator CPU {cpu_ms:.3f} ms per pair",
                    flush=True,
                )
    finally:
        etcd.stop()
        await server.stop(None)
    return Outcome(0, report(results, receiver.spans))


def report(results: dict[str, list[tuple[Stats, float]]], spans: int) -> Figures:
    def median(mode: str, pick: str) -> float:
        values = [getattr(stats, pick) if pick != "cpu" else cpu for stats, cpu in results[mode]]
        return statistics.median(values)

    figures: Figures = {}
    print()
    print(f"{'tracing':<8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/pair':>12}   (medians of rounds)")
    for mode in ("off", "on"):
        row = {
            "p50_ms": median(mode, "p50_ms"),
            "p99_ms": median(mode, "p99_ms"),
            "coordinator_cpu_ms_per_pair": median(mode, "cpu"),
            "rounds": [
                {"p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "cpu_ms": cpu} for s, cpu in results[mode]
            ],
        }
        figures[mode] = row
        print(
            f"{mode:<8} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} "
            f"{row['coordinator_cpu_ms_per_pair']:>12.3f}"
        )
    off, on = figures["off"], figures["on"]
    assert isinstance(off, dict)
    assert isinstance(on, dict)
    overhead_ms = on["p50_ms"] - off["p50_ms"]
    ratio = on["p50_ms"] / off["p50_ms"] if off["p50_ms"] else float("nan")
    cpu = on["coordinator_cpu_ms_per_pair"] - off["coordinator_cpu_ms_per_pair"]
    print()
    print(
        f"tracing on - off: Allocate p50 {overhead_ms:+.3f} ms ({ratio:.2f}x), coordinator "
        f"CPU {cpu:+.3f} ms per allocate+release pair; {spans} spans received"
    )
    off_p50 = [s.p50_ms for s, _ in results["off"]]
    print(f"run-to-run spread of tracing off p50: {min(off_p50):.3f}-{max(off_p50):.3f} ms")
    figures.update(
        {
            "overhead_p50_ms": overhead_ms,
            "on_over_off_p50": ratio,
            "overhead_cpu_ms_per_pair": cpu,
            "spans_received": spans,
        }
    )
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples", type=positive_int, default=1000, help="timed Allocates per round"
    )
    parser.add_argument("--warmup", type=positive_int, default=50, help="untimed first")
    parser.add_argument(
        "--rounds", type=positive_int, default=4, help="rounds of off and on (default 4)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=120.0, help="seconds a round may run (default 120)"
    )


def run(args: argparse.Namespace) -> Outcome:
    started = time.perf_counter()
    print(
        f"tracing benchmark: python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared by etcd, coordinator and client; {args.rounds} rounds "
        f"of {args.samples} sequential Allocates, tracing off and on in turn"
    )
    return run_in_workdir(functools.partial(run_cluster, args), started)


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={"samples": 30, "warmup": 5, "rounds": 1, "time_limit": 30.0},
)
