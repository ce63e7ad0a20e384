"""Hostile input for the fuzz tests: messages built from their protobuf descriptors, raw
wire garbage, and a coordinator process to throw them at.

One generic strategy covers every request type (any field value, nested messages, maps,
repeated fields, unknown enum numbers, huge strings, control characters), so a field added
to a proto is fuzzed without anyone writing a strategy for it. `wire_garbage` goes below
what a Python message can hold: invalid UTF-8, wrong wire types, truncations, nesting past
the decoder's limit, sent as bytes through a channel call with identity serializers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.state.store import EtcdStore

M = TypeVar("M", bound=Message)

FUZZ_LONG = "fuzz-long"
"""The hypothesis profile of the long run (registered in tests/conftest.py)."""

REFUSED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
"""What a hostile request may end with: a refusal a client can act on. Never UNKNOWN or
INTERNAL (a bug) nor UNAVAILABLE (the coordinator or etcd fell over)."""


def fuzz_settings(ci_examples: int) -> settings:
    """`ci_examples` per property in the bounded CI run; the fuzz-long profile's own count
    when that profile is loaded. No deadline: each example is a real RPC."""
    loaded = settings.default
    assert loaded is not None
    long_run = loaded.max_examples >= settings.get_profile(FUZZ_LONG).max_examples
    return settings(
        max_examples=loaded.max_examples if long_run else ci_examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# Strings a validator has to think about: names that are valid, almost valid, or hostile.
_PLAUSIBLE = (
    "node-a", "node-b", "MI300X", "MI210", "best-fit", "first-fit", "cu-mask", "mps",
    "exclusive", "partition", "none", "slurm/1", "r-1", "a" * 253, "a" * 254, "", " ",
    "..", "/", "node-a\n", "node\x00a", "\u202enode", "ü", "\U0001f600", "-1", "0", "1e3",
)  # fmt: skip
_BIG_STRING_CHARS = 300_000
"""Past every length limit the coordinator has, and well under the 16 MiB message limit."""

strings = st.one_of(
    st.sampled_from(_PLAUSIBLE),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=8),
    st.integers(1, _BIG_STRING_CHARS).map(lambda n: "x" * n),
)


def _integers(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted(
        e for e in {low, high, 0, 1, 64, 100, 999, 1000, 1001, 5001, 2**31} if low <= e <= high
    )
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _integers(32, True),
    FieldDescriptor.TYPE_SINT32: _integers(32, True),
    FieldDescriptor.TYPE_SFIXED32: _integers(32, True),
    FieldDescriptor.TYPE_INT64: _integers(64, True),
    FieldDescriptor.TYPE_SINT64: _integers(64, True),
    FieldDescriptor.TYPE_SFIXED64: _integers(64, True),
    FieldDescriptor.TYPE_UINT32: _integers(32, False),
    FieldDescriptor.TYPE_FIXED32: _integers(32, False),
    FieldDescriptor.TYPE_UINT64: _integers(64, False),
    FieldDescriptor.TYPE_FIXED64: _integers(64, False),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_STRING: strings,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """One value of `field`'s type (an element, for repeated fields)."""
    if field.message_type is not None:
        return message_of(field.message_type, depth - 1)
    if field.enum_type is not None:  # proto3 enums are open: any int32 parses
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _integers(32, True))
    return _SCALARS[field.type]


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name.values()
        return st.dictionaries(_value(key, depth), _value(value, depth), max_size=4)
    if field.is_repeated:
        return st.lists(_value(field, depth), max_size=4)
    return _value(field, depth)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        for item in value:
            if isinstance(item, Message):
                target.add().CopyFrom(item)
            else:
                target.append(item)
    elif isinstance(value, Message):
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def message_of(descriptor: Descriptor, depth: int = 4) -> st.SearchStrategy[Message]:
    """Any message of `descriptor`'s type: each field set or not, to any value of its type
    (nested messages down to `depth`, empty below it)."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth <= 0:
        return st.builds(cls)
    optional = {field.name: _field(field, depth) for field in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            _assign(message, descriptor.fields_by_name[name], value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


def descriptor_of(cls: type[Message]) -> Descriptor:
    return cast(Descriptor, cls.DESCRIPTOR)


def messages(cls: type[M], depth: int = 4) -> st.SearchStrategy[M]:
    return message_of(descriptor_of(cls), depth)  # type: ignore[return-value]


def _field_paths(descriptor: Descriptor, depth: int = 3) -> list[tuple[FieldDescriptor, ...]]:
    """Every field reachable through singular messages: what `mutated` may change."""
    paths: list[tuple[FieldDescriptor, ...]] = []
    for field in descriptor.fields:
        paths.append((field,))
        nested = field.message_type
        if nested is not None and not field.is_repeated and depth > 0:
            paths += [(field, *rest) for rest in _field_paths(nested, depth - 1)]
    return paths


@st.composite
def mutated(draw: st.DrawFn, base: Message, max_changes: int = 2) -> Message:
    """A valid message with one or a few fields set to any value: most random messages fail
    the first check they meet, these reach the checks behind it (and are sometimes valid)."""
    message = type(base)()
    message.CopyFrom(base)
    paths = _field_paths(descriptor_of(type(base)))
    for _ in range(draw(st.integers(0, max_changes)) if paths else 0):
        path = draw(st.sampled_from(paths))
        holder = message
        for step in path[:-1]:
            holder = getattr(holder, step.name)
        leaf = path[-1]
        holder.ClearField(leaf.name)
        _assign(holder, leaf, draw(_field(leaf, 2)))
    return message


# --- wire-level garbage ---------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _string_paths(descriptor: Descriptor, depth: int = 3) -> list[tuple[int, ...]]:
    """Field-number paths to every string field (through singular and repeated messages)."""
    paths: list[tuple[int, ...]] = []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            paths.append((field.number,))
        elif (nested := field.message_type) is not None and depth > 0:
            paths += [(field.number, *rest) for rest in _string_paths(nested, depth - 1)]
    return paths


def nested_in(path: tuple[int, ...], payload: bytes) -> bytes:
    """`payload` as the length-delimited value at the end of `path`."""
    for number in reversed(path):
        payload = length_delimited(number, payload)
    return payload


INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf")
"""A lone 0xFF, a broken pair, an encoded surrogate, past U+10FFFF, an overlong '/'."""
NESTING_PAST_LIMIT = 150
"""The protobuf decoders stop at 100 levels of nesting."""


@st.composite
def wire_garbage(draw: st.DrawFn, cls: type[Message]) -> bytes:
    """Bytes that claim to be a `cls`: most do not decode, some decode to odd messages."""
    descriptor = descriptor_of(cls)
    kind = draw(st.sampled_from(["random", "mutated", "utf8", "wire-type", "nested", "varint"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "mutated":  # a real message, flipped or cut
        data = bytearray(draw(messages(cls, depth=3)).SerializeToString())
        if not data:
            return draw(st.binary(min_size=1, max_size=16))
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "utf8" and (paths := _string_paths(descriptor)):  # proto3 strings must be UTF-8
        bad = draw(st.sampled_from(INVALID_UTF8))
        text = draw(st.binary(max_size=8)) + bad + draw(st.binary(max_size=8))
        return nested_in(draw(st.sampled_from(paths)), text)
    if kind == "wire-type" and descriptor.fields:  # a known field with the wrong wire type
        field: FieldDescriptor = draw(st.sampled_from(list(descriptor.fields)))
        wire = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
        return varint(field.number << 3 | wire) + draw(st.binary(max_size=16))
    if kind == "nested" and descriptor.fields:  # unknown fields nested past the limit
        number = draw(st.integers(100, 2**29 - 1))
        return nested_in((number,) * NESTING_PAST_LIMIT, b"")
    # An overlong varint (11 bytes) as a tag or a length.
    return b"\xff" * 10 + b"\x01" + draw(st.binary(max_size=8))


# --- the target -----------------------------------------------------------------------


IDENTITY: Callable[[bytes], bytes] = lambda raw: raw  # noqa: E731
"""The serializer of a raw call: the bytes go on the wire as they are."""


def vm_rss_kib(pid: int) -> int:
    """The resident set of process `pid` (its /proc status line VmRSS), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert found is not None, status
    return int(found.group(1))


