"""How the client commands print: aligned tables for people, JSON and YAML for scripts.

JSON and YAML are the proto3 JSON mapping with the .proto field names (as grpcurl prints
them, so 64-bit numbers are strings); every field is present, zeros included. Rendering is
pure: it takes messages and the current time and returns text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from google.protobuf.message import Message

from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.names import escaped
from kaiwo_gpu.common.units import format_fraction
from kaiwo_gpu.common.wire import isolation_from_proto
from kaiwo_gpu.v1 import allocation_pb2, types_pb2


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"
    ENV = "env"  # KEY=value lines of an allocation's environment


# json_format and yaml are imported by the outputs that use them: a table or `-o env` (a
# Slurm task's) does not pay their ~15 ms of start-up.


def message_data(message: Message) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def structured(data: object, output: OutputFormat, *, stream: bool = False) -> str:
    """JSON (one compact line per item when streaming) or YAML (a document per item)."""
    if output is OutputFormat.JSON:
        return json.dumps(data, separators=(",", ":")) if stream else json.dumps(data, indent=2)
    import yaml

    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return f"---\n{text.rstrip()}" if stream else text.rstrip()


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, like kubectl: easy to read and to `awk`. Cells
    come from the network, so each is escaped: none can drive the terminal."""
    lines = [list(headers), *([escaped(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def format_mib(mib: int) -> str:
    """4096 -> 4Gi, 4000 -> 4000Mi: the units the flags accept."""
    return f"{mib // 1024}Gi" if mib and mib % 1024 == 0 else f"{mib}Mi"


def format_duration(seconds: int) -> str:
    """`9m58s`, `3h04m`, `12s`: short enough for a table cell."""
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_expiry(allocation: types_pb2.Allocation, now: datetime) -> str:
    """How long until the lease expires; `-` when there is none."""
    if not allocation.HasField("expires_at"):
        return "-"
    seconds = int((allocation.expires_at.ToDatetime(tzinfo=UTC) - now).total_seconds())
    return format_duration(seconds) if seconds > 0 else "expired"


def isolation_name(value: int) -> str:
    """`cu-mask`; a number a newer coordinator sent is shown, not a crash."""
    try:
        return isolation_from_proto(value).value
    except InvalidArgumentError:
        return f"unknown ({value})"


def health_name(value: int) -> str:
    try:
        return types_pb2.Health.Name(value).removeprefix("HEALTH_").lower()  # type: ignore[arg-type]
    except ValueError:
        return f"unknown ({value})"


def _share(allocation: types_pb2.Allocation) -> str:
    shares = sorted({format_fraction(gpu.granted_millis) for gpu in allocation.gpus})
    return ",".join(shares) or "-"


def _memory(allocation: types_pb2.Allocation) -> str:
    sizes = sorted({gpu.granted_memory_mib for gpu in allocation.gpus})
    return ",".join(format_mib(size) for size in sizes) or "-"


ALLOCATION_HEADERS = ("ID", "NODE", "GPUS", "SHARE", "MEMORY", "ISOLATION", "OWNER", "EXPIRES")


def allocation_row(allocation: types_pb2.Allocation, now: datetime) -> list[str]:
    return [
        allocation.id,
        allocation.node,
        ",".join(str(gpu.index) for gpu in allocation.gpus),
        _share(allocation),
        _memory(allocation),
        isolation_name(allocation.isolation),
        allocation.request.owner or "-",
        format_expiry(allocation, now),
    ]


def allocations_table(allocations: Iterable[types_pb2.Allocation], now: datetime) -> str:
    return table(ALLOCATION_HEADERS, (allocation_row(a, now) for a in allocations))


def allocation_details(allocation: types_pb2.Allocation, now: datetime) -> str:
    """One allocation, described: what was granted where, and how to start work on it."""
    request = allocation.request
    lines = [
        f"id:          {allocation.id}",
        f"request id:  {allocation.request_id}",
        f"node:        {allocation.node}",
        f"isolation:   {isolation_name(allocation.isolation)}",
        f"strategy:    {allocation.strategy}",
        f"owner:       {request.owner or '-'}",
        f"labels:      {_pairs(request.labels) or '-'}",
        f"expires:     {format_expiry(allocation, now)}",
    ]
    if allocation.isolation_note:
        lines.append(f"note:        {allocation.isolation_note}")
    lines.append("gpus:")
    lines.extend(
        f"  {gpu.index}  {gpu.uuid}  share {format_fraction(gpu.granted_millis)}"
        f"  memory {format_mib(gpu.granted_memory_mib)}"
        + (f"  {len(gpu.compute_units)} CUs" if gpu.compute_units else "")
        for gpu in allocation.gpus
    )
    lines.append("environment:")
    lines.extend(f"  {line}" for line in environment_lines(allocation))
    return "\n".join(map(escaped, lines))


def environment_lines(allocation: types_pb2.Allocation) -> list[str]:
    return [escaped(f"{key}={value}") for key, value in sorted(allocation.environment.items())]


def _pairs(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


NODE_HEADERS = (
    "NODE",
    "STATUS",
    "GPU",
    "MODEL",
    "HEALTH",
    "ALLOCATED",
    "FREE-MEMORY",
    "UTIL",
    "TEMP",
    "POWER",
    "ALLOCS",
)


def _telemetry(gpu: types_pb2.GpuStatus) -> tuple[str, str, str]:
    sample = gpu.telemetry
    util = f"{sample.gfx_activity_percent}%" if sample.HasField("gfx_activity_percent") else "-"
    temp = (
        f"{sample.hotspot_temperature_c:.0f}C" if sample.HasField("hotspot_temperature_c") else "-"
    )
    power = f"{sample.socket_power_w:.0f}W" if sample.HasField("socket_power_w") else "-"
    return util, temp, power


def gpu_rows(node: types_pb2.NodeStatus) -> list[list[str]]:
    status = "ready" if node.schedulable else "unschedulable"
    rows = []
    for gpu in sorted(node.gpus, key=lambda g: g.inventory.index):
        rows.append(
            [
                node.name,
                status,
                str(gpu.inventory.index),
                gpu.inventory.model,
                health_name(gpu.health),
                f"{format_fraction(gpu.allocated_millis)}/1",
                f"{format_mib(gpu.free_memory_mib)}/{format_mib(gpu.inventory.vram_mib)}",
                *_telemetry(gpu),
                str(gpu.allocation_count),
            ]
        )
    return rows


def nodes_table(nodes: Iterable[types_pb2.NodeStatus]) -> str:
    """One row per GPU; reasons (with spaces) go below the table so its columns stay whole."""
    ordered = sorted(nodes, key=lambda n: n.name)
    text = table(NODE_HEADERS, (row for node in ordered for row in gpu_rows(node)))
    reasons = (
        [
            f"{node.name}: unschedulable: {node.unschedulable_reason}"
            for node in ordered
            if not node.schedulable and node.unschedulable_reason
        ]
        + [
            f"{node.name} GPU {gpu.inventory.index}: {health_name(gpu.health)}: {gpu.health_reason}"
            for node in ordered
            for gpu in sorted(node.gpus, key=lambda g: g.inventory.index)
            if gpu.health != types_pb2.HEALTH_HEALTHY and gpu.health_reason
        ]
        + [
            f"{node.name} GPU {gpu.inventory.index}: over-committed: {gpu.overcommit}"
            for node in ordered
            for gpu in sorted(node.gpus, key=lambda g: g.inventory.index)
            if gpu.overcommit
        ]
    )
    return "\n".join([text, *(["", *map(escaped, reasons)] if reasons else [])])


def stats_table(stats: allocation_pb2.GetClusterStatsResponse) -> str:
    strategies = _pairs({k: str(v) for k, v in stats.allocations_by_strategy.items()})
    rows = [
        ("nodes", f"{stats.schedulable_node_count} schedulable of {stats.node_count}"),
        ("gpus", f"{stats.healthy_gpu_count} healthy of {stats.gpu_count}"),
        (
            "compute",
            f"{format_fraction(stats.allocated_millis)} of "
            f"{format_fraction(stats.capacity_millis)} GPUs allocated",
        ),
        (
            "memory",
            f"{format_mib(stats.allocated_memory_mib)} of "
            f"{format_mib(stats.capacity_memory_mib)} allocated",
        ),
        ("allocations", str(stats.allocation_count)),
        ("by strategy", strategies or "-"),
        *([("etcd", stats.etcd_space_warning)] if stats.etcd_space_warning else []),
    ]
    return "\n".join(escaped(f"{name + ':':<13}{value}") for name, value in rows)


EVENT_HEADERS = ("EVENT", *ALLOCATION_HEADERS)
# A stream cannot be measured before it is printed: widths that fit the usual values.
EVENT_WIDTHS = (7, 32, 12, 5, 5, 6, 9, 16, 7)


def fixed_columns(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "   ".join(
        escaped(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)
    ).rstrip()


def event_kind(event: allocation_pb2.AllocationEvent) -> str:
    return allocation_pb2.AllocationEvent.Kind.Name(event.kind).removeprefix("KIND_")


def event_row(event: allocation_pb2.AllocationEvent, now: datetime) -> list[str]:
    return [event_kind(event), *allocation_row(event.allocation, now)]


def now_utc() -> datetime:
    return datetime.now(UTC)
