"""The agent Connect stream against hostile agents, on a real coordinator process.

An agent that never sends, sends too fast, sends garbage or a batch about another node's
GPUs, a message past the size limit, or bytes that are not HTTP/2 at all: each gets a
clear status (never UNKNOWN or INTERNAL) or its connection closed, and the coordinator
stays up, keeps answering Allocate, and keeps no memory of what it refused. The
coordinator asks for 100 ms samples, so a registered agent that falls silent is dropped
after 3 x 100 ms + 2 s. Bounded for CI by `fuzz_settings`; the long run is in
tests/conftest.py and tests/test_fuzz_rpcs.py.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import event, example, given
from hypothesis import strategies as st

from kaiwo_gpu.common import credentials
from kaiwo_gpu.coordinator.api.agent_servicer import REGISTER_WAIT_S
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.server import MAX_MESSAGE_BYTES
from kaiwo_gpu.v1 import agent_pb2, allocation_pb2, types_pb2
from tests.agents import raw_inventory
from tests.fuzz_strategies import (
    IDENTITY,
    REFUSED,
    Target,
    fuzz_settings,
    length_delimited,
    messages,
    mutated,
    names_a_field,
    target_running,
    wire_garbage,
)

pytestmark = pytest.mark.integration

CONNECT = "/kaiwo_gpu.v1.AgentService/Connect"
SAMPLE_INTERVAL_MS = 100
SILENT_LIMIT_S = 3 * SAMPLE_INTERVAL_MS / 1000 + 2.0  # AgentStreamSettings.silent_limit_s
STREAM_TIMEOUT_S = REGISTER_WAIT_S + 10.0
"""The most a test waits for the coordinator to end a stream (a bound, not a measure)."""
AGENT_MESSAGE = agent_pb2.AgentMessage.DESCRIPTOR


@pytest.fixture(scope="module")
def target(etcd: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("fuzz-agents")
    with target_running(
        etcd.endpoint,
        "/kaiwo-fuzz-agents/v1/",
        None,
        folder / "coordinator.log",
        (f"--sample-interval={SAMPLE_INTERVAL_MS}ms",),
    ) as running:
        yield running


class RawStream:
    """A Connect stream driven by hand with raw bytes: what a hostile agent could send."""

    def __init__(self, target: Target, timeout_s: float = STREAM_TIMEOUT_S) -> None:
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        connect = target.channel.stream_stream(
            CONNECT, request_serializer=IDENTITY, response_deserializer=IDENTITY
        )
        self.call = connect(iter(self._outbox.get, None), timeout=timeout_s)

    def send(self, raw: bytes) -> None:
        self._outbox.put(raw)

    def done_sending(self) -> None:
        self._outbox.put(None)

    def read(self) -> agent_pb2.CoordinatorDirective:
        return agent_pb2.CoordinatorDirective.FromString(next(self.call))

    def ending(self) -> tuple[grpc.StatusCode, str]:
        """Reads until the coordinator ends the stream: its status and message."""
        with contextlib.suppress(grpc.RpcError):
            for _ in self.call:
                pass
        return self.call.code(), self.call.details() or ""


def register(node: str, gpus: int = 2) -> bytes:
    return agent_pb2.AgentMessage(
        register=agent_pb2.Register(node=node, gpus=raw_inventory(node, gpus), backend="simulated")
    ).SerializeToString()


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def healthy_batch(node: str, gpus: int = 2) -> agent_pb2.TelemetryBatch:
    return agent_pb2.TelemetryBatch(
        sampled_at=now(),
        samples=[
            agent_pb2.GpuSample(
                uuid=gpu.uuid,
                telemetry=types_pb2.GpuTelemetry(sampled_at=now(), gfx_activity_percent=10),
                health=types_pb2.HEALTH_HEALTHY,
            )
            for gpu in raw_inventory(node, gpus)
        ],
    )


def check_ending(stream: RawStream) -> grpc.StatusCode:
    code, details = stream.ending()
    assert code is grpc.StatusCode.OK or code in REFUSED, (code, details)
    if code is not grpc.StatusCode.OK:
        assert details.strip(), code
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        # "message" and "first message" name the stream's own field: which message it was.
        on_stream = details.startswith(("message: ", "first message: "))
        assert on_stream or names_a_field(details, AGENT_MESSAGE), details
    return code


first_messages = st.one_of(
    messages(agent_pb2.AgentMessage).map(lambda m: m.SerializeToString()),
    st.builds(lambda: agent_pb2.AgentMessage.FromString(register("fuzz-first")))
    .flatmap(mutated)
    .map(lambda m: m.SerializeToString()),
    wire_garbage(agent_pb2.AgentMessage),
)


@fuzz_settings(ci_examples=60)
@given(first_messages)
@example(b"\x00")  # was UNKNOWN "Unexpected DecodeError", a traceback in the log
@example(b"")  # an empty message: said "'telemetry' is not allowed"
def test_any_first_message_registers_or_is_refused(target: Target, raw: bytes) -> None:
    stream = RawStream(target)
    stream.send(raw)
    stream.done_sending()
    event(check_ending(stream).name)
    assert target.process.alive(), target.process.log_tail()


later_messages = st.one_of(
    messages(agent_pb2.AgentMessage).map(lambda m: m.SerializeToString()),
    st.builds(lambda: agent_pb2.AgentMessage(telemetry=healthy_batch("fuzz-later")))
    .flatmap(lambda m: mutated(m, max_changes=3))
    .map(lambda m: m.SerializeToString()),
    wire_garbage(agent_pb2.AgentMessage),
)


@fuzz_settings(ci_examples=60)
@given(st.lists(later_messages, min_size=1, max_size=3))
@example([b"\x00"])  # was UNKNOWN "Unexpected DecodeError", a traceback in the log
@example([b""])  # an empty message: said "'register' is not allowed"
def test_any_message_after_registering_is_taken_or_refused(
    target: Target, raws: list[bytes]
) -> None:
    stream = RawStream(target)
    stream.send(register("fuzz-later"))
    assert stream.read().HasField("registered")
    for raw in raws:
        stream.send(raw)
    stream.done_sending()
    event(check_ending(stream).name)
    assert target.process.alive(), target.process.log_tail()


def test_a_batch_about_another_nodes_gpus_is_refused(target: Target) -> None:
    owner = RawStream(target)
    owner.send(register("fuzz-owner"))
    assert owner.read().HasField("registered")
    intruder = RawStream(target)
    intruder.send(register("fuzz-intruder"))
    assert intruder.read().HasField("registered")
    intruder.send(agent_pb2.AgentMessage(telemetry=healthy_batch("fuzz-owner")).SerializeToString())
    code, details = intruder.ending()
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "telemetry.samples[0].uuid" in details
    assert "belongs to node 'fuzz-owner'" in details
    # The owner's stream is untouched: it still takes its own batches.
    owner.send(agent_pb2.AgentMessage(telemetry=healthy_batch("fuzz-owner")).SerializeToString())
    owner.done_sending()
    assert owner.ending()[0] is grpc.StatusCode.OK


AGENT_TOKEN = "fuzz-agent-token"


@pytest.fixture(scope="module")
def guarded(etcd: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A coordinator that takes bearer tokens: one, of the agent of node fuzz-own."""
    folder = tmp_path_factory.mktemp("fuzz-guarded")
    tokens = folder / "tokens"
    tokens.write_text(f"{credentials.token_digest(AGENT_TOKEN)} fuzz-own agent\n")
    with target_running(
        etcd.endpoint,
        "/kaiwo-fuzz-guarded/v1/",
        None,
        folder / "coordinator.log",
        (f"--tokens={tokens}",),
    ) as running:
        yield running


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (AGENT_TOKEN, grpc.StatusCode.PERMISSION_DENIED),
        ("not-a-token", grpc.StatusCode.UNAUTHENTICATED),
        (None, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_an_agent_speaks_only_for_its_own_node(
    guarded: Target, token: str | None, code: grpc.StatusCode
) -> None:
    before = guarded.revision()
    connect = guarded.channel.stream_stream(
        CONNECT, request_serializer=IDENTITY, response_deserializer=IDENTITY
    )
    metadata = () if token is None else ((credentials.AUTHORIZATION, f"Bearer {token}"),)
    call = connect(iter([register("fuzz-other")]), timeout=STREAM_TIMEOUT_S, metadata=metadata)
    with pytest.raises(grpc.RpcError):
        next(call)
    assert call.code() is code, call.details()
    assert guarded.revision() == before, "a refused registration wrote etcd"


def test_an_agent_registers_its_own_node(guarded: Target) -> None:
    """Ending this stream revokes its node lease, a write the coordinator makes after the
    stream is gone: the test waits for it, so the next test's revision is its own. The
    stream stays open until the test has read the revision (a list of messages would
    half-close it at once, and the revocation could land before that read: seen in CI)."""
    connect = guarded.channel.stream_stream(
        CONNECT, request_serializer=IDENTITY, response_deserializer=IDENTITY
    )
    read = threading.Event()

    def messages() -> Iterator[bytes]:
        yield register("fuzz-own")
        read.wait(STREAM_TIMEOUT_S)

    own = connect(messages(), timeout=STREAM_TIMEOUT_S, metadata=(
        (credentials.AUTHORIZATION, f"Bearer {AGENT_TOKEN}"),
    ))  # fmt: skip
    assert agent_pb2.CoordinatorDirective.FromString(next(own)).HasField("registered")
    registered = guarded.revision()
    read.set()
    own.cancel()
    for _ in range(200):  # 10 s at most
        if guarded.revision() > registered:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the node lease of a closed stream was not revoked")


header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64).map(
        lambda text: "Bearer " + text
    ),
    st.integers(1, 8192).map(lambda n: "Bearer " + "t" * n),
)


