"""The coordinator process: etcd store, cluster view, allocator and the gRPC server around them.

`Coordinator.start()` / `stop()` serve tests in-process; `run()` is the command's main loop,
which stops gracefully on SIGTERM or SIGINT (health goes NOT_SERVING, in-flight calls get
`shutdown_grace_s` to finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable

import grpc
import structlog

try:  # not built for Windows; the coordinator runs on asyncio's own loop there
    import uvloop
except ImportError:  # pragma: no cover - Linux and macOS have it
    uvloop = None  # type: ignore[assignment]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from kaiwo_gpu.common import keepalive
from kaiwo_gpu.common.errors import InvalidArgumentError, KaiwoGpuError, UnavailableError
from kaiwo_gpu.common.metrics_http import MetricsServer
from kaiwo_gpu.coordinator.allocator import Allocator, AllocatorSettings
from kaiwo_gpu.coordinator.api.agent_servicer import AgentServicer, AgentStreamSettings
from kaiwo_gpu.coordinator.api.allocation_servicer import AllocationServicer
from kaiwo_gpu.coordinator.api.callers import Callers
from kaiwo_gpu.coordinator.api.decode_errors import DecodeErrorsAreInvalidArgument
from kaiwo_gpu.coordinator.api.rpc_observer import RpcObserver
from kaiwo_gpu.coordinator.api.tokens import TokenFile
from kaiwo_gpu.coordinator.instruments import Instruments
from kaiwo_gpu.coordinator.metrics import CoordinatorCollector, Sources
from kaiwo_gpu.coordinator.node_expiry import NodeExpiry
from kaiwo_gpu.coordinator.placement.strategies import BUILTIN_STRATEGIES, StrategyRegistry
from kaiwo_gpu.coordinator.settings import CoordinatorSettings
from kaiwo_gpu.coordinator.state.inventory import load_inventory
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.registration import register_nodes
from kaiwo_gpu.coordinator.state.space import space_warning
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.coordinator.transport import ServingCertificates, check_plaintext
from kaiwo_gpu.v1 import agent_pb2, agent_pb2_grpc, allocation_pb2, allocation_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = allocation_pb2.DESCRIPTOR.services_by_name["AllocationService"].full_name
AGENT_SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop the coordinator serves on: uvloop's (a dependency but on Windows).

    grpc.aio runs on any asyncio loop (its poller hands completions to whichever loop made
    the server); on uvloop the coordinator spent less CPU per allocation under 32 clients
    (`python -m bench allocate`, docs/performance.md).
    """
    return asyncio.new_event_loop() if uvloop is None else uvloop.new_event_loop()


def serve(settings: CoordinatorSettings, strategies: StrategyRegistry = BUILTIN_STRATEGIES) -> None:
    """Runs one coordinator until SIGTERM or SIGINT, on `new_event_loop()`'s loop (the
    command's main loop; it is built inside the loop, as grpc.aio objects belong to the
    loop that creates them)."""

    async def main() -> None:
        await Coordinator(settings, strategies).run()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())


