"""Decision time of the pure strategy engine, per strategy, at every fill level.

For each size (default 100, 1,000 and 10,000 GPUs; 8 GPUs per node) the cluster is filled
with best-fit until it refuses 200 requests in a row, then thinned by releasing allocations
at random to each fill level (default 50%, 90% and 99% of its compute millis). At each
level `place()` is timed for two seeded request streams under every built-in strategy,
without applying the placements (round-robin's state is carried forward): the everyday
mix, and a refusal-heavy one (whole, multi-GPU and large cu-mask shares, most of
which a full cluster must refuse). Placements and refusals are reported apart, because a
refusal explains itself and used to scan the cluster. Also timed at each level: the
incremental snapshot update the coordinator does per commit (`with_allocation` then
`without_allocation`), and a trivial same-process reference operation, so results from a
noisy machine can be read as ratios. Targets at 10,000 GPUs: placement p99 <= 100 us,
refusal p99 <= 1 ms, update p99 <= 100 us, at every fill level.

Run from the repository root:

    .venv/bin/python -m bench engine [--sizes 100,1000,10000] [--fills 0.5,0.9,0.99]
        [--decisions 2000] [--seed 0] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

from bench.lib import Figures, Outcome, Stats, positive_int, print_header
from bench.suites import SuiteSpec
from kaiwo_gpu.common import MILLIS_PER_GPU, AllocationRequest
from kaiwo_gpu.common.models import Isolation
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
FILL_STRATEGY = "best-fit"
TARGET_SIZE = 10_000
TARGET_PLACEMENT_P99_US = 100.0
TARGET_REFUSAL_P99_US = 1000.0
TARGET_UPDATE_P99_US = 100.0
WARMUP = 100
BASELINE_LIST_LEN = 1000
STREAMS = ("mixed", "refusal-heavy")


@dataclass(frozen=True, slots=True)
class DecisionRow:
    size: int
    fill: float
    stream: str
    strategy: str
    placements: Stats | None
    refusals: Stats | None

    @property
    def nofit_share(self) -> float:
        placed = self.placements.count if self.placements else 0
        refused = self.refusals.count if self.refusals else 0
        return refused / max(1, placed + refused)


@dataclass(frozen=True, slots=True)
class UpdateRow:
    size: int
    fill: float
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


def _parse_list(text: str, kind: Callable[[str], float]) -> list[float]:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from exc


def _parse_sizes(text: str) -> list[int]:
    sizes = [int(size) for size in _parse_list(text, int)]
    if not sizes or any(size < GPUS_PER_NODE for size in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be at least {GPUS_PER_NODE} GPUs each")
    return sizes


def _parse_fills(text: str) -> list[float]:
    fills = sorted(_parse_list(text, float))
    if not fills or any(not 0 < fill < 1 for fill in fills):
        raise argparse.ArgumentTypeError("fill levels must lie between 0 and 1 (exclusive)")
    return fills


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


def refusal_heavy_requests(rng: random.Random, prefix: str) -> Iterator[AllocationRequest]:
    """Whole GPUs, 2-8 GPUs on one node and large cu-mask shares: what a full cluster refuses."""
    serial = 0
    while True:
        serial += 1
        request_id = f"{prefix}-{serial:06d}"
        kind = rng.random()
        if kind < 0.4:
            yield AllocationRequest(request_id, count=rng.choice((2, 4, 8)), fraction_millis=1000)
        elif kind < 0.7:
            yield AllocationRequest(request_id, fraction_millis=rng.choice((750, 900, 1000)))
        else:
            yield AllocationRequest(
                request_id, fraction_millis=rng.choice((600, 800)), isolation=Isolation.CU_MASK
            )


SLIVER_ISOLATION = (Isolation.NONE, Isolation.CU_MASK)
"""Slivers of both kinds: a GPU holding cu-mask shares takes no time-shared work."""
SATURATED_AFTER = 200
"""Refusals in a row after which the filled cluster counts as full."""


def saturate(size: int, seed: int) -> Fill:
    """A cluster of `size` GPUs filled with best-fit until it refuses SATURATED_AFTER in a row,
    first the everyday mix, then 2 GiB memory-only requests (about a hundredth of a GPU's
    share, time-shared and cu-mask in turn) into the slivers the mix could not use."""
    started = time.perf_counter()
    snapshot = ClusterSnapshot.build(synthetic_nodes(size // GPUS_PER_NODE, GPUS_PER_NODE))
    placed = refused = 0
    state = SchedulerState()
    max_tries = 100 * size + 1000  # bounded: each placement adds at least 10 millis
    slivers = (
        AllocationRequest(f"fill-s-{n:07d}", memory_mib=2048, isolation=SLIVER_ISOLATION[n % 2])
        for n in range(max_tries)
    )
    mix = random_requests(random.Random(seed), prefix="fill")
    for stream in (mix, slivers):
        in_a_row = 0
        for request in islice(stream, max_tries):
            if in_a_row >= SATURATED_AFTER:
                break
            decision = place(request, snapshot, state, default_strategy=FILL_STRATEGY)
            if isinstance(decision, NoFit):
                refused += 1
                in_a_row += 1
                continue
            in_a_row = 0
            placed += 1
            snapshot = snapshot.with_allocation(decision.as_allocation(f"fill-a-{placed:07d}"))
            state = decision.state
    return Fill(snapshot, placed, refused, _filled(snapshot), time.perf_counter() - started)


def thinned(full: Fill, level: float, seed: int) -> Fill:
    """`full` with allocations released at random until at most `level` of its compute
    millis is allocated: free capacity in the pieces that work left behind, as on a cluster
    where work comes and goes, rather than the slivers best-fit leaves when filling."""
    snapshot = full.snapshot
    capacity = len(snapshot.gpus) * MILLIS_PER_GPU
    allocated = snapshot.allocated_millis()
    victims = sorted(snapshot.allocations)
    random.Random(seed).shuffle(victims)
    gone: list[str] = []
    for allocation_id in victims:
        if allocated <= level * capacity:
            break
        allocated -= sum(share.millis for share in snapshot.allocations[allocation_id].shares)
        gone.append(allocation_id)
    snapshot = snapshot.with_changes((), gone)
    return Fill(snapshot, full.allocations - len(gone), full.refused, _filled(snapshot), 0.0)


def _filled(snapshot: ClusterSnapshot) -> float:
    capacity = len(snapshot.gpus) * MILLIS_PER_GPU
    return snapshot.allocated_millis() / capacity


def measure_strategy(
    snapshot: ClusterSnapshot,
    strategy: str,
    requests: Sequence[AllocationRequest],
    warmup: Sequence[AllocationRequest],
) -> tuple[Stats | None, Stats | None]:
    """Times place() per request on a fixed snapshot: (placements, refusals)."""
    state = SchedulerState()
    for request in warmup:
        decision = place(request, snapshot, state, default_strategy=strategy)
        if isinstance(decision, Placement):
            state = decision.state

    refused = [False] * len(requests)
    state = SchedulerState()

    def decide(i: int) -> None:
        nonlocal state
        decision = place(requests[i], snapshot, state, default_strategy=strategy)
        if isinstance(decision, Placement):
            state = decision.state
        else:
            refused[i] = True

    durations = _timed(len(requests), decide)
    placed_ns = [d for d, no in zip(durations, refused, strict=True) if not no]
    refused_ns = [d for d, no in zip(durations, refused, strict=True) if no]
    return (
        Stats.of(placed_ns) if placed_ns else None,
        Stats.of(refused_ns) if refused_ns else None,
    )


def measure_update(
    snapshot: ClusterSnapshot, fill: float, requests: Sequence[AllocationRequest], warmup: int
) -> UpdateRow | None:
    """Times with_allocation then without_allocation for placements found with best-fit."""
    allocations = []
    for i, request in enumerate(requests):
        decision = place(request, snapshot, default_strategy=FILL_STRATEGY)
        if isinstance(decision, Placement):
            allocations.append(decision.as_allocation(f"bench-a-{i:07d}"))
    if not allocations:
        return None
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
        fill=fill,
        with_stats=Stats.of(with_ns),
        without_stats=Stats.of(without_ns),
        pair_stats=Stats.of(pair_ns),
    )


def _verdict(size: int, stats: Stats | None, target_us: float) -> str:
    if size != TARGET_SIZE or stats is None:
        return "-"
    return "PASS" if stats.p99_ns / 1000 <= target_us else "MISS"


def _us(stats: Stats | None, field: str) -> str:
    return f"{getattr(stats, field) / 1000:.1f}" if stats else "-"


def print_decisions(rows: Sequence[DecisionRow], baseline: Stats) -> None:
    header = (
        f"{'GPUs':>6} {'fill':>6}  {'stream':<14}{'strategy':<14}{'place p50':>10}"
        f"{'place p99':>10}{'refuse p50':>11}{'refuse p99':>11}{'NoFit':>7}"
        f"{'p99/base':>9}  target"
    )
    print_header(header)
    for row in rows:
        worst = max(
            (s.p99_ns for s in (row.placements, row.refusals) if s is not None), default=0.0
        )
        verdicts = (
            _verdict(row.size, row.placements, TARGET_PLACEMENT_P99_US),
            _verdict(row.size, row.refusals, TARGET_REFUSAL_P99_US),
        )
        print(
            f"{row.size:>6} {row.fill:>6.1%}  {row.stream:<14}{row.strategy:<14}"
            f"{_us(row.placements, 'p50_ns'):>10}{_us(row.placements, 'p99_ns'):>10}"
            f"{_us(row.refusals, 'p50_ns'):>11}{_us(row.refusals, 'p99_ns'):>11}"
            f"{row.nofit_share:>7.0%}{worst / baseline.p50_ns:>9.2f}  {'/'.join(verdicts)}"
        )


def print_updates(rows: Sequence[UpdateRow], baseline: Stats) -> None:
    header = (
        f"{'GPUs':>6} {'fill':>6}  {'with p50':>9}{'with p99':>9}{'w/o p50':>9}{'w/o p99':>9}"
        f"{'pair p50':>10}{'pair p99':>10}{'p50/base':>10}  target"
    )
    print_header(header)
    for row in rows:
        w, o, p = row.with_stats, row.without_stats, row.pair_stats
        verdict = "-"
        if row.size == TARGET_SIZE:
            worst = max(w.p99_ns, o.p99_ns) / 1000
            verdict = "PASS" if worst <= TARGET_UPDATE_P99_US else "MISS"
        print(
            f"{row.size:>6} {row.fill:>6.1%}  {w.p50_ns / 1000:>9.1f}{w.p99_ns / 1000:>9.1f}"
            f"{o.p50_ns / 1000:>9.1f}{o.p99_ns / 1000:>9.1f}{p.p50_ns / 1000:>10.1f}"
            f"{p.p99_ns / 1000:>10.1f}{p.p50_ns / baseline.p50_ns:>10.2f}  {verdict}"
        )


def decision_figures(rows: Sequence[DecisionRow], baseline: Stats) -> list[Figures]:
    return [
        {
            "gpus": row.size,
            "fill": row.fill,
            "stream": row.stream,
            "strategy": row.strategy,
            "placements": row.placements.figures("us") if row.placements else None,
            "refusals": row.refusals.figures("us") if row.refusals else None,
            "nofit_share": row.nofit_share,
            "placement_target": _verdict(row.size, row.placements, TARGET_PLACEMENT_P99_US),
            "refusal_target": _verdict(row.size, row.refusals, TARGET_REFUSAL_P99_US),
            "baseline_p50_us": baseline.p50_ns / 1000,
        }
        for row in rows
    ]


def update_figures(rows: Sequence[UpdateRow], baseline: Stats) -> list[Figures]:
    return [
        {
            "gpus": row.size,
            "fill": row.fill,
            "with": row.with_stats.figures("us"),
            "without": row.without_stats.figures("us"),
            "pair": row.pair_stats.figures("us"),
            "p50_over_base": row.pair_stats.p50_ns / baseline.p50_ns,
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
        "--fills",
        type=_parse_fills,
        default=[0.5, 0.9, 0.99],
        help="comma-separated fill levels, shares of compute millis (default 0.5,0.9,0.99)",
    )
    parser.add_argument(
        "--decisions",
        type=positive_int,
        default=2000,
        help="timed decisions per size, fill, stream and strategy (default 2000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of fill and request streams")


def run(args: argparse.Namespace) -> Outcome:
    sizes: list[int] = args.sizes
    levels: list[float] = args.fills
    decisions: int = args.decisions
    seed: int = args.seed
    strategies = list(BUILTIN_STRATEGIES)

    started = time.perf_counter()
    print(
        f"engine decision benchmark: python {platform.python_version()} on {platform.machine()}, "
        f"{decisions} decisions per size, fill, stream and strategy, seed {seed}, "
        f"{GPUS_PER_NODE} GPUs per node, filled with {FILL_STRATEGY} to "
        + ", ".join(f"{level:.0%}" for level in levels)
    )
    baseline = measure_baseline(decisions, seed)
    print(
        f"baseline: sorted() of {BASELINE_LIST_LEN} ints p50 {baseline.p50_ns / 1000:.1f} us, "
        f"p99 {baseline.p99_ns / 1000:.1f} us"
    )

    # The same timed streams and warm-up stream for every size, fill and strategy.
    streams = {
        "mixed": list(islice(random_requests(random.Random(seed + 1), "bench"), decisions)),
        "refusal-heavy": list(
            islice(refusal_heavy_requests(random.Random(seed + 3), "heavy"), decisions)
        ),
    }
    warmup = list(islice(random_requests(random.Random(seed + 2), prefix="warm"), WARMUP))

    decision_rows: list[DecisionRow] = []
    update_rows: list[UpdateRow] = []
    fills: list[Figures] = []
    for size in sizes:
        full = saturate(size, seed)
        print(
            f"filled {len(full.snapshot.gpus)} GPUs until {SATURATED_AFTER} refusals in a row: "
            f"{full.allocations} allocations, {full.refused} refused, {full.filled:.1%} of "
            f"compute millis allocated, in {full.seconds:.1f} s",
            flush=True,
        )
        for level in levels:
            fill = thinned(full, level, seed)
            gpus = len(fill.snapshot.gpus)
            fills.append(
                {
                    "gpus": gpus,
                    "level": level,
                    "allocations": fill.allocations,
                    "filled": fill.filled,
                    "saturated": full.filled,
                    "saturate_s": full.seconds,
                }
            )
            for stream, requests in streams.items():
                for strategy in strategies:
                    placed, refused = measure_strategy(fill.snapshot, strategy, requests, warmup)
                    decision_rows.append(
                        DecisionRow(gpus, fill.filled, stream, strategy, placed, refused)
                    )
            update = measure_update(fill.snapshot, fill.filled, streams["mixed"], WARMUP)
            if update is not None:
                update_rows.append(update)

    print()
    print("place() per decision (placements not applied), placements and refusals apart, in us")
    print_decisions(decision_rows, baseline)
    print()
    print("incremental snapshot update per commit: with_allocation, then without_allocation, us")
    print_updates(update_rows, baseline)
    print()
    total_s = time.perf_counter() - started
    print(
        f"targets at {TARGET_SIZE} GPUs: placement p99 <= {TARGET_PLACEMENT_P99_US:.0f} us, "
        f"refusal p99 <= {TARGET_REFUSAL_P99_US:.0f} us, update p99 <= "
        f"{TARGET_UPDATE_P99_US:.0f} us; p99/base = the worse p99 / baseline p50 "
        f"({baseline.p50_ns / 1000:.1f} us); total {total_s:.1f} s"
    )
    return Outcome(
        0,
        {
            "baseline": {"operation": f"sorted() of {BASELINE_LIST_LEN} ints"}
            | baseline.figures("us"),
            "fills": fills,
            "decisions": decision_figures(decision_rows, baseline),
            "updates": update_figures(update_rows, baseline),
            "targets": {
                "gpus": TARGET_SIZE,
                "placement_p99_us": TARGET_PLACEMENT_P99_US,
                "refusal_p99_us": TARGET_REFUSAL_P99_US,
                "update_p99_us": TARGET_UPDATE_P99_US,
            },
            "total_s": total_s,
        },
    )


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={"sizes": [100, 1000], "fills": [0.5, 0.99], "decisions": 200},
)