@fuzz_settings(ci_examples=40)
@given(header_values)
def test_any_authorization_header_but_a_token_listed_is_unauthenticated(
    guarded: Target, value: str
) -> None:
    before = guarded.revision()
    metadata = ((credentials.AUTHORIZATION, value),)
    stats = "/kaiwo_gpu.v1.AllocationService/GetClusterStats"
    with pytest.raises(grpc.RpcError) as raised:
        guarded.raw_unary(stats)(b"", timeout=10, metadata=metadata)
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED, raised.value.details()
    connect = guarded.channel.stream_stream(
        CONNECT, request_serializer=IDENTITY, response_deserializer=IDENTITY
    )
    call = connect(iter([register("fuzz-own")]), timeout=STREAM_TIMEOUT_S, metadata=metadata)
    with pytest.raises(grpc.RpcError):
        next(call)
    assert call.code() is grpc.StatusCode.UNAUTHENTICATED, call.details()
    assert guarded.revision() == before


def test_a_message_past_the_size_limit_is_resource_exhausted(target: Target) -> None:
    stream = RawStream(target)
    labels = length_delimited(1, b"k") + length_delimited(2, b"v" * MAX_MESSAGE_BYTES)
    stream.send(length_delimited(1, length_delimited(1, b"fuzz-big") + length_delimited(2, labels)))
    code, details = stream.ending()
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert target.serving()


