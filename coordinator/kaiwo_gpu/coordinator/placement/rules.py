"""The hard limits of placement, one home for each: what a GPU must be to take a request.

A GPU is checked in three steps, in this order, and the first that fails names the reason:
its position against the request's node and GPU lists; its class (what the GPU is and who
holds it: model, VRAM, node, health, holders) against every other rule that does not
count free capacity; and its free millis, MiB and compute units against the demand. GPUs
of one class pass or fail the class rules together, which is what lets a refusal count
classes instead of GPUs (refusals.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kaiwo_gpu.common.models import AllocationRequest, Isolation
from kaiwo_gpu.common.units import (
    MILLIS_PER_GPU,
    compute_units_for_millis,
    memory_for_millis,
    millis_for_compute_units,
    millis_for_memory,
)
from kaiwo_gpu.coordinator.placement.cluster import Gpu, GpuClass, labels_include
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot


class Reason(Enum):
    """Why a GPU cannot take a request, in the order the engine checks."""

    SELECTOR = "do not match the selector"
    NODE_UNSCHEDULABLE = "are on unschedulable nodes"
    UNHEALTHY = "are unhealthy"
    NOT_A_PARTITION = "are not hardware compute partitions"
    HELD_EXCLUSIVELY = "are held by a non-sharing allocation"
    NOT_IDLE = "are in use (an idle GPU is needed)"
    ISOLATION_MISMATCH = "hold shares of the other isolation (cu-mask and none do not mix)"
    TOO_SMALL = "have less VRAM in all than requested"
    LACKS_MILLIS = "lack compute share"
    LACKS_MEMORY = "lack memory"
    LACKS_COMPUTE_UNITS = "lack free compute units"
    TOO_FEW_ON_NODE = "fit, but no node has enough of them"


@dataclass(frozen=True, slots=True)
class Demand:
    """What a request takes from one particular GPU, after rounding to what it can grant."""

    millis: int
    memory_mib: int
    compute_units: int = 0


def demand_on(request: AllocationRequest, gpu: Gpu) -> Demand:
    """The millis, MiB and CUs that `request` would be granted on `gpu`."""
    if request.isolation in (Isolation.EXCLUSIVE, Isolation.PARTITION):
        return Demand(MILLIS_PER_GPU, max(gpu.vram_mib, request.memory_mib or 0))
    if request.fraction_millis is not None:
        millis = request.fraction_millis
    else:
        assert request.memory_mib is not None  # the model guarantees one of the two
        millis = millis_for_memory(request.memory_mib, gpu.vram_mib)
    memory = (
        request.memory_mib
        if request.memory_mib is not None
        else memory_for_millis(millis, gpu.vram_mib)
    )
    if request.isolation is Isolation.CU_MASK:
        units = compute_units_for_millis(millis, gpu.compute_units)
        return Demand(millis_for_compute_units(units, gpu.compute_units), memory, units)
    return Demand(millis, memory)


def min_free_millis(request: AllocationRequest, snapshot: ClusterSnapshot) -> int:
    """A lower bound on the millis the request takes from any GPU it fits, at least 1.

    The index starts from it, and a refusal counts every GPU with less free as lacking
    share. Every allocation holds at least one milli, so a GPU with 1000 free is idle.
    """
    if request.needs_idle_gpu:
        return MILLIS_PER_GPU
    if request.fraction_millis is not None:
        return max(1, request.fraction_millis)
    assert request.memory_mib is not None
    return millis_for_memory(request.memory_mib, max(1, snapshot.max_vram_mib))


def selects_position(request: AllocationRequest, gpu: Gpu) -> bool:
    """The selector's node and GPU lists (its model and label rules go by class)."""
    selector = request.selector
    return not (
        gpu.node in selector.exclude_nodes
        or (selector.nodes and gpu.node not in selector.nodes)
        or gpu.uuid in selector.exclude_gpus
    )


def class_reason(request: AllocationRequest, gpu_class: GpuClass) -> Reason | None:
    """The first rule every GPU of this class fails for the request, or None."""
    selector = request.selector
    if (selector.gpu_models and gpu_class.model not in selector.gpu_models) or not (
        labels_include(gpu_class.labels, selector.node_labels)
    ):
        return Reason.SELECTOR
    if not gpu_class.schedulable:
        return Reason.NODE_UNSCHEDULABLE
    if gpu_class.unhealthy:
        return Reason.UNHEALTHY
    if request.isolation is Isolation.PARTITION and not gpu_class.partition:
        return Reason.NOT_A_PARTITION
    if gpu_class.blocked:
        return Reason.HELD_EXCLUSIVELY
    if request.needs_idle_gpu and gpu_class.held:
        return Reason.NOT_IDLE
    # Work without a CU mask runs on every CU, so it would break the promise of cu-mask.
    if (
        gpu_class.cu_mask_held
        if request.isolation is Isolation.NONE
        else gpu_class.time_shared_held
    ):
        return Reason.ISOLATION_MISMATCH
    # Only a stated memory can exceed a GPU's VRAM: a fraction's memory is a part of it.
    if request.memory_mib is not None and request.memory_mib > gpu_class.vram_mib:
        return Reason.TOO_SMALL
    return None


def capacity_verdict(
    request: AllocationRequest, snapshot: ClusterSnapshot, pos: int
) -> Demand | Reason:
    """The demand on GPU `pos` if its free capacity holds it (its class passed), else why not."""
    gpu = snapshot.gpus[pos]
    usage = snapshot.usage[pos]
    demand = demand_on(request, gpu)
    if demand.millis > MILLIS_PER_GPU - usage.allocated_millis:
        return Reason.LACKS_MILLIS
    if demand.memory_mib > gpu.vram_mib - usage.allocated_memory_mib:
        return Reason.LACKS_MEMORY
    if demand.compute_units > snapshot.free_compute_units(pos):
        return Reason.LACKS_COMPUTE_UNITS
    return demand


def check_gpu(request: AllocationRequest, snapshot: ClusterSnapshot, pos: int) -> Demand | Reason:
    """The demand on GPU `pos` if it can take the request, else the first reason it cannot."""
    if not request.selector.is_empty and not selects_position(request, snapshot.gpus[pos]):
        return Reason.SELECTOR
    reason = class_reason(request, snapshot.classes[pos])
    if reason is not None:
        return reason
    return capacity_verdict(request, snapshot, pos)
