"""The simulated backend: realistic profiles, load that follows placements, smooth thermals
over an injected clock, and faults injected from code or from a file."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kaiwo_gpu.agent.backend import (
    DeviceLostError,
    DiscoveredGpu,
    FollowsPlacements,
    GpuBackend,
    GpuReading,
    PlacedShare,
)
from kaiwo_gpu.agent.health import HealthLimits, classify, initial, limits_for
from kaiwo_gpu.agent.simulated import (
    DRIVER_BASELINE_MIB,
    EDGE_FULL_C,
    EDGE_IDLE_C,
    FAULT_WORDS,
    IDLE_POWER_FRACTION,
    Fault,
    SimulatedBackend,
)
from kaiwo_gpu.common.gpu_models import GPU_MODELS
from kaiwo_gpu.common.models import Health

UUID_SHAPE = re.compile(r"^[0-9a-f]{8}-0000-1000-80[0-9a-f]{2}-[0-9a-f]{12}$")
BDF_SHAPE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:00\.0$")


class FakeClock:
    """Time that moves only when a test moves it."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def make(
    model: str = "MI300X", count: int = 8, seed: int = 0, node: str = "node-a"
) -> tuple[SimulatedBackend, FakeClock, tuple[DiscoveredGpu, ...]]:
    clock = FakeClock()
    backend = SimulatedBackend(node, model, count, seed=seed, clock=clock)
    return backend, clock, backend.discover()


def read_for(
    backend: SimulatedBackend, clock: FakeClock, gpu: DiscoveredGpu, seconds: int
) -> list[GpuReading]:
    """One reading per simulated second."""
    readings = []
    for _ in range(seconds):
        clock.advance(1.0)
        readings.append(backend.read(gpu))
    return readings


def hotspot(reading: GpuReading) -> float:
    assert reading.hotspot_temperature_c is not None
    return reading.hotspot_temperature_c


def edge(reading: GpuReading) -> float:
    assert reading.edge_temperature_c is not None
    return reading.edge_temperature_c


def test_unknown_model_names_the_allowed_models() -> None:
    with pytest.raises(ValueError, match="MI999") as caught:
        SimulatedBackend("n", "MI999", 1)
    for allowed in GPU_MODELS:
        assert allowed in str(caught.value)


def test_negative_count_is_refused() -> None:
    with pytest.raises(ValueError, match="-1"):
        SimulatedBackend("n", "MI300X", -1)


@pytest.mark.parametrize(
    ("model", "vram_mib", "compute_units", "compute_partition", "memory_partition"),
    [
        ("MI300X", 192 * 1024, 304, "SPX", "NPS1"),
        ("MI250X", 64 * 1024, 110, "", ""),
        ("MI210", 64 * 1024, 104, "", ""),
    ],
)
def test_discovered_gpus_carry_the_model_profile(
    model: str, vram_mib: int, compute_units: int, compute_partition: str, memory_partition: str
) -> None:
    _, _, gpus = make(model, count=4)
    assert [gpu.index for gpu in gpus] == [0, 1, 2, 3]
    for gpu in gpus:
        assert gpu.model == model
        assert gpu.vram_mib == vram_mib
        assert gpu.compute_units == compute_units
        assert gpu.compute_partition == compute_partition
        assert gpu.memory_partition == memory_partition


def test_uuids_and_bdfs_are_stable_per_node_unique_and_well_formed() -> None:
    """The same node must come back with the same UUIDs, or its allocations would be orphaned."""
    _, _, first = make(count=16, seed=1)
    _, _, again = make(count=16, seed=2)
    _, _, other_node = make(count=16, node="node-b")
    assert [gpu.uuid for gpu in first] == [gpu.uuid for gpu in again]
    assert not {gpu.uuid for gpu in first} & {gpu.uuid for gpu in other_node}
    assert len({gpu.uuid for gpu in first}) == 16
    assert len({gpu.bdf for gpu in first}) == 16
    for gpu in first:
        assert UUID_SHAPE.match(gpu.uuid), gpu.uuid
        assert BDF_SHAPE.match(gpu.bdf), gpu.bdf
    assert first[0].bdf == "0000:05:00.0"


def test_implements_the_backend_protocols() -> None:
    backend: GpuBackend = SimulatedBackend("n", "MI210", 2)
    assert backend.name == "simulated"
    assert isinstance(backend, FollowsPlacements)
    backend.close()


