"""What node agents report, checked at the edge and turned into records (pure).

An agent registers its node's inventory, then sends one telemetry batch per interval.
Everything is checked before anything is kept: a batch naming a GPU the node does not
have, or a value out of range, is refused whole, so a broken agent changes nothing.
Telemetry stays in memory; only the inventory and health changes become node records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import AlreadyExistsError, FailedPreconditionError
from kaiwo_gpu.common.errors import InvalidArgumentError as Invalid
from kaiwo_gpu.common.models import freeze_labels
from kaiwo_gpu.common.telemetry_limits import (
    MAX_PERCENT,
    MAX_PROCESS_NAME,
    MAX_PROCESSES,
    POWER_W,
    TEMPERATURE_C,
    within,
)
from kaiwo_gpu.common.wire import HEALTH_VERDICTS, moment_of
from kaiwo_gpu.coordinator.placement.cluster import GpuUsage, Telemetry
from kaiwo_gpu.coordinator.state.inventory import MAX_GPUS_PER_NODE, check_gpu_inventory
from kaiwo_gpu.coordinator.state.keys import FROM_AGENT, SOURCE_LABEL, source_of
from kaiwo_gpu.v1 import agent_pb2, types_pb2

KEPT_PROCESSES = 16
"""Per GPU, the processes with the most VRAM that ListNodes shows; the rest are dropped so
one busy node cannot push ListNodes past the message size limit."""
_FloatField = Literal[
    "edge_temperature_c",
    "hotspot_temperature_c",
    "memory_temperature_c",
    "socket_power_w",
    "power_limit_w",
]
_TEMPERATURES: tuple[_FloatField, ...] = (
    "edge_temperature_c",
    "hotspot_temperature_c",
    "memory_temperature_c",
)
_POWERS: tuple[_FloatField, ...] = ("socket_power_w", "power_limit_w")
_PERCENTS: tuple[Literal["gfx_activity_percent", "umc_activity_percent"], ...] = (
    "gfx_activity_percent",
    "umc_activity_percent",
)


@dataclass(frozen=True, slots=True)
class NodeReport:
    """The latest batch from one node's agent, as this coordinator received it."""

    received_at: datetime
    samples: Mapping[str, agent_pb2.GpuSample]  # by GPU UUID


def node_record(
    register: agent_pb2.Register,
    previous: types_pb2.NodeStatus | None,
    owner_of: Callable[[str], str | None],
) -> types_pb2.NodeStatus:
    """The node record an agent's registration makes, or an error naming the field.

    Health and a cordon carry over from the node's previous agent-written record, so a
    reconnecting agent does not make a bad GPU look healthy until its next batch.
    """
    names.check_node_name(register.node, "register.node")
    if previous is not None and source_of(previous) != FROM_AGENT:
        raise FailedPreconditionError(
            f"node {register.node!r} is registered by the static inventory; remove it "
            "there before running an agent for it"
        )
    if register.backend not in names.AGENT_BACKENDS:
        raise Invalid("register.backend", register.backend, " or ".join(names.AGENT_BACKENDS))
    labels = dict(freeze_labels(register.labels, "register.labels"))
    if SOURCE_LABEL in labels:
        raise Invalid("register.labels", SOURCE_LABEL, "a label that is not reserved")
    if not 1 <= len(register.gpus) <= MAX_GPUS_PER_NODE:
        raise Invalid("register.gpus", len(register.gpus), f"1-{MAX_GPUS_PER_NODE} GPUs")
    indices: set[int] = set()
    uuids: set[str] = set()
    for n, gpu in enumerate(register.gpus):
        check_gpu_inventory(gpu, f"register.gpus[{n}]")
        if gpu.index in indices or gpu.uuid in uuids:
            raise Invalid(f"register.gpus[{n}]", gpu.uuid, "a GPU with a UUID and index of its own")
        owner = owner_of(gpu.uuid)
        if owner is not None and owner != register.node:
            raise AlreadyExistsError(
                f"GPU {gpu.uuid} (register.gpus[{n}].uuid) belongs to node {owner!r}; "
                "two nodes cannot hold one GPU"
            )
        indices.add(gpu.index)
        uuids.add(gpu.uuid)
    old = {status.inventory.uuid: status for status in previous.gpus} if previous else {}
    record = types_pb2.NodeStatus(
        name=register.node,
        labels={**labels, SOURCE_LABEL: FROM_AGENT},
        schedulable=previous.schedulable if previous else True,
        unschedulable_reason=previous.unschedulable_reason if previous else "",
    )
    for gpu in sorted(register.gpus, key=lambda g: g.index):
        kept = old.get(gpu.uuid)
        record.gpus.add(
            inventory=gpu,
            health=kept.health if kept else types_pb2.HEALTH_HEALTHY,
            health_reason=kept.health_reason if kept else "",
        )
    return record


