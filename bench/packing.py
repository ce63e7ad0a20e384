"""How well each strategy packs GPU shares, on the shape of demand of a public GPU-sharing trace.

Workloads: by default two synthetic ones shaped like Alibaba's openb trace (about 6,200 GPUs in
nodes of 8, 4, 2 and 1; 44% of GPU tasks fractional with peaks near 0.5 and 0.85 GPU, a few
2-, 4- and 8-GPU tasks) and its all-fractional variant (like openb's gpushare100); or the
trace itself, read from the openb CSV files a user gives (--nodes-csv, --tasks-csv).

Protocol 1: tasks in arrival order, none leaving, until 130% of GPU capacity has been
requested; per strategy the share of capacity allocated at 100% and 130% requested, refusals,
idle GPUs, and place() time (placements and refusals apart) and the snapshot update per
commit. Protocol 2: creations and deletions in time order, a refused task dropped; the
time-averaged share allocated and the refusals. Offline bounds over protocol 1's demand: the
better of first-fit-decreasing and least-slack filling (achievable) and an upper bound, with
each strategy's headroom below both. Ratios: allocated over best-fit's, and decision time
over a trivial reference timed in the same process. A full run took about 3 minutes on 2
shared cores; --quick (300 GPUs) a few seconds.

Run from the repository root:

    .venv/bin/python -m bench packing [--gpus 6200] [--seed 0] [--nodes-csv F --tasks-csv F]
        [--plot FILE] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.engine import BASELINE_LIST_LEN, measure_baseline
from bench.lib import Figures, Outcome, Stats, positive_int, print_header
from bench.packing_replay import (
    REQUESTED_LIMIT,
    ArrivalResult,
    Bound,
    DepartureResult,
    offline_bound,
    replay_arrivals,
    replay_departures,
)
from bench.packing_trace import (
    DEFAULT_LOAD,
    TraceError,
    Workload,
    read_workload,
    synthetic_workload,
)
from bench.suites import SuiteSpec
from kaiwo_gpu.coordinator import BUILTIN_STRATEGIES

SYNTHETIC = {"synthetic": False, "synthetic-fractional": True}
"""The synthetic workloads by name: whether every task is fractional."""
REFERENCE = "best-fit"
PROTOCOLS = ("arrivals", "departures")
BASELINE_SAMPLES = 2000


@dataclass(frozen=True, slots=True)
class WorkloadRun:
    workload: Workload
    bound: Bound
    arrivals: list[ArrivalResult]
    departures: list[DepartureResult]
    seconds: float


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return names

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", type=positive_int, default=6200, help="GPUs of a synthetic cluster (~6200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic workloads")
    parser.add_argument(
        "--workloads",
        type=_names(list(SYNTHETIC)),
        default=list(SYNTHETIC),
        help=f"synthetic workloads to run (default {','.join(SYNTHETIC)})",
    )
    parser.add_argument(
        "--nodes-csv", type=Path, default=None, help="openb node list: run the trace instead"
    )
    parser.add_argument("--tasks-csv", type=Path, default=None, help="openb pod list, with it")
    parser.add_argument(
        "--ignore-gpu-spec", action="store_true", help="place tasks on any GPU model"
    )
    parser.add_argument(
        "--strategies",
        type=_names(list(BUILTIN_STRATEGIES)),
        default=list(BUILTIN_STRATEGIES),
        help="strategies to compare (default every built-in one)",
    )
    parser.add_argument(
        "--protocols",
        type=_names(PROTOCOLS),
        default=list(PROTOCOLS),
        help="arrivals (no departures, to 130%% requested), departures (default both)",
    )
    parser.add_argument(
        "--load",
        type=float,
        default=DEFAULT_LOAD,
        help=f"offered load of a synthetic workload with departures (default {DEFAULT_LOAD})",
    )
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="FILE", help="also write a PNG plot to FILE"
    )


def load_workloads(args: argparse.Namespace) -> list[Workload]:
    """The trace when CSV files are given, else the chosen synthetic workloads."""
    nodes_csv: Path | None = args.nodes_csv
    tasks_csv: Path | None = args.tasks_csv
    if nodes_csv is not None and tasks_csv is not None:
        return [read_workload(nodes_csv, tasks_csv)]
    return [
        synthetic_workload(
            name, args.gpus, args.seed, all_fractional=SYNTHETIC[name], load=args.load
        )
        for name in args.workloads
    ]


def run_workload(
    workload: Workload, strategies: Sequence[str], protocols: Sequence[str], ignore: bool
) -> WorkloadRun:
    started = time.perf_counter()
    bound = offline_bound(workload, REQUESTED_LIMIT, ignore_gpu_spec=ignore)
    arrivals = [
        replay_arrivals(workload, strategy, ignore_gpu_spec=ignore)
        for strategy in strategies
        if "arrivals" in protocols
    ]
    departures = [
        replay_departures(workload, strategy, ignore_gpu_spec=ignore)
        for strategy in strategies
        if "departures" in protocols
    ]
    return WorkloadRun(workload, bound, arrivals, departures, time.perf_counter() - started)


# --- figures and tables ----------------------------------------------------------------------


def _us(stats: Stats | None) -> Figures | None:
    return None if stats is None else stats.figures("us")


def _ratio(value: float, reference: float | None) -> float | None:
    return value / reference if reference else None


def arrival_figures(run: WorkloadRun, baseline: Stats) -> list[Figures]:
    reference = next((r.allocated_at_end for r in run.arrivals if r.strategy == REFERENCE), None)
    rows: list[Figures] = []
    for result in run.arrivals:
        decisions = result.timings.decisions()
        rows.append(
            {
                "workload": run.workload.name,
                "strategy": result.strategy,
                "requests": result.requests,
                "requested": result.requested_millis / result.capacity_millis,
                "allocated_at_100": result.allocated_at_100,
                "allocated_at_130": result.allocated_at_end,
                "over_best_fit": _ratio(result.allocated_at_end, reference),
                "refused": result.refused,
                "refused_share": result.refused_share,
                "idle_gpus": result.idle_gpus,
                "headroom_achievable": run.bound.achievable - result.allocated_at_end,
                "headroom_upper": run.bound.upper - result.allocated_at_end,
                "place_all": _us(decisions),
                "place_placed": _us(result.timings.placed()),
                "place_refused": _us(result.timings.refused()),
                "update": _us(result.timings.update()),
                "p50_over_base": _ratio(decisions.p50_us, baseline.p50_us) if decisions else None,
                "curve": [list(point) for point in result.curve],
            }
        )
    return rows


def departure_figures(run: WorkloadRun) -> list[Figures]:
    reference = next(
        (r.time_averaged_allocated for r in run.departures if r.strategy == REFERENCE), None
    )
    return [
        {
            "workload": run.workload.name,
            "strategy": result.strategy,
            "requests": result.requests,
            "time_averaged_allocated": result.time_averaged_allocated,
            "over_best_fit": _ratio(result.time_averaged_allocated, reference),
            "peak_allocated": result.peak_allocated,
            "refused": result.refused,
            "refused_share": result.refused_share,
            "window_s": result.window_s,
            "place_all": _us(result.timings.decisions()),
            "place_refused": _us(result.timings.refused()),
        }
        for result in run.departures
    ]


def workload_figures(run: WorkloadRun) -> Figures:
    workload, bound = run.workload, run.bound
    return {
        "name": workload.name,
        "gpus": workload.gpu_count,
        "nodes": len(workload.nodes),
        "tasks": len(workload.tasks),
        "fractional_share": workload.fractional_share(),
        "seconds": run.seconds,
        "bound": {
            "requested": bound.requested,
            "first_fit_decreasing": bound.first_fit_decreasing,
            "fill_decreasing": bound.fill_decreasing,
            "achievable": bound.achievable,
            "upper": bound.upper,
        },
    }


def _cell(stats: Stats | None) -> str:
    if stats is None:
        return f"{'-':>8}{'-':>8}{'-':>8}"
    return f"{stats.p50_us:>8.1f}{stats.p99_us:>8.1f}{stats.mean_us:>8.1f}"


def print_run(run: WorkloadRun, baseline: Stats) -> None:
    workload, bound = run.workload, run.bound
    print()
    print(
        f"{workload.name}: {workload.gpu_count} GPUs on {len(workload.nodes)} nodes, "
        f"{len(workload.tasks)} GPU tasks ({workload.fractional_share():.1%} fractional), "
        f"{run.seconds:.1f} s"
    )
    print(
        f"offline, over the demand to {bound.requested:.1%} requested: first-fit-decreasing "
        f"{bound.first_fit_decreasing:.2%}, fill-decreasing {bound.fill_decreasing:.2%}, "
        f"upper bound {bound.upper:.2%}"
    )
    if run.arrivals:
        reference = next((r for r in run.arrivals if r.strategy == REFERENCE), None)
        print("protocol 1: arrival order, no departures (place() and update in us)")
        print_header(
            f"{'strategy':<14}{'@100%':>8}{'@130%':>8}{'/best':>7}{'refused':>9}{'share':>7}"
            f"{'idle':>6}{'below ach':>10}{'below up':>9}"
            f"  {'placed p50':>8}{'p99':>8}{'mean':>8}  {'refused p50':>8}{'p99':>8}{'mean':>8}"
            f"  {'upd p50':>7}{'p99':>8}{'p50/base':>9}"
        )
        for r in run.arrivals:
            ratio = r.allocated_at_end / reference.allocated_at_end if reference else float("nan")
            update = r.timings.update()
            decisions = r.timings.decisions()
            print(
                f"{r.strategy:<14}{r.allocated_at_100:>8.2%}{r.allocated_at_end:>8.2%}"
                f"{ratio:>7.3f}{r.refused:>9}{r.refused_share:>7.1%}{r.idle_gpus:>6}"
                f"{(bound.achievable - r.allocated_at_end) * 100:>9.2f}p"
                f"{(bound.upper - r.allocated_at_end) * 100:>8.2f}p"
                f"  {_cell(r.timings.placed())}    {_cell(r.timings.refused())}"
                f"  {update.p50_us if update else 0:>7.1f}{update.p99_us if update else 0:>8.1f}"
                f"{(decisions.p50_us / baseline.p50_us) if decisions else 0:>9.2f}"
            )
    if run.departures:
        reference_d = next((r for r in run.departures if r.strategy == REFERENCE), None)
        print("protocol 2: creations and deletions in time order, refused tasks dropped")
        print_header(
            f"{'strategy':<14}{'time-avg':>9}{'/best':>7}{'peak':>8}{'refused':>9}{'share':>7}"
            f"  {'place p50':>9}{'p99':>8}{'mean':>8}"
        )
        for d in run.departures:
            base = reference_d.time_averaged_allocated if reference_d else 0.0
            ratio = d.time_averaged_allocated / base if base else float("nan")
            print(
                f"{d.strategy:<14}{d.time_averaged_allocated:>9.2%}{ratio:>7.3f}"
                f"{d.peak_allocated:>8.2%}{d.refused:>9}{d.refused_share:>7.1%}"
                f"  {_cell(d.timings.decisions())}"
            )


def _plot(path: Path, runs: Sequence[WorkloadRun]) -> None:
    from bench.packing_plot import Panel, write_plot  # noqa: PLC0415  (matplotlib only to plot)

    write_plot(
        path,
        [
            Panel(
                workload=run.workload.name,
                curves={r.strategy: r.curve for r in run.arrivals},
                requested=run.bound.requested,
                achievable=run.bound.achievable,
                upper=run.bound.upper,
            )
            for run in runs
        ],
    )


def run(args: argparse.Namespace) -> Outcome:
    started = time.perf_counter()
    if (args.nodes_csv is None) != (args.tasks_csv is None):
        message = "give --nodes-csv and --tasks-csv together (the openb node and pod lists)"
        print(f"packing: {message}", file=sys.stderr)
        return Outcome(2, {"error": message})
    try:
        workloads = load_workloads(args)
    except TraceError as error:
        print(f"packing: {error.message}", file=sys.stderr)
        return Outcome(2, {"error": error.message})
    print(
        f"packing benchmark: python {platform.python_version()} on {platform.machine()}, "
        f"strategies {', '.join(args.strategies)}, protocols {', '.join(args.protocols)}"
    )
    baseline = measure_baseline(BASELINE_SAMPLES, args.seed)
    print(
        f"baseline: sorted() of {BASELINE_LIST_LEN} ints p50 {baseline.p50_us:.1f} us, "
        f"p99 {baseline.p99_us:.1f} us",
        flush=True,
    )
    runs: list[WorkloadRun] = []
    for workload in workloads:
        runs.append(run_workload(workload, args.strategies, args.protocols, args.ignore_gpu_spec))
        print_run(runs[-1], baseline)
        sys.stdout.flush()
    if args.plot is not None:
        _plot(args.plot, runs)
        print(f"\nplot written to {args.plot}")
    total_s = time.perf_counter() - started
    print(f"\ntotal {total_s:.1f} s")
    return Outcome(
        0,
        {
            "baseline": {"operation": f"sorted() of {BASELINE_LIST_LEN} ints"}
            | baseline.figures("us"),
            "limit": REQUESTED_LIMIT,
            "workloads": [workload_figures(r) for r in runs],
            "arrivals": [row for r in runs for row in arrival_figures(r, baseline)],
            "departures": [row for r in runs for row in departure_figures(r)],
            "plot": args.plot,
            "total_s": total_s,
        },
    )


SUITE = SuiteSpec(
    description=__doc__ or "",
    add_arguments=add_arguments,
    run=run,
    quick={"gpus": 300},
)
