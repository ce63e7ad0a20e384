"""Each rule that once had several homes is applied alike at every door it guards.

Node names, request ids, GPU inventory, temperature bounds, health values and reasons are
each defined once; these tests send the same values through every entry point and check
that all of them agree, so a copy that drifts again fails here.
"""

from __future__ import annotations

import argparse
import math

import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from kaiwo_gpu.agent.amdsmi_backend import _temperature_c as amdsmi_temperature
from kaiwo_gpu.agent.backend import GpuReading, ProcessVram
from kaiwo_gpu.agent.sampler import telemetry_proto
from kaiwo_gpu.cli import flags
from kaiwo_gpu.cli.output import nodes_table, stats_table
from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.models import AllocationRequest, Health, Selector
from kaiwo_gpu.common.telemetry_limits import TEMPERATURE_C
from kaiwo_gpu.common.wire import HEALTH_VERDICTS, health_from_proto, health_to_proto
from kaiwo_gpu.coordinator.state.agent_reports import checked_batch, node_record
from kaiwo_gpu.coordinator.state.inventory import parse_inventory
from kaiwo_gpu.v1 import agent_pb2, allocation_pb2, types_pb2
from tests.agents import raw_inventory

NODE_NAMES = {
    "gpu-01": True,
    "rack1.gpu-01": True,
    "a": True,
    "x" * 253: True,
    "x" * 254: False,
    "Gpu-01": False,  # upper case: one of the old rules allowed it
    "gpu_01": False,  # '_': likewise
    "-gpu": False,
    "gpu-": False,
    "": False,
    "gpu 01": False,
}


def accepted(check: object, value: str) -> bool:
    try:
        check(value)  # type: ignore[operator]
    except (InvalidArgumentError, argparse.ArgumentTypeError):
        return False
    return True


def by_selector(name: str) -> None:
    AllocationRequest("r1", fraction_millis=500, selector=Selector(nodes=frozenset({name})))


def by_exclusion(name: str) -> None:
    Selector(exclude_nodes=frozenset({name}))


def by_inventory(name: str) -> None:
    text = yaml.safe_dump({"nodes": [{"name": name, "gpus": [{"model": "MI300X", "count": 1}]}]})
    parse_inventory(text)


def by_registration(name: str) -> None:
    register = agent_pb2.Register(node=name, gpus=raw_inventory("n1"), backend="simulated")
    node_record(register, None, lambda uuid: None)


@pytest.mark.parametrize(
    "door", [by_selector, by_exclusion, by_inventory, by_registration, flags.node_name]
)
def test_every_door_takes_the_same_node_names(door: object) -> None:
    verdicts = {name: accepted(door, name) for name in NODE_NAMES}
    assert verdicts == NODE_NAMES


def test_the_default_node_name_is_always_a_node_name() -> None:
    assert names.is_node_name(flags.default_node_name())


@pytest.mark.parametrize(
    ("request_id", "ok"),
    [("slurm-c-1-node", True), ("k8s:ns/pod:uid", True), ("a" * 128, True), ("a" * 129, False)],
)
def test_request_ids_follow_one_rule(request_id: str, ok: bool) -> None:
    assert names.is_request_id(request_id) is ok
    assert accepted(lambda rid: AllocationRequest(rid, fraction_millis=500), request_id) is ok


BAD_GPUS: dict[str, dict[str, object]] = {
    "uuid": {"uuid": "has space"},
    "index": {"index": 256},
    "vram_mib": {"vram_mib": 16 * 1024 * 1024 + 1},
    "compute_units": {"compute_units": 4097},
    "compute_partition": {"compute_partition": "XPX"},
    "model": {"model": "two words"},
}


GOOD_GPU: dict[str, object] = {
    "uuid": "GPU-1",
    "index": 0,
    "model": "MI210",
    "vram_mib": 65536,
    "compute_units": 104,
}


@pytest.mark.parametrize("field", sorted(BAD_GPUS))
def test_the_inventory_file_and_agents_refuse_the_same_gpu(field: str) -> None:
    _refused_by_both_doors({**GOOD_GPU, **BAD_GPUS[field]}, field)


