"""The agent's pure pieces (backoff, placements per GPU, a tick's verdicts) and the
uplink's async shell against a fake coordinator on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kaiwo_gpu.agent.backend import DiscoveredGpu, GpuReading, PlacedShare, ProcessVram
from kaiwo_gpu.agent.sampler import NodeSampler, inventory_proto, read_all, telemetry_proto
from kaiwo_gpu.agent.simulated import SimulatedBackend
from kaiwo_gpu.agent.uplink import Uplink
from kaiwo_gpu.agent.uplink_state import backoff_delay, placed_shares
from kaiwo_gpu.common.telemetry_limits import MAX_PROCESSES
from kaiwo_gpu.coordinator.local.etcd import free_port
from kaiwo_gpu.coordinator.state.agent_reports import checked_batch, node_record
from kaiwo_gpu.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tests.agents import eventually


@given(st.integers(0, 200), st.integers(0, 2**32))
def test_backoff_is_jittered_within_its_exponential_cap(attempt: int, seed: int) -> None:
    delay = backoff_delay(attempt, random.Random(seed), base_s=0.2, cap_s=10.0)
    assert 0.0 <= delay <= min(10.0, 0.2 * 2**attempt)


def test_backoff_spreads_agents_out() -> None:
    """Many agents losing one coordinator must not all come back at the same moment."""
    rng = random.Random(7)
    delays = [backoff_delay(5, rng, base_s=0.2, cap_s=10.0) for _ in range(200)]
    assert max(delays) - min(delays) > 3.0
    assert len({round(d, 3) for d in delays}) > 150


def test_placements_are_summed_per_gpu() -> None:
    placed = agent_pb2.PlacedAllocations(
        allocations=[
            types_pb2.Allocation(
                id="a",
                gpus=[
                    types_pb2.GpuGrant(uuid="g0", granted_millis=250, granted_memory_mib=1000),
                    types_pb2.GpuGrant(uuid="g1", granted_millis=250, granted_memory_mib=1000),
                ],
            ),
            types_pb2.Allocation(
                id="b",
                gpus=[types_pb2.GpuGrant(uuid="g0", granted_millis=500, granted_memory_mib=5)],
            ),
        ]
    )
    shares = placed_shares(placed)
    assert (shares["g0"].millis, shares["g0"].memory_mib, shares["g0"].allocations) == (
        750,
        1005,
        2,
    )
    assert shares["g1"].allocations == 1


def test_unreported_and_non_finite_values_stay_unset_on_the_wire() -> None:
    stamp = agent_pb2.TelemetryBatch().sampled_at
    telemetry = telemetry_proto(
        GpuReading(gfx_activity_percent=140, hotspot_temperature_c=math.nan, socket_power_w=300.0),
        stamp,
        vram_mib=1024,
    )
    assert telemetry.gfx_activity_percent == 100
    assert not telemetry.HasField("hotspot_temperature_c")
    assert not telemetry.HasField("edge_temperature_c")
    assert telemetry.socket_power_w == 300.0


readings = st.builds(
    GpuReading,
    gfx_activity_percent=st.none() | st.integers(-5, 70_000),
    umc_activity_percent=st.none() | st.integers(-5, 70_000),
    edge_temperature_c=st.none() | st.floats(),
    hotspot_temperature_c=st.none() | st.floats(),
    memory_temperature_c=st.none() | st.floats(),
    socket_power_w=st.none() | st.floats(),
    power_limit_w=st.none() | st.floats(),
    used_vram_mib=st.none() | st.integers(-1, 2**40),
    ecc_correctable_total=st.none() | st.integers(-1, 2**63),
    ecc_uncorrectable_total=st.none() | st.integers(-1, 2**63),
    processes=st.lists(
        st.builds(
            ProcessVram,
            pid=st.integers(0, 2**31),
            name=st.text(max_size=400),
            vram_mib=st.integers(-1, 2**40),
        ),
        max_size=4,
    ).map(tuple),
)


@given(st.lists(readings, min_size=1, max_size=2))
def test_whatever_a_backend_reads_the_coordinator_accepts_the_batch(
    gpu_readings: list[GpuReading],
) -> None:
    """Agent and coordinator share the limits: a sensor glitch never gets a batch refused
    (which would end the stream and take the node out of placement)."""
    inventory = [
        DiscoveredGpu(f"g{i}", i, f"0000:{i:02x}:00.0", "MI300X", 192 * 1024, 304)
        for i in range(len(gpu_readings))
    ]
    register = agent_pb2.Register(
        node="n1", backend="simulated", gpus=[inventory_proto(gpu) for gpu in inventory]
    )
    record = node_record(register, None, lambda uuid: None)
    sampler = NodeSampler(HangingBackend(), inventory, clock=lambda: 1.0)
    batch = sampler.judge({gpu.uuid: r for gpu, r in zip(inventory, gpu_readings, strict=True)})
    samples = checked_batch(batch, record, lambda uuid: None)
    assert set(samples) == {gpu.uuid for gpu in inventory}


GPU = DiscoveredGpu("g0", 0, "0000:05:00.0", "MI300X", 192 * 1024, 304)


class HangingBackend:
    """A backend whose read blocks until released, as a wedged driver call would."""

    name = "hanging"

    def __init__(self) -> None:
        self.release = threading.Event()

    def discover(self) -> tuple[DiscoveredGpu, ...]:
        return (GPU,)

    def read(self, gpu: DiscoveredGpu) -> GpuReading:
        self.release.wait(10)
        return GpuReading(gfx_activity_percent=1)

    def close(self) -> None:
        self.release.set()


async def test_a_hanging_backend_makes_its_gpus_unhealthy_once_samples_are_stale() -> None:
    now = [0.0]
    backend = HangingBackend()
    sampler = NodeSampler(backend, [GPU], clock=lambda: now[0])
    try:
        first = await sampler.sample(wait_s=0.05)
        assert first.samples[0].health == types_pb2.HEALTH_HEALTHY  # not stale yet
        assert not first.samples[0].telemetry.HasField("sampled_at")
        now[0] = 60.0
        later = await sampler.sample(wait_s=0.05)
        assert later.samples[0].health == types_pb2.HEALTH_UNHEALTHY
        assert "no sample" in later.samples[0].health_reason
    finally:
        backend.close()


def test_a_lost_device_is_unhealthy_at_once() -> None:
    sampler = NodeSampler(HangingBackend(), [GPU], clock=lambda: 1.0)
    batch = sampler.judge({GPU.uuid: None})
    assert batch.samples[0].health == types_pb2.HEALTH_UNHEALTHY
    assert "not answering" in batch.samples[0].health_reason


class BrokenAfterOneRead:
    """Reads once (an uncorrectable ECC error), then raises what a buggy layer might."""

    name = "broken"

    def __init__(self) -> None:
        self.reads = 0

    def discover(self) -> tuple[DiscoveredGpu, ...]:
        return (GPU,)

    def read(self, gpu: DiscoveredGpu) -> GpuReading:
        self.reads += 1
        if self.reads == 1:
            return GpuReading(ecc_uncorrectable_total=5)
        raise KeyError("current_socket_power")

    def close(self) -> None:
        pass


def test_a_backend_error_keeps_the_verdict_until_the_sample_is_stale() -> None:
    """A read that fails oddly is no sample, not a clean one: it must not heal the GPU."""
    now = [0.0]
    backend = BrokenAfterOneRead()
    sampler = NodeSampler(backend, [GPU], clock=lambda: now[0])
    verdicts = []
    for tick in range(12):
        now[0] = float(tick)
        readings = read_all(backend, [GPU])
        verdicts.append(sampler.judge(readings).samples[0])
    assert all(v.health == types_pb2.HEALTH_UNHEALTHY for v in verdicts)
    assert "uncorrectable" in verdicts[5].health_reason
    assert "no sample" in verdicts[-1].health_reason


def test_the_agent_sends_at_most_the_processes_the_coordinator_takes() -> None:
    stamp = agent_pb2.TelemetryBatch().sampled_at
    many = tuple(ProcessVram(pid, f"p{pid}", pid % 2000) for pid in range(1500))
    telemetry = telemetry_proto(GpuReading(processes=many), stamp, vram_mib=1999)
    assert len(telemetry.processes) == MAX_PROCESSES
    assert min(p.vram_mib for p in telemetry.processes) == 1500 - MAX_PROCESSES  # the largest


PLACED = agent_pb2.PlacedAllocations(
    allocations=[
        types_pb2.Allocation(
            id="a", gpus=[types_pb2.GpuGrant(uuid="g", granted_millis=500, granted_memory_mib=8)]
        )
    ]
)


class FakeCoordinator(agent_pb2_grpc.AgentServiceServicer):
    """Registers every stream and places one allocation; ends the first stream after two
    batches, and notes the second stream's first batch and its half-close."""

    def __init__(self) -> None:
        self.streams: list[list[agent_pb2.AgentMessage]] = []
        self.second_sending = asyncio.Event()
        self.half_closed = asyncio.Event()

    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        messages: list[agent_pb2.AgentMessage] = []
        self.streams.append(messages)
        first = await context.read()
        assert isinstance(first, agent_pb2.AgentMessage)
        messages.append(first)
        registered = agent_pb2.Registered(coordinator_id="fake", sample_interval_ms=100)
        await context.write(agent_pb2.CoordinatorDirective(registered=registered))
        await context.write(agent_pb2.CoordinatorDirective(placed_allocations=PLACED))
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                self.half_closed.set()
                return
            assert isinstance(message, agent_pb2.AgentMessage)
            messages.append(message)
            if len(self.streams) == 2:
                self.second_sending.set()
            elif len(messages) == 3:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "fake going away")