def test_silent_agents_are_dropped_with_a_log_line(target: Target) -> None:
    """One never registers, one registers and then says nothing: both are ended, each
    with a status that says why, and the silent node does not stay schedulable."""
    never = RawStream(target)
    silent = RawStream(target)
    silent.send(register("fuzz-silent"))
    assert silent.read().HasField("registered")
    code, details = silent.ending()
    assert code is grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "no telemetry from node 'fuzz-silent'" in details
    code, details = never.ending()
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
    assert "no register message" in details
    log = target.process.log_tail()
    assert "agent stream dropped" in log, log
    assert "no register message" in log, log
    nodes = allocation_pb2.ListNodesResponse.FromString(
        target.raw_unary("/kaiwo_gpu.v1.AllocationService/ListNodes")(b"", timeout=10)
    )
    (node,) = [n for n in nodes.nodes if n.name == "fuzz-silent"]
    assert not node.schedulable, node


FLOOD_BATCHES = 3000
FLOOD_RSS_GROWTH_LIMIT_KIB = 32 * 1024
"""3,000 batches of two samples are a few hundred KiB on the wire: any retention per batch
past ~10 KiB would show; below the bound, allocator noise and gRPC's buffers."""


def test_an_agent_sending_too_fast_is_bounded_and_allocate_still_answers(
    target: Target,
) -> None:
    stream = RawStream(target)
    stream.send(register("fuzz-flood", gpus=4))
    assert stream.read().HasField("registered")
    revision, rss_kib = target.revision(), target.rss_kib()
    batch = agent_pb2.AgentMessage(telemetry=healthy_batch("fuzz-flood", 4)).SerializeToString()
    allocate = target.raw_unary("/kaiwo_gpu.v1.AllocationService/Allocate")
    release = target.raw_unary("/kaiwo_gpu.v1.AllocationService/Release")
    granted: list[str] = []

    def allocate_meanwhile() -> None:
        for n in range(10):
            request = allocation_pb2.AllocateRequest(
                request=types_pb2.AllocationRequest(request_id=f"flood-{n}", fraction_millis=100)
            )
            reply = allocation_pb2.AllocateResponse.FromString(
                allocate(request.SerializeToString(), timeout=10)
            )
            granted.append(reply.allocation.id)
            release(
                allocation_pb2.ReleaseRequest(
                    allocation_id=reply.allocation.id
                ).SerializeToString(),
                timeout=10,
            )

    allocating = threading.Thread(target=allocate_meanwhile)
    allocating.start()
    for _ in range(FLOOD_BATCHES):
        stream.send(batch)
    allocating.join(60)
    stream.done_sending()
    code, details = stream.ending()
    assert code is grpc.StatusCode.OK, (code, details)
    assert len(granted) == 10
    grown_kib = target.rss_kib() - rss_kib
    assert grown_kib < FLOOD_RSS_GROWTH_LIMIT_KIB, f"RSS grew {grown_kib} KiB"
    # Same verdicts every time: at most the first batch's health write. Each allocation
    # and release is one transaction (one revision); the stream's end revokes its presence.
    assert target.revision() - revision <= 2 * 10 + 3


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")
    return header + payload


