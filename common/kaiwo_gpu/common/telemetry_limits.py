"""The ranges a telemetry value must fall in to be believed.

One definition for every place that judges a reading: the amdsmi backend and the sampler
leave a value outside them unset (a sensor glitch or a sentinel is "not reported"), the
coordinator refuses a batch that carries one (so an agent of this version never has a batch
refused for a reading), and the load score clamps to them.
"""

from __future__ import annotations

TEMPERATURE_C = (-60.0, 200.0)
"""Beyond what silicon survives: a sentinel or garbage, not a temperature."""
POWER_W = (0.0, 10_000.0)
MAX_PERCENT = 100
MAX_PROCESS_NAME = 256
MAX_PROCESSES = 1024
"""Per GPU and batch; an agent sends the ones with the most VRAM."""


def within(value: float, bounds: tuple[float, float]) -> bool:
    """True for a finite value inside the bounds (NaN compares false, so it is outside)."""
    low, high = bounds
    return low <= value <= high
