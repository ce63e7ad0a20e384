"""Workloads for the packing benchmark: the openb CSV format of Alibaba's GPU-sharing trace
(cluster-trace-gpu-v2023), read from paths a user gives, and a seeded synthetic generator with
the same shape of demand, so tests and CI never need third-party data.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kaiwo_gpu.common import KaiwoGpuError
from kaiwo_gpu.common.models import MAX_GPUS_PER_REQUEST, AllocationRequest, Selector
from kaiwo_gpu.common.names import check_node_name
from kaiwo_gpu.common.units import MILLIS_PER_GPU, MIN_FRACTION_MILLIS
from kaiwo_gpu.coordinator import Gpu, Node

GIB = 1024
GPU_VRAM_MIB: Mapping[str, int] = {
    "P100": 16 * GIB,
    "T4": 16 * GIB,
    "V100M16": 16 * GIB,
    "V100M32": 32 * GIB,
    "A10": 24 * GIB,
    # G1, G2 and G3 are undisclosed internal codes in openb; these sizes are assumptions.
    # Only the share of a GPU matters to packing here (memory follows from the share).
    "G1": 16 * GIB,
    "G2": 32 * GIB,
    "G3": 32 * GIB,
}
"""VRAM of every GPU model that appears in openb (node `model` and task `gpu_spec`)."""

COMPUTE_UNITS = 100
"""openb says nothing of compute units; no openb request is cu-mask, so any count will do."""

NODE_COLUMNS = ("sn", "gpu", "model")
TASK_COLUMNS = ("name", "num_gpu", "gpu_milli", "gpu_spec", "creation_time", "deletion_time")
EMPTY_SPECS = frozenset({"", "nan", "none"})


class TraceError(Exception):
    """A row of a trace file that cannot be read: names the file, the line and the field."""

    def __init__(self, path: Path, line: int, field: str, why: str) -> None:
        super().__init__(f"{path}: line {line}: field {field!r}: {why}")
        self.message = str(self)


@dataclass(frozen=True, slots=True)
class Task:
    """One GPU task of a trace: `count` GPUs on one node with `millis` of each."""

    name: str
    count: int
    millis: int
    gpu_models: frozenset[str]
    creation_s: float
    deletion_s: float | None  # None: it never leaves

    @property
    def millis_total(self) -> int:
        return self.count * self.millis

    @property
    def fractional(self) -> bool:
        return self.millis < MILLIS_PER_GPU

    def request(self, request_id: str, *, ignore_gpu_spec: bool = False) -> AllocationRequest:
        models = frozenset() if ignore_gpu_spec else self.gpu_models
        return AllocationRequest(
            request_id,
            count=self.count,
            fraction_millis=self.millis,
            selector=Selector(gpu_models=models),
        )


@dataclass(frozen=True, slots=True)
class Workload:
    """A cluster and the tasks offered to it, in arrival order."""

    name: str
    nodes: tuple[Node, ...]
    tasks: tuple[Task, ...]

    @property
    def gpu_count(self) -> int:
        return sum(len(node.gpus) for node in self.nodes)

    @property
    def capacity_millis(self) -> int:
        return self.gpu_count * MILLIS_PER_GPU

    def fractional_share(self) -> float:
        """The share of GPU tasks that ask for less than a whole GPU."""
        return sum(task.fractional for task in self.tasks) / max(1, len(self.tasks))


# --- the openb CSV format -----------------------------------------------------------------


def _rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row; a missing column is an error on line 1."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as error:
        raise TraceError(path, 0, "-", f"cannot open: {error.strerror}") from error
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for column in columns:
            if column not in header:
                raise TraceError(path, 1, column, f"missing from the header {header}")
        for row in reader:
            # A short row reads None for its missing fields; a long one keys its extras None.
            yield (
                reader.line_num,
                {
                    key: value.strip()
                    for key, value in row.items()
                    if isinstance(key, str) and isinstance(value, str)
                },
            )


def _integer(path: Path, line: int, row: Mapping[str, str], field: str, low: int) -> int:
    text = row.get(field, "")
    try:
        value = float(text)
    except ValueError:
        raise TraceError(path, line, field, f"not a number: {text!r}") from None
    if not math.isfinite(value) or value != int(value) or value < low:
        raise TraceError(path, line, field, f"not an integer >= {low}: {text!r}")
    return int(value)


def _seconds(path: Path, line: int, row: Mapping[str, str], field: str) -> float | None:
    text = row.get(field, "")
    if text.lower() in EMPTY_SPECS:
        return None
    try:
        value = float(text)
    except ValueError:
        raise TraceError(path, line, field, f"not a time in seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise TraceError(path, line, field, f"not a time in seconds: {text!r}")
    return value


def _model(path: Path, line: int, field: str, name: str) -> str:
    if name not in GPU_VRAM_MIB:
        known = ", ".join(GPU_VRAM_MIB)
        raise TraceError(path, line, field, f"unknown GPU model {name!r} (known: {known})")
    return name


def gpus_of(node_name: str, count: int, model: str) -> tuple[Gpu, ...]:
    return tuple(
        Gpu(
            uuid=f"{node_name}-gpu{index}",
            node=node_name,
            index=index,
            bdf=f"0000:{0x10 + index:02x}:00.0",
            model=model,
            vram_mib=GPU_VRAM_MIB[model],
            compute_units=COMPUTE_UNITS,
        )
        for index in range(count)
    )


def read_nodes(path: Path) -> list[Node]:
    """The GPU nodes of an openb node list; rows with no GPU are dropped."""
    nodes: list[Node] = []
    seen: set[str] = set()
    for line, row in _rows(path, NODE_COLUMNS):
        count = _integer(path, line, row, "gpu", 0)
        if count == 0:
            continue
        name = row["sn"]
        try:
            check_node_name(name, "sn")
        except KaiwoGpuError as error:
            raise TraceError(path, line, "sn", error.message) from None
        if name in seen:
            raise TraceError(path, line, "sn", f"node {name!r} listed twice")
        seen.add(name)
        model = _model(path, line, "model", row["model"])
        nodes.append(Node(name=name, gpus=gpus_of(name, count, model)))
    return nodes


def parse_task(path: Path, line: int, row: Mapping[str, str]) -> Task | None:
    """The task of one openb row, or None for a CPU-only one.

    A share of one GPU below the engine's smallest share is clamped up to it; a task of more
    than one GPU takes them whole, as in openb.
    """
    count = _integer(path, line, row, "num_gpu", 0)
    if count == 0:
        return None
    if count > MAX_GPUS_PER_REQUEST:
        raise TraceError(path, line, "num_gpu", f"more than {MAX_GPUS_PER_REQUEST} GPUs: {count}")
    millis = MILLIS_PER_GPU
    if count == 1:
        asked = _integer(path, line, row, "gpu_milli", 1)
        if asked > MILLIS_PER_GPU:
            raise TraceError(path, line, "gpu_milli", f"more than a GPU: {asked}")
        millis = max(MIN_FRACTION_MILLIS, asked)
    spec = row.get("gpu_spec", "")
    models = frozenset(
        ()
        if spec.lower() in EMPTY_SPECS
        else (_model(path, line, "gpu_spec", name.strip()) for name in spec.split("|"))
    )
    creation = _seconds(path, line, row, "creation_time")
    if creation is None:
        raise TraceError(path, line, "creation_time", "empty")
    deletion = _seconds(path, line, row, "deletion_time")
    if deletion is not None and deletion < creation:
        raise TraceError(path, line, "deletion_time", f"before creation_time {creation:g}")
    return Task(row["name"] or f"line-{line}", count, millis, models, creation, deletion)


def read_tasks(path: Path) -> list[Task]:
    """The GPU tasks of an openb pod list in arrival order (by creation time, then file)."""
    tasks = [
        task
        for line, row in _rows(path, TASK_COLUMNS)
        if (task := parse_task(path, line, row)) is not None
    ]
    return sorted(tasks, key=lambda task: task.creation_s)


def read_workload(nodes_csv: Path, tasks_csv: Path) -> Workload:
    return Workload(tasks_csv.stem, tuple(read_nodes(nodes_csv)), tuple(read_tasks(tasks_csv)))


# --- the synthetic generator ------------------------------------------------------------------

NODE_MIX: tuple[tuple[int, float, str], ...] = (
    # (GPUs per node, share of the cluster's GPUs, model), about openb's proportions
    (8, 0.72, "G2"),
    (4, 0.08, "V100M32"),
    (2, 0.17, "T4"),
    (1, 0.03, "T4"),
)
FRACTIONAL_SHARE = 0.44
WHOLE_COUNTS: tuple[tuple[int, float], ...] = ((1, 0.90), (2, 0.04), (4, 0.035), (8, 0.025))
"""Of the tasks that take whole GPUs: how many GPUs, and how often."""
PEAKS_MILLIS: tuple[tuple[int, float], ...] = ((500, 0.40), (850, 0.30))
"""The two peaks of fractional shares and their weights; the rest spreads over SPREAD."""
PEAK_SIGMA_MILLIS = 20
SPREAD_MILLIS = (100, 950)
DURATION_SIGMA = 1.6
"""Log-normal durations this wide have a heavy tail: the mean is 3.6 x the median."""
MEAN_GAP_S = 10.0
DEFAULT_LOAD = 2.5
"""Offered load with departures (arrival rate x mean duration x mean demand) over capacity:
above 1, so the cluster saturates and how well a strategy packs decides what is refused."""


def synthetic_nodes(gpus: int, rng: random.Random) -> list[Node]:
    """About `gpus` GPUs in nodes of 8, 4, 2 and 1 GPUs, shuffled, named in that order."""
    sizes: list[tuple[int, str]] = []
    for per_node, share, model in NODE_MIX:
        sizes += [(per_node, model)] * max(1, round(gpus * share / per_node))
    rng.shuffle(sizes)
    width = max(4, len(str(len(sizes))))
    nodes = []
    for n, (per_node, model) in enumerate(sizes):
        name = f"node-{n:0{width}d}"
        nodes.append(Node(name=name, gpus=gpus_of(name, per_node, model)))
    return nodes


def fractional_millis(rng: random.Random) -> int:
    """A share around 0.5 or 0.85 of a GPU, or spread over 0.1-0.95, in steps of 5 millis."""
    pick = rng.random()
    for peak, weight in PEAKS_MILLIS:
        if pick < weight:
            millis = rng.gauss(peak, PEAK_SIGMA_MILLIS)
            break
        pick -= weight
    else:
        millis = rng.uniform(*SPREAD_MILLIS)
    low, high = SPREAD_MILLIS
    return int(min(high, max(low, 5 * round(millis / 5))))


def _sizes(rng: random.Random, fractional_share: float) -> tuple[int, int]:
    """(count, millis) of one task."""
    if rng.random() < fractional_share:
        return 1, fractional_millis(rng)
    pick = rng.random()
    for count, weight in WHOLE_COUNTS:
        if pick < weight:
            return count, MILLIS_PER_GPU
        pick -= weight
    return 1, MILLIS_PER_GPU


def synthetic_workload(
    name: str,
    gpus: int,
    seed: int,
    *,
    all_fractional: bool = False,
    demand_factor: float = 3.0,
    load: float = DEFAULT_LOAD,
) -> Workload:
    """A cluster of about `gpus` GPUs and tasks asking `demand_factor` x its capacity in all.

    Arrivals are Poisson; durations log-normal, scaled so the offered load with departures
    is `load` x capacity. The same (name, gpus, seed, ...) gives the same workload.
    """
    rng = random.Random(f"{name}:{gpus}:{seed}")
    nodes = synthetic_nodes(gpus, rng)
    capacity = sum(len(node.gpus) for node in nodes) * MILLIS_PER_GPU
    share = 1.0 if all_fractional else FRACTIONAL_SHARE
    sizes: list[tuple[int, int]] = []
    asked = 0
    # Bounded: every task asks at least MIN_FRACTION_MILLIS.
    for _ in range(int(demand_factor * capacity) // MIN_FRACTION_MILLIS + 1):
        if asked >= demand_factor * capacity:
            break
        count, millis = _sizes(rng, share)
        sizes.append((count, millis))
        asked += count * millis
    mean_demand = asked / max(1, len(sizes))
    mean_duration = load * capacity * MEAN_GAP_S / mean_demand
    mu = math.log(mean_duration) - DURATION_SIGMA**2 / 2
    tasks = []
    now = 0.0
    for serial, (count, millis) in enumerate(sizes):
        now += rng.expovariate(1 / MEAN_GAP_S)
        duration = rng.lognormvariate(mu, DURATION_SIGMA)
        tasks.append(Task(f"task-{serial:06d}", count, millis, frozenset(), now, now + duration))
    return Workload(name, tuple(nodes), tuple(tasks))


def demand_until(tasks: Iterable[Task], limit_millis: float) -> list[Task]:
    """The tasks in order until `limit_millis` have been asked (the one crossing it included)."""
    prefix: list[Task] = []
    asked = 0
    for task in tasks:
        if asked >= limit_millis:
            break
        prefix.append(task)
        asked += task.millis_total
    return prefix
