"""/metrics over HTTP for the coordinator and the agent: prometheus-client's WSGI app, on
a thread of its own, serving one registry (never the process-wide default, so several
services in one process, as `kaiwo-gpu up` and the tests run them, keep their series apart),
followed by the large gauge families `metrics_text` writes.

The library's app answers (content negotiation, `name[]`, OPTIONS, errors); this wraps it
only to add those families to a 200 answer, before OpenMetrics's `# EOF`, and to gzip the
whole when the scraper accepts it (Prometheus always does), at a level that costs a 10 MB
answer tens of milliseconds rather than the library's level 9.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, gzip_accepted
from prometheus_client.registry import Collector

from kaiwo_gpu.common.errors import UnavailableError
from kaiwo_gpu.common.metrics_text import Family

log = structlog.get_logger(__name__)

TextSource = Callable[[], Iterable[Family]]
"""Families to serve after the registry's, read anew at each scrape."""

OPENMETRICS_END = b"# EOF\n"
GZIP_LEVEL = 1


class _QuietHandler(WSGIRequestHandler):
    timeout = 30
    """Seconds a connection may sit unread (socket timeout): a scraper that sends a request
    and never reads the answer would otherwise hold the answer (20 MB on 2,000 nodes) and a
    thread for as long as it stays connected."""

    def log_message(self, format: str, *args: Any) -> None:  # the base's name
        """A scrape is not worth a log line."""


class MetricsServer:
    def __init__(self, *collectors: Collector, texts: Sequence[TextSource] = ()) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created`: noise
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in collectors:
            self.registry.register(collector)
        self._texts = tuple(texts)
        self._library_app = make_wsgi_app(self.registry, disable_compression=True)
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
            family, _, _, _, address = socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]

            class Server(ThreadingWSGIServer):
                address_family = family

            self._server = make_server(
                str(address[0]), int(port), self.app, Server, handler_class=_QuietHandler
            )
        except (OSError, ValueError) as error:
            detail = error.strerror if isinstance(error, OSError) else str(error)
            raise UnavailableError(f"cannot serve metrics on {listen}: {detail}") from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        self.port = int(self._server.server_port)
        return self.port

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """The library's answer, with the text sources' families added to a scrape."""
        answered: list[tuple[str, list[tuple[str, str]]]] = []

        def keep(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            answered.append((status, headers))

        body = b"".join(self._library_app(environ, keep))
        status, headers = answered[0]
        content_type = dict(headers).get("Content-Type", "")
        if status.startswith("200") and content_type:  # a scrape, not OPTIONS or the favicon
            wanted = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
            try:
                extra = "".join(
                    family.text
                    for source in self._texts
                    for family in source()
                    if wanted is None or family.name in wanted
                ).encode()
            except UnavailableError as error:  # the service could not be read in time
                log.warning("a scrape was not answered", reason=error.message)
                start_response(
                    "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")]
                )
                return [f"{error.message}\n".encode()]
            if body.endswith(OPENMETRICS_END):
                body = body[: -len(OPENMETRICS_END)] + extra + OPENMETRICS_END
            else:
                body += extra
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
                headers = [*headers, ("Content-Encoding", "gzip")]
        start_response(status, headers)
        return [body]

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
