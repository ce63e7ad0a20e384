"""The agent's /metrics: its GPUs under AMD's exporter names, read off the latest tick.

A scrape reads what the last tick sampled (never the GPUs themselves), so it costs the
node nothing and shows exactly what the coordinator was sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kaiwo_gpu.agent.sampler import NodeSampler
from kaiwo_gpu.agent.uplink_state import UplinkStatus
from kaiwo_gpu.common.gpu_metrics import GpuMetricFamilies
from kaiwo_gpu.v1 import types_pb2


class AgentCollector(Collector):
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

    def collect(self) -> Iterator[Metric]:
        batch = self._sampler.last_batch
        samples = {sample.uuid: sample for sample in batch.samples} if batch else {}
        gpus = GpuMetricFamilies()
        for inventory in self._inventory:
            sample = samples.get(inventory.uuid)
            if sample is None:
                continue  # not sampled yet: no series rather than zeros
            row = types_pb2.GpuStatus(inventory=inventory, health=sample.health)
            if sample.HasField("telemetry"):
                row.telemetry.CopyFrom(sample.telemetry)
            gpus.add(self._node, row)
        yield from gpus.families()
        yield GaugeMetricFamily(
            "kaiwo_gpu_agent_connected",
            "1 while the agent is registered with a coordinator",
            value=int(self._status.connected),
        )
        if batch is not None:
            sampled_at = batch.sampled_at.ToDatetime(tzinfo=UTC)  # naive would read as local
            age = max(0.0, time.time() - sampled_at.timestamp())
            yield GaugeMetricFamily(
                "kaiwo_gpu_agent_sample_age_seconds",
                "Time since the agent last sampled its GPUs",
                value=age,
            )