def test_an_idle_gpu_reads_idle() -> None:
    backend, clock, gpus = make()
    model = GPU_MODELS["MI300X"]
    for reading in read_for(backend, clock, gpus[0], 30):
        assert reading.gfx_activity_percent is not None
        assert 0 <= reading.gfx_activity_percent <= 2
        assert reading.used_vram_mib == DRIVER_BASELINE_MIB
        assert reading.power_limit_w == model.max_power_w
        assert reading.socket_power_w is not None
        assert reading.socket_power_w <= IDLE_POWER_FRACTION * model.max_power_w + 0.03 * 600
        assert reading.processes == ()
        assert reading.ecc_uncorrectable_total == 0
        assert reading.ecc_correctable_total == 0
        assert abs(edge(reading) - EDGE_IDLE_C) <= 1


@settings(max_examples=150)
@given(
    model=st.sampled_from(sorted(GPU_MODELS)),
    millis=st.integers(0, 3000),
    memory_mib=st.integers(0, 400 * 1024),
    allocations=st.integers(0, 8),
    seed=st.integers(0, 2**32),
)
def test_load_follows_placements(
    model: str, millis: int, memory_mib: int, allocations: int, seed: int
) -> None:
    backend, _, gpus = make(model, count=2, seed=seed)
    profile = GPU_MODELS[model]
    backend.follow_placements({gpus[1].uuid: PlacedShare(millis, memory_mib, allocations)})
    reading = backend.read(gpus[1])
    gfx = reading.gfx_activity_percent
    assert gfx is not None
    if millis > 0:
        assert abs(gfx - min(100, millis / 10)) <= 2.5
    else:
        assert gfx <= 2
    assert reading.umc_activity_percent == round(gfx * 0.6)
    assert reading.used_vram_mib == min(profile.vram_mib, DRIVER_BASELINE_MIB + memory_mib)
    idle_w = IDLE_POWER_FRACTION * profile.max_power_w
    assert reading.socket_power_w is not None
    expected_w = idle_w + gfx / 100 * (profile.max_power_w - idle_w)
    assert abs(reading.socket_power_w - expected_w) <= 0.5
    assert reading.socket_power_w <= profile.max_power_w
    assert len(reading.processes) == allocations
    assert len({process.pid for process in reading.processes}) == allocations
    assert all(process.name == "kaiwo-sim" for process in reading.processes)
    if allocations:
        assert sum(p.vram_mib for p in reading.processes) == min(memory_mib, profile.vram_mib)
    # The GPU not named holds nothing.
    idle = backend.read(gpus[0])
    assert idle.processes == ()
    assert idle.used_vram_mib == DRIVER_BASELINE_MIB


def test_a_gpu_left_out_of_new_placements_goes_idle_and_unknown_uuids_are_ignored() -> None:
    backend, _, gpus = make(count=2)
    backend.follow_placements({gpus[0].uuid: PlacedShare(1000, 1024, 2)})
    assert backend.read(gpus[0]).gfx_activity_percent is not None
    busy = backend.read(gpus[0]).gfx_activity_percent
    assert busy is not None
    assert busy >= 98
    backend.follow_placements({"not-a-gpu-here": PlacedShare(500, 10, 1)})
    reading = backend.read(gpus[0])
    assert reading.gfx_activity_percent is not None
    assert reading.gfx_activity_percent <= 2
    assert reading.processes == ()


def test_negative_placed_share_is_refused() -> None:
    backend, _, gpus = make(count=1)
    with pytest.raises(ValueError, match="negative"):
        backend.follow_placements({gpus[0].uuid: PlacedShare(-1, 0, 0)})


@pytest.mark.parametrize("model", sorted(GPU_MODELS))
def test_full_load_temperature_converges_smoothly_and_stays_healthy(model: str) -> None:
    """A fully loaded GPU without a fault must never look degraded, or the demo would lie."""
    backend, clock, gpus = make(model, count=1)
    limits = limits_for(model)
    backend.follow_placements({gpus[0].uuid: PlacedShare(1000, 1024, 1)})
    readings = read_for(backend, clock, gpus[0], 300)
    for before, after in itertools.pairwise(readings):
        assert abs(hotspot(after) - hotspot(before)) <= 7
    assert hotspot(readings[5]) < hotspot(readings[40])
    for reading in readings[-60:]:
        assert abs(edge(reading) - EDGE_FULL_C) <= 1
    health = initial()
    for tick, reading in enumerate(readings):
        assert hotspot(reading) < limits.hotspot_warn_c
        assert reading.memory_temperature_c is not None
        assert reading.memory_temperature_c < limits.memory_warn_c
        assert edge(reading) + 10 <= hotspot(reading) <= edge(reading) + 20
        assert edge(reading) + 4 <= reading.memory_temperature_c <= edge(reading) + 11
        health = classify(health, reading, float(tick), limits)
        assert health.health is Health.HEALTHY, health.reason


