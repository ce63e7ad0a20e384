"""OpenTelemetry traces, configured the standard way and free when off.

`configure(service)` is called once by each entry point (coordinator, agent, the CLI). It
installs an SDK tracer provider with an exporter only when the standard environment asks
for one: `OTEL_TRACES_EXPORTER` (otlp, console; `none` turns tracing off) or, with it
unset, an `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
`OTEL_SERVICE_NAME` overrides the service's default name, `OTEL_TRACES_SAMPLER` (and its
argument) picks the sampler, as the SDK reads them. With nothing set, `enabled()` is False
and every helper here returns before touching OpenTelemetry, so tracing costs one boolean
test per span site. The SDK and exporter are the `otel` extra; without them a request for
an exporter logs that they are missing and tracing stays off.

W3C trace context travels in gRPC metadata (`traceparent`, `tracestate`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from kaiwo_gpu.common import logs

log = logs.get_logger(__name__)

COORDINATOR_SERVICE = "kaiwo-gpu-coordinator"
AGENT_SERVICE = "kaiwo-gpu-agent"
CLI_SERVICE = "kaiwo-gpu"
TRACER_NAME = "kaiwo_gpu"

_enabled = False


def enabled() -> bool:
    return _enabled


def _exporters(environment: Mapping[str, str]) -> list[str]:
    named = environment.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return [] if named == "none" else [part.strip() for part in named.split(",") if part]
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return ["otlp"] if any(environment.get(name) for name in endpoints) else []


def configure(service: str, environment: Mapping[str, str] | None = None) -> bool:
    """Installs a tracer provider when the environment asks for an exporter; whether it did."""
    global _enabled
    environment = os.environ if environment is None else environment
    wanted = _exporters(environment)
    if not wanted or _enabled:
        return _enabled
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        log.warning(
            "traces were asked for but the OpenTelemetry SDK is not installed; "
            "install kaiwo-gpu[otel]",
            exporters=wanted,
        )
        return False
    exporters: list[SpanExporter] = []
    for name in wanted:
        if name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("the OTLP exporter is not installed; install kaiwo-gpu[otel]")
                continue
            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER entry ignored", exporter=name)
    if not exporters:
        return False
    name = environment.get("OTEL_SERVICE_NAME", "").strip() or service
    # Not at exit by the SDK's own hook, which waits up to 30 s for an unreachable
    # collector: `shutdown` below bounds the wait.
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}), shutdown_on_exit=False
    )
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


SHUTDOWN_TIMEOUT_S = 2.0
"""How long a process waits on its way out for its last spans to leave. OpenTelemetry's
own shutdown waits for the exporter's retries (up to 30 s with a collector that does not
answer); a CLI command, or a coordinator told to stop, must not."""


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """Flushes what is queued (a command's spans, before the process exits), waiting at
    most `timeout_s`; whether it finished. What is still in flight then is dropped: the
    SDK's threads are daemons and do not hold the exit."""
    if not _enabled:
        return True
    from opentelemetry import trace

    provider: Any = trace.get_tracer_provider()

    def flush() -> None:
        with contextlib.suppress(Exception):
            provider.shutdown()

    flushing = threading.Thread(target=flush, name="otel-shutdown", daemon=True)
    flushing.start()
    flushing.join(timeout_s)
    return not flushing.is_alive()


def quiet_exporter_logs() -> None:
    """Keeps OpenTelemetry's own log lines (an export that failed, a retry) off the
    terminal: a CLI command's stderr is the user's, and a collector that is down is not
    what they asked about. Services keep them in their logs."""
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL + 1)


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: str = "internal",
    parent: object | None = None,
    links: Sequence[object] = (),
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """A span around the block (None when tracing is off). `parent` is a context from
    `current_context()` or `extracted()`; `links` are such contexts too (a batch decided
    for several requests is a child of the first and links the others)."""
    if not _enabled:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind

    span_links = [
        Link(trace.get_current_span(context).get_span_context())  # type: ignore[arg-type]
        for context in links
    ]
    with _tracer().start_as_current_span(
        name,
        context=parent,
        kind=getattr(SpanKind, kind.upper()),
        links=span_links,
        attributes=dict(attributes or {}),
    ) as current:
        yield current


def set_attributes(current: Any, attributes: Mapping[str, Any]) -> None:
    if current is not None:
        current.set_attributes(dict(attributes))


def record_error(current: Any, code: str, message: str) -> None:
    """Marks a span failed with the status a call ended in."""
    if current is None:
        return
    from opentelemetry.trace import Status, StatusCode

    current.set_attribute("rpc.grpc.status_code", code)
    current.set_status(Status(StatusCode.ERROR, message[:256]))


def current_context() -> object | None:
    """The active context, to hand to work another task does (None when tracing is off)."""
    if not _enabled:
        return None
    from opentelemetry import context

    return context.get_current()


def injected() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the active span's W3C context (nothing when tracing is off)."""
    if not _enabled:
        return ()
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def extracted(metadata: Iterable[Any] | None) -> object | None:
    """The context a caller sent in its gRPC metadata (None when tracing is off).

    As W3C Trace Context reads headers: several `tracestate` values join with commas, and
    more than one `traceparent` is no parent at all (a new trace), not whichever came last.
    """
    if not _enabled:
        return None
    from opentelemetry import propagate

    sent: dict[str, list[str]] = {"traceparent": [], "tracestate": []}
    for key, value in metadata or ():
        if key in sent:
            sent[key].append(value.decode() if isinstance(value, bytes) else value)
    if len(sent["traceparent"]) != 1:
        return propagate.extract({})
    return propagate.extract(
        {"traceparent": sent["traceparent"][0], "tracestate": ",".join(sent["tracestate"])}
    )


def log_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: `trace_id` and `span_id` on every line logged inside a span."""
    if not _enabled:
        return event
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event
