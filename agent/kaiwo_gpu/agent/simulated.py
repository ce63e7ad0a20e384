"""A GPU backend with no GPUs: plausible AMD Instinct readings whose load follows placements.

It lets a laptop run the whole system (demo, integration tests): the load on each simulated
GPU follows what the coordinator placed on it, temperatures drift toward their target over
the injected clock, and faults (overheat, ECC errors, a vanished device) can be injected from
code or from a small YAML/JSON file that the agent re-reads when it changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import yaml

from kaiwo_gpu.agent.backend import (
    DeviceLostError,
    DiscoveredGpu,
    GpuReading,
    PlacedShare,
    ProcessVram,
)
from kaiwo_gpu.common.gpu_models import GPU_MODELS, GpuModel

# Thermal shape at 0 % and 100 % activity. Full normal load keeps the hotspot near 88 C and HBM
# near 80 C: well below every known model's hotspot limit (>= 105 C) and below the health
# classifier's warn levels (limit - 10 C, HBM 85 C), so only an injected fault looks unhealthy.
EDGE_IDLE_C = 35.0
EDGE_FULL_C = 70.0
HOTSPOT_OVER_EDGE_IDLE_C = 10.0
HOTSPOT_OVER_EDGE_FULL_C = 18.0
MEMORY_OVER_EDGE_IDLE_C = 5.0
MEMORY_OVER_EDGE_FULL_C = 10.0
# Temperatures close ~63 % of the gap to their target in this time: quick enough for a demo.
THERMAL_TIME_CONSTANT_S = 10.0
# An OVERHEAT fault pins edge and hotspot this far above the model's hotspot limit.
OVERHEAT_EDGE_OVER_LIMIT_C = 2.0
OVERHEAT_HOTSPOT_OVER_LIMIT_C = 10.0

IDLE_POWER_FRACTION = 0.2
UMC_PER_GFX = 0.6  # memory-controller activity as a share of compute activity
IDLE_GFX_MAX_PERCENT = 2
GFX_NOISE_PERCENT = 2.0
TEMPERATURE_NOISE_C = 0.4
DRIVER_BASELINE_MIB = 282  # what an idle MI300X reports as used before any process runs
PROCESS_NAME = "kaiwo-sim"
FIRST_PID = 100_000
PIDS_PER_GPU = 10_000
CORRECTABLE_PER_ECC_READ_MAX = 20
GPUS_PER_PCI_DOMAIN = 8


class Fault(StrEnum):
    """What can go wrong with a simulated GPU; the values are the words of the faults file."""

    OVERHEAT = "overheat"
    ECC = "ecc"
    VANISH = "vanish"


NO_FAULT = "none"
FAULT_WORDS = (*(fault.value for fault in Fault), NO_FAULT)


def simulated_uuid(node: str, index: int) -> str:
    """A stable UUID in amdsmi's shape, derived from node and index so restarts keep it."""
    digest = hashlib.sha256(f"kaiwo-sim/{node}/{index}".encode()).hexdigest()
    return f"{digest[:8]}-0000-1000-80{digest[8:10]}-{digest[10:22]}"


def simulated_bdf(index: int) -> str:
    """A PCI address like an 8-GPU MI300X node's (buses 0x05, 0x25, ... 0xe5), one domain per 8."""
    domain, slot = divmod(index, GPUS_PER_PCI_DOMAIN)
    return f"{domain:04x}:{0x05 + 0x20 * slot:02x}:00.0"


@dataclass
class _GpuState:
    """Mutable per-GPU state; only touched with the backend's lock held."""

    gpu: DiscoveredGpu
    edge_c: float
    hotspot_c: float
    memory_c: float
    updated_s: float
    share: PlacedShare = field(default_factory=lambda: PlacedShare(0, 0, 0))
    faults: set[Fault] = field(default_factory=set)
    ecc_correctable_total: int = 0
    ecc_uncorrectable_total: int = 0


def _thermal_targets(activity_fraction: float) -> tuple[float, float, float]:
    edge = EDGE_IDLE_C + (EDGE_FULL_C - EDGE_IDLE_C) * activity_fraction
    hotspot = edge + HOTSPOT_OVER_EDGE_IDLE_C
    hotspot += (HOTSPOT_OVER_EDGE_FULL_C - HOTSPOT_OVER_EDGE_IDLE_C) * activity_fraction
    memory = edge + MEMORY_OVER_EDGE_IDLE_C
    memory += (MEMORY_OVER_EDGE_FULL_C - MEMORY_OVER_EDGE_IDLE_C) * activity_fraction
    return edge, hotspot, memory


def _placed_activity_fraction(share: PlacedShare) -> float:
    """Noise-free load in [0, 1]: 1000 placed millis is a fully busy GPU."""
    return min(100.0, share.millis / 10) / 100


