"""A fake libamd_smi.so, so the real amdsmi package (its whole Python layer) runs without ROCm.

`amdsmi.amdsmi_wrapper` loads the library with `ctypes.CDLL` and binds each C entry point with
its argtypes; `amdsmi.amdsmi_interface` calls those with ctypes out-parameters and turns the
results into dicts, "N/A" strings and `AmdSmiLibraryException`s. This module answers the
`CDLL` call with a stub library while amdsmi is imported, then replaces the entry points the
backend uses with Python functions that check their arguments against the declared argtypes
and fill the out-parameters the way the C library does, from a list of `FakeGpu`s.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

MIB = 1024 * 1024
UINT16_MAX = 0xFFFF  # what gpu_metrics-based fields hold when unsupported; Python says "N/A"
UINT32_MAX = 0xFFFF_FFFF  # what amdsmi.h says unsupported struct members are set to
UINT64_MAX = 0xFFFF_FFFF_FFFF_FFFF

# amdsmi_status_t (amdsmi.h); install() checks them against the wrapper's.
STATUS_SUCCESS = 0
STATUS_INVAL = 1
STATUS_NOT_SUPPORTED = 2
STATUS_INIT_ERROR = 18
STATUS_NOT_FOUND = 31
STATUS_NOT_INIT = 32
STATUS_DRIVER_NOT_LOADED = 34
STATUS_INSUFFICIENT_SIZE = 41
STATUS_NAMES = {
    STATUS_SUCCESS: "AMDSMI_STATUS_SUCCESS",
    STATUS_INVAL: "AMDSMI_STATUS_INVAL",
    STATUS_NOT_SUPPORTED: "AMDSMI_STATUS_NOT_SUPPORTED",
    STATUS_INIT_ERROR: "AMDSMI_STATUS_INIT_ERROR",
    STATUS_NOT_FOUND: "AMDSMI_STATUS_NOT_FOUND",
    STATUS_NOT_INIT: "AMDSMI_STATUS_NOT_INIT",
    STATUS_DRIVER_NOT_LOADED: "AMDSMI_STATUS_DRIVER_NOT_LOADED",
    STATUS_INSUFFICIENT_SIZE: "AMDSMI_STATUS_INSUFFICIENT_SIZE",
}

GPU_UUID_SIZE = 38  # AMDSMI_GPU_UUID_SIZE
TEMPERATURE_EDGE, TEMPERATURE_HOTSPOT, TEMPERATURE_VRAM = 0, 1, 2  # amdsmi_temperature_type_t
TEMP_CURRENT = 0  # amdsmi_temperature_metric_t
MEM_TYPE_VRAM = 0  # amdsmi_memory_type_t
VRAM_TYPE_HBM3 = 4
SOCKET_ADDRESS = 0x5000
FIRST_HANDLE_ADDRESS = 0x1000
MI300X_VRAM_BYTES = 196_592 * MIB  # what an MI300X reports as its VRAM total

READ_ENTRY_POINTS = (
    "amdsmi_get_gpu_activity",
    "amdsmi_get_temp_metric",
    "amdsmi_get_power_info",
    "amdsmi_get_gpu_vram_usage",
    "amdsmi_get_gpu_total_ecc_count",
    "amdsmi_get_gpu_process_list",
)


@dataclass(frozen=True)
class FakeProcess:
    pid: int
    name: str
    vram_bytes: int
    gtt_bytes: int = 0


@dataclass
class FakeGpu:
    """One device as the C library sees it; values are the raw C fields, in the C units."""

    uuid: str
    bdf: str  # "dddd:bb:dd.f"
    market_name: str = "AMD Instinct MI300X"
    device_id: int = 0x74A1
    compute_units: int = 304  # UINT32_MAX = not reported
    vram_total_bytes: int = MI300X_VRAM_BYTES
    compute_partition: str = "SPX"
    memory_partition: str = "NPS1"
    gfx_activity: int = 37  # %, UINT16_MAX = not reported
    umc_activity: int = 12
    edge_c: int | None = 45  # None = AMDSMI_STATUS_NOT_SUPPORTED
    hotspot_c: int | None = 58
    vram_c: int | None = 52
    socket_power_w: int = 350
    current_socket_power_w: int = 350  # MI300 and later
    average_socket_power_w: int = UINT32_MAX  # Navi, MI200 and earlier
    power_limit: int = 750  # W in amdsmi 7.0 (uW in later headers)
    vram_used_mb: int = 1024  # MB = bytes / 2**20
    ecc_correctable: int = 3
    ecc_uncorrectable: int = 0
    processes: tuple[FakeProcess, ...] = ()
    # Entry points that answer AMDSMI_STATUS_NOT_SUPPORTED for this device.
    not_supported: set[str] = field(default_factory=set)


def two_mi300x() -> list[FakeGpu]:
    return [
        FakeGpu(
            uuid="a3ff74a1-0000-1000-80c4-1a2b3c4d5e6f",
            bdf="0000:05:00.0",
            vram_used_mb=3354,  # the driver's 282 MB plus the process's 3 GiB
            processes=(FakeProcess(4242, "python3", 3 * 1024 * MIB + 12_345),),
        ),
        FakeGpu(
            uuid="b7ff74a1-0000-1000-8091-6f5e4d3c2b1a",
            bdf="0000:25:00.0",
            gfx_activity=88,
            umc_activity=41,
            edge_c=61,
            hotspot_c=79,
            vram_c=70,
            socket_power_w=612,
            current_socket_power_w=612,
            vram_used_mb=150_000,
            ecc_correctable=0,
        ),
    ]


class _Status(Exception):
    """Raised inside a fake entry point to return this status, as the C code's early returns."""

    def __init__(self, code: int) -> None:
        super().__init__(STATUS_NAMES.get(code, str(code)))
        self.code = code


