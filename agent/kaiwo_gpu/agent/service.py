"""The node agent process: open the backend, discover the GPUs, and keep the uplink up.

`--backend auto` means amdsmi, and when amdsmi cannot load the agent fails with the reason
and the fix; the simulated backend runs only when asked for, so a broken ROCm install is
never hidden behind a demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from kaiwo_gpu.agent.amdsmi_backend import AmdSmiBackend
from kaiwo_gpu.agent.backend import (
    BackendUnavailableError,
    DeviceLostError,
    FollowsPlacements,
    GpuBackend,
    PlacedShare,
)
from kaiwo_gpu.agent.metrics import AgentMetrics
from kaiwo_gpu.agent.sampler import NodeSampler, inventory_proto
from kaiwo_gpu.agent.simulated import SimulatedBackend
from kaiwo_gpu.agent.uplink import Uplink
from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import FailedPreconditionError
from kaiwo_gpu.common.metrics_http import MetricsServer
from kaiwo_gpu.common.names import AGENT_BACKENDS
from kaiwo_gpu.v1 import agent_pb2

log = structlog.get_logger(__name__)

AGENT_VERSION = "0.1.0"
BACKEND_CHOICES = ("auto", *AGENT_BACKENDS)
"""What --backend takes: auto means amdsmi."""
ENVIRONMENT = {
    "node": "KAIWO_GPU_NODE",
    "coordinator": "KAIWO_GPU_COORDINATOR",
    "backend": "KAIWO_GPU_AGENT_BACKEND",
    "interval": "KAIWO_GPU_SAMPLE_INTERVAL",
    "labels": "KAIWO_GPU_NODE_LABELS",
    "log_format": "KAIWO_GPU_LOG_FORMAT",
    "metrics_listen": "KAIWO_GPU_METRICS_LISTEN",
    **credentials.VARIABLES,
}
"""Flag destination -> environment variable that supplies its default."""


@dataclass(frozen=True, slots=True)
class AgentSettings:
    node: str
    coordinators: tuple[str, ...]
    backend: str = "auto"
    interval_ms: int = 1000
    labels: tuple[tuple[str, str], ...] = ()
    simulated_model: str = "MI300X"
    simulated_gpus: int = 8
    faults_file: Path | None = None
    seed: int = 0
    metrics_listen: str | None = None
    """host:port to serve Prometheus /metrics on (None: no metrics server)."""
    credentials: Credentials = field(default_factory=Credentials)
    """The certificate (`kaiwo-gpu://agent/NODE`) or token the agent proves its node with."""


def open_backend(settings: AgentSettings) -> GpuBackend:
    if settings.backend == "simulated":
        return SimulatedBackend(
            node=settings.node,
            model=settings.simulated_model,
            count=settings.simulated_gpus,
            seed=settings.seed,
        )
    return AmdSmiBackend()  # loads the library at discovery


class NodeAgent:
    """One node's agent: its backend, sampler and uplink."""

    def __init__(self, settings: AgentSettings, backend: GpuBackend | None = None) -> None:
        self.settings = settings
        self.backend = backend if backend is not None else open_backend(settings)
        try:
            gpus = self.backend.discover()
        except (BackendUnavailableError, DeviceLostError) as error:
            self.backend.close()
            hint = (
                " (--backend auto means amdsmi; it never falls back to simulated GPUs)"
                if settings.backend == "auto"
                else ""
            )
            raise FailedPreconditionError(f"{error}{hint}") from None
        for why in getattr(self.backend, "skipped", ()):
            log.warning("GPU left out at discovery", node=settings.node, reason=why)
        usable = tuple(gpu for gpu in gpus if gpu.vram_mib > 0 and gpu.compute_units > 0)
        for gpu in gpus:
            if gpu not in usable:  # the coordinator could not account for it
                log.warning(
                    "GPU reports no VRAM size or compute unit count; left out",
                    node=settings.node,
                    uuid=gpu.uuid,
                    index=gpu.index,
                )
        gpus = usable
        if not gpus:
            self.backend.close()
            raise FailedPreconditionError(
                f"the {self.backend.name} backend found no GPUs on this node"
            )
        self.gpus = gpus
        self.sampler = NodeSampler(self.backend, gpus)
        register = agent_pb2.Register(
            node=settings.node,
            labels=dict(settings.labels),
            gpus=[inventory_proto(gpu) for gpu in gpus],
            agent_version=AGENT_VERSION,
            backend=self.backend.name,
        )
        self.uplink = Uplink(
            settings.coordinators,
            register,
            self.sampler,
            interval_ms=settings.interval_ms,
            on_placements=self._follow_placements,
            before_tick=self._load_faults,
            held=settings.credentials,
        )
        self._faults_mtime: float | None = None
        agent_metrics = AgentMetrics(settings.node, register.gpus, self.sampler, self.uplink.status)
        self.metrics = MetricsServer(texts=[agent_metrics.families])

    def _follow_placements(self, shares: Mapping[str, PlacedShare]) -> None:
        if isinstance(self.backend, FollowsPlacements):
            self.backend.follow_placements(shares)

    def _load_faults(self) -> None:
        """Re-reads the simulated backend's fault file when it changed (tests and demos)."""
        path = self.settings.faults_file
        if path is None or not isinstance(self.backend, SimulatedBackend):
            return
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = None
        if mtime == self._faults_mtime:
            return
        self._faults_mtime = mtime
        try:
            if mtime is None:  # the file is gone: no faults
                for gpu in self.gpus:
                    self.backend.clear(gpu.uuid)
            else:
                self.backend.load_faults(path)
        except (OSError, ValueError) as error:
            log.warning("fault file ignored", path=str(path), error=str(error))
            return
        log.info("simulated faults loaded", node=self.settings.node, path=str(path))

    async def run(self, stop: asyncio.Event) -> None:
        if self.settings.metrics_listen:
            self.metrics.start(self.settings.metrics_listen)
        log.info(
            "agent starting",
            node=self.settings.node,
            backend=self.backend.name,
            gpus=len(self.gpus),
            coordinators=list(self.settings.coordinators),
            metrics_port=self.metrics.port or None,
        )
        try:
            await self.uplink.run(stop)
        finally:
            self.metrics.stop()
            if self.sampler.reading:  # closing a library under a running call is unsafe
                log.warning("a GPU read is still running; leaving the backend open")
            else:
                self.backend.close()
            log.info("agent stopped", node=self.settings.node)


async def run_until_signalled(agent: NodeAgent) -> None:
    """The `kaiwo-gpu agent` main loop: SIGTERM or SIGINT closes the stream cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await agent.run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
