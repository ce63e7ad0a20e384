"""One tick of the agent: read every GPU, judge its health, and make the batch to send.

Backends block (amdsmi is a C library), so reads run in a daemon thread of their own: a
read that hangs in the driver can neither stall the event loop nor keep the process from
exiting on SIGTERM. A read that is still running when the next tick comes is not started
twice: its GPUs keep their last verdict until the sample counts as stale, and then they
are unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from kaiwo_gpu.agent.backend import DeviceLostError, DiscoveredGpu, GpuBackend, GpuReading
from kaiwo_gpu.agent.health import GpuHealth, classify, initial, limits_for, stale
from kaiwo_gpu.common.names import MAX_REASON_CHARS, escaped
from kaiwo_gpu.common.telemetry_limits import (
    MAX_PERCENT,
    MAX_PROCESS_NAME,
    MAX_PROCESSES,
    POWER_W,
    TEMPERATURE_C,
    within,
)
from kaiwo_gpu.common.wire import health_to_proto
from kaiwo_gpu.v1 import agent_pb2, types_pb2

log = structlog.get_logger(__name__)


def inventory_proto(gpu: DiscoveredGpu) -> types_pb2.GpuInventory:
    return types_pb2.GpuInventory(
        uuid=gpu.uuid,
        index=gpu.index,
        bdf=gpu.bdf,
        model=gpu.model,
        vram_mib=gpu.vram_mib,
        compute_units=gpu.compute_units,
        compute_partition=gpu.compute_partition,
        memory_partition=gpu.memory_partition,
    )


def _text(text: str, max_chars: int) -> str:
    """Text the coordinator takes: escaped (a process may name itself anything) and cut, so
    one odd process name does not get the node's whole batch refused."""
    return escaped(text)[:max_chars]


def _believable(value: float | None, bounds: tuple[float, float]) -> float | None:
    return value if value is not None and within(value, bounds) else None


def telemetry_proto(
    reading: GpuReading, sampled_at: Timestamp, vram_mib: int
) -> types_pb2.GpuTelemetry:
    """The wire form of a reading. Values a device does not report stay unset, and so do
    values outside what the coordinator believes: a sensor glitch must not get a whole
    batch refused (and the node's stream with it)."""
    telemetry = types_pb2.GpuTelemetry(sampled_at=sampled_at)
    for name in ("gfx_activity_percent", "umc_activity_percent"):
        value = getattr(reading, name)
        if value is not None:
            setattr(telemetry, name, min(max(int(value), 0), MAX_PERCENT))
    for name in ("edge_temperature_c", "hotspot_temperature_c", "memory_temperature_c"):
        value = _believable(getattr(reading, name), TEMPERATURE_C)
        if value is not None:
            setattr(telemetry, name, value)
    for name in ("socket_power_w", "power_limit_w"):
        value = _believable(getattr(reading, name), POWER_W)
        if value is not None:
            setattr(telemetry, name, value)
    if reading.used_vram_mib is not None and 0 <= reading.used_vram_mib <= vram_mib:
        telemetry.used_vram_mib = reading.used_vram_mib
    for name in ("ecc_correctable_total", "ecc_uncorrectable_total"):
        value = getattr(reading, name)
        if value is not None and value >= 0:
            setattr(telemetry, name, int(value))
    believable = [process for process in reading.processes if 0 <= process.vram_mib <= vram_mib]
    believable.sort(key=lambda process: -process.vram_mib)
    for process in believable[:MAX_PROCESSES]:
        telemetry.processes.add(
            pid=process.pid, name=_text(process.name, MAX_PROCESS_NAME), vram_mib=process.vram_mib
        )
    return telemetry


def read_all(backend: GpuBackend, gpus: Sequence[DiscoveredGpu]) -> dict[str, GpuReading | None]:
    """Every GPU's reading; None for a GPU that is gone, and no entry for one whose read
    failed some other way (a backend bug): its verdict holds until the sample is stale."""
    readings: dict[str, GpuReading | None] = {}
    for gpu in gpus:
        try:
            readings[gpu.uuid] = backend.read(gpu)
        except DeviceLostError:
            readings[gpu.uuid] = None
        except Exception:  # a backend bug: no sample for this GPU, keep the others
            log.exception("reading a GPU failed", uuid=gpu.uuid, backend=backend.name)
    return readings


class NodeSampler:
    """Keeps each GPU's health between ticks and turns readings into telemetry batches."""

    def __init__(
        self,
        backend: GpuBackend,
        gpus: Sequence[DiscoveredGpu],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.backend = backend
        self.gpus = tuple(gpus)
        self.clock = clock
        self.wall_clock = wall_clock
        self.limits = {gpu.uuid: limits_for(gpu.model) for gpu in gpus}
        self.last_batch: agent_pb2.TelemetryBatch | None = None
        """The latest tick's batch, for /metrics."""
        started = clock()
        self.health: dict[str, GpuHealth] = {gpu.uuid: initial(started) for gpu in gpus}
        self._reading: asyncio.Future[dict[str, GpuReading | None]] | None = None

    @property
    def reading(self) -> bool:
        """Whether a backend read is still in flight (then the backend must not be closed)."""
        return self._reading is not None and not self._reading.done()

    def _start_read(self) -> asyncio.Future[dict[str, GpuReading | None]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, GpuReading | None]] = loop.create_future()

        def settle(
            outcome: dict[str, GpuReading | None] | None, error: BaseException | None
        ) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(outcome or {})

        def work() -> None:
            try:
                outcome = read_all(self.backend, self.gpus)
            except BaseException as error:  # handed to the event loop, not lost
                with contextlib.suppress(RuntimeError):  # the loop is gone: exiting
                    loop.call_soon_threadsafe(settle, None, error)
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, outcome, None)

        threading.Thread(target=work, name="gpu-read", daemon=True).start()
        return future

    async def sample(self, wait_s: float) -> agent_pb2.TelemetryBatch:
        """Reads all GPUs (waiting at most `wait_s` for the backend) and makes a batch."""
        if self._reading is None or self._reading.done():
            self._reading = self._start_read()
        readings: dict[str, GpuReading | None] | None = None
        try:
            readings = await asyncio.wait_for(asyncio.shield(self._reading), wait_s)
        except TimeoutError:
            readings = None  # the backend hangs: health turns stale below
        return self.judge(readings)

    def judge(self, readings: Mapping[str, GpuReading | None] | None) -> agent_pb2.TelemetryBatch:
        """Health verdicts for this tick and the batch that carries them."""
        now = self.clock()
        stamp = Timestamp()
        stamp.FromDatetime(self.wall_clock())
        batch = agent_pb2.TelemetryBatch(sampled_at=stamp)
        for gpu in self.gpus:
            limits = self.limits[gpu.uuid]
            previous = self.health[gpu.uuid]
            sampled = readings is not None and gpu.uuid in readings
            reading = readings.get(gpu.uuid) if readings is not None else None
            if sampled:
                verdict = classify(previous, reading, now, limits)
            else:
                verdict = stale(previous, now, limits)
            self.health[gpu.uuid] = verdict
            sample = batch.samples.add(
                uuid=gpu.uuid,
                health=health_to_proto(verdict.health),
                health_reason=_text(verdict.reason, MAX_REASON_CHARS),
            )
            if reading is not None:  # lost or not read this tick: no telemetry to send
                sample.telemetry.CopyFrom(telemetry_proto(reading, stamp, gpu.vram_mib))
        self.last_batch = batch
        return batch
