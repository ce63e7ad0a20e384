"""The agent's /metrics: its GPUs under AMD's exporter names, read off the latest tick.

A scrape reads what the last tick sampled (never the GPUs themselves), so it costs the
node nothing and shows exactly what the coordinator was sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC

from kaiwo_gpu.agent.sampler import NodeSampler
from kaiwo_gpu.agent.uplink_state import UplinkStatus
from kaiwo_gpu.common.gpu_metrics import GpuMetricFamilies
from kaiwo_gpu.common.metrics_text import Family, Gauge, single
from kaiwo_gpu.v1 import types_pb2

CONNECTED = Gauge("kaiwo_gpu_agent_connected", "1 while the agent is registered with a coordinator")
SAMPLE_AGE = Gauge(
    "kaiwo_gpu_agent_sample_age_seconds", "Time since the agent last sampled its GPUs"
)


class AgentMetrics:
    """The agent's families, as `MetricsServer` serves them (a text source)."""

    def __init__(
        self,
        node: str,
        inventory: Sequence[types_pb2.GpuInventory],
        sampler: NodeSampler,
        status: UplinkStatus,
    ) -> None:
        self._node = node
        self._inventory = tuple(inventory)
        self._sampler = sampler
        self._status = status

    def families(self) -> Iterator[Family]:
        batch = self._sampler.last_batch
        samples = {sample.uuid: sample for sample in batch.samples} if batch else {}
        gpus = GpuMetricFamilies()
        gpus.node(self._node, len(self._inventory))
        for inventory in self._inventory:
            sample = samples.get(inventory.uuid)
            if sample is None:
                continue  # not sampled yet: no series rather than zeros
            row = types_pb2.GpuStatus(inventory=inventory, health=sample.health)
            if sample.HasField("telemetry"):
                row.telemetry.CopyFrom(sample.telemetry)
            gpus.add(self._node, row)
        yield from gpus.families()
        yield single(CONNECTED, int(self._status.connected))
        if batch is not None:
            sampled_at = batch.sampled_at.ToDatetime(tzinfo=UTC)  # naive would read as local
            yield single(SAMPLE_AGE, max(0.0, time.time() - sampled_at.timestamp()))
