"""The coordinator's checks on what agents send, and the records they make (pure)."""

from __future__ import annotations

import math
import re

import pytest

from kaiwo_gpu.common.errors import AlreadyExistsError, FailedPreconditionError
from kaiwo_gpu.common.errors import InvalidArgumentError as Invalid
from kaiwo_gpu.coordinator.state.agent_reports import (
    checked_batch,
    node_record,
    placement_reading,
    trimmed,
    with_health,
)
from kaiwo_gpu.coordinator.state.keys import SOURCE_LABEL
from kaiwo_gpu.v1 import agent_pb2, types_pb2

from .agents import raw_inventory


def register(node: str = "n1", **fields: object) -> agent_pb2.Register:
    values: dict[str, object] = {"gpus": raw_inventory(node), "backend": "amdsmi"}
    values.update(fields)
    return agent_pb2.Register(node=node, **values)  # type: ignore[arg-type]


def no_owner(uuid: str) -> str | None:
    return None


def test_registration_makes_an_agent_record_with_healthy_gpus_in_index_order() -> None:
    gpus = list(reversed(raw_inventory("n1")))
    record = node_record(register(gpus=gpus, labels={"zone": "a"}), None, no_owner)
    assert record.labels == {"zone": "a", SOURCE_LABEL: "agent"}
    assert [status.inventory.index for status in record.gpus] == [0, 1]
    assert {status.health for status in record.gpus} == {types_pb2.HEALTH_HEALTHY}
    assert record.schedulable


def test_reregistration_keeps_health_verdicts_and_a_cordon() -> None:
    first = node_record(register(), None, no_owner)
    first.gpus[1].health = types_pb2.HEALTH_UNHEALTHY
    first.gpus[1].health_reason = "2 uncorrectable ECC errors"
    first.schedulable = False
    first.unschedulable_reason = "drained for maintenance"
    again = node_record(register(), first, no_owner)
    assert again.gpus[1].health == types_pb2.HEALTH_UNHEALTHY
    assert again.gpus[1].health_reason == "2 uncorrectable ECC errors"
    assert (again.schedulable, again.unschedulable_reason) == (False, "drained for maintenance")


def test_registration_refuses_what_placement_could_not_account_for() -> None:
    with pytest.raises(AlreadyExistsError, match="belongs to node 'other'"):
        node_record(register(), None, {raw_inventory("n1")[0].uuid: "other"}.get)
    inventory_node = types_pb2.NodeStatus(name="n1", labels={SOURCE_LABEL: "inventory"})
    with pytest.raises(FailedPreconditionError, match="static inventory"):
        node_record(register(), inventory_node, no_owner)
    with pytest.raises(Invalid, match=r"register\.labels"):
        node_record(register(labels={SOURCE_LABEL: "inventory"}), None, no_owner)
    twice = raw_inventory("n1")
    twice[1].uuid = twice[0].uuid
    with pytest.raises(Invalid, match=r"register.gpus\[1\]"):
        node_record(register(gpus=twice), None, no_owner)
    too_many_cus = raw_inventory("n1")
    too_many_cus[0].compute_units = 5000
    with pytest.raises(Invalid, match=r"register.gpus\[0\].compute_units"):
        node_record(register(gpus=too_many_cus), None, no_owner)
    with pytest.raises(Invalid, match=r"register\.gpus"):
        node_record(register(gpus=raw_inventory("n1", 65)), None, no_owner)


def _batch(**telemetry: object) -> agent_pb2.TelemetryBatch:
    message = agent_pb2.TelemetryBatch()
    message.sampled_at.GetCurrentTime()
    message.samples.add(
        uuid=raw_inventory("n1")[0].uuid,
        health=types_pb2.HEALTH_HEALTHY,
        telemetry=types_pb2.GpuTelemetry(**telemetry),  # type: ignore[arg-type]
    )
    return message


def test_a_good_batch_passes_whole() -> None:
    record = node_record(register(), None, no_owner)
    batch = _batch(gfx_activity_percent=40, hotspot_temperature_c=71.5, used_vram_mib=1024)
    samples = checked_batch(batch, record, no_owner)
    assert list(samples) == [record.gpus[0].inventory.uuid]
    reading = placement_reading(samples[record.gpus[0].inventory.uuid].telemetry)
    assert (reading.gfx_activity_percent, reading.hotspot_temperature_c) == (40, 71.5)
    assert reading.socket_power_w is None  # not reported stays unknown, not zero


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"edge_temperature_c": math.nan}, "edge_temperature_c"),
        ({"memory_temperature_c": -300.0}, "memory_temperature_c"),
        ({"socket_power_w": math.inf}, "socket_power_w"),
        ({"umc_activity_percent": 250}, "umc_activity_percent"),
        ({"used_vram_mib": 192 * 1024 + 1}, "used_vram_mib"),
        ({"processes": [types_pb2.ProcessMemory(pid=1, name="x" * 300)]}, "processes[0]"),
    ],
)
def test_a_value_out_of_range_names_its_field(fields: dict[str, object], named: str) -> None:
    record = node_record(register(), None, no_owner)
    with pytest.raises(Invalid) as refused:
        checked_batch(_batch(**fields), record, no_owner)
    assert named in refused.value.message
    assert "telemetry.samples[0]" in refused.value.message


def test_a_batch_needs_its_time_and_one_sample_per_gpu() -> None:
    record = node_record(register(), None, no_owner)
    untimed = _batch()
    untimed.ClearField("sampled_at")
    with pytest.raises(Invalid, match="sampled_at"):
        checked_batch(untimed, record, no_owner)
    far = _batch()
    far.sampled_at.seconds = 253_402_300_800  # year 10000: no clock can hold it
    with pytest.raises(Invalid, match=re.escape("telemetry.sampled_at: 'seconds=253402300800")):
        checked_batch(far, record, no_owner)
    doubled = _batch()
    doubled.samples.append(doubled.samples[0])
    with pytest.raises(Invalid, match="one sample per GPU"):
        checked_batch(doubled, record, no_owner)


def test_health_is_rewritten_only_when_a_verdict_changed() -> None:
    record = node_record(register(), None, no_owner)
    same = checked_batch(_batch(), record, no_owner)
    assert with_health(record, same) is None
    sick = _batch()
    sick.samples[0].health = types_pb2.HEALTH_DEGRADED
    sick.samples[0].health_reason = "hotspot 101 C >= warn 100 C"
    changed = with_health(record, checked_batch(sick, record, no_owner))
    assert changed is not None
    assert changed.gpus[0].health == types_pb2.HEALTH_DEGRADED
    assert changed.gpus[1].health == types_pb2.HEALTH_HEALTHY
    assert record.gpus[0].health == types_pb2.HEALTH_HEALTHY  # the input is not changed


def test_listnodes_keeps_the_processes_with_the_most_vram() -> None:
    sample = agent_pb2.GpuSample(uuid="g0")
    for pid in range(40):
        sample.telemetry.processes.add(pid=pid, name=f"p{pid}", vram_mib=(pid * 7) % 40)
    kept = trimmed(sample)
    assert len(kept.telemetry.processes) == 16
    assert sorted(p.vram_mib for p in kept.telemetry.processes) == list(range(24, 40))
    assert len(sample.telemetry.processes) == 40  # the input is not changed
    assert trimmed(kept) is kept
