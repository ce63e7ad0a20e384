"""Traces across processes: a real OTLP receiver gets one trace per request from the CLI and
the coordinator, with the decision and the etcd transaction inside the coordinator's span.

The receiver is a gRPC server implementing the collector's TraceService (from
opentelemetry-proto) on 127.0.0.1; the CLI and the coordinator are subprocesses configured
only by the standard OTEL_* environment, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from kaiwo_gpu.common import tracing
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from tests.agents import eventually

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for pair in self.span.attributes:
            kind = pair.value.WhichOneof("value")
            found[pair.key] = getattr(pair.value, kind) if kind else None
        return found


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ReceivedSpan] = field(default_factory=list)

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                self.spans.extend(ReceivedSpan(service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    """The receiver, and the standard environment pointing this test's processes at it."""
    server = grpc.aio.server()
    servicer = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export soon
    try:
        yield servicer
    finally:
        await server.stop(None)


def test_with_nothing_set_no_exporter_is_installed() -> None:
    assert tracing._exporters({}) == []
    assert tracing._exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing._exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) == ["otlp"]
    assert tracing._exporters({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]
    assert tracing.configure("test", {}) is False
    assert not tracing.enabled()
    assert tracing.injected() == ()
    with tracing.span("nothing") as span:
        assert span is None


async def cli_allocate(coordinator: str) -> tuple[str, str]:
    """`kaiwo-gpu allocate --fraction 0.5` as a subprocess in this environment: the id it
    printed, and its stderr."""
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kaiwo_gpu.cli.main",
        "allocate",
        "--fraction",
        "0.5",
        "--coordinator",
        coordinator,
        "-o",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ},
    )
    out, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, err.decode()
    return str(json.loads(out)["id"]), err.decode()


PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("metadata", "trace_id"),
    [
        ([("traceparent", PARENT)], 0x0AF7651916CD43DD8448EB211C80319C),
        ([("traceparent", PARENT.encode())], 0x0AF7651916CD43DD8448EB211C80319C),
        ([("traceparent", PARENT), ("traceparent", OTHER)], None),  # review: last won
        ([("traceparent", "garbage!!")], None),
        ([], None),
    ],
)
def test_a_caller_sends_one_parent_or_none(
    metadata: list[tuple[str, str | bytes]], trace_id: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "_enabled", True)  # the API alone extracts; no provider
    context = trace.get_current_span(tracing.extracted(metadata)).get_span_context()  # type: ignore[arg-type]
    assert (context.trace_id if context.is_valid else None) == trace_id


def test_tracestate_sent_in_pieces_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_enabled", True)
    metadata = [("traceparent", PARENT), ("tracestate", "a=1"), ("tracestate", "b=2")]
    context = trace.get_current_span(tracing.extracted(metadata)).get_span_context()  # type: ignore[arg-type]
    assert dict(context.trace_state) == {"a": "1", "b": "2"}


async def test_one_allocate_is_one_trace_across_the_cli_and_the_coordinator(
    etcd: LocalEtcd,
    prefix: str,
    inventory: Path,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    spans = receiver
    log = tmp_path / "coordinator.log"
    coordinator = CoordinatorProcess(etcd.endpoint, prefix, inventory, log)
    coordinator.start()
    try:
        await coordinator.wait_serving()
        allocation_id, _ = await cli_allocate(coordinator.address)

        def by_name(name: str, service: str) -> list[ReceivedSpan]:
            return [s for s in spans.spans if s.span.name == name and s.service == service]

        allocate = "kaiwo_gpu.v1.AllocationService/Allocate"

        async def all_there() -> bool | None:
            wanted = (
                by_name(allocate, "kaiwo-gpu"),
                by_name(allocate, "kaiwo-gpu-coordinator"),
                by_name("kaiwo_gpu.decide", "kaiwo-gpu-coordinator"),
                by_name("etcd txn", "kaiwo-gpu-coordinator"),
            )
            return True if all(wanted) else None

        await eventually(all_there, timeout_s=30)
        (client,) = by_name(allocate, "kaiwo-gpu")
        (server,) = by_name(allocate, "kaiwo-gpu-coordinator")
        (decision,) = by_name("kaiwo_gpu.decide", "kaiwo-gpu-coordinator")
        txn = by_name("etcd txn", "kaiwo-gpu-coordinator")[0]
        trace_id = client.span.trace_id
        assert {s.span.trace_id for s in (server, decision, txn)} == {trace_id}
        assert client.span.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert server.span.kind == trace_pb2.Span.SPAN_KIND_SERVER
        assert server.span.parent_span_id == client.span.span_id
        assert decision.span.parent_span_id == server.span.span_id
        assert txn.span.parent_span_id == server.span.span_id
        assert txn.attributes["db.system"] == "etcd"
        assert decision.attributes["kaiwo_gpu.strategy"] == "best-fit"
        assert decision.attributes["kaiwo_gpu.placed"] == 1
        assert decision.attributes["kaiwo_gpu.gpus_considered"] == 6
        assert server.attributes["rpc.grpc.status_code"] == "OK"

        # Logs and traces join up: the coordinator's "allocated" line names the trace.
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        (allocated,) = [line for line in lines if line.get("allocation_id") == allocation_id]
        assert allocated["trace_id"] == trace_id.hex()
        assert allocated["span_id"] == server.span.span_id.hex()
    finally:
        coordinator.stop()


@pytest.fixture
def silent_collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A port on 127.0.0.1 that takes connections and never answers: a collector that hangs.
    The standard environment points this test's processes at it with a 30 s export timeout,
    which OpenTelemetry's own shutdown waits out, retries and all."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nobody reads
        port = listener.getsockname()[1]
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: the coordinator tries soon
        yield port


async def test_a_collector_that_hangs_holds_neither_the_cli_nor_the_coordinator(
    etcd: LocalEtcd, prefix: str, inventory: Path, tmp_path: Path, silent_collector: int
) -> None:
    """Review finding: with a collector that did not answer, a CLI command took 7-10 s to
    exit and printed OpenTelemetry's retries on stderr, and a coordinator took about 30 s
    to stop after SIGTERM. Both now wait at most `tracing.SHUTDOWN_TIMEOUT_S` (2 s) for
    their last spans; the bounds below leave room for a slow machine, not for 30 s."""
    coordinator = CoordinatorProcess(etcd.endpoint, prefix, inventory, tmp_path / "c.log")
    coordinator.start()
    try:
        await coordinator.wait_serving()
        started = time.monotonic()
        _, err = await cli_allocate(coordinator.address)
        took = time.monotonic() - started
        assert err == ""  # no exporter retries on the user's terminal
        assert took < 20, f"the CLI took {took:.1f} s"
        await asyncio.sleep(1)  # the coordinator's spans are now stuck in an export
    finally:
        started = time.monotonic()
        status = await asyncio.to_thread(coordinator.stop, signal.SIGTERM, 60)
        stopped_in = time.monotonic() - started
    assert status == 0, coordinator.log_tail()
    assert stopped_in < 20, f"the coordinator took {stopped_in:.1f} s to stop"