@dataclass
class Target:
    """A `kaiwo-gpu coordinator` child process, a plain channel to it, and etcd's revision
    read with the project's store on a loop of the target's own (the tests stay sync)."""

    process: CoordinatorProcess
    channel: grpc.Channel
    runner: asyncio.Runner
    store: EtcdStore

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def revision(self) -> int:
        return self.runner.run(self.store.revision())

    def rss_kib(self) -> int:
        return vm_rss_kib(self.pid)

    def raw_unary(self, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(
            method, request_serializer=IDENTITY, response_deserializer=IDENTITY
        )

    def serving(self) -> bool:
        """Alive, and answering a health check."""
        if not self.process.alive():
            return False
        reply = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.contextmanager
def target_running(
    etcd_endpoint: str,
    prefix: str,
    inventory: Path | None,
    log_path: Path,
    extra_args: tuple[str, ...] = (),
) -> Iterator[Target]:
    """A coordinator process on `prefix`, stopped (SIGTERM) on exit; it must exit 0, and
    its log must hold no traceback (a refusal is a log line, never an exception)."""
    process = CoordinatorProcess(etcd_endpoint, prefix, inventory, log_path, extra_args=extra_args)
    runner = asyncio.Runner()
    process.start()
    try:
        runner.run(process.wait_serving())
        store = EtcdStore([etcd_endpoint])
        with grpc.insecure_channel(
            process.address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
        ) as channel:
            try:
                yield Target(process, channel, runner, store)
            finally:
                runner.run(store.close())
    finally:
        status = process.stop()
        runner.close()
    assert status == 0, process.log_tail()
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :][:6000]


def field_names(descriptor: Descriptor, depth: int = 6) -> set[str]:
    """Every field name in `descriptor`'s tree: what an INVALID_ARGUMENT message may name."""
    names: set[str] = set()
    for field in descriptor.fields:
        names.add(field.name)
        if field.message_type is not None and depth > 0:
            names |= field_names(field.message_type, depth - 1)
    return names


def names_a_field(details: str, descriptor: Descriptor) -> bool:
    """Whether an INVALID_ARGUMENT message names a field of the request (its first word, as
    `InvalidArgumentError` writes it), or says the request does not decode."""
    if "does not decode" in details:
        return True
    head = details.split(":", 1)[0]
    parts = {part for part in re.split(r"[.\[\] ]+", head) if part and not part.isdigit()}
    return bool(parts & field_names(descriptor))
