"""The GPU backend for real AMD GPUs, over ROCm's amdsmi Python package.

The only module that imports `amdsmi`, and only when a backend is opened: the package raises
`KeyError` at import time on machines without ROCm, and the agent must run (simulated) there.
Everything the library cannot report becomes None; only a device that no longer answers
raises `DeviceLostError`.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kaiwo_gpu.agent.backend import (
    BackendUnavailableError,
    DeviceLostError,
    DiscoveredGpu,
    GpuReading,
    ProcessVram,
)
from kaiwo_gpu.common.telemetry_limits import TEMPERATURE_C, within

MIB = 1024 * 1024
# amdsmi fills fields a device does not support with the largest value of the field's type.
# The Python layer turns the 16-bit one into "N/A" for activity and power only; 0xFFFF is a
# real value elsewhere (65,535 MiB used, 65,535 correctable errors).
UNSUPPORTED_SENTINELS = frozenset({0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF})
UINT16_UNSUPPORTED = 0xFFFF
# amdsmi 7.0 reports power_limit in W; later headers (7.13) say uW. No GPU has a 100 kW limit.
POWER_LIMIT_MICROWATT_THRESHOLD = 100_000
MICROWATTS_PER_WATT = 1_000_000
MARKET_NAME_PREFIXES = ("AMD Instinct ", "AMD ")
UNKNOWN_MODEL = "unknown"

# amdsmi_status_t codes (amdsmi.h) that mean the device is gone rather than a sensor missing.
AMDSMI_STATUS_NOT_FOUND = 31  # the handle no longer resolves to a processor
AMDSMI_STATUS_DRIVER_NOT_LOADED = 34
DEVICE_LOST_STATUSES = frozenset({AMDSMI_STATUS_NOT_FOUND, AMDSMI_STATUS_DRIVER_NOT_LOADED})

INSTALL_HINT = (
    "install ROCm (>= 6.x) with its amd-smi library and the amdsmi Python package of the same "
    "version (pip install 'kaiwo-gpu[amdsmi]'; set ROCM_PATH if ROCm is not in /opt/rocm), "
    "or run with --backend simulated"
)


def load_amdsmi() -> ModuleType:
    """Import amdsmi, or raise BackendUnavailableError that says why and what to do.

    Without ROCm the package prints two lines to stdout and raises KeyError('libamd_smi.so');
    the print is captured into the message and the half-imported modules are dropped, so a
    later attempt (after installing ROCm) starts clean.
    """
    before = {name for name in sys.modules if _is_amdsmi_module(name)}
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            import amdsmi  # noqa: PLC0415 - absent or broken on nodes without ROCm
    # KeyError: no libamd_smi.so (it prints first); AttributeError: a libamd_smi.so of another
    # ROCm release, missing a symbol the package binds at import.
    except (KeyError, ImportError, OSError, AttributeError) as error:
        for name in [name for name in sys.modules if _is_amdsmi_module(name)]:
            if name not in before:
                del sys.modules[name]
        said = " / ".join(line.strip() for line in printed.getvalue().splitlines() if line.strip())
        detail = f" (amdsmi said: {said})" if said else ""
        raise BackendUnavailableError(
            f"amdsmi could not load libamd_smi.so: {type(error).__name__}: {error}{detail}; "
            "the amdsmi package must be the one of the node's ROCm release; "
            f"{INSTALL_HINT}"
        ) from error
    module: ModuleType = amdsmi
    return module


def _is_amdsmi_module(name: str) -> bool:
    return name == "amdsmi" or name.startswith("amdsmi.")


def normalise_model(market_name: object, device_id: object = None) -> str:
    """'AMD Instinct MI300X' -> 'MI300X'; falls back to the PCI device id, then 'unknown'."""
    if isinstance(market_name, str):
        name = market_name.strip()
        for prefix in MARKET_NAME_PREFIXES:
            if name.lower().startswith(prefix.lower()):
                name = name[len(prefix) :].strip()
                break
        if name and name != "N/A":
            return name
    if isinstance(device_id, str) and device_id and device_id != "N/A":
        return device_id
    return UNKNOWN_MODEL


def _number(value: object) -> float | None:
    """A reported number, or None for "N/A", sentinels, non-numbers and non-finite floats."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value in UNSUPPORTED_SENTINELS:
        return None
    return float(value)


def _count(value: object) -> int | None:
    number = _number(value)
    if number is None or number < 0 or not number.is_integer():
        return None
    return int(number)


def _percent(value: object) -> int | None:
    count = _count(value)
    return count if count is not None and count <= 100 else None  # 0xFFFF: over 100


def _uint16_watts(value: object) -> float | None:
    """Power fields are 16-bit in the C structs: 0xFFFF there means not supported."""
    return None if value == UINT16_UNSUPPORTED else _watts(value)


def _temperature_c(value: object) -> float | None:
    number = _number(value)
    return number if number is not None and within(number, TEMPERATURE_C) else None


