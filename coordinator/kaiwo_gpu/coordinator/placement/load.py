"""How busy a GPU is, as one integer the load-balanced strategy can sort by.

Lower is better. The score takes the larger of the share already allocated and the live
gfx activity (a GPU can be busier than its allocations say), then adds power draw relative
to the limit, heat above a soft limit, and a penalty for a degraded GPU. Readings that are
NaN or infinite count as not reported, and others are clamped to the telemetry limits, so
one bad sample cannot stop placement.
"""

from __future__ import annotations

import math

from kaiwo_gpu.common.models import Health
from kaiwo_gpu.common.telemetry_limits import MAX_PERCENT, POWER_W, TEMPERATURE_C
from kaiwo_gpu.coordinator.placement.cluster import Gpu, GpuUsage, Telemetry

HOT_SOFT_LIMIT_C = 85.0
PER_DEGREE_OVER = 25
DEGRADED_PENALTY = 1000


def _sane(value: float | None, bounds: tuple[float, float]) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    low, high = bounds
    return min(max(value, low), high)


def load_score(gpu: Gpu, usage: GpuUsage, telemetry: Telemetry | None) -> int:
    busy = usage.allocated_millis
    power = 0
    heat = 0
    if telemetry is not None:
        activity = _sane(telemetry.gfx_activity_percent, (0, MAX_PERCENT))
        if activity is not None:
            busy = max(busy, int(activity * 10))
        watts = _sane(telemetry.socket_power_w, POWER_W)
        limit = _sane(telemetry.power_limit_w, POWER_W)
        if watts is not None and limit:
            power = int(250 * min(watts / limit, 2.0))
        hotspot = _sane(telemetry.hotspot_temperature_c, TEMPERATURE_C)
        if hotspot is not None:
            heat = int(max(0.0, hotspot - HOT_SOFT_LIMIT_C) * PER_DEGREE_OVER)
    degraded = DEGRADED_PENALTY if gpu.health is Health.DEGRADED else 0
    return busy + power + heat + degraded