@pytest.mark.parametrize(
    ("figures", "field"),
    [({"vram_mib": 65537}, "vram_mib"), ({"compute_units": 105}, "compute_units")],
)
def test_a_known_model_may_report_less_than_its_figures_but_never_more(
    figures: dict[str, object], field: str
) -> None:
    """A partition of an MI210 reports less; an MI210 with more VRAM or CUs than an MI210
    has is a broken or lying report (an agent claiming 16 TiB took 69 grants of 100 GiB)."""
    _refused_by_both_doors({**GOOD_GPU, **figures}, field)
    smaller = {**GOOD_GPU, "vram_mib": 32768, "compute_units": 52, "compute_partition": "DPX"}
    parse_inventory(yaml.safe_dump({"nodes": [{"name": "n1", "gpus": [smaller]}]}), "nodes.yaml")


def _refused_by_both_doors(gpu: dict[str, object], field: str) -> None:
    text = yaml.safe_dump({"nodes": [{"name": "n1", "gpus": [gpu]}]})
    with pytest.raises(InvalidArgumentError) as from_file:
        parse_inventory(text, "nodes.yaml")
    inventory = types_pb2.GpuInventory(**gpu)  # type: ignore[arg-type]
    register = agent_pb2.Register(node="n1", gpus=[inventory], backend="amdsmi")
    with pytest.raises(InvalidArgumentError) as from_agent:
        node_record(register, None, lambda uuid: None)
    assert from_file.value.field == f"nodes.yaml: nodes[0].gpus[0].{field}"
    assert from_agent.value.field == f"register.gpus[0].{field}"
    assert from_file.value.allowed == from_agent.value.allowed


@pytest.mark.parametrize(
    "celsius",
    [
        TEMPERATURE_C[0],
        TEMPERATURE_C[1],
        TEMPERATURE_C[0] - 0.5,
        TEMPERATURE_C[1] + 0.5,
        55.0,
        math.nan,
        math.inf,
    ],
)
def test_what_the_agent_sends_the_coordinator_accepts(celsius: float) -> None:
    """The amdsmi backend and the sampler leave out exactly what the coordinator refuses."""
    stamp = Timestamp(seconds=1)
    telemetry = telemetry_proto(GpuReading(hotspot_temperature_c=celsius), stamp, 1024)
    sent = telemetry.HasField("hotspot_temperature_c")
    record = node_record(
        agent_pb2.Register(node="n1", gpus=raw_inventory("n1"), backend="simulated"),
        None,
        lambda uuid: None,
    )
    raw = agent_pb2.TelemetryBatch(
        sampled_at=stamp,
        samples=[
            agent_pb2.GpuSample(
                uuid=raw_inventory("n1")[0].uuid,
                health=types_pb2.HEALTH_HEALTHY,
                telemetry=types_pb2.GpuTelemetry(hotspot_temperature_c=celsius),
            )
        ],
    )
    believed = accepted(lambda _: checked_batch(raw, record, lambda uuid: None), "")
    read = amdsmi_temperature(celsius) is not None
    assert sent is believed is read
    assert sent is (TEMPERATURE_C[0] <= celsius <= TEMPERATURE_C[1])


def test_health_values_round_trip_and_an_unknown_one_is_unhealthy() -> None:
    assert {health_from_proto(health_to_proto(h)) for h in Health} == set(Health)
    assert {health_to_proto(h) for h in Health} == HEALTH_VERDICTS
    assert health_from_proto(99) is Health.UNHEALTHY
    assert health_from_proto(types_pb2.HEALTH_UNSPECIFIED) is Health.HEALTHY


def test_reasons_have_one_limit_for_health_and_cordons() -> None:
    longest = "x" * names.MAX_REASON_CHARS
    text = yaml.safe_dump(
        {
            "nodes": [
                {
                    "name": "n1",
                    "schedulable": False,
                    "reason": longest + "x",
                    "gpus": [{"model": "MI300X", "count": 1}],
                }
            ]
        }
    )
    with pytest.raises(InvalidArgumentError, match=str(names.MAX_REASON_CHARS)):
        parse_inventory(text)
    assert names.check_reason(longest, "reason") == longest