def check_grants_fit(
    record: types_pb2.NodeStatus,
    granted: Mapping[str, GpuUsage],
    previous: types_pb2.NodeStatus | None,
) -> None:
    """A new record must never leave more granted on a GPU than the GPU it lists has, nor
    move a granted GPU to another index or PCI address (grants name those: two exclusive
    allocations would get the same device).

    A change of partition mode shrinks each device's VRAM and compute units under the work
    placed on it, and a GPU that vanished has none: the record is refused
    (FailedPreconditionError naming the GPU and what is granted on it) until that work is
    released, so no record in etcd ever holds more than its GPU has."""
    reported = {status.inventory.uuid: status.inventory for status in record.gpus}
    before = {s.inventory.uuid: s.inventory for s in previous.gpus} if previous else {}
    for uuid, usage in sorted(granted.items()):
        gpu, old = reported.get(uuid), before.get(uuid)
        if gpu is None:
            excess = "the new record does not list it"
        elif old is not None and (old.index, old.bdf) != (gpu.index, gpu.bdf):
            excess = (
                f"it moved from index {old.index} ({old.bdf or 'no PCI address'}) to "
                f"{gpu.index} ({gpu.bdf or 'no PCI address'}), which its grants name"
            )
        else:
            excess = usage.excess_over(gpu.vram_mib, gpu.compute_units)
        if excess:
            raise FailedPreconditionError(
                f"node {record.name!r}: GPU {uuid} holds {usage.holders} allocation(s) "
                f"({usage.allocated_millis} millis, {usage.allocated_memory_mib} MiB) that "
                f"the new figures cannot hold: {excess}; release them (`kaiwo-gpu list "
                f"--node {record.name}`) or restore the GPU's partition mode, and the agent "
                "registers at its next attempt"
            )


def checked_batch(
    batch: agent_pb2.TelemetryBatch,
    record: types_pb2.NodeStatus,
    owner_of: Callable[[str], str | None],
) -> dict[str, agent_pb2.GpuSample]:
    """The batch's samples by UUID, if every one is about this node's GPUs and in range."""
    if not batch.HasField("sampled_at") or moment_of(batch.sampled_at) is None:
        raise Invalid("telemetry.sampled_at", _stamp(batch.sampled_at), _WHEN_SAMPLED)
    vram = {status.inventory.uuid: status.inventory.vram_mib for status in record.gpus}
    samples: dict[str, agent_pb2.GpuSample] = {}
    for n, sample in enumerate(batch.samples):
        where = f"telemetry.samples[{n}]"
        if sample.uuid not in vram:
            owner = owner_of(sample.uuid)
            whose = f"belongs to node {owner!r}" if owner else "is not a GPU of any node"
            raise Invalid(
                f"{where}.uuid",
                sample.uuid,
                f"a GPU of node {record.name!r} ({sample.uuid} {whose})",
            )
        if sample.uuid in samples:
            raise Invalid(f"{where}.uuid", sample.uuid, "one sample per GPU in a batch")
        _check_sample(sample, where, vram[sample.uuid])
        samples[sample.uuid] = sample
    return samples


_WHEN_SAMPLED = "the time it was sampled, a timestamp in years 1-9999 with nanos 0-999999999"


def _stamp(stamp: Timestamp) -> str:
    return f"seconds={stamp.seconds} nanos={stamp.nanos}"


