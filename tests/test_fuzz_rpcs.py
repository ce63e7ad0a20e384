"""Every AllocationService RPC against hostile input, on a real coordinator process.

Whatever a caller sends (any field value the proto allows, bytes that do not decode, a
message past the size limit), the call ends with a refusal a client can act on, never
UNKNOWN or INTERNAL; an INVALID_ARGUMENT names the field; a refused call writes nothing to
etcd; the coordinator stays up and its memory does not grow with what it refused. Valid
requests that hypothesis happens to build may succeed, and are released.

The coordinator has a static inventory and no agents, so nothing else writes to etcd while
a property runs: its revision before and after a refused call must be the same.
Bounded for CI by `fuzz_settings`; the long run: `pytest tests/test_fuzz_rpcs.py
tests/test_fuzz_agent_stream.py --hypothesis-profile=fuzz-long --timeout=1800`.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import event, example, given
from hypothesis import strategies as st

from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.server import MAX_MESSAGE_BYTES
from kaiwo_gpu.v1 import allocation_pb2, types_pb2
from tests.fuzz_strategies import (
    IDENTITY,
    INVALID_UTF8,
    REFUSED,
    Target,
    fuzz_settings,
    length_delimited,
    message_of,
    mutated,
    names_a_field,
    target_running,
    wire_garbage,
)
from tests.harness import INVENTORY

pytestmark = pytest.mark.integration

SERVICE = allocation_pb2.DESCRIPTOR.services_by_name["AllocationService"]
METHODS = {method.name: method for method in SERVICE.methods}
WATCH_S = 0.1
"""How long a watch that was accepted is read before the test hangs up (it never ends)."""


@pytest.fixture(scope="module")
def target(etcd: LocalEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("fuzz-rpcs")
    inventory = folder / "nodes.yaml"
    inventory.write_text(INVENTORY)
    with target_running(
        etcd.endpoint, "/kaiwo-fuzz-rpcs/v1/", inventory, folder / "coordinator.log"
    ) as running:
        yield running


def _path(method: MethodDescriptor) -> str:
    return f"/{SERVICE.full_name}/{method.name}"


Answer = tuple[grpc.StatusCode, str, list[bytes]]
"""A call's status, message and replies."""


