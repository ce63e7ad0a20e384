"""/metrics over HTTP for the coordinator and the agent: prometheus-client's own server, on
its own thread, serving one registry (never the process-wide default, so several services in
one process, as `kaiwo-gpu up` and the tests run them, keep their series apart)."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.registry import Collector

from kaiwo_gpu.common.errors import UnavailableError


class MetricsServer:
    def __init__(self, *collectors: Collector) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created`: noise
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in collectors:
            self.registry.register(collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self, listen: str) -> int:
        """Serves on `listen` (host:port; port 0 picks a free one); the port it took. Once
        serving, it stays where it is (so `up` can choose the port before the service
        starts)."""
        if self._server is not None:
            return self.port
        host, _, port = listen.rpartition(":")
        try:
            self._server, self._thread = start_http_server(
                int(port), addr=host.strip("[]"), registry=self.registry
            )
        except (OSError, ValueError) as error:
            detail = error.strerror if isinstance(error, OSError) else str(error)
            raise UnavailableError(f"cannot serve metrics on {listen}: {detail}") from None
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


def start_preferring(server: MetricsServer, host: str, port: int) -> int:
    """Serves on host:port, or on a free port of `host` when that one is taken."""
    try:
        return server.start(f"{host}:{port}")
    except UnavailableError:
        return server.start(f"{host}:0")
