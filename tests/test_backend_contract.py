"""The GpuBackend contract, asserted identically over every backend.

The amdsmi backend runs over the fake C library (tests/fake_amdsmi.py) and the simulated
backend over its own model; both must give the agent the same shapes, ranges and errors, so
neither the fake nor the simulation can drift from what the agent relies on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from kaiwo_gpu.agent.amdsmi_backend import AmdSmiBackend
from kaiwo_gpu.agent.backend import (
    DeviceLostError,
    DiscoveredGpu,
    GpuBackend,
    GpuReading,
    PlacedShare,
    ProcessVram,
)
from kaiwo_gpu.agent.simulated import Fault, SimulatedBackend
from kaiwo_gpu.common.telemetry_limits import TEMPERATURE_C, within
from tests.fake_amdsmi import MIB, FakeProcess, installed_fake_amdsmi

BUSY_MILLIS = 700
BUSY_MEMORY_MIB = 40 * 1024
BUSY_PROCESSES = 2


@dataclass
class Subject:
    """A backend plus the hooks a test needs that only its own kind can provide."""

    backend: GpuBackend
    make_busy: Callable[[str], None]  # GPU UUID: put load and processes on it
    vanish: Callable[[str], None]  # GPU UUID: make it disappear


def _amdsmi_subject() -> Iterator[Subject]:
    with installed_fake_amdsmi() as fake:

        def make_busy(uuid: str) -> None:
            device = fake.gpu(uuid)
            device.gfx_activity, device.umc_activity = 70, 42
            device.vram_used_mb = 282 + BUSY_MEMORY_MIB
            each_bytes = BUSY_MEMORY_MIB // BUSY_PROCESSES * MIB
            device.processes = tuple(
                FakeProcess(1000 + number, "worker", each_bytes) for number in range(BUSY_PROCESSES)
            )

        backend = AmdSmiBackend()
        try:
            yield Subject(backend, make_busy, fake.vanish)
        finally:
            backend.close()


def _simulated_subject() -> Iterator[Subject]:
    backend = SimulatedBackend(node="node-a", model="MI300X", count=2, seed=1)

    def make_busy(uuid: str) -> None:
        backend.follow_placements({uuid: PlacedShare(BUSY_MILLIS, BUSY_MEMORY_MIB, BUSY_PROCESSES)})

    def vanish(uuid: str) -> None:
        backend.inject(uuid, Fault.VANISH)

    try:
        yield Subject(backend, make_busy, vanish)
    finally:
        backend.close()


SUBJECTS = {"amdsmi": _amdsmi_subject, "simulated": _simulated_subject}


@pytest.fixture(params=sorted(SUBJECTS))
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    yield from SUBJECTS[request.param]()


def _assert_plausible(reading: GpuReading, gpu: DiscoveredGpu) -> None:
    assert isinstance(reading, GpuReading)
    for percent in (reading.gfx_activity_percent, reading.umc_activity_percent):
        if percent is not None:
            assert type(percent) is int
            assert 0 <= percent <= 100
    for celsius in (
        reading.edge_temperature_c,
        reading.hotspot_temperature_c,
        reading.memory_temperature_c,
    ):
        if celsius is not None:
            assert type(celsius) is float
            assert math.isfinite(celsius)
            assert within(celsius, TEMPERATURE_C), "outside what the coordinator accepts"
    for watts in (reading.socket_power_w, reading.power_limit_w):
        if watts is not None:
            assert type(watts) is float
            assert math.isfinite(watts)
            assert watts >= 0
    if reading.power_limit_w is not None:
        assert reading.power_limit_w > 0
    if reading.used_vram_mib is not None:
        assert type(reading.used_vram_mib) is int
        assert 0 <= reading.used_vram_mib <= gpu.vram_mib
    for count in (reading.ecc_correctable_total, reading.ecc_uncorrectable_total):
        if count is not None:
            assert type(count) is int
            assert count >= 0
    assert isinstance(reading.processes, tuple)
    for process in reading.processes:
        assert isinstance(process, ProcessVram)
        assert type(process.pid) is int
        assert process.pid > 0
        assert isinstance(process.name, str)
        assert type(process.vram_mib) is int
        assert process.vram_mib >= 0
    if reading.used_vram_mib is not None:
        assert sum(process.vram_mib for process in reading.processes) <= reading.used_vram_mib


def test_the_backend_names_itself(subject: Subject) -> None:
    assert subject.backend.name in SUBJECTS


def test_discovery_lists_gpus_in_index_order_with_unique_uuids(subject: Subject) -> None:
    gpus = subject.backend.discover()

    assert isinstance(gpus, tuple)
    assert len(gpus) == 2
    assert all(isinstance(gpu, DiscoveredGpu) for gpu in gpus)
    assert [gpu.index for gpu in gpus] == list(range(len(gpus)))
    assert len({gpu.uuid for gpu in gpus}) == len(gpus)
    assert all(isinstance(gpu.uuid, str) and gpu.uuid for gpu in gpus)


def test_discovered_gpus_have_a_model_and_positive_sizes(subject: Subject) -> None:
    for gpu in subject.backend.discover():
        assert isinstance(gpu.model, str)
        assert gpu.model
        assert type(gpu.vram_mib) is int
        assert gpu.vram_mib > 0
        assert type(gpu.compute_units) is int
        assert gpu.compute_units > 0
        assert isinstance(gpu.bdf, str)
        assert isinstance(gpu.compute_partition, str)
        assert isinstance(gpu.memory_partition, str)


def test_discovery_is_stable(subject: Subject) -> None:
    assert subject.backend.discover() == subject.backend.discover()


def test_idle_readings_are_in_range(subject: Subject) -> None:
    for gpu in subject.backend.discover():
        _assert_plausible(subject.backend.read(gpu), gpu)


def test_busy_readings_are_in_range_and_show_the_load(subject: Subject) -> None:
    gpu = subject.backend.discover()[0]
    subject.make_busy(gpu.uuid)

    reading = subject.backend.read(gpu)

    _assert_plausible(reading, gpu)
    assert reading.gfx_activity_percent is not None
    assert reading.gfx_activity_percent >= 50
    assert len(reading.processes) == BUSY_PROCESSES
    assert sum(process.vram_mib for process in reading.processes) == BUSY_MEMORY_MIB


def test_a_vanished_gpu_is_lost_and_the_others_still_read(subject: Subject) -> None:
    first, second = subject.backend.discover()
    subject.vanish(first.uuid)

    with pytest.raises(DeviceLostError):
        subject.backend.read(first)
    _assert_plausible(subject.backend.read(second), second)


def test_a_gpu_the_backend_does_not_have_is_lost(subject: Subject) -> None:
    known = subject.backend.discover()[0]
    stranger = DiscoveredGpu(
        uuid="00000000-0000-0000-0000-000000000000",
        index=known.index,
        bdf=known.bdf,
        model=known.model,
        vram_mib=known.vram_mib,
        compute_units=known.compute_units,
    )

    with pytest.raises(DeviceLostError):
        subject.backend.read(stranger)


def test_close_is_idempotent(subject: Subject) -> None:
    subject.backend.discover()

    subject.backend.close()
    subject.backend.close()
