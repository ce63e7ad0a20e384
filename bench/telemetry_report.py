"""The figures of the telemetry benchmark: rates, lag, CPU per phase, baseline and verdict.

Keeps up on one core = received >= 99% of offered and the coordinator used less than 100%
of one core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.lib import CpuUse, Figures, percentile, print_header
from bench.telemetry_baseline import BASELINE_NODES, Baseline
from bench.telemetry_load import REGISTER_CONCURRENCY
from bench.telemetry_measure import DRAIN_TIMEOUT_S, Options, Results
from bench.telemetry_nodes import INTERVAL_S, last_due, node_index

KEEPS_UP_FRACTION = 0.99
ROLES = ("coordinator", "etcd", "generators", "bench")


def _spread_ms(values: Sequence[float]) -> Figures | None:
    """count, p50, p99 and max in ms of durations in seconds; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 0.5) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def _ms(values: Sequence[float]) -> str:
    spread = _spread_ms(values)
    if spread is None:
        return "n/a"
    return (
        f"p50 {spread['p50_ms']:.1f} ms, p99 {spread['p99_ms']:.1f} ms, "
        f"max {spread['max_ms']:.1f} ms"
    )


def print_cpu(uses: Sequence[CpuUse]) -> None:
    def cell(value: float | None, width: int, fmt: str) -> str:
        return f"{value:>{width}{fmt}}" if value is not None else f"{'?':>{width}}"

    print(f"{'':<22}{'':>7}{'':>8}{'-- CPU % of one core --':>32}{'--- CPU ms/op ---':>18}")
    header = (
        f"{'phase':<22}{'ops':>7}{'wall s':>8}{'coord':>8}{'etcd':>8}{'gens':>8}{'bench':>8}"
        f"{'coord':>9}{'etcd':>9}{'busy':>6}"
    )
    print_header(header)
    for use in uses:
        shares = "".join(
            cell(None if (s := use.share(role)) is None else s * 100, 8, ".0f") for role in ROLES
        )
        print(
            f"{use.phase:<22}{use.ops:>7}{use.wall_s:>8.2f}{shares}"
            f"{cell(use.per_op_ms('coordinator'), 9, '.3f')}"
            f"{cell(use.per_op_ms('etcd'), 9, '.3f')}{use.busy:>6.0%}"
        )


def print_registration(nodes: int, results: Results) -> None:
    use = results.registration
    latencies = [s for reg in results.registered for s in reg.latencies_s]
    failures = [f for reg in results.registered for f in reg.failures]
    print(
        f"registration: {use.ops}/{nodes} nodes in {use.wall_s:.2f} s "
        f"({use.ops / use.wall_s:.0f}/s, {REGISTER_CONCURRENCY} in flight per generator); "
        f"Connect+Register -> Registered {_ms(latencies)}; telemetry of the nodes already "
        "registered runs alongside"
    )
    for failure in failures[:5]:
        print(f"  registration failed: {failure}")


@dataclass(frozen=True, slots=True)
class Steady:
    """The steady-state figures, derived from the results."""

    offered_batches_s: float
    sent_batches_s: float
    received_batches_s: float
    lags_s: list[float]  # write done - scheduled, batches due in the window
    backlog: list[int]  # per node: batches due by the closing snapshot, not ingested
    coordinator_share: float | None  # of one core
    coordinator_us_per_batch: float | None

    @property
    def received_fraction(self) -> float:
        return self.received_batches_s / self.offered_batches_s

    @property
    def keeps_up(self) -> bool:
        share = self.coordinator_share
        return self.received_fraction >= KEEPS_UP_FRACTION and share is not None and share < 1.0