@pytest.mark.parametrize("key", ["Bad Key!", "-x", "a" * 64])
def test_node_labels_follow_one_rule_in_the_inventory_and_from_agents(key: str) -> None:
    text = yaml.safe_dump(
        {"nodes": [{"name": "n1", "labels": {key: "v"}, "gpus": [{"model": "MI300X", "count": 1}]}]}
    )
    with pytest.raises(InvalidArgumentError, match="labels"):
        parse_inventory(text)
    register = agent_pb2.Register(
        node="n1", gpus=raw_inventory("n1"), backend="simulated", labels={key: "v"}
    )
    with pytest.raises(InvalidArgumentError, match="labels"):
        node_record(register, None, lambda uuid: None)


FORGED = "ok\x1b]0;pwned\x07\x1b[2K\rnode-x GPU 0: healthy\u2028\u202e"


def test_text_that_could_drive_a_terminal_is_refused_at_the_edge_and_escaped_on_print() -> None:
    """Review finding: an agent's health_reason with ANSI escapes forged lines and retitled
    the terminal in `nodes` and `top`. The coordinator refuses it in every free-text field;
    the agent's own sampler escapes what a process names itself, so its batch is taken;
    and whatever reaches a table anyway (an older coordinator) prints escaped."""
    record = node_record(
        agent_pb2.Register(node="n1", gpus=raw_inventory("n1"), backend="simulated"),
        None,
        lambda uuid: None,
    )
    uuid = raw_inventory("n1")[0].uuid

    def batch_with(sample: agent_pb2.GpuSample) -> agent_pb2.TelemetryBatch:
        return agent_pb2.TelemetryBatch(sampled_at=Timestamp(seconds=1), samples=[sample])

    forged_reason = agent_pb2.GpuSample(uuid=uuid, health=types_pb2.HEALTH_DEGRADED)
    forged_reason.health_reason = FORGED
    with pytest.raises(InvalidArgumentError, match="printable characters only"):
        checked_batch(batch_with(forged_reason), record, lambda uuid: None)
    process = types_pb2.ProcessMemory(pid=1, name=FORGED[:15], vram_mib=1)
    forged_process = agent_pb2.GpuSample(
        uuid=uuid,
        health=types_pb2.HEALTH_HEALTHY,
        telemetry=types_pb2.GpuTelemetry(processes=[process]),
    )
    with pytest.raises(InvalidArgumentError, match=r"processes\[0\]\.name"):
        checked_batch(batch_with(forged_process), record, lambda uuid: None)
    bad_model = raw_inventory("n2")
    bad_model[0].model = "MI300X\x1b[31m"
    register = agent_pb2.Register(node="n2", gpus=bad_model, backend="simulated")
    with pytest.raises(InvalidArgumentError, match=r"register\.gpus\[0\]\.model"):
        node_record(register, None, lambda uuid: None)

    reading = GpuReading(processes=(ProcessVram(pid=1, name=FORGED, vram_mib=1),))
    sent = telemetry_proto(reading, Timestamp(seconds=1), 1024)
    taken = agent_pb2.GpuSample(uuid=uuid, health=types_pb2.HEALTH_HEALTHY, telemetry=sent)
    checked_batch(batch_with(taken), record, lambda uuid: None)  # the sampler's is accepted
    assert "\x1b" not in sent.processes[0].name

    shown = types_pb2.NodeStatus(name="n1", schedulable=True, gpus=[types_pb2.GpuStatus(
        inventory=raw_inventory("n1")[0], health=types_pb2.HEALTH_DEGRADED, health_reason=FORGED
    )])  # fmt: skip
    printed = nodes_table([shown])
    assert all(line.isprintable() for line in printed.splitlines())
    assert "\\x1b]0;pwned\\x07" in printed
    assert names.escaped(FORGED).isprintable()
    # A record written by hand reaches `stats` through the strategy names it counts
    # (review finding: they printed raw).
    stats = allocation_pb2.GetClusterStatsResponse(allocations_by_strategy={FORGED: 1})
    assert all(line.isprintable() for line in stats_table(stats).splitlines())