def _watts(value: object) -> float | None:
    number = _number(value)
    return number if number is not None and number >= 0 else None


def _power_limit_w(value: object) -> float | None:
    watts = _watts(value)
    if watts is not None and watts > POWER_LIMIT_MICROWATT_THRESHOLD:
        return watts / MICROWATTS_PER_WATT
    return watts


def _socket_power_w(power: dict[str, Any]) -> float | None:
    """MI300+ report current_socket_power, older parts average_socket_power; the other is unset."""
    candidates = [
        _uint16_watts(power.get(key))
        for key in ("current_socket_power", "average_socket_power", "socket_power")
    ]
    present = [watts for watts in candidates if watts is not None]
    positive = [watts for watts in present if watts > 0]
    if positive:
        return positive[0]
    return present[0] if present else None


def _processes(entries: object) -> tuple[ProcessVram, ...]:
    """amdsmi 6.1+ lists dicts; 6.0 listed process handles (details took another call per
    process): those, and anything else unexpected, count as not reported."""
    processes = []
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        pid = _count(entry.get("pid"))
        if pid is None:
            continue
        name = entry.get("name")
        usage = entry.get("memory_usage")
        vram_bytes = _count(usage.get("vram_mem")) if isinstance(usage, dict) else None
        processes.append(
            ProcessVram(
                pid=pid,
                name=name if isinstance(name, str) and name != "N/A" else "",
                vram_mib=(vram_bytes or 0) // MIB,
            )
        )
    return tuple(processes)


@dataclass
class _Calls:
    """Runs amdsmi calls for one device: a library error is None, a lost device raises."""

    amdsmi: ModuleType
    what: str
    answered: int = 0
    failures: list[str] = field(default_factory=list)

    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            result = function(*args)
        except self.amdsmi.AmdSmiLibraryException as error:
            code = error.get_error_code()
            if code in DEVICE_LOST_STATUSES:
                raise DeviceLostError(
                    f"{self.what} is gone: {function.__name__} answered "
                    f"{error.get_error_info(detailed=False)}"
                ) from error
            self.failures.append(f"{function.__name__}: {error.get_error_info(detailed=False)}")
            return None
        except (self.amdsmi.AmdSmiException, ValueError, UnicodeDecodeError) as error:
            # The Python layer failing to parse what the library returned: not reported.
            self.failures.append(f"{function.__name__}: {error}")
            return None
        self.answered += 1
        return result


