"""Telemetry ingestion of one coordinator process: 1,000 nodes x 8 GPUs at 1 Hz.

A throwaway etcd (fsync on, temp data dir, 127.0.0.1) and one `kaiwo-gpu coordinator`
subprocess (no inventory, `--node-ttl=15s --sample-interval=1s`, JSON logs to a temp file).
Load generator processes (--processes, spawned with multiprocessing, a few channels each
with many streams per channel) open one `AgentService.Connect` stream per simulated node,
register it, and from then on write one TelemetryBatch per node per second on a fixed
schedule: node i's batch k is due at t0 + k + i/nodes seconds, so the load is spread evenly
over each second. A batch carries one sample per GPU with the fields an MI300X agent fills
in (gfx/umc activity, edge/hotspot/memory temperature, power and its limit, used VRAM, ECC
counts, one or two processes); the messages are built once per node (a few value variants)
and only their timestamps change before each write. A sender that falls behind sends late
batches at once (no skipping), so the offered load stays 1 batch per node per second for as
long as the generators can keep the schedule.

What the coordinator received is counted without touching it. Every batch's `sampled_at`
(and each sample's) is its scheduled wall time, so the batch number k can be recovered from
it; ListNodes returns, per node, the telemetry of the latest batch the coordinator ingested
and `last_seen`, the coordinator's clock when it did. One ListNodes snapshot opens and one
closes the steady-state window (after --warmup seconds, once every node registered);
batches received in the window = sum over nodes of the difference in batch number, and the
window is timed by the coordinator's own clock (the latest `last_seen` in each snapshot).
A stream delivers in order, so a node's latest ingested batch k means the coordinator has
read every batch before it; one it read but dropped as superseded (latest-wins, when a
batch follows the previous one within half the sample interval) counts as received. On
schedule no two batches of a node come that close; a coordinator that falls behind and then
reads a queue of them shows up in the ingest delay and the backlog instead.
gRPC flow control cannot be relied on to show backpressure here: a stream's window holds
dozens of ~1 KiB batches, longer than the window lasts. So lag is shown three ways:
sender lag (write done minus scheduled time, in the generators), ingest delay (for each
node's latest batch at the closing snapshot, `last_seen` minus `sampled_at`), and backlog
(batches due by the closing snapshot but not yet ingested). After the senders stop, the
last batch every node wrote must show up in ListNodes (the drain check).

CPU of every process over each phase comes from /proc/<pid>/stat (utime + stime).
Registration is reported on its own: it writes each node record and a presence key on a
node lease into etcd; nodes registered early already stream telemetry while later ones
register (they must: the coordinator ends a stream silent for 5 s). The steady state
includes the coordinator keeping 1,000 node leases alive (one refresh per node every 5 s).

Baseline (in this process, before anything else starts, on a quiet machine): the
coordinator's irreducible work per batch, `AgentMessage.FromString` on the same bytes the
generators send plus `agent_reports.checked_batch` (the pure parse + validate step of its
`_ingest`). Coordinator CPU per batch over baseline CPU per batch says how much the
transport, the event loop and the rest of the coordinator cost on top of the work itself.
A second row adds `placement_reading` and `with_health`, the rest of `_ingest`'s pure work.

Verdict: keeps up on one core = received >= 99% of offered and the coordinator used less
than 100% of one core. etcd, the coordinator and the generators share the machine's cores;
where the generators cannot hold the schedule (sender lag past a second), the offered load
was not met and the figures are a lower bound on what the coordinator can take.

Run from the repository root:

    .venv/bin/python -m bench telemetry [--nodes 1000] [--gpus 8] [--duration 30]
        [--warmup 5] [--processes 2] [--baseline-batches 20000] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from pathlib import Path

import grpc

from bench.lib import CpuMeter, Outcome, local_cluster, positive_int, run_in_workdir
from bench.suites import SuiteSpec
from bench.telemetry_baseline import BASELINE_BATCHES, Baseline, measure_baseline
from bench.telemetry_load import Generators
from bench.telemetry_measure import Options, measure
from bench.telemetry_nodes import INTERVAL_S
from bench.telemetry_report import figures, report
from kaiwo_gpu.v1 import allocation_pb2_grpc

PREFIX = "/bench-telemetry/v1/"
COORDINATOR_FLAGS = ("--node-ttl=15s", "--sample-interval=1s")
MAX_LIST_BYTES = 256 * 1024 * 1024


async def run_cluster(options: Options, baseline: Baseline, workdir: Path) -> Outcome:
    generators: Generators | None = None
    channel: grpc.aio.Channel | None = None
    async with local_cluster(workdir, PREFIX, None, extra_args=COORDINATOR_FLAGS) as cluster:
        coordinator = cluster.coordinator
        try:
            generators = Generators(
                coordinator.address, options.processes, options.nodes, options.gpus
            )
            print(
                f"etcd {cluster.etcd.endpoint} pid {cluster.etcd_pid or '?'}, "
                f"coordinator pid {coordinator.pid} on {coordinator.address}, "
                f"generator pids {generators.pids} (data and logs in {workdir})",
                flush=True,
            )
            channel = grpc.aio.insecure_channel(
                coordinator.address,
                options=[("grpc.max_receive_message_length", MAX_LIST_BYTES)],
            )
            api = allocation_pb2_grpc.AllocationServiceStub(channel)
            meter = CpuMeter(
                {
                    "coordinator": [coordinator.pid],
                    "etcd": [cluster.etcd_pid],
                    "generators": generators.pids,
                },
                this_process="bench",
            )
            results = await measure(options, generators, meter, api, coordinator.log_path)
            if cluster.coordinator_exited():
                return Outcome(1)
            report(options, baseline, results)
            return Outcome(0, figures(options, baseline, results))
        finally:
            if generators is not None:
                generators.close()
            if channel is not None:
                await channel.close()


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be 0-3600 seconds")
    return value


def _gpus(text: str) -> int:
    value = positive_int(text)
    if value > 256:
        raise argparse.ArgumentTypeError("a node has at most 256 GPUs")
    return value


def _duration(text: str) -> float:
    value = _seconds(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1 second")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nodes", type=positive_int, default=1000, help="simulated nodes (default 1000)"
    )
    parser.add_argument("--gpus", type=_gpus, default=8, help="GPUs per node, 1-256 (default 8)")
    parser.add_argument(
        "--duration",
        type=_duration,
        default=30.0,
        help="seconds of steady state measured (default 30)",
    )
    parser.add_argument(
        "--warmup",
        type=_seconds,
        default=5.0,
        help="seconds between the last registration and the measurement (default 5)",
    )
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=2,
        help="load generator processes, each with its share of the nodes (default 2)",
    )
    parser.add_argument(
        "--baseline-batches",
        type=positive_int,
        default=BASELINE_BATCHES,
        help=f"batches the baseline times, in this process (default {BASELINE_BATCHES})",
    )


def run(args: argparse.Namespace) -> Outcome:
    options = Options(
        nodes=args.nodes,
        gpus=args.gpus,
        duration_s=args.duration,
        warmup_s=args.warmup,
        processes=min(args.processes, args.nodes),
    )
    started = time.perf_counter()
    print(
        f"telemetry ingest benchmark: python {platform.python_version()} on "
        f"{platform.machine()}, {os.cpu_count()} CPUs shared by etcd, the coordinator and "
        f"{options.processes} generator processes; {options.nodes} nodes x {options.gpus} "
        f"GPUs at {1 / INTERVAL_S:g} Hz = {options.nodes * options.gpus / INTERVAL_S:,.0f} "
        f"samples/s offered; warm-up {options.warmup_s:g} s, steady state "
        f"{options.duration_s:g} s",
        flush=True,
    )
    baseline = measure_baseline(options.nodes, options.gpus, args.baseline_batches)
    print(
        f"baseline: parse + checked_batch {baseline.parse_check_us:.1f} us CPU per batch",
        flush=True,
    )
    try:
        return run_in_workdir(functools.partial(run_cluster, options, baseline), started)
    except KeyboardInterrupt:
        print("interrupted; etcd, the coordinator and the generators were stopped")
        return Outcome(130)


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={
        "nodes": 20,
        "gpus": 2,
        "duration": 2.0,
        "warmup": 2.0,
        "processes": 1,
        "baseline_batches": 2000,
    },
)
