"""Immutable records of the cluster as the strategy engine sees it.

Inventory (nodes and GPUs), what is placed on them (allocations) and the latest telemetry.
These are plain frozen values; the snapshot module derives usage and indexes from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kaiwo_gpu.common.models import Health, Isolation, Labels
from kaiwo_gpu.common.units import MILLIS_PER_GPU

MAX_COMPUTE_UNITS = 4096
"""The most compute units a GPU may report; a CU id at or above it is no GPU's."""

GpuKey = tuple[str, int]
"""(node name, device index): the canonical order of GPUs in a cluster."""

WHOLE_DEVICE_PARTITIONS = frozenset({"", "SPX"})


@dataclass(frozen=True, slots=True)
class Gpu:
    uuid: str
    node: str
    index: int
    bdf: str
    model: str
    vram_mib: int
    compute_units: int
    health: Health = Health.HEALTHY
    health_reason: str = ""
    compute_partition: str = ""

    def __post_init__(self) -> None:
        if self.vram_mib <= 0 or self.compute_units <= 0 or self.index < 0:
            raise ValueError(f"GPU {self.uuid}: VRAM, compute units must be positive, index >= 0")

    @property
    def key(self) -> GpuKey:
        return (self.node, self.index)

    @property
    def is_partition(self) -> bool:
        """True for a hardware compute partition (DPX/QPX/CPX), false for a whole device."""
        return self.compute_partition.upper() not in WHOLE_DEVICE_PARTITIONS


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    gpus: tuple[Gpu, ...]
    labels: Labels = ()
    schedulable: bool = True
    unschedulable_reason: str = ""

    def has_labels(self, wanted: Labels) -> bool:
        return labels_include(self.labels, wanted)


def labels_include(labels: Labels, wanted: Labels) -> bool:
    """Every wanted (key, value) pair is one of `labels`; labels are unique per key."""
    return all(pair in labels for pair in wanted)


@dataclass(frozen=True, slots=True)
class GpuShare:
    """What one allocation holds on one GPU."""

    gpu_uuid: str
    millis: int
    memory_mib: int
    compute_units: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PlacedAllocation:
    allocation_id: str
    node: str
    shares: tuple[GpuShare, ...]
    isolation: Isolation = Isolation.NONE
    sharing: bool = True

    def __post_init__(self) -> None:
        uuids = [share.gpu_uuid for share in self.shares]
        if len(set(uuids)) != len(uuids):
            raise ValueError(f"allocation {self.allocation_id} holds one GPU twice: {uuids}")

    @property
    def blocks_sharing(self) -> bool:
        return not self.sharing or self.isolation in (Isolation.EXCLUSIVE, Isolation.PARTITION)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The latest sample of one GPU that placement cares about; None = not reported."""

    gfx_activity_percent: int | None = None
    hotspot_temperature_c: float | None = None
    socket_power_w: float | None = None
    power_limit_w: float | None = None


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """What the allocations on one GPU add up to."""

    allocated_millis: int = 0
    allocated_memory_mib: int = 0
    used_compute_units_mask: int = 0
    holders: int = 0
    blocked: bool = False
    cu_mask_holders: int = 0

    @property
    def shared_holders(self) -> int:
        """Holders that time-share every compute unit (isolation none)."""
        return self.holders - self.cu_mask_holders

    def excess_over(self, vram_mib: int, compute_units: int) -> str:
        """What is granted beyond what a GPU of these figures has, in words, or "".

        Placement never grants more than a GPU has; a GPU's record can still shrink under
        its grants (an agent registering smaller figures) or a hand edit can over-grant it,
        and reads must show that rather than fail on it."""
        excess = []
        if self.allocated_millis > MILLIS_PER_GPU:
            excess.append(f"{self.allocated_millis} millis granted of {MILLIS_PER_GPU}")
        if self.allocated_memory_mib > vram_mib:
            excess.append(f"{self.allocated_memory_mib} MiB granted of {vram_mib} MiB")
        if self.used_compute_units_mask.bit_length() > compute_units:
            highest = self.used_compute_units_mask.bit_length() - 1
            excess.append(f"compute unit {highest} granted of 0-{compute_units - 1}")
        return "; ".join(excess)

    def plus(self, share: GpuShare, blocks_sharing: bool) -> GpuUsage:
        """The usage with one more holder, which counts for at least one milli: placement never
        grants less, and with this a GPU with every milli free holds nothing (a record
        stating 0 millis is odd, and odd records count for more, never for less)."""
        mask = 0
        for cu in share.compute_units:
            mask |= 1 << cu
        return GpuUsage(
            allocated_millis=self.allocated_millis + max(1, share.millis),
            allocated_memory_mib=self.allocated_memory_mib + share.memory_mib,
            used_compute_units_mask=self.used_compute_units_mask | mask,
            holders=self.holders + 1,
            blocked=self.blocked or blocks_sharing,
            cu_mask_holders=self.cu_mask_holders + (1 if share.compute_units else 0),
        )


class GpuClass(NamedTuple):
    """Everything placement's rules read of a GPU except its free capacity.

    GPUs of one class pass or fail those rules together for any request, so the snapshot
    counts GPUs per class and a refusal is explained from the counts rather than from every
    GPU. Labels make a class per label set, one per node where nodes carry their own names
    as labels; so the snapshot also counts classes without labels, which is all a request
    without a label selector needs (a few dozen whatever the labels). A named tuple, not a
    dataclass: every commit hashes and compares a few, and a tuple does both in C.
    """

    model: str
    vram_mib: int
    compute_units: int
    partition: bool
    labels: Labels
    schedulable: bool
    unhealthy: bool
    blocked: bool
    held: bool
    cu_mask_held: bool
    time_shared_held: bool

    def without_labels(self) -> GpuClass:
        return self._replace(labels=())

    @property
    def open_and_idle(self) -> bool:
        """Could take a whole GPU: on a schedulable node, not unhealthy, nothing on it."""
        return self.schedulable and not self.unhealthy and not self.held

    @staticmethod
    def of(gpu: Gpu, node: Node, usage: GpuUsage) -> GpuClass:
        return GpuClass(
            model=gpu.model,
            vram_mib=gpu.vram_mib,
            compute_units=gpu.compute_units,
            partition=gpu.is_partition,
            labels=node.labels,
            schedulable=node.schedulable,
            unhealthy=gpu.health is Health.UNHEALTHY,
            blocked=usage.blocked,
            held=usage.holders > 0,
            cu_mask_held=usage.cu_mask_holders > 0,
            time_shared_held=usage.shared_holders > 0,
        )