class Coordinator:
    """One coordinator process. `strategies` is the registry placement chooses from (the
    built-ins unless a deployment adds its own); the default strategy must be one of them."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        strategies: StrategyRegistry = BUILTIN_STRATEGIES,
    ) -> None:
        if settings.default_strategy not in strategies:
            raise InvalidArgumentError(
                "--strategy", settings.default_strategy, ", ".join(sorted(strategies))
            )
        self.settings = settings
        self.layout = KeyLayout(settings.prefix)
        self.store = EtcdStore(
            settings.etcd_endpoints,
            timeout_s=settings.etcd_timeout_s,
            security=settings.etcd_security,
        )
        self.view = ClusterView(self.store, self.layout)
        self.instruments = Instruments()
        self.allocator = Allocator(
            self.store,
            self.view,
            self.layout,
            AllocatorSettings(
                default_strategy=settings.default_strategy,
                default_ttl_s=settings.default_ttl_s,
                strategies=strategies,
            ),
            instruments=self.instruments,
        )
        self.health = HealthServicer()
        # Read here, so a bad token file or certificate stops the coordinator before it binds.
        self.certificates = ServingCertificates(settings.tls) if settings.tls.tls else None
        self.callers = Callers(
            TokenFile(settings.tokens) if settings.tokens else None,
            client_certificates=settings.tls.tls_ca is not None,
        )
        self.server = grpc.aio.server(
            # Observed outermost, so a request that does not decode is counted and traced too.
            interceptors=[RpcObserver(self.instruments), DecodeErrorsAreInvalidArgument()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # gRPC shares ports by default: a second coordinator on the same address
                # would start "fine" and take half the traffic. Refuse instead.
                ("grpc.so_reuseport", 0),
                *keepalive.SERVER_OPTIONS,
            ],
        )
        self.agents = AgentServicer(
            self.store,
            self.view,
            self.layout,
            AgentStreamSettings(
                node_ttl_s=settings.node_ttl_s, sample_interval_ms=settings.sample_interval_ms
            ),
            callers=self.callers,
        )
        self.node_expiry = (
            NodeExpiry(self.store, self.view, settings.agentless_node_expiry_s)
            if settings.agentless_node_expiry_s
            else None
        )
        self.space_warning = ""
        """What `state.space` says of etcd's database size at the last check ("": fine)."""
        self._space_task: asyncio.Task[None] | None = None
        allocation_pb2_grpc.add_AllocationServiceServicer_to_server(
            AllocationServicer(self.allocator, self.view, self.callers, lambda: self.space_warning),
            self.server,
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self.agents, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                AGENT_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = 0
        self._background: set[asyncio.Task[None]] = set()
        self._collector = CoordinatorCollector(
            Sources(self.view, self.agents.connected_nodes, lambda: self.space_warning),
            self.instruments,
        )
        with contextlib.suppress(RuntimeError):  # built inside the loop it will run on
            self._collector.loop = asyncio.get_running_loop()
        self.metrics = MetricsServer(self._collector, texts=[self._collector.families])

    async def _connect(self) -> None:
        """Waits up to `startup_wait_s` for etcd, so a coordinator may start before it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.startup_wait_s
        delay = 0.1
        nodes = load_inventory(self.settings.inventory) if self.settings.inventory else None
        while True:
            try:
                if nodes is not None:
                    await register_nodes(self.store, self.layout, nodes)
                await self.view.start()
                return
            except UnavailableError as error:
                if loop.time() + delay > deadline:
                    raise UnavailableError(
                        f"{error.message} (waited {self.settings.startup_wait_s:g}s at startup)"
                    ) from None
                log.warning("waiting for etcd", error=error.message, retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _report_etcd(self, connected: bool) -> None:
        """Health follows the etcd watch, so load balancers and probes stop sending work."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if connected
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        log.warning("etcd watch " + ("restored" if connected else "lost"), etcd=self.store.target)
        task = asyncio.create_task(self.health.set(SERVICE_NAME, status))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _bind(self) -> None:
        """Takes the listen address first, so a taken port fails before etcd is touched."""
        listen = self.settings.listen
        try:
            if self.certificates is not None:
                self.port = self.server.add_secure_port(
                    listen, self.certificates.server_credentials()
                )
            else:
                check_plaintext(listen, self.settings.insecure)
                self.port = self.server.add_insecure_port(listen)
        except RuntimeError as error:
            self.port = 0
            detail = str(error)
        else:
            detail = "the address is taken or invalid"
        if not self.port:
            raise UnavailableError(f"cannot listen on {self.settings.listen}: {detail}")

    async def start(self) -> int:
        """Binds, connects to etcd, loads the view and starts serving; returns the port."""
        self._bind()
        self._collector.loop = asyncio.get_running_loop()
        if self.settings.metrics_listen:
            self.metrics.start(self.settings.metrics_listen)
        await self._connect()
        self.view.on_connected_change = self._report_etcd
        self.allocator.start()
        self.agents.start(f"{socket.gethostname()}:{self.port}/{os.getpid()}")
        await self.server.start()
        self._space_task = asyncio.create_task(self._watch_space(), name="etcd-space")
        if self.node_expiry is not None:
            self.node_expiry.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "coordinator serving",
            listen=self.settings.listen,
            port=self.port,
            etcd=self.store.target,
            prefix=self.settings.prefix,
            nodes=len(self.view.state.nodes),
            allocations=len(self.view.state.allocations),
            metrics_port=self.metrics.port or None,
            tls=self.certificates is not None,
            client_certificates=self.callers.client_certificates,
            tokens=str(self.settings.tokens) if self.settings.tokens else None,
            event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        if not self.callers.enabled:
            log.warning(
                "authorization is off: every caller may do everything (give --tls-ca for "
                "client certificates or --tokens for bearer tokens)"
            )
        return self.port

    async def _watch_space(self) -> None:
        """Reads etcd's database size every `space_check_s` and warns before the quota."""
        while True:
            try:
                size = await self.store.db_size()
            except KaiwoGpuError:
                pass  # etcd away: the watch says so, and health turns NOT_SERVING
            else:
                warning = space_warning(size, self.settings.etcd_quota_bytes)
                if warning:
                    log.warning("etcd is running out of space", detail=warning)
                elif self.space_warning:
                    log.info("etcd has room again", db_size_bytes=size)
                self.space_warning = warning
            await asyncio.sleep(self.settings.space_check_s)

    async def stop(self) -> None:
        if self._space_task is not None:
            self._space_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._space_task
        if self.node_expiry is not None:
            await self.node_expiry.stop()
        await self.health.enter_graceful_shutdown()
        await self.agents.stop()
        await self.server.stop(self.settings.shutdown_grace_s)
        await self.allocator.stop()
        await self.view.stop()
        await self.store.close()
        self.metrics.stop()
        log.info("coordinator stopped", commit_conflicts=self.allocator.conflicts)

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serves until SIGTERM or SIGINT."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        starting = asyncio.create_task(self.start())
        signalled = asyncio.create_task(stopping.wait())
        await asyncio.wait((starting, signalled), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal while waiting for etcd: stop at once
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            signalled.cancel()
            log.info("coordinator stopped before it was serving")
            await self.stop()
            return
        if starting.exception() is not None:
            signalled.cancel()
            with contextlib.suppress(Exception):
                await self.stop()
            starting.result()  # raises what start raised
        if on_ready is not None:
            on_ready()
        await signalled
        log.info("coordinator stopping", grace_s=self.settings.shutdown_grace_s)
        await self.stop()