class HighestDraw(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


@contextlib.asynccontextmanager
async def fake_coordinator() -> AsyncIterator[tuple[FakeCoordinator, str]]:
    servicer = FakeCoordinator()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def simulated_uplink(
    addresses: list[str], placements: list[Mapping[str, PlacedShare]] | None = None, **kwargs: Any
) -> tuple[Uplink, SimulatedBackend]:
    backend = SimulatedBackend(node="n1", model="MI300X", count=1)
    gpus = backend.discover()
    register = agent_pb2.Register(
        node="n1", backend="simulated", gpus=[inventory_proto(gpu) for gpu in gpus]
    )
    sink = placements if placements is not None else []
    uplink = Uplink(
        addresses, register, NodeSampler(backend, gpus), on_placements=sink.append, **kwargs
    )
    return uplink, backend


@pytest.mark.integration  # a real stream over loopback gRPC, paced in real time
async def test_the_uplink_registers_sends_follows_and_comes_back_after_an_end() -> None:
    async with fake_coordinator() as (servicer, address):
        placements: list[Mapping[str, PlacedShare]] = []
        uplink, backend = simulated_uplink(
            [address], placements, rng=random.Random(1), backoff_base_s=0.01, backoff_cap_s=0.05
        )
        stop = asyncio.Event()
        task = asyncio.create_task(uplink.run(stop))
        try:
            await asyncio.wait_for(servicer.second_sending.wait(), 10)
            assert uplink.status.registrations == 2
            assert uplink.status.connected
            stop.set()
            await asyncio.wait_for(task, 5)
            await asyncio.wait_for(servicer.half_closed.wait(), 5)  # the agent ended it
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
            backend.close()
        first = servicer.streams[0]
        assert first[0].register.node == "n1"
        assert [message.WhichOneof("body") for message in first[1:]] == ["telemetry"] * 2
        status = uplink.status
        assert status.last_error == "UNAVAILABLE: fake going away"
        assert (status.coordinator, status.connected, status.interval_ms) == (address, False, 100)
        assert status.batches_sent >= 3
        assert placements[-1] == {"g": PlacedShare(millis=500, memory_mib=8, allocations=1)}
        assert status.placed == placements[-1]


@pytest.mark.integration  # a real dial to a dead address
async def test_stop_cuts_a_long_backoff_after_a_dead_address() -> None:
    dead = f"127.0.0.1:{free_port()}"
    uplink, backend = simulated_uplink([dead], rng=HighestDraw(), backoff_base_s=600.0)

    async def refused() -> str | None:
        return uplink.status.last_error or None

    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))
    try:
        assert (await eventually(refused, timeout_s=10)).startswith("UNAVAILABLE")
        assert not task.done()  # backing off, for 10 s (the cap)
        stop.set()
        await asyncio.wait_for(task, 2)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        backend.close()
    assert (uplink.status.registrations, uplink.status.connected) == (0, False)