def _check_sample(sample: agent_pb2.GpuSample, where: str, vram_mib: int) -> None:
    stamp = sample.telemetry.sampled_at
    if sample.telemetry.HasField("sampled_at") and moment_of(stamp) is None:
        raise Invalid(f"{where}.telemetry.sampled_at", _stamp(stamp), _WHEN_SAMPLED)
    if sample.health not in HEALTH_VERDICTS:
        raise Invalid(f"{where}.health", sample.health, "HEALTHY, DEGRADED or UNHEALTHY")
    names.check_reason(sample.health_reason, f"{where}.health_reason")
    telemetry = sample.telemetry
    for percent in _PERCENTS:
        if telemetry.HasField(percent) and getattr(telemetry, percent) > MAX_PERCENT:
            raise Invalid(
                f"{where}.telemetry.{percent}", getattr(telemetry, percent), f"0-{MAX_PERCENT}"
            )
    for temperature in _TEMPERATURES:
        _check_float(telemetry, temperature, where, TEMPERATURE_C, unit="°C")
    for power in _POWERS:
        _check_float(telemetry, power, where, POWER_W, unit="W")
    if telemetry.HasField("used_vram_mib") and telemetry.used_vram_mib > vram_mib:
        raise Invalid(
            f"{where}.telemetry.used_vram_mib", telemetry.used_vram_mib, f"0-{vram_mib} MiB"
        )
    if len(telemetry.processes) > MAX_PROCESSES:
        raise Invalid(
            f"{where}.telemetry.processes", len(telemetry.processes), f"0-{MAX_PROCESSES}"
        )
    for p, process in enumerate(telemetry.processes):
        names.check_text(process.name, f"{where}.telemetry.processes[{p}].name", MAX_PROCESS_NAME)
        if process.vram_mib > vram_mib:
            raise Invalid(
                f"{where}.telemetry.processes[{p}].vram_mib", process.vram_mib, f"0-{vram_mib} MiB"
            )


def _check_float(
    telemetry: types_pb2.GpuTelemetry,
    name: _FloatField,
    where: str,
    bounds: tuple[float, float],
    *,
    unit: str,
) -> None:
    if not telemetry.HasField(name):
        return
    value = getattr(telemetry, name)
    if not within(value, bounds):
        low, high = bounds
        raise Invalid(f"{where}.telemetry.{name}", value, f"a finite {low:g}-{high:g} {unit}")


def with_health(
    record: types_pb2.NodeStatus, samples: Mapping[str, agent_pb2.GpuSample]
) -> types_pb2.NodeStatus | None:
    """The record with the agent's health verdicts, or None when none changed."""
    changed = types_pb2.NodeStatus()
    changed.CopyFrom(record)
    moved = False
    for status in changed.gpus:
        sample = samples.get(status.inventory.uuid)
        if sample is None:
            continue
        if (status.health, status.health_reason) != (sample.health, sample.health_reason):
            status.health = sample.health
            status.health_reason = sample.health_reason
            moved = True
    return changed if moved else None


def trimmed(sample: agent_pb2.GpuSample) -> agent_pb2.GpuSample:
    """The sample with at most KEPT_PROCESSES processes, the largest by VRAM."""
    if len(sample.telemetry.processes) <= KEPT_PROCESSES:
        return sample
    kept = sorted(sample.telemetry.processes, key=lambda p: (-p.vram_mib, p.pid))[:KEPT_PROCESSES]
    short = agent_pb2.GpuSample()
    short.CopyFrom(sample)
    del short.telemetry.processes[:]
    short.telemetry.processes.extend(kept)
    return short


def placement_reading(telemetry: types_pb2.GpuTelemetry) -> Telemetry:
    """The part of a sample the load-balanced strategy weighs."""
    return Telemetry(
        gfx_activity_percent=telemetry.gfx_activity_percent
        if telemetry.HasField("gfx_activity_percent")
        else None,
        hotspot_temperature_c=telemetry.hotspot_temperature_c
        if telemetry.HasField("hotspot_temperature_c")
        else None,
        socket_power_w=telemetry.socket_power_w if telemetry.HasField("socket_power_w") else None,
        power_limit_w=telemetry.power_limit_w if telemetry.HasField("power_limit_w") else None,
    )
