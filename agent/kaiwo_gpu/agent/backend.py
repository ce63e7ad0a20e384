"""What every GPU backend (amdsmi, simulated) provides, and the plain values it returns.

A backend discovers the node's GPUs once and then reads each one on every tick. Values a
device does not report are None, never an error: an unsupported sensor must not take a
GPU out of service. A device that has gone away raises `DeviceLostError`.
Backends are synchronous (amdsmi is a C library); the agent calls them off the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class BackendUnavailableError(Exception):
    """The backend cannot run on this machine; the message says why and how to fix it."""


class DeviceLostError(Exception):
    """The GPU no longer answers (fell off the bus, driver reset, removed)."""


@dataclass(frozen=True, slots=True)
class DiscoveredGpu:
    uuid: str
    index: int
    bdf: str
    model: str  # market name, e.g. "MI300X"
    vram_mib: int
    compute_units: int
    compute_partition: str = ""  # "SPX", "DPX", "QPX", "CPX"; "" = not reported
    memory_partition: str = ""  # "NPS1", "NPS4"; "" = not reported


@dataclass(frozen=True, slots=True)
class ProcessVram:
    pid: int
    name: str
    vram_mib: int


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One sample of one GPU; None = the device does not report it."""

    gfx_activity_percent: int | None = None
    umc_activity_percent: int | None = None
    edge_temperature_c: float | None = None
    hotspot_temperature_c: float | None = None
    memory_temperature_c: float | None = None
    socket_power_w: float | None = None
    power_limit_w: float | None = None
    used_vram_mib: int | None = None
    ecc_correctable_total: int | None = None
    ecc_uncorrectable_total: int | None = None
    processes: tuple[ProcessVram, ...] = ()


@dataclass(frozen=True, slots=True)
class PlacedShare:
    """What the coordinator placed on one GPU of this node, summed over its allocations."""

    millis: int
    memory_mib: int
    allocations: int


class GpuBackend(Protocol):
    name: str

    def discover(self) -> tuple[DiscoveredGpu, ...]:
        """The node's GPUs in index order; raises BackendUnavailableError when it cannot."""
        ...

    def read(self, gpu: DiscoveredGpu) -> GpuReading:
        """The current sample; raises DeviceLostError when the device is gone."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class FollowsPlacements(Protocol):
    """A backend whose simulated load follows what the coordinator placed (the demo)."""

    def follow_placements(self, shares: Mapping[str, PlacedShare]) -> None:
        """`shares` by GPU UUID; GPUs not named hold nothing."""
        ...