def test_temperatures_move_only_when_the_clock_does() -> None:
    backend, _, gpus = make(count=1)
    backend.follow_placements({gpus[0].uuid: PlacedShare(1000, 0, 1)})
    readings = [backend.read(gpus[0]) for _ in range(50)]
    assert all(abs(edge(reading) - EDGE_IDLE_C) <= 1 for reading in readings)


def test_a_gpu_cools_back_when_its_load_goes() -> None:
    backend, clock, gpus = make(count=1)
    backend.follow_placements({gpus[0].uuid: PlacedShare(1000, 0, 1)})
    read_for(backend, clock, gpus[0], 120)
    backend.follow_placements({})
    cooling = read_for(backend, clock, gpus[0], 120)
    assert edge(cooling[0]) > EDGE_FULL_C - 5
    assert abs(edge(cooling[-1]) - EDGE_IDLE_C) <= 1


def test_the_same_seed_and_calls_give_the_same_readings() -> None:
    def run(seed: int) -> list[GpuReading]:
        backend, clock, gpus = make(count=2, seed=seed)
        backend.follow_placements({gpus[0].uuid: PlacedShare(400, 2048, 2)})
        return [backend.read(gpu) for gpu in gpus for _ in range(20)] + read_for(
            backend, clock, gpus[0], 20
        )

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_overheat_pins_edge_and_hotspot_above_the_limit_then_cools_smoothly() -> None:
    backend, clock, gpus = make("MI250X", count=2)
    limit_c = GPU_MODELS["MI250X"].hotspot_limit_c
    backend.inject(gpus[0].uuid, Fault.OVERHEAT)
    assert backend.faults(gpus[0].uuid) == {Fault.OVERHEAT}
    for reading in read_for(backend, clock, gpus[0], 5):
        assert edge(reading) > limit_c
        assert hotspot(reading) > limit_c
    assert hotspot(backend.read(gpus[1])) < limit_c - 20
    backend.clear(gpus[0].uuid)
    cooling = read_for(backend, clock, gpus[0], 120)
    assert hotspot(cooling[0]) > limit_c - 5  # no jump straight back to idle
    assert hotspot(cooling[-1]) < limit_c - 50


def test_ecc_fault_adds_an_uncorrectable_error_on_every_read() -> None:
    backend, _, gpus = make(count=1)
    backend.inject(gpus[0].uuid, Fault.ECC)
    readings = [backend.read(gpus[0]) for _ in range(4)]
    assert [reading.ecc_uncorrectable_total for reading in readings] == [1, 2, 3, 4]
    correctable = [reading.ecc_correctable_total or 0 for reading in readings]
    assert all(b > a for a, b in itertools.pairwise(correctable))
    backend.clear(gpus[0].uuid, Fault.ECC)  # the repair a GPU reset stands for
    after = [backend.read(gpus[0]) for _ in range(3)]
    assert {reading.ecc_uncorrectable_total for reading in after} == {0}
    assert min(reading.ecc_correctable_total or 0 for reading in after) >= correctable[-1]


def test_vanish_raises_device_lost_for_that_gpu_only() -> None:
    backend, _, gpus = make(count=2)
    backend.inject(gpus[1].uuid, Fault.VANISH)
    with pytest.raises(DeviceLostError, match="vanished"):
        backend.read(gpus[1])
    backend.read(gpus[0])
    backend.clear(gpus[1].uuid)
    backend.read(gpus[1])


def test_reading_a_gpu_this_backend_does_not_have_is_device_lost() -> None:
    backend, _, _ = make(count=1)
    _, _, foreign = make(count=1, node="elsewhere")
    with pytest.raises(DeviceLostError):
        backend.read(foreign[0])


def test_inject_on_an_unknown_uuid_is_refused() -> None:
    backend, _, _ = make(count=1)
    with pytest.raises(ValueError, match="nope"):
        backend.inject("nope", Fault.ECC)


