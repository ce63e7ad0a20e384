"""Per-GPU gauges named and labelled as AMD's device-metrics-exporter names them by default.

The agent exports them for its GPUs, and a coordinator re-exports them for the nodes whose
agents stream to it, so dashboards and alerts written for AMD's exporter work unchanged on
either. Names, units and labels follow the exporter: activity in percent, VRAM in MB (as
amd-smi reports it), temperatures in Celsius, power in Watts, ECC counts as running totals;
`gpu_health` is 1 for a healthy GPU and 0 otherwise. Pure: rows in, families' text out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kaiwo_gpu.common.metrics_text import Family, Gauge, GaugeRows
from kaiwo_gpu.v1 import types_pb2

LABELS = (
    "gpu_id",
    "gpu_uuid",
    "card_model",
    "gpu_compute_partition_type",
    "gpu_memory_partition_type",
    "hostname",
)
"""AMD's label names for the GPU index, its UUID (optional in AMD's exporter, and what its
dashboards filter on), its model, its partition modes (lower case, as AMD writes them: spx,
nps1; empty when not reported) and its node. AMD's `serial_number` is not known here."""


@dataclass(frozen=True, slots=True)
class GpuGauge(Gauge):
    """A gauge and how to read it off a GPU's row."""

    value: Callable[[types_pb2.GpuStatus], float | None]


def _telemetry(field: str) -> Callable[[types_pb2.GpuStatus], float | None]:
    def read(status: types_pb2.GpuStatus) -> float | None:
        telemetry = status.telemetry
        present = telemetry.HasField(field)  # type: ignore[arg-type]  # one of its optionals
        return float(getattr(telemetry, field)) if present else None

    return read


def _free_vram(status: types_pb2.GpuStatus) -> float | None:
    if not status.telemetry.HasField("used_vram_mib"):
        return None
    return float(max(0, status.inventory.vram_mib - status.telemetry.used_vram_mib))


GAUGES = (
    GpuGauge("gpu_gfx_activity", "Graphics (compute) engine activity, percent",
             _telemetry("gfx_activity_percent")),
    GpuGauge("gpu_umc_activity", "Memory controller (UMC) activity, percent",
             _telemetry("umc_activity_percent")),
    GpuGauge("gpu_used_vram", "VRAM in use, MB", _telemetry("used_vram_mib")),
    GpuGauge("gpu_total_vram", "VRAM of the GPU, MB",
             lambda status: float(status.inventory.vram_mib)),
    GpuGauge("gpu_free_vram", "VRAM not in use, MB", _free_vram),
    GpuGauge("gpu_junction_temperature", "Junction (hotspot) temperature, Celsius",
             _telemetry("hotspot_temperature_c")),
    GpuGauge("gpu_edge_temperature", "Edge temperature, Celsius",
             _telemetry("edge_temperature_c")),
    GpuGauge("gpu_memory_temperature", "HBM temperature, Celsius",
             _telemetry("memory_temperature_c")),
    GpuGauge("gpu_package_power", "Package (socket) power, Watts",
             _telemetry("socket_power_w")),
    GpuGauge("gpu_power_usage", "Power usage, Watts (the socket power, as amd-smi reads it)",
             _telemetry("socket_power_w")),
    GpuGauge("gpu_ecc_correct_total", "Correctable ECC errors since the driver loaded",
             _telemetry("ecc_correctable_total")),
    GpuGauge("gpu_ecc_uncorrect_total", "Uncorrectable ECC errors since the driver loaded",
             _telemetry("ecc_uncorrectable_total")),
    GpuGauge("gpu_health", "1 when the GPU is healthy, 0 when it is not",
             lambda status: 1.0 if status.health == types_pb2.HEALTH_HEALTHY else 0.0),
)  # fmt: skip
"""Each gauge: AMD's name, what it is, and how to read it off a GPU's row (None: the GPU
did not report it, so the series is left out rather than shown as 0)."""


class GpuMetricFamilies:
    """Collects GPU rows (inventory, latest telemetry, health) into one family per gauge."""

    def __init__(self) -> None:
        self._rows = GaugeRows(LABELS, GAUGES)
        self._gpus_on: dict[str, int] = {}

    def add(self, hostname: str, status: types_pb2.GpuStatus) -> None:
        inventory = status.inventory
        labels = (
            str(inventory.index),
            inventory.uuid,
            inventory.model,
            inventory.compute_partition.lower(),
            inventory.memory_partition.lower(),
            hostname,
        )
        self._rows.add(labels, [gauge.value(status) for gauge in GAUGES])

    def node(self, hostname: str, gpus: int) -> None:
        """The node's GPU count (`gpu_nodes_total`), sampled or not."""
        self._gpus_on[hostname] = gpus

    def families(self) -> Iterator[Family]:
        yield from self._rows.families()
        # AMD's name: a gauge, despite the suffix.
        nodes = GaugeRows(("hostname",), [Gauge("gpu_nodes_total", "GPUs on the node")])
        for hostname, count in sorted(self._gpus_on.items()):
            nodes.add((hostname,), (count,))
        yield from nodes.families()
