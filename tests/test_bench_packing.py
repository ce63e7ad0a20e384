"""The packing benchmark's parts: the openb reader, the synthetic generator, the replays and
their bounds, and the plot. Pure: no process is started."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main
from bench.packing_plot import Panel, write_plot
from bench.packing_replay import (
    first_fit_decreasing,
    offline_bound,
    replay_arrivals,
    replay_departures,
    upper_bound_millis,
)
from bench.packing_trace import (
    GPU_VRAM_MIB,
    Task,
    TraceError,
    Workload,
    gpus_of,
    read_nodes,
    read_tasks,
    synthetic_workload,
)
from kaiwo_gpu.common import MILLIS_PER_GPU
from kaiwo_gpu.coordinator import BUILTIN_STRATEGIES, Node

NODES_HEADER = "sn,cpu_milli,memory_mib,gpu,model"
TASKS_HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
    "creation_time,deletion_time,scheduled_time"
)


def write(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join((header, *rows)) + "\n", encoding="utf-8")
    return path


def one_gpu_workload(*tasks: Task) -> Workload:
    return Workload("tiny", (Node("node-0", gpus_of("node-0", 1, "T4")),), tasks)


def task(name: str, millis: int, start: float, end: float | None, count: int = 1) -> Task:
    return Task(name, count, millis, frozenset(), start, end)


# --- the reader ------------------------------------------------------------------------------


def test_nodes_are_read_with_their_gpus_and_gpu_less_rows_dropped(tmp_path: Path) -> None:
    path = write(
        tmp_path / "nodes.csv",
        NODES_HEADER,
        "openb-node-0227,32000,262144,0,",
        "openb-node-0228,128000,786432,8,G3",
        "openb-node-0229,104000,524288,2,T4",
    )
    nodes = read_nodes(path)
    assert [node.name for node in nodes] == ["openb-node-0228", "openb-node-0229"]
    assert [len(node.gpus) for node in nodes] == [8, 2]
    gpu = nodes[1].gpus[1]
    assert (gpu.node, gpu.index, gpu.model) == ("openb-node-0229", 1, "T4")
    assert gpu.vram_mib == GPU_VRAM_MIB["T4"]
    assert len({g.uuid for node in nodes for g in node.gpus}) == 10


def test_tasks_are_read_as_requests(tmp_path: Path) -> None:
    path = write(
        tmp_path / "tasks.csv",
        TASKS_HEADER,
        "pod-cpu,4000,8192,0,0,,BE,Running,5,9,5",
        "pod-half,4000,15258,1,220,,BE,Running,30,40,30",
        "pod-tiny,4000,15258,1,50,,BE,Running,20,,20",
        "pod-whole,16000,32768,1,1000,V100M16|V100M32,LS,Running,10,12,10",
        "pod-four,88000,327680,4,1000,,Burstable,Succeeded,40,50,40",
    )
    tasks = read_tasks(path)
    assert [t.name for t in tasks] == ["pod-whole", "pod-tiny", "pod-half", "pod-four"]
    whole, tiny, half, four = tasks
    assert (half.count, half.millis, half.deletion_s) == (1, 220, 40.0)
    assert tiny.millis == 100  # clamped up to the engine's smallest share
    assert tiny.deletion_s is None  # never leaves
    assert whole.gpu_models == frozenset({"V100M16", "V100M32"})
    assert (four.count, four.millis, four.millis_total) == (4, 1000, 4000)

    request = whole.request("r-1")
    assert (request.count, request.fraction_millis) == (1, 1000)
    assert request.selector.gpu_models == frozenset({"V100M16", "V100M32"})
    assert whole.request("r-2", ignore_gpu_spec=True).selector.is_empty
    assert four.request("r-3").count == 4


@pytest.mark.parametrize(
    ("row", "field", "words"),
    [
        ("pod-a,1,1,x,500,,BE,Running,1,2,1", "num_gpu", "not a number"),
        ("pod-a,1,1", "num_gpu", "not a number: ''"),  # a short row
        ("pod-a,1,1,65,1000,,BE,Running,1,2,1", "num_gpu", "more than 64 GPUs"),
        ("pod-a,1,1,1,1500,,BE,Running,1,2,1", "gpu_milli", "more than a GPU"),
        ("pod-a,1,1,1,500,H100,BE,Running,1,2,1", "gpu_spec", "unknown GPU model 'H100'"),
        ("pod-a,1,1,1,500,,BE,Running,,2,1", "creation_time", "empty"),
        ("pod-a,1,1,1,500,,BE,Running,5,2,1", "deletion_time", "before creation_time"),
    ],
)
def test_a_bad_task_row_names_file_line_and_field(
    tmp_path: Path, row: str, field: str, words: str
) -> None:
    path = write(tmp_path / "tasks.csv", TASKS_HEADER, "pod-ok,1,1,1,500,,BE,Running,1,2,1", row)
    with pytest.raises(TraceError) as caught:
        read_tasks(path)
    message = caught.value.message
    assert str(path) in message
    assert "line 3" in message
    assert f"'{field}'" in message
    assert words in message


def test_an_unknown_node_model_and_a_missing_column_are_named(tmp_path: Path) -> None:
    nodes = write(tmp_path / "nodes.csv", NODES_HEADER, "node-a,1,1,8,G2", "node-b,1,1,4,Z9")
    with pytest.raises(TraceError, match=r"line 3: field 'model': unknown GPU model 'Z9'"):
        read_nodes(nodes)
    headless = write(tmp_path / "bad.csv", "sn,cpu_milli,memory_mib,gpu", "node-a,1,1,8")
    with pytest.raises(TraceError, match=r"line 1: field 'model': missing"):
        read_nodes(headless)


def test_the_suite_reports_a_bad_trace_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = write(tmp_path / "nodes.csv", NODES_HEADER, "node-a,1,1,8,G2")
    tasks = write(tmp_path / "tasks.csv", TASKS_HEADER, "pod-a,1,1,two,500,,BE,Running,1,2,1")
    status = bench_main(["packing", "--nodes-csv", str(nodes), "--tasks-csv", str(tasks)])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{tasks}: line 2: field 'num_gpu'" in err
    assert "Traceback" not in err
    assert bench_main(["packing", "--nodes-csv", str(nodes)]) == 2
    assert "--tasks-csv together" in capsys.readouterr().err


def test_the_suite_replays_a_trace_end_to_end(tmp_path: Path) -> None:
    nodes = write(tmp_path / "nodes.csv", NODES_HEADER, "node-a,1,1,2,T4", "node-b,1,1,1,A10")
    rows = [f"pod-{i},1,1,1,{300 + 100 * (i % 5)},,BE,Running,{i},{i + 3},{i}" for i in range(12)]
    tasks = write(tmp_path / "openb_pods.csv", TASKS_HEADER, *rows, "p-8,1,1,2,1000,T4,LS,R,4,,4")
    out = tmp_path / "figures.json"
    assert (
        bench_main(
            ["packing", "--nodes-csv", str(nodes), "--tasks-csv", str(tasks), "--json", str(out)]
        )
        == 0
    )
    figures = json.loads(out.read_text(encoding="utf-8"))["figures"]
    (workload,) = figures["workloads"]
    assert (workload["name"], workload["gpus"], workload["tasks"]) == ("openb_pods", 3, 13)
    assert {row["strategy"] for row in figures["arrivals"]} == set(BUILTIN_STRATEGIES)
    assert all(row["requests"] > 0 for row in figures["departures"])


# --- the generator -----------------------------------------------------------------------------


def test_the_synthetic_workload_has_openb_shape() -> None:
    workload = synthetic_workload("synthetic", 2000, seed=3)
    assert abs(workload.gpu_count - 2000) <= 100
    assert {len(node.gpus) for node in workload.nodes} == {8, 4, 2, 1}
    assert 2 <= len({gpu.model for node in workload.nodes for gpu in node.gpus}) <= 3
    assert abs(workload.fractional_share() - 0.44) <= 0.03
    counts = Counter(t.count for t in workload.tasks)
    assert {2, 4, 8} <= set(counts)
    assert counts[2] + counts[4] + counts[8] < 0.1 * len(workload.tasks)  # a few
    assert all(t.millis == MILLIS_PER_GPU for t in workload.tasks if t.count > 1)
    shares = [t.millis for t in workload.tasks if t.fractional]
    assert min(shares) >= 100
    assert max(shares) <= 950

    def near(center: int) -> int:
        return sum(abs(millis - center) <= 50 for millis in shares)

    assert near(500) > 3 * near(300)  # a peak at 0.5 ...
    assert near(850) > 3 * near(650)  # ... and one at 0.85, above the spread between
    assert near(300) > 0  # and some spread
    durations = [t.deletion_s - t.creation_s for t in workload.tasks if t.deletion_s is not None]
    assert statistics.fmean(durations) > 2 * statistics.median(durations)  # a heavy tail
    assert all(a.creation_s <= b.creation_s for a, b in pairwise(workload.tasks))


def test_the_generator_is_deterministic_per_seed() -> None:
    first = synthetic_workload("synthetic", 300, seed=7)
    assert synthetic_workload("synthetic", 300, seed=7) == first
    assert synthetic_workload("synthetic", 300, seed=8).tasks != first.tasks


def test_the_all_fractional_variant_has_only_fractions() -> None:
    workload = synthetic_workload("synthetic-fractional", 300, seed=0, all_fractional=True)
    assert workload.fractional_share() == 1.0
    assert all(t.count == 1 for t in workload.tasks)


# --- the replays and the bounds ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Workload:
    return synthetic_workload("synthetic-fractional", 160, seed=1, all_fractional=True)


@pytest.mark.parametrize("strategy", list(BUILTIN_STRATEGIES))
def test_arrivals_never_overfill_and_allocate_what_they_say(small: Workload, strategy: str) -> None:
    result = replay_arrivals(small, strategy)
    snapshot = result.snapshot
    assert all(snapshot.usage[pos].allocated_millis <= 1000 for pos in range(len(snapshot.gpus)))
    assert snapshot.allocated_millis() == round(result.allocated_at_end * small.capacity_millis)
    requested = result.requested_millis / small.capacity_millis
    assert 1.3 <= requested < 1.31
    assert result.allocated_at_end <= min(requested, 1.0)
    assert result.allocated_at_100 <= result.allocated_at_end
    assert result.refused > 0  # 130% cannot all fit
    assert result.timings.refused() is not None
    assert len(result.timings.placed_ns) == result.requests - result.refused
    points = result.curve
    assert all(a <= b and x <= y for (a, x), (b, y) in pairwise(points))
    bound = offline_bound(small, 1.3)
    assert bound.upper >= result.allocated_at_end


def test_the_bounds_hold_and_fill_decreasing_is_never_overfull(small: Workload) -> None:
    bound = offline_bound(small, 1.3)
    assert bound.upper <= 1.0
    assert bound.first_fit_decreasing <= bound.upper
    assert bound.fill_decreasing <= bound.upper
    for snapshot in bound.snapshots:
        assert all(
            snapshot.usage[pos].allocated_millis <= 1000 for pos in range(len(snapshot.gpus))
        )
    best_fit = replay_arrivals(small, "best-fit").allocated_at_end
    assert bound.achievable >= best_fit  # the offline packing is the better one here


def test_one_big_share_per_gpu_bounds_the_upper_bound() -> None:
    workload = Workload(
        "two",
        (Node("node-0", gpus_of("node-0", 2, "T4")),),
        tuple(task(f"t{i}", 600, i, None) for i in range(3)),
    )
    assert upper_bound_millis(workload, workload.tasks) == 1200  # not min(1800, 2000)
    ffd = first_fit_decreasing(workload, workload.tasks, ignore_gpu_spec=False)
    assert ffd.allocated_millis() == 1200


def test_departures_give_capacity_back() -> None:
    workload = one_gpu_workload(task("a", 1000, 0, 10), task("b", 1000, 20, 30))
    assert replay_arrivals(workload, "best-fit", limit=2.0).refused == 1  # nobody leaves
    result = replay_departures(workload, "best-fit")
    assert result.refused == 0
    assert result.final_allocated_millis == 0
    assert result.snapshot.usage[0].allocated_millis == 0


def test_departures_average_the_share_over_the_window() -> None:
    # 100% asked at t=0; a whole GPU for 5 s of the 10 s window, then nothing.
    workload = one_gpu_workload(task("a", 1000, 0, 5), task("b", 500, 10, None))
    result = replay_departures(workload, "best-fit")
    assert result.window_s == 10
    assert result.time_averaged_allocated == pytest.approx(0.5)
    assert result.peak_allocated == 1.0
    assert result.final_allocated_millis == 500  # b never leaves


@pytest.mark.parametrize("strategy", ["best-fit", "worst-fit"])
def test_a_replay_with_departures_ends_empty(small: Workload, strategy: str) -> None:
    result = replay_departures(small, strategy)
    assert result.refused > 0  # the offered load saturates the cluster
    assert 0 < result.time_averaged_allocated <= result.peak_allocated <= 1.0
    assert result.final_allocated_millis == 0
    assert result.snapshot.allocated_millis() == 0


# --- the plot --------------------------------------------------------------------------------


@pytest.mark.integration  # matplotlib's first import on a machine runs fc-list for its font cache
def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "packing.png"
    curves = {"best-fit": [(0.0, 0.0), (1.0, 0.9), (1.3, 0.95)], "worst-fit": [(0.0, 0.0)]}
    write_plot(path, [Panel("synthetic", curves, 1.3, 0.97, 1.0)] * 2)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
