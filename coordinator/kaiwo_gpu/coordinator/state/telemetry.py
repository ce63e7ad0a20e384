"""Live telemetry of the agents connected to this coordinator: one owner, one entry point.

`ingest(node, batch, ...)` checks a batch and answers with everything that follows from it:
the display rows ListNodes shows, the readings placement weighs, and the health verdicts
that changed (for the node record). Nothing else keeps telemetry, so the two shapes cannot
drift apart. Pure and synchronous; the view owns it and feeds placement from it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from kaiwo_gpu.coordinator.placement.cluster import Telemetry
from kaiwo_gpu.coordinator.state.agent_reports import (
    NodeReport,
    checked_batch,
    placement_reading,
    trimmed,
    with_health,
)
from kaiwo_gpu.v1 import agent_pb2, types_pb2


@dataclass(frozen=True, slots=True)
class Ingested:
    """What one accepted batch changes."""

    report: NodeReport
    """The node's display rows (last batch, processes trimmed), as ListNodes shows them."""
    readings: Mapping[str, Telemetry]
    """By GPU UUID: what the load-balanced strategy weighs."""
    health_change: types_pb2.NodeStatus | None
    """The node record with the new health verdicts, or None when none changed."""


class LiveTelemetry:
    """The latest report of each node whose agent this coordinator has heard from."""

    def __init__(self) -> None:
        self._reports: dict[str, NodeReport] = {}

    @property
    def reports(self) -> Mapping[str, NodeReport]:
        return self._reports

    def ingest(
        self,
        node: str,
        batch: agent_pb2.TelemetryBatch,
        record: types_pb2.NodeStatus,
        owner_of: Callable[[str], str | None],
        received_at: datetime,
    ) -> Ingested:
        """Checks the batch against the node's record (InvalidArgumentError naming the field,
        and nothing kept, when any value is out of range) and keeps it as the latest."""
        samples = checked_batch(batch, record, owner_of)
        report = NodeReport(
            received_at=received_at,
            samples={uuid: trimmed(sample) for uuid, sample in samples.items()},
        )
        self._reports[node] = report
        return Ingested(
            report=report,
            readings={uuid: placement_reading(s.telemetry) for uuid, s in samples.items()},
            health_change=with_health(record, samples),
        )

    def registered(self, node: str, at: datetime, known_nodes: Collection[str]) -> None:
        """A node (re)registered: it was last seen now, and its last rows stay until its
        first batch. Reports of nodes no longer known (their record was deleted) go."""
        last = self._reports.get(node)
        self._reports[node] = NodeReport(at, last.samples if last is not None else {})
        for gone in [name for name in self._reports if name not in known_nodes]:
            if gone != node:
                del self._reports[gone]

    def disconnected(self, node: str) -> dict[str, None]:
        """The node's readings for placement to forget (UUID -> None); its display rows stay,
        so ListNodes still shows when it was last seen."""
        report = self._reports.get(node)
        return dict.fromkeys(report.samples) if report is not None else {}