def steady_figures(nodes: int, results: Results) -> Steady:
    r = results
    window_s = r.closing.at_wall_s - r.opening.at_wall_s
    start_mono, end_mono = r.window_mono_s
    done_in_window = sum(1 for s in r.sent for d in s.done_mono_s if start_mono <= d < end_mono)
    coordinator_s = r.steady.by_role["coordinator"]
    return Steady(
        offered_batches_s=nodes / INTERVAL_S,
        sent_batches_s=done_in_window / (end_mono - start_mono),
        received_batches_s=r.steady.ops / window_s if window_s > 0 else 0.0,
        lags_s=[
            done - due
            for s in r.sent
            for due, done in zip(s.due_mono_s, s.done_mono_s, strict=True)
            if start_mono <= due < end_mono
        ],
        backlog=[
            max(0, last_due(r.closing.at_wall_s, r.t0_wall_s, node_index(n), nodes) - k)
            for n, k in r.closing.batch.items()
        ],
        coordinator_share=r.steady.share("coordinator"),
        coordinator_us_per_batch=coordinator_s * 1e6 / r.steady.ops
        if coordinator_s is not None and r.steady.ops
        else None,
    )


def print_steady(options: Options, results: Results, steady: Steady) -> None:
    r = results
    print(
        f"steady state: {r.closing.at_wall_s - r.opening.at_wall_s:.2f} s between ListNodes "
        f"snapshots (coordinator clock), {options.warmup_s:g} s after the last registration"
    )
    for label, per_s in (
        ("offered (schedule)", steady.offered_batches_s),
        ("sent (writes completed)", steady.sent_batches_s),
        ("received (ingested)", steady.received_batches_s),
    ):
        print(
            f"  {label:<26}{per_s * options.gpus:>9.0f} samples/s {per_s:>8.1f} batches/s "
            f"{per_s / steady.offered_batches_s:>7.1%} of offered"
        )
    late = sum(1 for lag in steady.lags_s if lag > INTERVAL_S)
    print(f"  sender lag (write done - scheduled): {_ms(steady.lags_s)}; {late} over 1 s late")
    for label, shot in (("start", r.opening), ("end", r.closing)):
        print(
            f"  ingest delay at the {label:<5} (last_seen - sampled_at of each node's latest "
            f"batch): {_ms(list(shot.ingest_delay_s.values()))}"
        )
    print(
        f"  backlog at the end: {sum(steady.backlog)} batches due before the closing snapshot "
        f"but not ingested (max {max(steady.backlog, default=0)} on one node)"
    )
    late_nodes = len([n for n in r.closing.batch if n not in r.opening.batch])
    unseen = options.nodes - len(r.closing.batch)
    if late_nodes or unseen:
        print(f"  nodes without telemetry: {late_nodes} at the start, {unseen} at the end")
    stream_failures = [f for s in r.sent for f in s.stream_failures]
    print(
        f"  streams ended (generator side): {len(stream_failures)}; coordinator log: "
        + ", ".join(f"{n} x {event!r}" for event, n in r.ended.items())
    )
    for failure in stream_failures[:5]:
        print(f"    {failure}")
    if r.drain_s is not None:
        print(f"  after the senders stopped: every node's last batch ingested in {r.drain_s:.2f} s")
    else:
        print(
            f"  after the senders stopped: {len(r.undrained)} nodes' last batch not ingested "
            f"within {DRAIN_TIMEOUT_S:g} s (e.g. {', '.join(r.undrained[:3])})"
        )


def print_baseline(gpus: int, baseline: Baseline, steady: Steady) -> None:
    print(
        f"baseline, in this process on a quiet machine ({baseline.batches} batches of "
        f"{gpus} samples, {BASELINE_NODES} nodes' bytes), CPU per batch:"
    )
    print(f"  AgentMessage.FromString + checked_batch  {baseline.parse_check_us:>8.1f} us")
    print(f"  ... + placement_reading + with_health     {baseline.whole_pure_us:>8.1f} us")
    per_batch = steady.coordinator_us_per_batch
    if per_batch is None:
        print("  coordinator, steady state: unknown (no CPU reading or no batch ingested)")
        return
    print(
        f"  coordinator, steady state (all its work)  {per_batch:>8.1f} us = "
        f"{per_batch / baseline.parse_check_us:.1f} x parse + check"
    )
    print(
        f"  one core at that cost (linear extrapolation): {1e6 / per_batch:,.0f} batches/s "
        f"= {1e6 / per_batch * gpus:,.0f} samples/s"
    )