def _returns_status(method: Callable[..., None]) -> Callable[..., int]:
    @functools.wraps(method)
    def entry_point(*args: Any) -> int:
        try:
            method(*args)
        except _Status as status:
            return status.code
        return STATUS_SUCCESS

    return entry_point


def _target(argument: Any) -> Any:
    """What a pointer argument points at: byref() objects, pointers, or arrays themselves."""
    referenced = getattr(argument, "_obj", None)  # ctypes.byref(x)
    if referenced is not None:
        return referenced
    if isinstance(argument, ctypes._Pointer):
        return argument.contents
    return argument


def _scalar(argument: Any) -> int:
    return int(getattr(argument, "value", argument) or 0)


def _is_null(argument: Any) -> bool:
    return isinstance(argument, ctypes._Pointer) and not argument


class _StubFunction:
    """A symbol of the stub library: it takes argtypes and restype and reports not supported."""

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.argtypes: Sequence[Any] | None = None
        self.restype: Any = None

    def __call__(self, *args: Any) -> int:
        return STATUS_NOT_SUPPORTED


class _StubLibrary:
    """Stands in for ctypes.CDLL('libamd_smi.so') while amdsmi.amdsmi_wrapper binds symbols."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> _StubFunction:
        if name.startswith("__"):
            raise AttributeError(name)
        function = _StubFunction(name)
        setattr(self, name, function)
        return function


class _CEntryPoint:
    """A fake C function: converts its arguments as ctypes would for the declared argtypes."""

    def __init__(self, stub: Any, implementation: Callable[..., int]) -> None:
        self.__name__ = stub.__name__
        self.argtypes = stub.argtypes
        self.restype = stub.restype
        self._implementation = implementation

    def __call__(self, *args: Any) -> int:
        if self.argtypes is not None:
            if len(args) != len(self.argtypes):
                raise TypeError(f"{self.__name__} takes {len(self.argtypes)} arguments")
            for argtype, argument in zip(self.argtypes, args, strict=True):
                argtype.from_param(argument)  # raises as a real foreign call would
        return self._implementation(*args)


def is_amdsmi_module(name: str) -> bool:
    return name == "amdsmi" or name.startswith("amdsmi.")


def import_amdsmi_without_rocm() -> ModuleType:
    """Import the real amdsmi package with ctypes.CDLL answering a stub for libamd_smi.so."""
    real_cdll = ctypes.CDLL

    def cdll(name: Any, *args: Any, **kwargs: Any) -> Any:
        if str(name).endswith("libamd_smi.so"):
            return _StubLibrary(str(name))
        return real_cdll(name, *args, **kwargs)

    for name in [name for name in sys.modules if is_amdsmi_module(name)]:
        del sys.modules[name]  # a failed real import leaves amdsmi._version behind
    ctypes.CDLL = cdll  # type: ignore[misc,assignment]
    try:
        return importlib.import_module("amdsmi")
    finally:
        ctypes.CDLL = real_cdll  # type: ignore[misc]


class FakeAmdSmi:
    """The fake library's state: its devices, whether it is initialised, what was called."""

    def __init__(self, gpus: Sequence[FakeGpu]) -> None:
        self.gpus = list(gpus)
        self._by_address = {
            FIRST_HANDLE_ADDRESS * (position + 1): gpu for position, gpu in enumerate(self.gpus)
        }
        self.init_status = STATUS_SUCCESS
        self.initialized = False
        self.init_flags: list[int] = []
        self.shutdown_calls = 0

    def gpu(self, uuid: str) -> FakeGpu:
        return next(gpu for gpu in self.gpus if gpu.uuid == uuid)

    def fall_off_bus(self, uuid: str) -> None:
        """What a GPU that dropped off the bus looks like to the real library: its handle
        still resolves, every sysfs-backed read fails, but the process list (from KFD)
        still answers."""
        gpu = self.gpu(uuid)
        gpu.not_supported |= set(READ_ENTRY_POINTS) - {"amdsmi_get_gpu_process_list"}

    def vanish(self, uuid: str) -> None:
        """The device leaves: its handle stops resolving, as after a hot unplug or reset."""
        for address, gpu in list(self._by_address.items()):
            if gpu.uuid == uuid:
                del self._by_address[address]

    def install(self, amdsmi: ModuleType) -> None:
        """Replace the wrapper's C entry points the backend uses with this fake's."""
        wrapper = amdsmi.amdsmi_wrapper
        for code, name in STATUS_NAMES.items():
            assert getattr(wrapper, name) == code, f"{name} drifted from amdsmi.h"
        for name in (
            "amdsmi_init",
            "amdsmi_shut_down",
            "amdsmi_get_socket_handles",
            "amdsmi_get_processor_handles",
            "amdsmi_get_gpu_device_uuid",
            "amdsmi_get_gpu_device_bdf",
            "amdsmi_get_gpu_asic_info",
            "amdsmi_get_gpu_memory_total",
            "amdsmi_get_gpu_vram_info",
            "amdsmi_get_gpu_compute_partition",
            "amdsmi_get_gpu_memory_partition",
            *READ_ENTRY_POINTS,
        ):
            setattr(wrapper, name, _CEntryPoint(getattr(wrapper, name), getattr(self, name)))

    # The entry points, with the C signatures (amdsmi.h, amdsmi_wrapper argtypes).

    def _gpu(self, handle: Any, entry_point: str) -> FakeGpu:
        if not self.initialized:
            raise _Status(STATUS_NOT_INIT)
        gpu = self._by_address.get(_scalar(handle))
        if gpu is None:
            raise _Status(STATUS_NOT_FOUND)
        if entry_point in gpu.not_supported:
            raise _Status(STATUS_NOT_SUPPORTED)
        return gpu

    @_returns_status
    def amdsmi_init(self, flags: Any) -> None:
        self.init_flags.append(_scalar(flags))
        if self.init_status != STATUS_SUCCESS:
            raise _Status(self.init_status)
        self.initialized = True

    @_returns_status
    def amdsmi_shut_down(self) -> None:
        self.shutdown_calls += 1
        self.initialized = False

    @_returns_status
    def amdsmi_get_socket_handles(self, count: Any, handles: Any) -> None:
        if not self.initialized:
            raise _Status(STATUS_NOT_INIT)
        _target(count).value = 1
        if not _is_null(handles):
            handles[0] = SOCKET_ADDRESS

    @_returns_status
    def amdsmi_get_processor_handles(self, socket: Any, count: Any, handles: Any) -> None:
        if not self.initialized:
            raise _Status(STATUS_NOT_INIT)
        if _scalar(socket) != SOCKET_ADDRESS:
            raise _Status(STATUS_INVAL)
        addresses = sorted(self._by_address)
        count = _target(count)
        if not _is_null(handles):
            if count.value < len(addresses):
                raise _Status(STATUS_INSUFFICIENT_SIZE)
            for position, address in enumerate(addresses):
                handles[position] = address
        count.value = len(addresses)

    @_returns_status
    def amdsmi_get_gpu_device_uuid(self, handle: Any, length: Any, uuid: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_device_uuid")
        length = _target(length)
        if length.value < GPU_UUID_SIZE:
            raise _Status(STATUS_INSUFFICIENT_SIZE)
        uuid.value = gpu.uuid.encode()
        length.value = len(gpu.uuid)

    @_returns_status
    def amdsmi_get_gpu_device_bdf(self, handle: Any, bdf: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_device_bdf")
        domain, bus, rest = gpu.bdf.split(":")
        device, function = rest.split(".")
        fields = _target(bdf).struct_amdsmi_bdf_t
        fields.domain_number = int(domain, 16)
        fields.bus_number = int(bus, 16)
        fields.device_number = int(device, 16)
        fields.function_number = int(function, 16)

    @_returns_status
    def amdsmi_get_gpu_asic_info(self, handle: Any, info: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_asic_info")
        info = _target(info)
        info.market_name = gpu.market_name.encode()
        info.vendor_id = 0x1002
        info.vendor_name = b"Advanced Micro Devices Inc. [AMD/ATI]"
        info.subvendor_id = 0x1002
        info.device_id = gpu.device_id
        info.rev_id = 0
        info.asic_serial = b"D3C1A2B4E5F60718"
        info.oam_id = self.gpus.index(gpu)
        info.num_of_compute_units = gpu.compute_units
        info.target_graphics_version = 0x942
        info.subsystem_id = 0x74A1

    @_returns_status
    def amdsmi_get_gpu_memory_total(self, handle: Any, memory_type: Any, total: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_memory_total")
        if _scalar(memory_type) != MEM_TYPE_VRAM:
            raise _Status(STATUS_NOT_SUPPORTED)
        _target(total).value = gpu.vram_total_bytes

    @_returns_status
    def amdsmi_get_gpu_vram_info(self, handle: Any, info: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_vram_info")
        info = _target(info)
        info.vram_type = VRAM_TYPE_HBM3
        info.vram_vendor = b"HYNIX"
        info.vram_size = gpu.vram_total_bytes // MIB
        info.vram_bit_width = 8192
        info.vram_max_bandwidth = 5300

    def _partition(self, handle: Any, buffer: Any, length: Any, entry_point: str) -> None:
        gpu = self._gpu(handle, entry_point)
        value = (
            gpu.compute_partition
            if entry_point == "amdsmi_get_gpu_compute_partition"
            else gpu.memory_partition
        ).encode()
        if _scalar(length) <= len(value):
            raise _Status(STATUS_INSUFFICIENT_SIZE)
        buffer.value = value

    @_returns_status
    def amdsmi_get_gpu_compute_partition(self, handle: Any, buffer: Any, length: Any) -> None:
        self._partition(handle, buffer, length, "amdsmi_get_gpu_compute_partition")

    @_returns_status
    def amdsmi_get_gpu_memory_partition(self, handle: Any, buffer: Any, length: Any) -> None:
        self._partition(handle, buffer, length, "amdsmi_get_gpu_memory_partition")

    @_returns_status
    def amdsmi_get_gpu_activity(self, handle: Any, usage: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_activity")
        usage = _target(usage)
        usage.gfx_activity = gpu.gfx_activity
        usage.umc_activity = gpu.umc_activity
        usage.mm_activity = UINT16_MAX

    @_returns_status
    def amdsmi_get_temp_metric(self, handle: Any, sensor: Any, metric: Any, value: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_temp_metric")
        by_sensor = {
            TEMPERATURE_EDGE: gpu.edge_c,
            TEMPERATURE_HOTSPOT: gpu.hotspot_c,
            TEMPERATURE_VRAM: gpu.vram_c,
        }
        celsius = by_sensor.get(_scalar(sensor))
        if _scalar(metric) != TEMP_CURRENT or celsius is None:
            raise _Status(STATUS_NOT_SUPPORTED)
        _target(value).value = celsius

    @_returns_status
    def amdsmi_get_power_info(self, handle: Any, info: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_power_info")
        info = _target(info)
        info.socket_power = gpu.socket_power_w
        info.current_socket_power = gpu.current_socket_power_w
        info.average_socket_power = gpu.average_socket_power_w
        info.gfx_voltage = 800
        info.soc_voltage = UINT64_MAX
        info.mem_voltage = UINT64_MAX
        info.power_limit = gpu.power_limit

    @_returns_status
    def amdsmi_get_gpu_vram_usage(self, handle: Any, usage: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_vram_usage")
        usage = _target(usage)
        usage.vram_total = gpu.vram_total_bytes // MIB
        usage.vram_used = gpu.vram_used_mb

    @_returns_status
    def amdsmi_get_gpu_total_ecc_count(self, handle: Any, counts: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_total_ecc_count")
        counts = _target(counts)
        counts.correctable_count = gpu.ecc_correctable
        counts.uncorrectable_count = gpu.ecc_uncorrectable
        counts.deferred_count = 0

    @_returns_status
    def amdsmi_get_gpu_process_list(self, handle: Any, count: Any, processes: Any) -> None:
        gpu = self._gpu(handle, "amdsmi_get_gpu_process_list")
        count = _target(count)
        if count.value < len(gpu.processes):
            count.value = len(gpu.processes)
            raise _Status(STATUS_INSUFFICIENT_SIZE)
        for position, process in enumerate(gpu.processes):
            entry = processes[position]
            entry.name = process.name.encode()
            entry.pid = process.pid
            entry.mem = process.vram_bytes + process.gtt_bytes
            entry.memory_usage.vram_mem = process.vram_bytes
            entry.memory_usage.gtt_mem = process.gtt_bytes
            entry.memory_usage.cpu_mem = 0
            entry.cu_occupancy = UINT32_MAX
        count.value = len(gpu.processes)


@contextlib.contextmanager
def installed_fake_amdsmi(gpus: Sequence[FakeGpu] | None = None) -> Iterator[FakeAmdSmi]:
    """amdsmi importable over a fake library for the duration; sys.modules restored after."""
    saved = {name: module for name, module in sys.modules.items() if is_amdsmi_module(name)}
    try:
        amdsmi = import_amdsmi_without_rocm()
        fake = FakeAmdSmi(two_mi300x() if gpus is None else gpus)
        fake.install(amdsmi)
        yield fake
    finally:
        for name in [name for name in sys.modules if is_amdsmi_module(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
