"""The client commands' tables: pure rendering, checked without a coordinator."""

from __future__ import annotations

from kaiwo_gpu.cli.output import format_mib, nodes_table, stats_table
from kaiwo_gpu.v1 import allocation_pb2, types_pb2


def gpu(index: int, health: int, reason: str = "") -> types_pb2.GpuStatus:
    return types_pb2.GpuStatus(
        inventory=types_pb2.GpuInventory(index=index, model="MI300X", vram_mib=196608),
        health=health,  # type: ignore[arg-type]
        health_reason=reason,
        allocated_millis=250,
        free_memory_mib=147456,
    )


def test_reasons_with_spaces_go_below_the_table_so_columns_stay_whole() -> None:
    node = types_pb2.NodeStatus(
        name="n1",
        schedulable=False,
        unschedulable_reason="agent gone since 12:00",
        gpus=[
            gpu(0, types_pb2.HEALTH_HEALTHY),
            gpu(1, types_pb2.HEALTH_DEGRADED, "hotspot 101 C >= 100 C"),
        ],
    )
    text = nodes_table([node])
    table, reasons = text.split("\n\n")
    header, *rows = table.splitlines()
    assert all(len(row.split()) == len(header.split()) for row in rows)
    assert rows[1].split()[:6] == ["n1", "unschedulable", "1", "MI300X", "degraded", "0.25/1"]
    assert reasons.splitlines() == [
        "n1: unschedulable: agent gone since 12:00",
        "n1 GPU 1: degraded: hotspot 101 C >= 100 C",
    ]


def test_sizes_print_in_the_units_the_flags_take() -> None:
    assert [format_mib(m) for m in (4096, 4000, 196608, 0)] == ["4Gi", "4000Mi", "192Gi", "0Mi"]


def test_an_over_committed_gpu_is_named_below_the_table() -> None:
    over = gpu(2, types_pb2.HEALTH_HEALTHY)
    over.overcommit = "compute unit 227 granted of 0-109"
    node = types_pb2.NodeStatus(name="n1", schedulable=True, gpus=[gpu(0, 1), over])
    _, reasons = nodes_table([node]).split("\n\n")
    assert reasons.splitlines() == ["n1 GPU 2: over-committed: compute unit 227 granted of 0-109"]


def test_stats_say_when_etcd_nears_its_quota() -> None:
    quiet = stats_table(allocation_pb2.GetClusterStatsResponse())
    assert "etcd:" not in quiet
    loud = stats_table(allocation_pb2.GetClusterStatsResponse(etcd_space_warning="90% of it"))
    assert loud.splitlines()[-1] == "etcd:        90% of it"