class SimulatedBackend:
    """`count` GPUs of one known model on `node`; deterministic for a given seed and call order."""

    name = "simulated"

    def __init__(
        self,
        node: str,
        model: str,
        count: int,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        profile = GPU_MODELS.get(model)
        if profile is None:
            allowed = ", ".join(sorted(GPU_MODELS))
            raise ValueError(f"unknown simulated GPU model {model!r}; allowed: {allowed}")
        if count < 0:
            raise ValueError(f"simulated GPU count must be >= 0, got {count}")
        self._node = node
        self._profile = profile
        self._rng = random.Random(seed)
        self._clock = clock
        self._lock = threading.Lock()
        now_s = clock()
        edge, hotspot, memory = _thermal_targets(0.0)
        self._states: dict[str, _GpuState] = {}
        for index in range(count):
            gpu = _discovered(node, index, profile)
            self._states[gpu.uuid] = _GpuState(gpu, edge, hotspot, memory, now_s)
        self._gpus = tuple(state.gpu for state in self._states.values())

    @property
    def profile(self) -> GpuModel:
        return self._profile

    def discover(self) -> tuple[DiscoveredGpu, ...]:
        return self._gpus

    def read(self, gpu: DiscoveredGpu) -> GpuReading:
        with self._lock:
            state = self._states.get(gpu.uuid)
            if state is None:
                raise DeviceLostError(f"no simulated GPU {gpu.uuid} on node {self._node}")
            if Fault.VANISH in state.faults:
                raise DeviceLostError(
                    f"simulated GPU {gpu.index} ({gpu.uuid}) on node {self._node} vanished"
                )
            self._advance_thermals(state, self._clock())
            return self._sample(state)

    def close(self) -> None:
        """Nothing to release; present for the GpuBackend protocol."""

    def follow_placements(self, shares: Mapping[str, PlacedShare]) -> None:
        """Set each GPU's load; UUIDs of GPUs this node does not have are ignored."""
        for uuid, share in shares.items():
            if share.millis < 0 or share.memory_mib < 0 or share.allocations < 0:
                raise ValueError(f"placed share on {uuid} has a negative field: {share}")
        with self._lock:
            now_s = self._clock()
            for uuid, state in self._states.items():
                # Settle the thermals under the old load first, so a late read stays exact.
                self._advance_thermals(state, now_s)
                state.share = shares.get(uuid, PlacedShare(0, 0, 0))

    def inject(self, uuid: str, fault: Fault) -> None:
        """Add a fault to one GPU (it keeps any others) until `clear` removes it."""
        with self._lock:
            state = self._state(uuid)
            state.faults.add(fault)
            if fault is Fault.OVERHEAT:
                self._advance_thermals(state, self._clock())

    def clear(self, uuid: str, fault: Fault | None = None) -> None:
        """Remove one fault, or all of them; temperatures then cool back smoothly, and an
        ECC fault's uncorrectable count is reset, as the GPU reset that repairs it would."""
        with self._lock:
            state = self._state(uuid)
            self._advance_thermals(state, self._clock())  # an overheat lasts until now
            before = set(state.faults)
            if fault is None:
                state.faults.clear()
            else:
                state.faults.discard(fault)
            _reset_if_repaired(state, before)

    def faults(self, uuid: str) -> frozenset[Fault]:
        with self._lock:
            return frozenset(self._state(uuid).faults)

    def load_faults(self, path: Path) -> None:
        """Set exactly the faults a file names, clearing every other GPU's.

        The file maps a GPU UUID or index to one of "overheat", "ecc", "vanish", "none"; JSON
        when the name ends in .json, YAML otherwise; an empty file clears all faults. Invalid
        content raises ValueError and changes nothing; an unreadable file raises OSError.
        """
        wanted = self._parse_faults(path)
        with self._lock:
            now_s = self._clock()
            for uuid, state in self._states.items():
                self._advance_thermals(state, now_s)  # under the old faults up to now
                fault = wanted.get(uuid)
                before = state.faults
                state.faults = set() if fault is None else {fault}
                _reset_if_repaired(state, before)
                self._advance_thermals(state, now_s)  # pins a new overheat at once

    def _parse_faults(self, path: Path) -> dict[str, Fault | None]:
        text = path.read_text(encoding="utf-8")
        is_json = path.suffix.lower() == ".json"
        try:
            document: object = json.loads(text) if is_json else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            kind = "JSON" if is_json else "YAML"
            raise ValueError(f"faults file {path} is not valid {kind}: {error}") from error
        if document is None:
            return {}
        if not isinstance(document, dict):
            raise ValueError(
                f"faults file {path} must map a GPU UUID or index to one of "
                f"{', '.join(FAULT_WORDS)}; got a {type(document).__name__}"
            )
        wanted: dict[str, Fault | None] = {}
        for key, value in document.items():
            uuid = self._resolve_key(path, key)
            if not isinstance(value, str) or value.strip().lower() not in FAULT_WORDS:
                raise ValueError(
                    f"faults file {path}: GPU {key!r} has fault {value!r}; "
                    f"allowed: {', '.join(FAULT_WORDS)}"
                )
            word = value.strip().lower()
            fault = None if word == NO_FAULT else Fault(word)
            if uuid in wanted and wanted[uuid] != fault:
                raise ValueError(f"faults file {path}: GPU {key!r} is named twice, differently")
            wanted[uuid] = fault
        return wanted

    def _resolve_key(self, path: Path, key: object) -> str:
        if isinstance(key, str) and key in self._states:
            return key
        index: int | None = None
        if isinstance(key, int) and not isinstance(key, bool):
            index = key
        elif isinstance(key, str) and key.strip().isdigit():
            index = int(key.strip())
        if index is not None and 0 <= index < len(self._gpus):
            return self._gpus[index].uuid
        raise ValueError(
            f"faults file {path}: key {key!r} is neither a GPU index (0-{len(self._gpus) - 1}) "
            f"nor a UUID of a simulated GPU on node {self._node}"
        )

    def _state(self, uuid: str) -> _GpuState:
        state = self._states.get(uuid)
        if state is None:
            raise ValueError(f"no simulated GPU {uuid} on node {self._node}")
        return state

    def _advance_thermals(self, state: _GpuState, now_s: float) -> None:
        """Move temperatures toward their target as a first-order lag over the elapsed time."""
        elapsed_s = max(0.0, now_s - state.updated_s)
        state.updated_s = max(state.updated_s, now_s)
        edge, hotspot, memory = _thermal_targets(_placed_activity_fraction(state.share))
        pull = 1.0 - math.exp(-elapsed_s / THERMAL_TIME_CONSTANT_S)
        state.edge_c += (edge - state.edge_c) * pull
        state.hotspot_c += (hotspot - state.hotspot_c) * pull
        state.memory_c += (memory - state.memory_c) * pull
        if Fault.OVERHEAT in state.faults:
            limit_c = self._profile.hotspot_limit_c
            state.edge_c = limit_c + OVERHEAT_EDGE_OVER_LIMIT_C
            state.hotspot_c = limit_c + OVERHEAT_HOTSPOT_OVER_LIMIT_C

    def _sample(self, state: _GpuState) -> GpuReading:
        share = state.share
        rng = self._rng
        if share.millis > 0:
            noisy = 100 * _placed_activity_fraction(share) + rng.uniform(
                -GFX_NOISE_PERCENT, GFX_NOISE_PERCENT
            )
            gfx_percent = min(100, max(0, round(noisy)))
        else:
            gfx_percent = rng.randint(0, IDLE_GFX_MAX_PERCENT)
        max_power_w = float(self._profile.max_power_w)
        idle_power_w = IDLE_POWER_FRACTION * max_power_w
        vram_mib = self._profile.vram_mib
        if Fault.ECC in state.faults:
            state.ecc_uncorrectable_total += 1
            state.ecc_correctable_total += rng.randint(1, CORRECTABLE_PER_ECC_READ_MAX)
        return GpuReading(
            gfx_activity_percent=gfx_percent,
            umc_activity_percent=round(gfx_percent * UMC_PER_GFX),
            edge_temperature_c=self._jitter(state.edge_c),
            hotspot_temperature_c=self._jitter(state.hotspot_c),
            memory_temperature_c=self._jitter(state.memory_c),
            socket_power_w=float(
                round(idle_power_w + gfx_percent / 100 * (max_power_w - idle_power_w))
            ),
            power_limit_w=max_power_w,
            used_vram_mib=min(vram_mib, DRIVER_BASELINE_MIB + share.memory_mib),
            ecc_correctable_total=state.ecc_correctable_total,
            ecc_uncorrectable_total=state.ecc_uncorrectable_total,
            processes=_processes(state.gpu.index, share, vram_mib),
        )

    def _jitter(self, temperature_c: float) -> float:
        """Whole degrees, as amdsmi reports them, with a little sensor noise."""
        noise = self._rng.uniform(-TEMPERATURE_NOISE_C, TEMPERATURE_NOISE_C)
        return float(round(temperature_c + noise))


def _discovered(node: str, index: int, profile: GpuModel) -> DiscoveredGpu:
    is_mi300x = profile.name == "MI300X"
    return DiscoveredGpu(
        uuid=simulated_uuid(node, index),
        index=index,
        bdf=simulated_bdf(index),
        model=profile.name,
        vram_mib=profile.vram_mib,
        compute_units=profile.compute_units,
        compute_partition="SPX" if is_mi300x else "",
        memory_partition="NPS1" if is_mi300x else "",
    )


def _processes(index: int, share: PlacedShare, vram_mib: int) -> tuple[ProcessVram, ...]:
    """One process per placed allocation, splitting the placed memory (remainder to the first)."""
    if share.allocations == 0:
        return ()
    memory_mib = min(share.memory_mib, vram_mib)
    each_mib, remainder_mib = divmod(memory_mib, share.allocations)
    first_pid = FIRST_PID + index * PIDS_PER_GPU
    return tuple(
        ProcessVram(
            pid=first_pid + number,
            name=PROCESS_NAME,
            vram_mib=each_mib + (remainder_mib if number == 0 else 0),
        )
        for number in range(share.allocations)
    )


def _reset_if_repaired(state: _GpuState, before: set[Fault]) -> None:
    """A cleared ECC fault stands for a GPU reset: the driver's uncorrectable count is 0."""
    if Fault.ECC in before and Fault.ECC not in state.faults:
        state.ecc_uncorrectable_total = 0