def _call(target: Target, method: MethodDescriptor, raw: bytes) -> Answer:
    """The status, message and replies of one call with `raw` as its request."""
    if method.server_streaming:
        watch: grpc.UnaryStreamMultiCallable[bytes, bytes] = target.channel.unary_stream(
            _path(method), request_serializer=IDENTITY, response_deserializer=IDENTITY
        )
        call = watch(raw, timeout=WATCH_S)
        replies: list[bytes] = []
        try:
            replies.extend(call)
        except grpc.RpcError as error:
            return error.code(), error.details() or "", replies
        return grpc.StatusCode.OK, "", replies
    try:
        reply = target.raw_unary(_path(method))(raw, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", []
    return grpc.StatusCode.OK, "", [reply]


def _release_what_was_allocated(
    target: Target, method: MethodDescriptor, replies: list[bytes]
) -> None:
    if method.name != "Allocate":
        return
    made = allocation_pb2.AllocateResponse.FromString(replies[0])
    assert made.allocation.id, made
    released = target.raw_unary(_path(METHODS["Release"]))(
        allocation_pb2.ReleaseRequest(allocation_id=made.allocation.id).SerializeToString(),
        timeout=10,
    )
    assert allocation_pb2.ReleaseResponse.FromString(released).allocation.id == made.allocation.id


def check_answer(target: Target, method: MethodDescriptor, raw: bytes) -> grpc.StatusCode:
    """One call: answered, or refused with a status a client can act on and nothing
    written; what was allocated is released."""
    before = target.revision()
    code, details, replies = _call(target, method, raw)
    if code is grpc.StatusCode.OK or (
        method.server_streaming and code is grpc.StatusCode.DEADLINE_EXCEEDED
    ):  # a watch that was accepted stays open until the caller hangs up
        _release_what_was_allocated(target, method, replies)
        return code
    assert code in REFUSED, (method.name, code, details)
    assert details.strip(), (method.name, code)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert names_a_field(details, method.input_type), (method.name, details)
    assert target.revision() == before, f"{method.name} refused ({code.name}) but wrote etcd"
    return code


def _requests(name: str) -> st.SearchStrategy[tuple[str, bytes]]:
    serialized = message_of(METHODS[name].input_type).map(lambda m: m.SerializeToString())
    return st.tuples(st.just(name), serialized)


def _garbage(name: str) -> st.SearchStrategy[tuple[str, bytes]]:
    return st.tuples(
        st.just(name), wire_garbage(message_factory.GetMessageClass(METHODS[name].input_type))
    )


def _base(name: str) -> st.SearchStrategy[Message]:
    """A valid request of method `name` (for Allocate: a new request id each time)."""
    if name == "Allocate":
        return st.uuids().map(
            lambda uuid: allocation_pb2.AllocateRequest(
                request=types_pb2.AllocationRequest(
                    request_id=f"fuzz-{uuid.hex}", fraction_millis=250, ttl_seconds=60
                )
            )
        )
    return st.just(message_factory.GetMessageClass(METHODS[name].input_type)())


def _near_valid(name: str) -> st.SearchStrategy[tuple[str, bytes]]:
    changed = _base(name).flatmap(mutated).map(lambda m: m.SerializeToString())
    return st.tuples(st.just(name), changed)


near_valid_request = st.sampled_from(sorted(METHODS)).flatmap(_near_valid)
any_request = st.sampled_from(sorted(METHODS)).flatmap(_requests)
any_garbage = st.sampled_from(sorted(METHODS)).flatmap(_garbage)


def answered_and_alive(target: Target, call: tuple[str, bytes]) -> None:
    """One fuzzed call checked (`check_answer`), its status counted, and the coordinator
    still running."""
    name, raw = call
    event(f"{name}: {check_answer(target, METHODS[name], raw).name}")
    assert target.process.alive(), target.process.log_tail()


@fuzz_settings(ci_examples=250)
@given(any_request)
@example(("GetClusterStats", b""))
def test_any_field_values_are_answered_or_refused_by_name(
    target: Target, call: tuple[str, bytes]
) -> None:
    answered_and_alive(target, call)


@fuzz_settings(ci_examples=200)
@given(near_valid_request)
def test_valid_requests_with_a_field_changed_are_answered_or_refused_by_name(
    target: Target, call: tuple[str, bytes]
) -> None:
    answered_and_alive(target, call)


@fuzz_settings(ci_examples=200)
@given(any_garbage)
def test_bytes_that_do_not_decode_are_invalid_argument(
    target: Target, call: tuple[str, bytes]
) -> None:
    answered_and_alive(target, call)


@pytest.mark.parametrize("bad", INVALID_UTF8)
def test_invalid_utf8_in_a_string_field_names_the_message(target: Target, bad: bytes) -> None:
    raw = length_delimited(1, length_delimited(1, b"job-" + bad))  # request.request_id
    code, details, _ = _call(target, METHODS["Allocate"], raw)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "kaiwo_gpu.v1.AllocateRequest" in details


def test_a_message_past_the_size_limit_is_resource_exhausted(target: Target) -> None:
    before = target.revision()
    raw = length_delimited(1, length_delimited(1, b"x" * MAX_MESSAGE_BYTES))
    code, details, _ = _call(target, METHODS["Allocate"], raw)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert target.revision() == before
    assert target.serving()


def test_an_unknown_method_is_unimplemented(target: Target) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        target.raw_unary(f"/{SERVICE.full_name}/Nope")(b"", timeout=10)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert target.serving()


HOSTILE_BATCH = 600
PAYLOAD_BYTES = 128 * 1024
RSS_GROWTH_LIMIT_KIB = 32 * 1024
"""The batch carries HOSTILE_BATCH x PAYLOAD_BYTES = 75 MiB of refused input: keeping any
part of each request (a log buffer, a cache keyed by request id) past half of it would
show. Below the bound: the allocator's high-water mark and gRPC's buffers (a few MiB,
measured after a warm-up batch of the same shape)."""


def _hostile(n: int) -> tuple[MethodDescriptor, bytes]:
    """Refused requests of every shape, each carrying PAYLOAD_BYTES."""
    big = b"x" * PAYLOAD_BYTES
    shapes = [
        ("Allocate", length_delimited(1, length_delimited(1, big + str(n).encode()))),
        ("Allocate", length_delimited(1, length_delimited(9, big) + length_delimited(1, b"r"))),
        ("GetAllocation", length_delimited(1, big)),
        ("Release", length_delimited(1, big)),
        ("KeepAlive", length_delimited(1, b"\xff" + big)),
        ("RemoveNode", length_delimited(1, big)),
    ]
    name, raw = shapes[n % len(shapes)]
    return METHODS[name], raw


def test_a_large_batch_of_refusals_writes_nothing_and_leaves_no_memory(target: Target) -> None:
    def batch() -> None:
        for n in range(HOSTILE_BATCH):
            method, raw = _hostile(n)
            code, details, _ = _call(target, method, raw)
            assert code in REFUSED, (method.name, code, details)

    batch()  # warm-up: the same shapes, so the allocator's pools are as large as they get
    revision, rss_kib = target.revision(), target.rss_kib()
    batch()
    grown_kib = target.rss_kib() - rss_kib
    assert target.revision() == revision
    assert grown_kib < RSS_GROWTH_LIMIT_KIB, f"RSS grew {grown_kib} KiB"
    assert target.serving()


MANY = 50_000
"""Elements in one repeated or map field: a few MiB, under the message limit, far past
any count the coordinator may accept."""


def _many_requests() -> list[tuple[str, Message]]:
    pairs = {f"k{n}": "v" for n in range(MANY)}
    names = [f"n{n}" for n in range(MANY)]

    def allocate(**fields: object) -> allocation_pb2.AllocateRequest:
        return allocation_pb2.AllocateRequest(
            request=types_pb2.AllocationRequest(
                request_id="fuzz-many",
                fraction_millis=250,
                **fields,  # type: ignore[arg-type]
            )
        )

    return [
        ("Allocate", allocate(labels=pairs)),
        ("Allocate", allocate(selector=types_pb2.Selector(node_labels=pairs))),
        ("Allocate", allocate(selector=types_pb2.Selector(exclude_gpus=names))),
        ("Allocate", allocate(selector=types_pb2.Selector(exclude_nodes=names))),
        ("Allocate", allocate(selector=types_pb2.Selector(gpu_models=names))),
        ("Allocate", allocate(selector=types_pb2.Selector(nodes=names))),
        ("ListAllocations", allocation_pb2.ListAllocationsRequest(labels=pairs)),
        ("ListNodes", allocation_pb2.ListNodesRequest(labels=pairs)),
    ]


@pytest.mark.parametrize(("name", "request_message"), _many_requests())
def test_a_field_with_very_many_elements_is_answered_or_refused_by_name(
    target: Target, name: str, request_message: Message
) -> None:
    event_code = check_answer(target, METHODS[name], request_message.SerializeToString())
    assert event_code in REFUSED | {grpc.StatusCode.OK}
    assert target.serving()