def report(options: Options, baseline: Baseline, results: Results) -> bool:
    """Prints the figures; True when the coordinator keeps up on one core."""
    steady = steady_figures(options.nodes, results)
    print()
    print_registration(options.nodes, results)
    print()
    print_steady(options, results, steady)
    print()
    print("CPU per phase (ops = nodes registered / batches ingested; busy = all / all cores)")
    print_cpu([results.registration, results.steady, results.list_cpu])
    print()
    print_baseline(options.gpus, baseline, steady)
    print()
    lags = sorted(steady.lags_s)
    if lags and percentile(lags, 0.99) > INTERVAL_S:
        print(
            "note: the generators fell over a second behind their schedule; the offered load "
            "was not fully met, so these figures are a lower bound"
        )
    share = steady.coordinator_share
    print(
        f"keeps up on one core: {'yes' if steady.keeps_up else 'no'} (received "
        f"{steady.received_fraction:.1%} of offered, wanted >= {KEEPS_UP_FRACTION:.0%}; "
        f"coordinator {f'{share:.0%}' if share is not None else '?'} of one core, "
        "wanted < 100%)"
    )
    return steady.keeps_up


def figures(options: Options, baseline: Baseline, results: Results) -> Figures:
    """What `report` prints, as JSON-ready values."""
    r = results
    steady = steady_figures(options.nodes, r)
    registration = r.registration
    per_batch = steady.coordinator_us_per_batch
    return {
        "registration": {
            "nodes": options.nodes,
            "registered": registration.ops,
            "seconds": registration.wall_s,
            "per_s": registration.ops / registration.wall_s if registration.wall_s > 0 else None,
            "in_flight_per_generator": REGISTER_CONCURRENCY,
            "latency": _spread_ms([s for reg in r.registered for s in reg.latencies_s]),
            "failures": sum(len(reg.failures) for reg in r.registered),
        },
        "steady": {
            "window_s": r.closing.at_wall_s - r.opening.at_wall_s,
            "offered_batches_s": steady.offered_batches_s,
            "sent_batches_s": steady.sent_batches_s,
            "received_batches_s": steady.received_batches_s,
            "offered_samples_s": steady.offered_batches_s * options.gpus,
            "sent_samples_s": steady.sent_batches_s * options.gpus,
            "received_samples_s": steady.received_batches_s * options.gpus,
            "received_fraction": steady.received_fraction,
            "batches_ingested": r.steady.ops,
            "sender_lag": _spread_ms(steady.lags_s),
            "late_over_1s": sum(1 for lag in steady.lags_s if lag > INTERVAL_S),
            "ingest_delay_start": _spread_ms(list(r.opening.ingest_delay_s.values())),
            "ingest_delay_end": _spread_ms(list(r.closing.ingest_delay_s.values())),
            "backlog_batches": sum(steady.backlog),
            "backlog_max_per_node": max(steady.backlog, default=0),
            "stream_failures": sum(len(s.stream_failures) for s in r.sent),
            "coordinator_log": dict(r.ended),
            "drain_s": r.drain_s,
            "undrained_nodes": len(r.undrained),
        },
        "cpu": [use.figures() for use in (r.registration, r.steady, r.list_cpu)],
        "baseline": {
            "batches": baseline.batches,
            "parse_check_us": baseline.parse_check_us,
            "whole_pure_us": baseline.whole_pure_us,
            "coordinator_us_per_batch": per_batch,
            "coordinator_over_parse_check": per_batch / baseline.parse_check_us
            if per_batch is not None
            else None,
            "one_core_batches_s": 1e6 / per_batch if per_batch else None,
        },
        "keeps_up": steady.keeps_up,
        "coordinator_share_of_one_core": steady.coordinator_share,
    }
