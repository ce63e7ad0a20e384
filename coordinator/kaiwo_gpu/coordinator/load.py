"""How busy a GPU is, as one integer the load-balanced strategy can sort by.

Lower is better. The score takes the larger of the share already allocated and the live
gfx activity (a GPU can be busier than its allocations say), then adds power draw relative
to the limit, heat above a soft limit, and a penalty for a degraded GPU.
"""

from __future__ import annotations

from kaiwo_gpu.common.models import Health
from kaiwo_gpu.coordinator.cluster import Gpu, GpuUsage, Telemetry

HOT_SOFT_LIMIT_C = 85.0
PER_DEGREE_OVER = 25
DEGRADED_PENALTY = 1000


def load_score(gpu: Gpu, usage: GpuUsage, telemetry: Telemetry | None) -> int:
    busy = usage.allocated_millis
    power = 0
    heat = 0
    if telemetry is not None:
        if telemetry.gfx_activity_percent is not None:
            busy = max(busy, telemetry.gfx_activity_percent * 10)
        if telemetry.socket_power_w is not None and telemetry.power_limit_w:
            power = int(250 * telemetry.socket_power_w / telemetry.power_limit_w)
        if telemetry.hotspot_temperature_c is not None:
            heat = int(
                max(0.0, telemetry.hotspot_temperature_c - HOT_SOFT_LIMIT_C) * PER_DEGREE_OVER
            )
    degraded = DEGRADED_PENALTY if gpu.health is Health.DEGRADED else 0
    return busy + power + heat + degraded
