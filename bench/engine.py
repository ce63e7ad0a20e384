"""Decision time of the pure strategy engine, per strategy, on a half-full synthetic cluster.

For each size (default 100, 1,000 and 10,000 GPUs; 8 GPUs per node) the cluster is filled once
to about 50% of its compute millis with best-fit; then `place()` is timed for the same seeded
request stream under every built-in strategy, without applying the placements (round-robin's
state is carried forward). Also timed: the incremental snapshot update the coordinator does per
commit (`with_allocation` then `without_allocation`), and a trivial same-process reference
operation, so results from a noisy machine can be read as ratios. Target: p99 <= 100 us per
decision at 10,000 GPUs.

Run from the repository root:

    .venv/bin/python -m bench engine [--sizes 100,1000,10000] [--decisions 2000] [--seed 0]
        [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

from bench.lib import Figures, Outcome, Stats, positive_int, print_header
from bench.suites import SuiteSpec
from kaiwo_gpu.common import MILLIS_PER_GPU, AllocationRequest
from kaiwo_gpu.coordinator import (
    BUILTIN_STRATEGIES,
    ClusterSnapshot,
    NoFit,
    Placement,
    SchedulerState,
    place,
)
from kaiwo_gpu.coordinator.local.synthetic import random_requests, synthetic_nodes

GPUS_PER_NODE = 8
FILL_TARGET = 0.5
FILL_STRATEGY = "best-fit"
TARGET_SIZE = 10_000
TARGET_P99_US = 100.0
WARMUP = 100
BASELINE_LIST_LEN = 1000


@dataclass(frozen=True, slots=True)
class DecisionRow:
    size: int
    strategy: str
    stats: Stats
    nofit_share: float


@dataclass(frozen=True, slots=True)
class UpdateRow:
    size: int
    with_stats: Stats
    without_stats: Stats
    pair_stats: Stats


@dataclass(frozen=True, slots=True)
class Fill:
    snapshot: ClusterSnapshot
    allocations: int
    refused: int
    filled: float
    seconds: float


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if not sizes or any(size < GPUS_PER_NODE for size in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be at least {GPUS_PER_NODE} GPUs each")
    return sizes


def _timed(samples: int, operation: Callable[[int], object]) -> list[int]:
    """Runs operation(i) for i in range(samples) with the GC off; one duration per call."""
    durations = [0] * samples
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i in range(samples):
            start = clock()
            operation(i)
            durations[i] = clock() - start
    finally:
        gc.enable()
    return durations


def measure_baseline(samples: int, seed: int) -> Stats:
    """`sorted()` of a fixed shuffled list of 1000 ints: a yardstick for this machine."""
    values = list(range(BASELINE_LIST_LEN))
    random.Random(seed).shuffle(values)
    _timed(min(WARMUP, samples), lambda _: sorted(values))
    return Stats.of(_timed(samples, lambda _: sorted(values)))


def fill_half(size: int, seed: int) -> Fill:
    """A snapshot of `size` GPUs filled with best-fit to FILL_TARGET of its compute millis."""
    started = time.perf_counter()
    snapshot = ClusterSnapshot.build(synthetic_nodes(size // GPUS_PER_NODE, GPUS_PER_NODE))
    capacity = len(snapshot.gpus) * MILLIS_PER_GPU
    target = int(capacity * FILL_TARGET)
    allocated = placed = refused = 0
    state = SchedulerState()
    # Bounded: each placement adds at least 100 millis, so this many tries is plenty.
    max_tries = 4 * target // 100 + 1000
    stream = random_requests(random.Random(seed), prefix="fill")
    for request in islice(stream, max_tries):
        if allocated >= target:
            break
        decision = place(request, snapshot, state, default_strategy=FILL_STRATEGY)
        if isinstance(decision, NoFit):
            refused += 1
            continue
        placed += 1
        snapshot = snapshot.with_allocation(decision.as_allocation(f"fill-a-{placed:07d}"))
        state = decision.state
        allocated += sum(grant.millis for grant in decision.grants)
    filled = sum(u.allocated_millis for u in snapshot.usage) / capacity
    return Fill(snapshot, placed, refused, filled, time.perf_counter() - started)


def measure_strategy(
    snapshot: ClusterSnapshot,
    strategy: str,
    requests: Sequence[AllocationRequest],
    warmup: Sequence[AllocationRequest],
) -> tuple[Stats, float]:
    """Times place() per request on a fixed snapshot; returns the stats and the NoFit share."""
    state = SchedulerState()
    for request in warmup:
        decision = place(request, snapshot, state, default_strategy=strategy)
        if isinstance(decision, Placement):
            state = decision.state

    decisions: list[Placement | NoFit] = []
    state = SchedulerState()

    def decide(i: int) -> None:
        nonlocal state
        decision = place(requests[i], snapshot, state, default_strategy=strategy)
        decisions.append(decision)
        if isinstance(decision, Placement):
            state = decision.state

    durations = _timed(len(requests), decide)
    nofit = sum(isinstance(decision, NoFit) for decision in decisions)
    return Stats.of(durations), nofit / len(requests)


def measure_update(
    snapshot: ClusterSnapshot, requests: Sequence[AllocationRequest], warmup: int
) -> UpdateRow:
    """Times with_allocation then without_allocation for placements found with best-fit."""
    allocations = []
    for i, request in enumerate(requests):
        decision = place(request, snapshot, default_strategy=FILL_STRATEGY)
        if isinstance(decision, Placement):
            allocations.append(decision.as_allocation(f"bench-a-{i:07d}"))
    if not allocations:
        raise SystemExit("no request fitted the half-full cluster; cannot time updates")
    for allocation in allocations[:warmup]:
        snapshot.with_allocation(allocation).without_allocation(allocation.allocation_id)

    with_ns = [0] * len(allocations)
    without_ns = [0] * len(allocations)
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i, allocation in enumerate(allocations):
            start = clock()
            committed = snapshot.with_allocation(allocation)
            middle = clock()
            committed.without_allocation(allocation.allocation_id)
            end = clock()
            with_ns[i] = middle - start
            without_ns[i] = end - middle
    finally:
        gc.enable()
    pair_ns = [a + b for a, b in zip(with_ns, without_ns, strict=True)]
    return UpdateRow(
        size=len(snapshot.gpus),
        with_stats=Stats.of(with_ns),
        without_stats=Stats.of(without_ns),
        pair_stats=Stats.of(pair_ns),
    )


def _verdict(row: DecisionRow) -> str:
    if row.size != TARGET_SIZE:
        return "-"
    return "PASS" if row.stats.p99_us <= TARGET_P99_US else "MISS"


def print_decisions(rows: Sequence[DecisionRow], baseline: Stats) -> None:
    header = (
        f"{'GPUs':>6}  {'strategy':<14}{'p50 us':>9}{'p99 us':>9}{'mean us':>9}"
        f"{'max us':>10}{'NoFit':>8}{'p50/base':>10}  target"
    )
    print_header(header)
    for row in rows:
        s = row.stats
        print(
            f"{row.size:>6}  {row.strategy:<14}{s.p50_us:>9.1f}{s.p99_us:>9.1f}{s.mean_us:>9.1f}"
            f"{s.max_us:>10.1f}{row.nofit_share:>8.1%}{s.p50_us / baseline.p50_us:>10.2f}"
            f"  {_verdict(row)}"
        )


def print_updates(rows: Sequence[UpdateRow], baseline: Stats) -> None:
    header = (
        f"{'GPUs':>6}  {'with p50':>9}{'with p99':>9}{'w/o p50':>9}{'w/o p99':>9}"
        f"{'pair p50':>10}{'pair p99':>10}{'p50/base':>10}"
    )
    print_header(header)
    for row in rows:
        w, o, p = row.with_stats, row.without_stats, row.pair_stats
        print(
            f"{row.size:>6}  {w.p50_us:>9.1f}{w.p99_us:>9.1f}{o.p50_us:>9.1f}{o.p99_us:>9.1f}"
            f"{p.p50_us:>10.1f}{p.p99_us:>10.1f}{p.p50_us / baseline.p50_us:>10.2f}"
        )


def decision_figures(rows: Sequence[DecisionRow], baseline: Stats) -> list[Figures]:
    return [
        {
            "gpus": row.size,
            "strategy": row.strategy,
            **row.stats.figures("us"),
            "nofit_share": row.nofit_share,
            "p50_over_base": row.stats.p50_us / baseline.p50_us,
            "target": _verdict(row),
        }
        for row in rows
    ]


def update_figures(rows: Sequence[UpdateRow], baseline: Stats) -> list[Figures]:
    return [
        {
            "gpus": row.size,
            "with": row.with_stats.figures("us"),
            "without": row.without_stats.figures("us"),
            "pair": row.pair_stats.figures("us"),
            "p50_over_base": row.pair_stats.p50_us / baseline.p50_us,
        }
        for row in rows
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=[100, 1000, 10_000],
        help="comma-separated cluster sizes in GPUs (default 100,1000,10000)",
    )
    parser.add_argument(
        "--decisions",
        type=positive_int,
        default=2000,
        help="timed decisions per size and strategy (default 2000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of fill and request streams")


def run(args: argparse.Namespace) -> Outcome:
    sizes: list[int] = args.sizes
    decisions: int = args.decisions
    seed: int = args.seed
    strategies = list(BUILTIN_STRATEGIES)

    started = time.perf_counter()
    print(
        f"engine decision benchmark: python {platform.python_version()} on {platform.machine()}, "
        f"{decisions} decisions per size and strategy, seed {seed}, "
        f"{GPUS_PER_NODE} GPUs per node, fill {FILL_TARGET:.0%} with {FILL_STRATEGY}"
    )
    baseline = measure_baseline(decisions, seed)
    print(
        f"baseline: sorted() of {BASELINE_LIST_LEN} ints p50 {baseline.p50_us:.1f} us, "
        f"p99 {baseline.p99_us:.1f} us"
    )

    # The same timed stream and warm-up stream for every size and strategy.
    requests = list(islice(random_requests(random.Random(seed + 1), prefix="bench"), decisions))
    warmup = list(islice(random_requests(random.Random(seed + 2), prefix="warm"), WARMUP))

    decision_rows: list[DecisionRow] = []
    update_rows: list[UpdateRow] = []
    fills: list[Figures] = []
    for size in sizes:
        fill = fill_half(size, seed)
        gpus = len(fill.snapshot.gpus)
        print(
            f"fill {gpus} GPUs: {fill.allocations} allocations, {fill.refused} refused, "
            f"{fill.filled:.1%} of compute millis allocated, in {fill.seconds:.1f} s",
            flush=True,
        )
        fills.append(
            {
                "gpus": gpus,
                "allocations": fill.allocations,
                "refused": fill.refused,
                "filled": fill.filled,
                "seconds": fill.seconds,
            }
        )
        for strategy in strategies:
            stats, nofit_share = measure_strategy(fill.snapshot, strategy, requests, warmup)
            decision_rows.append(DecisionRow(gpus, strategy, stats, nofit_share))
        update_rows.append(measure_update(fill.snapshot, requests, WARMUP))

    print()
    print("place() per decision, half-full cluster (placements not applied)")
    print_decisions(decision_rows, baseline)
    print()
    print("incremental snapshot update per commit: with_allocation, then without_allocation")
    print_updates(update_rows, baseline)
    print()
    total_s = time.perf_counter() - started
    print(
        f"target: p99 <= {TARGET_P99_US:.0f} us per decision at {TARGET_SIZE} GPUs; "
        f"p50/base = p50 / baseline p50 ({baseline.p50_us:.1f} us); "
        f"total {total_s:.1f} s"
    )
    return Outcome(
        0,
        {
            "baseline": {"operation": f"sorted() of {BASELINE_LIST_LEN} ints"}
            | baseline.figures("us"),
            "fills": fills,
            "decisions": decision_figures(decision_rows, baseline),
            "updates": update_figures(update_rows, baseline),
            "target": {"gpus": TARGET_SIZE, "p99_us_at_most": TARGET_P99_US},
            "total_s": total_s,
        },
    )


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={"sizes": [100, 1000], "decisions": 200},
)