def test_load_faults_from_yaml_sets_exactly_the_named_faults(tmp_path: Path) -> None:
    backend, _, gpus = make(count=4)
    backend.inject(gpus[3].uuid, Fault.ECC)
    faults = tmp_path / "faults.yaml"
    faults.write_text(f"0: overheat\n'{gpus[1].uuid}': VANISH\n2: none\n")
    backend.load_faults(faults)
    assert [backend.faults(gpu.uuid) for gpu in gpus] == [
        {Fault.OVERHEAT},
        {Fault.VANISH},
        set(),
        set(),
    ]
    faults.write_text("")
    backend.load_faults(faults)
    assert all(backend.faults(gpu.uuid) == set() for gpu in gpus)


def test_load_faults_from_json_accepts_index_strings(tmp_path: Path) -> None:
    backend, _, gpus = make(count=2)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"1": "ecc"}))
    backend.load_faults(faults)
    assert backend.faults(gpus[1].uuid) == {Fault.ECC}
    assert backend.read(gpus[1]).ecc_uncorrectable_total == 1


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("f.yaml", "0: melt\n", ["0", "melt", *FAULT_WORDS]),
        ("f.yaml", "7: ecc\n", ["7"]),
        ("f.yaml", "gpu-zero: ecc\n", ["gpu-zero"]),
        ("f.yaml", "true: ecc\n", ["True"]),
        ("f.yaml", "- 0\n- ecc\n", ["list"]),
        ("f.yaml", "0: [ecc]\n", ["0", *FAULT_WORDS]),
        ("f.json", '{"0": "ecc",', ["JSON"]),
        ("f.yaml", "0: ecc\n'0': vanish\n", ["twice"]),
    ],
)
def test_invalid_faults_files_are_refused_and_change_nothing(
    tmp_path: Path, name: str, content: str, words: list[str]
) -> None:
    backend, _, gpus = make(count=2)
    backend.inject(gpus[1].uuid, Fault.OVERHEAT)
    faults = tmp_path / name
    faults.write_text(content)
    with pytest.raises(ValueError, match="faults file") as caught:
        backend.load_faults(faults)
    for word in words:
        assert word in str(caught.value)
    assert backend.faults(gpus[0].uuid) == set()
    assert backend.faults(gpus[1].uuid) == {Fault.OVERHEAT}


@pytest.mark.parametrize("raise_after", [1, 2, 3, 4])
def test_overheat_is_classified_unhealthy_after_raise_after_ticks(raise_after: int) -> None:
    backend, clock, gpus = make("MI300X", count=1)
    limits = HealthLimits(hotspot_limit_c=110, hotspot_warn_c=100, raise_after=raise_after)
    health = initial()
    for tick, reading in enumerate(read_for(backend, clock, gpus[0], 5)):
        health = classify(health, reading, float(tick), limits)
    assert health.health is Health.HEALTHY
    backend.inject(gpus[0].uuid, Fault.OVERHEAT)
    verdicts = []
    for tick, reading in enumerate(read_for(backend, clock, gpus[0], raise_after)):
        health = classify(health, reading, 10.0 + tick, limits)
        verdicts.append(health.health)
    assert verdicts == [Health.HEALTHY] * (raise_after - 1) + [Health.UNHEALTHY]
    assert "hotspot" in health.reason
    assert "limit 110 C" in health.reason


def test_vanish_and_ecc_faults_are_unhealthy_on_the_first_tick() -> None:
    backend, _, gpus = make(count=2)
    limits = HealthLimits(hotspot_limit_c=110, hotspot_warn_c=100, raise_after=5)
    backend.inject(gpus[0].uuid, Fault.VANISH)
    backend.inject(gpus[1].uuid, Fault.ECC)
    with pytest.raises(DeviceLostError):
        backend.read(gpus[0])
    lost = classify(initial(), None, 1.0, limits)
    assert lost.health is Health.UNHEALTHY
    assert lost.reason == "device not answering"
    ecc = classify(initial(), backend.read(gpus[1]), 1.0, limits)
    assert ecc.health is Health.UNHEALTHY
    assert "uncorrectable ECC" in ecc.reason


def test_an_overheat_cleared_by_file_lasts_until_the_file_clears_it(tmp_path: Path) -> None:
    """Cooling starts when the fault goes, not at the last read before it went."""
    backend, clock, gpus = make(count=1)
    limit_c = GPU_MODELS["MI300X"].hotspot_limit_c
    backend.inject(gpus[0].uuid, Fault.OVERHEAT)
    clock.advance(60)
    faults = tmp_path / "faults.yaml"
    faults.write_text("0: none\n")
    backend.load_faults(faults)
    assert hotspot(backend.read(gpus[0])) > limit_c