h2_garbage = st.one_of(
    st.binary(min_size=1, max_size=512),
    st.binary(max_size=256).map(lambda tail: H2_PREFACE + tail),
    st.tuples(
        st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**31 - 1), st.binary(max_size=64)
    ).map(lambda f: H2_PREFACE + _frame(4, 0, 0, b"") + _frame(*f)),
    # A frame that claims more than it carries, then nothing.
    st.integers(17, 2**24 - 1).map(lambda n: H2_PREFACE + n.to_bytes(3, "big") + b"\x01\x04"),
)


def _closed_by_server(address: str, raw: bytes) -> bool:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw_socket:
        raw_socket.sendall(raw)
        with contextlib.suppress(OSError):
            raw_socket.shutdown(socket.SHUT_WR)  # no more from us: a frame cut short stays so
        try:
            while raw_socket.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True


@fuzz_settings(ci_examples=25)
@given(h2_garbage)
def test_bytes_that_are_not_http2_close_the_connection(target: Target, raw: bytes) -> None:
    assert _closed_by_server(target.process.address, raw)
    assert target.serving()


MANY = 20_000
"""Elements in one repeated or map field: a few MiB, under the message limit."""


def _many_messages() -> list[tuple[str, bytes]]:
    node = "fuzz-many"
    gpus = raw_inventory(node, 2)
    many_gpus = [
        types_pb2.GpuInventory(
            uuid=f"MANY-{n}", index=n, bdf="0000:20:00.0", model="MI300X",
            vram_mib=192 * 1024, compute_units=304,
        )
        for n in range(MANY)
    ]  # fmt: skip
    registers = {
        "gpus": agent_pb2.Register(node=node, gpus=many_gpus, backend="simulated"),
        "labels": agent_pb2.Register(
            node=node, gpus=gpus, labels={f"k{n}": "v" for n in range(MANY)}, backend="simulated"
        ),
    }
    batch = healthy_batch(node)
    batch.samples[0].telemetry.processes.extend(
        types_pb2.ProcessMemory(pid=n, name="p", vram_mib=1) for n in range(MANY)
    )
    unknown = agent_pb2.TelemetryBatch(
        sampled_at=now(),
        samples=[agent_pb2.GpuSample(uuid=f"U-{n}") for n in range(MANY)],
    )
    return [
        *((f"register.{k}", agent_pb2.AgentMessage(register=r).SerializeToString())
          for k, r in registers.items()),
        ("telemetry.processes", agent_pb2.AgentMessage(telemetry=batch).SerializeToString()),
        ("telemetry.samples", agent_pb2.AgentMessage(telemetry=unknown).SerializeToString()),
    ]  # fmt: skip


@pytest.mark.parametrize(("what", "raw"), _many_messages(), ids=lambda v: str(v)[:20])
def test_a_field_with_very_many_elements_is_taken_or_refused(
    target: Target, what: str, raw: bytes
) -> None:
    stream = RawStream(target)
    if what.startswith("telemetry"):
        stream.send(register("fuzz-many"))
        assert stream.read().HasField("registered")
    stream.send(raw)
    stream.done_sending()
    check_ending(stream)
    assert target.serving()
