"""The ranges a telemetry value must fall in to be believed.

One definition for both ends of the stream: the agent leaves a value outside them unset
(a sensor glitch is "not reported"), and the coordinator refuses a batch that carries one,
so an agent of this version never has a batch refused for a reading.
"""

from __future__ import annotations

TEMPERATURE_C = (-60.0, 250.0)
POWER_W = (0.0, 10_000.0)
MAX_PERCENT = 100
MAX_PROCESS_NAME = 256
MAX_PROCESSES = 1024
"""Per GPU and batch; an agent sends the ones with the most VRAM."""


def within(value: float, bounds: tuple[float, float]) -> bool:
    """True for a finite value inside the bounds (NaN compares false, so it is outside)."""
    low, high = bounds
    return low <= value <= high