class AmdSmiBackend:
    """The node's AMD GPUs as amdsmi reports them; one library session per backend."""

    name = "amdsmi"

    def __init__(self, loader: Callable[[], ModuleType] = load_amdsmi) -> None:
        self._loader = loader
        self._amdsmi: ModuleType | None = None
        self._handles: dict[str, Any] = {}
        self.skipped: tuple[str, ...] = ()  # why GPUs were left out at discovery
        # amdsmi keeps per-process state; one call at a time keeps init/shutdown race-free.
        self._lock = threading.Lock()

    def discover(self) -> tuple[DiscoveredGpu, ...]:
        with self._lock:
            amdsmi = self._open()
            try:
                handles = list(amdsmi.amdsmi_get_processor_handles())
            except amdsmi.AmdSmiException as error:
                raise BackendUnavailableError(
                    f"amdsmi could not list the GPUs: {error}; check that the amdgpu driver is "
                    "loaded and this user may open /dev/kfd and /dev/dri (groups video, render)"
                ) from error
            gpus: list[DiscoveredGpu] = []
            self._handles = {}
            skipped: list[str] = []
            for index, handle in enumerate(handles):
                try:
                    gpu = self._describe(amdsmi, index, handle)
                except (BackendUnavailableError, DeviceLostError) as error:
                    skipped.append(str(error))  # one bad GPU must not hide the others
                    continue
                self._handles[gpu.uuid] = handle
                gpus.append(gpu)
            if skipped and not gpus:
                raise BackendUnavailableError("; ".join(skipped))
            self.skipped = tuple(skipped)
            return tuple(gpus)

    def read(self, gpu: DiscoveredGpu) -> GpuReading:
        with self._lock:
            handle = self._handles.get(gpu.uuid)
            if self._amdsmi is None or handle is None:
                raise DeviceLostError(
                    f"GPU {gpu.index} ({gpu.uuid}) has no amdsmi handle: not discovered by this "
                    "backend, or the backend was closed"
                )
            return self._sample(self._amdsmi, gpu, handle)

    def close(self) -> None:
        with self._lock:
            amdsmi, self._amdsmi = self._amdsmi, None
            self._handles = {}
            if amdsmi is not None:
                # Shutting down is best effort: the process may be exiting on a driver fault.
                with contextlib.suppress(amdsmi.AmdSmiException):
                    amdsmi.amdsmi_shut_down()

    def _open(self) -> ModuleType:
        if self._amdsmi is not None:
            return self._amdsmi
        amdsmi = self._loader()
        try:
            amdsmi.amdsmi_init(amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
        except amdsmi.AmdSmiException as error:
            raise BackendUnavailableError(
                f"amdsmi_init failed: {error}; check that the amdgpu driver is loaded "
                "(modprobe amdgpu), that this user may open /dev/kfd and /dev/dri (groups "
                f"video, render), and that the amdsmi package matches ROCm; or {INSTALL_HINT}"
            ) from error
        self._amdsmi = amdsmi
        return amdsmi

    def _describe(self, amdsmi: ModuleType, index: int, handle: Any) -> DiscoveredGpu:
        calls = _Calls(amdsmi, f"GPU {index}")
        uuid = calls(amdsmi.amdsmi_get_gpu_device_uuid, handle)
        bdf = calls(amdsmi.amdsmi_get_gpu_device_bdf, handle)
        if not isinstance(uuid, str) or not uuid:
            raise BackendUnavailableError(
                f"amdsmi reports no UUID for GPU {index} (bdf {bdf}): {'; '.join(calls.failures)}"
                "; kaiwo-gpu identifies GPUs by UUID, so this node cannot offer them"
            )
        if uuid in self._handles:
            # Partitions of one device may share its UUID; the handle order keeps this stable.
            uuid = f"{uuid}-{index}"
        asic = calls(amdsmi.amdsmi_get_gpu_asic_info, handle) or {}
        vram_bytes = _count(
            calls(amdsmi.amdsmi_get_gpu_memory_total, handle, amdsmi.AmdSmiMemoryType.VRAM)
        )
        if vram_bytes is not None:
            vram_mib = vram_bytes // MIB
        else:
            vram_info = calls(amdsmi.amdsmi_get_gpu_vram_info, handle) or {}
            vram_mib = _count(vram_info.get("vram_size")) or 0  # in MB (bytes / 2**20)
        compute_partition = calls(amdsmi.amdsmi_get_gpu_compute_partition, handle)
        memory_partition = calls(amdsmi.amdsmi_get_gpu_memory_partition, handle)
        return DiscoveredGpu(
            uuid=uuid,
            index=index,
            bdf=bdf if isinstance(bdf, str) else "",
            model=normalise_model(asic.get("market_name"), asic.get("device_id")),
            vram_mib=vram_mib,
            compute_units=_count(asic.get("num_compute_units")) or 0,  # 0 = not reported
            compute_partition=_partition(compute_partition),
            memory_partition=_partition(memory_partition),
        )

    def _sample(self, amdsmi: ModuleType, gpu: DiscoveredGpu, handle: Any) -> GpuReading:
        calls = _Calls(amdsmi, f"GPU {gpu.index} ({gpu.uuid})")
        activity = calls(amdsmi.amdsmi_get_gpu_activity, handle) or {}
        kinds = amdsmi.AmdSmiTemperatureType
        current = amdsmi.AmdSmiTemperatureMetric.CURRENT
        edge = calls(amdsmi.amdsmi_get_temp_metric, handle, kinds.EDGE, current)
        hotspot = calls(amdsmi.amdsmi_get_temp_metric, handle, kinds.HOTSPOT, current)
        memory = calls(amdsmi.amdsmi_get_temp_metric, handle, kinds.VRAM, current)
        power = calls(amdsmi.amdsmi_get_power_info, handle) or {}
        vram = calls(amdsmi.amdsmi_get_gpu_vram_usage, handle) or {}
        ecc = calls(amdsmi.amdsmi_get_gpu_total_ecc_count, handle) or {}
        if calls.answered == 0:
            # A missing sensor is None, but a device whose sensors all fail is gone (a GPU
            # off the bus reads as missing files, which amdsmi calls "not supported"). The
            # process list is left out: it comes from KFD and answers even then.
            raise DeviceLostError(
                f"GPU {gpu.index} ({gpu.uuid}) answered none of its queries: "
                + "; ".join(calls.failures)
            )
        processes = calls(amdsmi.amdsmi_get_gpu_process_list, handle) or []
        return GpuReading(
            gfx_activity_percent=_percent(activity.get("gfx_activity")),
            umc_activity_percent=_percent(activity.get("umc_activity")),
            edge_temperature_c=_temperature_c(edge),
            hotspot_temperature_c=_temperature_c(hotspot),
            memory_temperature_c=_temperature_c(memory),
            socket_power_w=_socket_power_w(power),
            power_limit_w=_power_limit_w(power.get("power_limit")),
            used_vram_mib=_count(vram.get("vram_used")),  # in MB (bytes / 2**20)
            ecc_correctable_total=_count(ecc.get("correctable_count")),
            ecc_uncorrectable_total=_count(ecc.get("uncorrectable_count")),
            processes=_processes(processes),
        )


def _partition(value: object) -> str:
    if not isinstance(value, str):
        return ""
    value = value.strip()
    return "" if value in ("", "N/A", "UNKNOWN") else value
