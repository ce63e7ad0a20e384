"""The coordinator's /metrics: its instruments, and gauges read off its view at scrape time.

Nothing here runs on a request's path: a scrape reads the view state, the agent streams this
coordinator holds and the instruments' values, the same rows ListNodes answers with
(`node_statuses`). The view belongs to the event loop (a read may rebuild its placement
snapshot), so the HTTP thread that serves a scrape asks the loop for a reading (references
to immutable records, `ScrapeView`) and builds the families from it itself: reading the view
from that thread once lost etcd changes applied meanwhile, and building the families on the
loop held it 0.4 s for a 2,000-node cluster. The view's gauges are written as text
(`metrics_text`), the instruments by prometheus-client. Cluster-wide figures
(allocations, per-GPU and per-node shares) come from etcd through the view, so every
coordinator exports the same; the GPUs' AMD-named gauges only for the nodes whose agents
stream to this one, as those agents export them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kaiwo_gpu.common.errors import UnavailableError
from kaiwo_gpu.common.gpu_metrics import GpuMetricFamilies
from kaiwo_gpu.common.metrics_text import Family, Gauge, GaugeRows, single
from kaiwo_gpu.common.models import Isolation
from kaiwo_gpu.common.units import MILLIS_PER_GPU
from kaiwo_gpu.common.wire import isolation_from_proto
from kaiwo_gpu.coordinator.api.queries import node_statuses
from kaiwo_gpu.coordinator.instruments import Instruments
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.state.agent_reports import NodeReport
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.v1 import types_pb2

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sources:
    """What a scrape reads: the view, the nodes whose streams this coordinator holds, and
    the last etcd space verdict."""

    view: ClusterView
    connected_nodes: Callable[[], Iterable[str]]
    space_warning: Callable[[], str]


SCRAPE_TIMEOUT_S = 5.0
"""How long a scrape waits for the event loop to take its reading of the view (less than
Prometheus's default scrape timeout of 10 s, so the scraper hears why)."""


@dataclass(frozen=True, slots=True)
class ScrapeView:
    """What one scrape reads of the view, taken by the event loop in one step.

    The view replaces its snapshot, node records, allocation records and reports when they
    change and never edits them in place, so holding references is a consistent reading:
    the families are then built on the scrape's own thread, and a scrape of a full cluster
    holds the loop for the copies (it once built 90,000 samples on it: 0.4 s), and for a
    rebuild of the snapshot when nodes changed since the last read, which any read pays.
    """

    nodes: Mapping[str, types_pb2.NodeStatus]
    snapshot: ClusterSnapshot
    reports: Mapping[str, NodeReport]
    allocations: tuple[types_pb2.Allocation, ...]
    connected: frozenset[str]
    revision: int
    watch_up: bool
    blocked: bool
    space_warning: bool
    at: datetime


GPU_LABELS = ("node", "gpu_id", "gpu_uuid", "card_model")
GPU_GAUGES = tuple(
    Gauge(f"kaiwo_gpu_gpu_{name}", text)
    for name, text in (
        ("allocated_millis", "Compute share granted on the GPU, in thousandths"),
        ("capacity_millis", "Compute share the GPU has, in thousandths (1000)"),
        ("allocated_memory_bytes", "VRAM granted on the GPU"),
        ("memory_bytes", "VRAM the GPU has"),
        ("allocations", "Allocations holding a share of the GPU"),
    )
)
NODE_GAUGES = tuple(
    Gauge(f"kaiwo_gpu_node_{name}", text)
    for name, text in (
        ("allocated_millis", "Compute share granted on the node's GPUs, in thousandths"),
        ("capacity_millis", "Compute share of the node's GPUs, in thousandths"),
        ("allocated_memory_bytes", "VRAM granted on the node's GPUs"),
        ("memory_bytes", "VRAM of the node's GPUs"),
        ("schedulable", "1 when the node takes new allocations"),
    )
)
ALLOCATIONS = Gauge("kaiwo_gpu_allocations", "Allocations in etcd, by isolation")
TELEMETRY_AGE = Gauge(
    "kaiwo_gpu_node_telemetry_age_seconds",
    "Time since this coordinator last heard from the node's agent (nodes whose agents "
    "stream to it)",
)
AGENTS = Gauge("kaiwo_gpu_agents_connected", "Agents streaming to this coordinator")
WATCH_UP = Gauge("kaiwo_gpu_etcd_watch_up", "1 while the watch on etcd is up")
REVISION = Gauge("kaiwo_gpu_view_revision", "The etcd revision this coordinator's view holds")
SPACE_WARNING = Gauge(
    "kaiwo_gpu_etcd_space_warning", "1 while etcd's database is above 80% of --etcd-quota"
)
BLOCKED = Gauge(
    "kaiwo_gpu_placement_blocked",
    "1 while placement is refused because an allocation record cannot be read",
)


class CoordinatorCollector(Collector):
    """The instruments and the removal counter, through prometheus-client; `families`, the
    text source, writes the view's gauges (most of a scrape's series)."""

    def __init__(self, sources: Sources, instruments: Instruments) -> None:
        self._sources = sources
        self._instruments = instruments
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop that owns the view; None until the coordinator runs on one."""

    def collect(self) -> Iterator[Metric]:
        for instrument in self._instruments.collectors():
            yield from instrument.collect()
        removed = CounterMetricFamily(
            "kaiwo_gpu_allocations_removed",
            "Allocations this coordinator saw leave etcd since it started: released, or "
            "expired (their lease ran out or was revoked)",
            labels=("reason",),
        )
        counts = self._sources.view.state.removed_allocations  # two ints the loop only raises
        for reason in ("released", "expired"):
            removed.add_metric((reason,), counts.get(reason, 0))
        yield removed

    def families(self) -> Iterator[Family]:
        yield from view_families(self._read_on_the_loop())

    def _read_on_the_loop(self) -> ScrapeView:
        """The view's reading, taken by the loop that owns the view (directly when this is
        that loop's thread, or when there is no loop yet and so nothing else reads it)."""
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or not loop.is_running() or running is loop:
            return self._reading()

        abandoned = threading.Event()

        async def read() -> ScrapeView | None:
            # Cancelling the future would not stop a read whose task has not started yet:
            # the cancellation lands after its first step.
            return None if abandoned.is_set() else self._reading()

        reading = asyncio.run_coroutine_threadsafe(read(), loop)
        try:
            answer = reading.result(SCRAPE_TIMEOUT_S)
        except TimeoutError:
            abandoned.set()  # not read later, once for every scrape that gave up
            raise UnavailableError(
                f"the coordinator's event loop did not answer in {SCRAPE_TIMEOUT_S:g} s"
            ) from None
        assert answer is not None  # only an abandoned read answers None
        return answer

    def _reading(self) -> ScrapeView:
        view = self._sources.view
        state = view.state
        return ScrapeView(
            nodes=dict(state.nodes),
            snapshot=state.snapshot,  # may rebuild it: only ever on the loop
            reports=dict(view.telemetry.reports),
            allocations=tuple(state.allocations.values()),
            connected=frozenset(self._sources.connected_nodes()),
            revision=state.revision,
            watch_up=view.connected,
            blocked=state.blocked_reason is not None,
            space_warning=bool(self._sources.space_warning()),
            at=datetime.now(UTC),
        )


def view_families(read: ScrapeView) -> Iterator[Family]:
    """The gauges a scrape shows of the cluster (pure: a reading in, families out)."""
    by_isolation: Tally[str] = Tally(dict.fromkeys(map(str, Isolation), 0))  # 0, not no series
    for record in read.allocations:
        try:
            by_isolation[isolation_from_proto(record.isolation).value] += 1
        except Exception:
            by_isolation["unknown"] += 1
    allocations = GaugeRows(("isolation",), [ALLOCATIONS])
    for isolation, count in sorted(by_isolation.items()):
        allocations.add((isolation,), (count,))
    yield from allocations.families()

    gpus = GaugeRows(GPU_LABELS, GPU_GAUGES)
    nodes = GaugeRows(("node",), NODE_GAUGES)
    telemetry_age = GaugeRows(("node",), [TELEMETRY_AGE])
    amd = GpuMetricFamilies()
    for status in node_statuses(read.nodes, read.snapshot, {}, read.reports):
        streaming = status.name in read.connected
        totals = [0, 0, 0, 0]  # a node's first four gauges sum its GPUs' first four
        written: set[str] = set()
        for gpu in status.gpus:
            inventory = gpu.inventory
            if inventory.uuid in written:
                continue  # a record naming a GPU twice (by hand: placement skips the node)
            written.add(inventory.uuid)
            row = (
                gpu.allocated_millis,
                MILLIS_PER_GPU,
                gpu.allocated_memory_mib * MIB,
                inventory.vram_mib * MIB,
                gpu.allocation_count,
            )
            gpus.add((status.name, str(inventory.index), inventory.uuid, inventory.model), row)
            totals = [total + value for total, value in zip(totals, row, strict=False)]
            if streaming and gpu.HasField("telemetry"):
                amd.add(status.name, gpu)
        nodes.add((status.name,), (*totals, int(status.schedulable)))
        report = read.reports.get(status.name)
        if streaming:
            amd.node(status.name, len(written))
            if report is not None:
                age = max(0.0, (read.at - report.received_at).total_seconds())
                telemetry_age.add((status.name,), (age,))
    yield from gpus.families()
    yield from nodes.families()
    yield from telemetry_age.families()
    yield from amd.families()
    yield single(AGENTS, len(read.connected))
    yield single(WATCH_UP, int(read.watch_up))
    yield single(REVISION, read.revision)
    yield single(SPACE_WARNING, int(read.space_warning))
    yield single(BLOCKED, int(read.blocked))
