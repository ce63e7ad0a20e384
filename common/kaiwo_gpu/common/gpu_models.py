"""Published figures of the AMD Instinct devices kaiwo-gpu knows by name.

Used by the simulated backend and demos; a real node reports its own figures through amdsmi.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuModel:
    name: str
    vram_mib: int
    compute_units: int
    max_power_w: int
    hotspot_limit_c: int


GPU_MODELS: dict[str, GpuModel] = {
    model.name: model
    for model in (
        GpuModel(
            "MI300X", vram_mib=192 * 1024, compute_units=304, max_power_w=750, hotspot_limit_c=110
        ),
        # One MI250X package is two GCDs; each GCD is a GPU to ROCm and to kaiwo-gpu.
        GpuModel(
            "MI250X", vram_mib=64 * 1024, compute_units=110, max_power_w=280, hotspot_limit_c=105
        ),
        GpuModel(
            "MI210", vram_mib=64 * 1024, compute_units=104, max_power_w=300, hotspot_limit_c=105
        ),
    )
}
