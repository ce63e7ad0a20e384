"""The amdsmi backend over the real amdsmi package and a fake C library (tests/fake_amdsmi.py).

Values are checked exactly, in the units the backend promises, so a unit slip (bytes vs MiB,
W vs uW) or a sentinel read as a value fails here; and without ROCm the backend must say so.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kaiwo_gpu.agent.amdsmi_backend import (
    AmdSmiBackend,
    _processes,
    load_amdsmi,
    normalise_model,
)
from kaiwo_gpu.agent.backend import (
    BackendUnavailableError,
    DeviceLostError,
    DiscoveredGpu,
    GpuReading,
    ProcessVram,
)
from tests.fake_amdsmi import (
    MI300X_VRAM_BYTES,
    MIB,
    READ_ENTRY_POINTS,
    STATUS_DRIVER_NOT_LOADED,
    UINT16_MAX,
    UINT32_MAX,
    FakeAmdSmi,
    FakeGpu,
    FakeProcess,
    _StubLibrary,
    installed_fake_amdsmi,
    is_amdsmi_module,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake() -> Iterator[FakeAmdSmi]:
    with installed_fake_amdsmi() as installed:
        yield installed


@pytest.fixture
def backend(fake: FakeAmdSmi) -> Iterator[AmdSmiBackend]:
    opened = AmdSmiBackend()
    yield opened
    opened.close()


def _read(backend: AmdSmiBackend, uuid: str) -> GpuReading:
    gpu = next(gpu for gpu in backend.discover() if gpu.uuid == uuid)
    return backend.read(gpu)


def _rocm_installed() -> bool:
    for path in ("libamd_smi.so", "/opt/rocm/lib/libamd_smi.so"):
        try:
            ctypes.CDLL(path)
        except OSError:
            continue
        return True
    return False


def test_discovers_every_device_with_its_identity_and_size(
    fake: FakeAmdSmi, backend: AmdSmiBackend
) -> None:
    first, second = fake.gpus
    gpus = backend.discover()

    assert gpus == (
        DiscoveredGpu(
            uuid=first.uuid,
            index=0,
            bdf="0000:05:00.0",
            model="MI300X",
            vram_mib=MI300X_VRAM_BYTES // MIB,
            compute_units=304,
            compute_partition="SPX",
            memory_partition="NPS1",
        ),
        DiscoveredGpu(
            uuid=second.uuid,
            index=1,
            bdf="0000:25:00.0",
            model="MI300X",
            vram_mib=MI300X_VRAM_BYTES // MIB,
            compute_units=304,
            compute_partition="SPX",
            memory_partition="NPS1",
        ),
    )
    assert fake.init_flags == [2]  # AMDSMI_INIT_AMD_GPUS: GPUs only, no CPU drivers needed


def test_discovery_reports_what_the_device_says_not_defaults() -> None:
    odd = FakeGpu(
        uuid="c0ffee00-0000-1000-8000-000000000001",
        bdf="0001:e5:1f.3",
        market_name="AMD Instinct MI250X",
        compute_units=110,
        vram_total_bytes=65_520 * MIB + 4096,  # not a whole MiB: floor, never round up
        compute_partition="CPX",
        memory_partition="NPS4",
    )
    with installed_fake_amdsmi([odd]):
        backend = AmdSmiBackend()
        try:
            (gpu,) = backend.discover()
        finally:
            backend.close()
    assert (gpu.bdf, gpu.model, gpu.vram_mib, gpu.compute_units) == (
        "0001:e5:1f.3",
        "MI250X",
        65_520,
        110,
    )
    assert (gpu.compute_partition, gpu.memory_partition) == ("CPX", "NPS4")


def test_vram_total_falls_back_to_vram_info_in_mb(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    fake.gpus[0].not_supported.add("amdsmi_get_gpu_memory_total")
    fake.gpus[0].vram_total_bytes = 65_536 * MIB

    assert backend.discover()[0].vram_mib == 65_536


def test_unreported_discovery_fields_are_empty_not_fatal(
    fake: FakeAmdSmi, backend: AmdSmiBackend
) -> None:
    gpu = fake.gpus[0]
    gpu.not_supported |= {"amdsmi_get_gpu_compute_partition", "amdsmi_get_gpu_memory_partition"}
    gpu.compute_units = UINT32_MAX  # the Python layer makes this "N/A"
    gpu.market_name = ""  # the Python layer makes this "N/A"

    discovered = backend.discover()[0]

    assert (discovered.compute_partition, discovered.memory_partition) == ("", "")
    assert discovered.compute_units == 0
    assert discovered.model == "0x74a1"  # the PCI device id rather than "N/A"
    assert backend.discover()[1].compute_partition == "SPX"


@pytest.mark.parametrize(
    ("market_name", "model"),
    [
        ("AMD Instinct MI300X", "MI300X"),
        ("AMD Instinct MI300X VF", "MI300X VF"),
        ("amd instinct MI210", "MI210"),
        ("AMD Radeon PRO W7900", "Radeon PRO W7900"),
        ("MI325X", "MI325X"),
        ("N/A", "unknown"),
        ("", "unknown"),
    ],
)
def test_market_names_become_short_model_names(market_name: str, model: str) -> None:
    assert normalise_model(market_name) == model


def test_a_gpu_without_a_uuid_is_left_out_and_the_others_offered(fake: FakeAmdSmi) -> None:
    fake.gpus[1].not_supported.add("amdsmi_get_gpu_device_uuid")
    backend = AmdSmiBackend()
    try:
        (only,) = backend.discover()
        assert only.uuid == fake.gpus[0].uuid
        (why,) = backend.skipped
        assert re.search(r"no UUID for GPU 1 \(bdf 0000:25:00\.0\)", why)
    finally:
        backend.close()


def test_no_gpu_with_a_uuid_makes_the_backend_unavailable(fake: FakeAmdSmi) -> None:
    for gpu in fake.gpus:
        gpu.not_supported.add("amdsmi_get_gpu_device_uuid")
    backend = AmdSmiBackend()
    try:
        with pytest.raises(BackendUnavailableError, match="no UUID for GPU 0"):
            backend.discover()
    finally:
        backend.close()


def test_reads_every_value_in_the_promised_units(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    first, second = fake.gpus

    assert _read(backend, first.uuid) == GpuReading(
        gfx_activity_percent=37,
        umc_activity_percent=12,
        edge_temperature_c=45.0,
        hotspot_temperature_c=58.0,
        memory_temperature_c=52.0,
        socket_power_w=350.0,
        power_limit_w=750.0,
        used_vram_mib=3354,
        ecc_correctable_total=3,
        ecc_uncorrectable_total=0,
        processes=(ProcessVram(pid=4242, name="python3", vram_mib=3 * 1024),),
    )
    reading = _read(backend, second.uuid)
    assert (reading.gfx_activity_percent, reading.umc_activity_percent) == (88, 41)
    assert (reading.edge_temperature_c, reading.hotspot_temperature_c) == (61.0, 79.0)
    assert (reading.socket_power_w, reading.used_vram_mib) == (612.0, 150_000)


def test_readings_follow_the_device(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    gpu = backend.discover()[0]
    before = backend.read(gpu)
    device = fake.gpus[0]
    device.gfx_activity, device.edge_c, device.vram_used_mb = 99, 83, 190_000
    device.processes = (
        FakeProcess(7, "train", 100 * 1024 * MIB, gtt_bytes=5 * MIB),
        FakeProcess(8, "", 512 * MIB),
    )

    after = backend.read(gpu)

    assert before.gfx_activity_percent == 37
    assert (after.gfx_activity_percent, after.edge_temperature_c, after.used_vram_mib) == (
        99,
        83.0,
        190_000,
    )
    assert after.processes == (
        ProcessVram(pid=7, name="train", vram_mib=100 * 1024),  # VRAM only, not GTT
        ProcessVram(pid=8, name="", vram_mib=512),
    )


def test_na_fields_and_sentinels_become_none(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    device = fake.gpus[0]
    device.gfx_activity = UINT16_MAX  # the Python layer's "N/A"
    device.umc_activity = UINT32_MAX  # passes the Python layer as a number; not a percentage
    device.current_socket_power_w = UINT32_MAX
    device.average_socket_power_w = UINT32_MAX
    device.socket_power_w = UINT32_MAX
    device.power_limit = UINT16_MAX  # the Python layer's "N/A"

    reading = _read(backend, device.uuid)

    assert reading.gfx_activity_percent is None
    assert reading.umc_activity_percent is None
    assert reading.socket_power_w is None
    assert reading.power_limit_w is None
    assert reading.edge_temperature_c == 45.0  # the rest still reads
    assert reading.used_vram_mib == 3354


def test_not_supported_calls_become_none(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    device = fake.gpus[0]
    device.not_supported |= {
        "amdsmi_get_gpu_total_ecc_count",
        "amdsmi_get_gpu_process_list",
        "amdsmi_get_power_info",
    }
    device.vram_c = None  # the temperature call answers AMDSMI_STATUS_NOT_SUPPORTED
    device.hotspot_c = None

    reading = _read(backend, device.uuid)

    assert reading.ecc_correctable_total is None
    assert reading.ecc_uncorrectable_total is None
    assert reading.processes == ()
    assert (reading.socket_power_w, reading.power_limit_w) == (None, None)
    assert (reading.memory_temperature_c, reading.hotspot_temperature_c) == (None, None)
    assert reading.edge_temperature_c == 45.0
    assert reading.gfx_activity_percent == 37


def test_older_parts_report_average_power(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    device = fake.gpus[0]
    device.current_socket_power_w = UINT32_MAX  # MI200 and earlier: only the average
    device.average_socket_power_w = 287
    device.socket_power_w = 287

    assert _read(backend, device.uuid).socket_power_w == 287.0


def test_a_power_limit_in_microwatts_is_read_as_watts(
    fake: FakeAmdSmi, backend: AmdSmiBackend
) -> None:
    fake.gpus[0].power_limit = 650_000_000  # later amdsmi headers document uW

    assert _read(backend, fake.gpus[0].uuid).power_limit_w == 650.0


def test_implausible_temperatures_are_none(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    device = fake.gpus[0]
    device.edge_c, device.hotspot_c, device.vram_c = 65_535, -273, 95

    reading = _read(backend, device.uuid)

    assert (reading.edge_temperature_c, reading.hotspot_temperature_c) == (None, None)
    assert reading.memory_temperature_c == 95.0


def test_a_vanished_device_is_lost_and_the_others_still_read(
    fake: FakeAmdSmi, backend: AmdSmiBackend
) -> None:
    first, second = backend.discover()
    fake.vanish(first.uuid)

    with pytest.raises(DeviceLostError, match=first.uuid):
        backend.read(first)
    assert backend.read(second).gfx_activity_percent == 88


def test_a_device_that_answers_nothing_is_lost(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    gpu = backend.discover()[0]
    fake.gpus[0].not_supported |= set(READ_ENTRY_POINTS)

    with pytest.raises(DeviceLostError, match="answered none"):
        backend.read(gpu)


def test_a_gpu_off_the_bus_is_lost_although_its_process_list_answers(
    fake: FakeAmdSmi, backend: AmdSmiBackend
) -> None:
    first, second = backend.discover()
    fake.fall_off_bus(first.uuid)

    with pytest.raises(DeviceLostError, match="answered none"):
        backend.read(first)
    assert backend.read(second).gfx_activity_percent == 88


def test_0xffff_is_a_value_where_the_library_does_not_mean_unsupported(
    fake: FakeAmdSmi, backend: AmdSmiBackend
) -> None:
    gpu = backend.discover()[0]
    fake.gpus[0].vram_used_mb = 0xFFFF
    fake.gpus[0].ecc_correctable = 0xFFFF

    reading = backend.read(gpu)
    assert reading.used_vram_mib == 0xFFFF
    assert reading.ecc_correctable_total == 0xFFFF


def test_process_handles_of_older_amdsmi_count_as_not_reported() -> None:
    """amdsmi 6.0 listed process handles, not dicts: no crash, just no process VRAM."""
    assert _processes([ctypes.c_uint32(7), ctypes.c_uint32(8)]) == ()
    assert _processes("N/A") == ()


def test_a_library_of_another_rocm_release_is_explained_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """amdsmi binds every C symbol at import: a libamd_smi.so of another release lacks some."""

    class OlderLibrary(_StubLibrary):
        def __getattr__(self, name: str) -> Any:
            if name == "amdsmi_get_gpu_enumeration_info":
                raise AttributeError(f"libamd_smi.so: undefined symbol: {name}")
            return super().__getattr__(name)

    real_cdll = ctypes.CDLL

    def cdll(name: Any, *args: Any, **kwargs: Any) -> Any:
        if str(name).endswith("libamd_smi.so"):
            return OlderLibrary(str(name))
        return real_cdll(name, *args, **kwargs)

    saved = {name: module for name, module in sys.modules.items() if is_amdsmi_module(name)}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    with pytest.raises(BackendUnavailableError) as refused:
        load_amdsmi()
    assert "undefined symbol" in str(refused.value)
    assert "ROCm release" in str(refused.value)
    assert not any(is_amdsmi_module(name) for name in sys.modules)


def test_one_answer_keeps_a_device_in_service(fake: FakeAmdSmi, backend: AmdSmiBackend) -> None:
    gpu = backend.discover()[0]
    fake.gpus[0].not_supported |= set(READ_ENTRY_POINTS) - {"amdsmi_get_gpu_vram_usage"}

    assert backend.read(gpu) == GpuReading(used_vram_mib=3354)


def test_a_gpu_this_backend_did_not_discover_is_lost(backend: AmdSmiBackend) -> None:
    stranger = DiscoveredGpu("not-a-gpu-here", 7, "0000:ff:00.0", "MI300X", 1, 1)
    backend.discover()

    with pytest.raises(DeviceLostError, match="not-a-gpu-here"):
        backend.read(stranger)


def test_close_shuts_the_library_down_once(fake: FakeAmdSmi) -> None:
    backend = AmdSmiBackend()
    gpu = backend.discover()[0]

    backend.close()
    backend.close()

    assert fake.shutdown_calls == 1
    assert not fake.initialized
    with pytest.raises(DeviceLostError, match="closed"):
        backend.read(gpu)


def test_closing_an_unopened_backend_touches_nothing(fake: FakeAmdSmi) -> None:
    AmdSmiBackend().close()

    assert (fake.init_flags, fake.shutdown_calls) == ([], 0)


def test_a_failed_init_makes_the_backend_unavailable(fake: FakeAmdSmi) -> None:
    fake.init_status = STATUS_DRIVER_NOT_LOADED
    backend = AmdSmiBackend()

    with pytest.raises(BackendUnavailableError, match="amdsmi_init failed") as raised:
        backend.discover()
    assert "DRIVER_NOT_LOADED" in str(raised.value)
    assert "modprobe amdgpu" in str(raised.value)
    backend.close()
    assert fake.shutdown_calls == 0


@pytest.mark.skipif(_rocm_installed(), reason="libamd_smi.so is installed here")
def test_without_rocm_the_error_says_why_and_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    saved = {name: module for name, module in sys.modules.items() if is_amdsmi_module(name)}
    for name in saved:
        del sys.modules[name]
    try:
        with pytest.raises(BackendUnavailableError) as raised:
            AmdSmiBackend().discover()
        left_behind = [name for name in sys.modules if is_amdsmi_module(name)]
    finally:
        for name in [name for name in sys.modules if is_amdsmi_module(name)]:
            del sys.modules[name]
        sys.modules.update(saved)

    message = str(raised.value)
    assert "libamd_smi.so" in message
    assert "install ROCm" in message
    assert "--backend simulated" in message
    assert "Unable to find libamd_smi.so" in message  # what amdsmi printed, kept as detail
    assert capsys.readouterr().out == ""  # ... and not on our stdout
    assert left_behind == []  # no half-imported amdsmi to trip the next attempt


@pytest.mark.integration
@pytest.mark.skipif(_rocm_installed(), reason="libamd_smi.so is installed here")
def test_without_rocm_a_fresh_process_exits_with_the_message_not_a_traceback() -> None:
    script = (
        "import sys\n"
        "from kaiwo_gpu.agent.amdsmi_backend import AmdSmiBackend\n"
        "from kaiwo_gpu.agent.backend import BackendUnavailableError\n"
        "try:\n"
        "    AmdSmiBackend().discover()\n"
        "except BackendUnavailableError as error:\n"
        "    print(f'unavailable: {error}')\n"
        "    sys.exit(3)\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("ROCM_PATH", "ROCM_HOME")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )

    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("unavailable: amdsmi could not load libamd_smi.so")
    assert result.stdout.count("\n") == 1  # amdsmi's own two lines went into the message
    assert "--backend simulated" in result.stdout
