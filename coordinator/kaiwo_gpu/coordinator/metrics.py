"""The coordinator's /metrics: its instruments, and gauges read off its view at scrape time.

Nothing here runs on a request's path: a scrape reads the view state, the agent streams this
coordinator holds and the instruments' values, the same rows ListNodes answers with
(`node_statuses`). The view belongs to the event loop (a read may rebuild its placement
snapshot), so the HTTP thread that serves a scrape hands the reading to the loop and waits:
reading it from that thread once lost etcd changes applied meanwhile. Cluster-wide figures
(allocations, per-GPU and per-node shares) come from etcd through the view, so every
coordinator exports the same; the GPUs' AMD-named gauges only for the nodes whose agents
stream to this one, as those agents export them.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kaiwo_gpu.common.gpu_metrics import GpuMetricFamilies
from kaiwo_gpu.common.wire import isolation_from_proto
from kaiwo_gpu.coordinator.api.queries import node_statuses
from kaiwo_gpu.coordinator.instruments import Instruments
from kaiwo_gpu.coordinator.state.view import ClusterView

MIB = 1024 * 1024
NODE_TOTALS = ("allocated_millis", "capacity_millis", "allocated_memory_bytes", "memory_bytes")


@dataclass(frozen=True, slots=True)
class Sources:
    """What a scrape reads: the view, the nodes whose streams this coordinator holds, and
    the last etcd space verdict."""

    view: ClusterView
    connected_nodes: Callable[[], Iterable[str]]
    space_warning: Callable[[], str]


SCRAPE_TIMEOUT_S = 10.0
"""How long a scrape waits for the event loop to read the view."""


class CoordinatorCollector(Collector):
    def __init__(self, sources: Sources, instruments: Instruments) -> None:
        self._sources = sources
        self._instruments = instruments
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop that owns the view; None until the coordinator runs on one."""

    def collect(self) -> Iterator[Metric]:
        for instrument in self._instruments.collectors():
            yield from instrument.collect()
        yield from self._on_the_loop()

    def _on_the_loop(self) -> list[Metric]:
        """The view's gauges, read by the loop that owns the view (directly when this is
        that loop's thread, or when there is no loop yet and so nothing else reads it)."""
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or not loop.is_running() or running is loop:
            return list(self._view_gauges(datetime.now(UTC)))

        async def read() -> list[Metric]:
            return list(self._view_gauges(datetime.now(UTC)))

        return asyncio.run_coroutine_threadsafe(read(), loop).result(SCRAPE_TIMEOUT_S)

    def _view_gauges(self, now: datetime) -> Iterator[Metric]:
        view = self._sources.view
        state = view.state
        connected = set(self._sources.connected_nodes())

        by_isolation: Tally[str] = Tally()
        for record in state.allocations.values():
            try:
                by_isolation[isolation_from_proto(record.isolation).value] += 1
            except Exception:
                by_isolation["unknown"] += 1
        allocations = GaugeMetricFamily(
            "kaiwo_gpu_allocations",
            "Allocations in etcd, by isolation",
            labels=("isolation",),
        )
        for isolation, count in sorted(by_isolation.items()):
            allocations.add_metric((isolation,), count)
        yield allocations

        removed = CounterMetricFamily(
            "kaiwo_gpu_allocations_removed",
            "Allocations this coordinator saw leave etcd since it started: released, or "
            "expired (their lease ran out or was revoked)",
            labels=("reason",),
        )
        for reason in ("released", "expired"):
            removed.add_metric((reason,), state.removed_allocations[reason])
        yield removed

        gpu_labels = ("node", "gpu_id", "gpu_uuid", "card_model")
        gpu = {
            name: GaugeMetricFamily(f"kaiwo_gpu_gpu_{name}", text, labels=gpu_labels)
            for name, text in (
                ("allocated_millis", "Compute share granted on the GPU, in thousandths"),
                ("capacity_millis", "Compute share the GPU has, in thousandths (1000)"),
                ("allocated_memory_bytes", "VRAM granted on the GPU"),
                ("memory_bytes", "VRAM the GPU has"),
                ("allocations", "Allocations holding a share of the GPU"),
            )
        }
        node_labels = ("node",)
        node = {
            name: GaugeMetricFamily(f"kaiwo_gpu_node_{name}", text, labels=node_labels)
            for name, text in (
                ("allocated_millis", "Compute share granted on the node's GPUs, in thousandths"),
                ("capacity_millis", "Compute share of the node's GPUs, in thousandths"),
                ("allocated_memory_bytes", "VRAM granted on the node's GPUs"),
                ("memory_bytes", "VRAM of the node's GPUs"),
                ("schedulable", "1 when the node takes new allocations"),
            )
        }
        telemetry_age = GaugeMetricFamily(
            "kaiwo_gpu_node_telemetry_age_seconds",
            "Time since this coordinator last heard from the node's agent (nodes whose "
            "agents stream to it)",
            labels=node_labels,
        )
        amd = GpuMetricFamilies()
        reports = view.telemetry.reports
        for status in node_statuses(state, {}, reports):
            totals: Tally[str] = Tally()
            for gpu_status in status.gpus:
                inventory = gpu_status.inventory
                labels = (status.name, str(inventory.index), inventory.uuid, inventory.model)
                values = {
                    "allocated_millis": gpu_status.allocated_millis,
                    "capacity_millis": 1000,
                    "allocated_memory_bytes": gpu_status.allocated_memory_mib * MIB,
                    "memory_bytes": inventory.vram_mib * MIB,
                    "allocations": gpu_status.allocation_count,
                }
                for name, value in values.items():
                    gpu[name].add_metric(labels, value)
                totals.update({name: values[name] for name in NODE_TOTALS})
                if status.name in connected and gpu_status.HasField("telemetry"):
                    amd.add(status.name, gpu_status)
            for name in NODE_TOTALS:
                node[name].add_metric((status.name,), totals[name])
            node["schedulable"].add_metric((status.name,), 1 if status.schedulable else 0)
            report = reports.get(status.name)
            if status.name in connected and report is not None:
                telemetry_age.add_metric(
                    (status.name,), max(0.0, (now - report.received_at).total_seconds())
                )
        yield from gpu.values()
        yield from node.values()
        yield telemetry_age
        yield from amd.families()

        yield GaugeMetricFamily(
            "kaiwo_gpu_agents_connected",
            "Agents streaming to this coordinator",
            value=len(connected),
        )
        yield GaugeMetricFamily(
            "kaiwo_gpu_etcd_watch_up", "1 while the watch on etcd is up", value=int(view.connected)
        )
        yield GaugeMetricFamily(
            "kaiwo_gpu_view_revision", "The etcd revision this coordinator's view holds",
            value=state.revision,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "kaiwo_gpu_etcd_space_warning",
            "1 while etcd's database is above 80% of --etcd-quota",
            value=int(bool(self._sources.space_warning())),
        )
        yield GaugeMetricFamily(
            "kaiwo_gpu_placement_blocked",
            "1 while placement is refused because an allocation record cannot be read",
            value=int(state.blocked_reason is not None),
        )
