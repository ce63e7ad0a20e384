"""The layout of kaiwo-gpu's keys in etcd, under one configurable prefix.

<prefix>nodes/<node>           NodeStatus: inventory, labels, health (no usage)
<prefix>allocations/<id>       Allocation record, on its lease when it has a TTL
<prefix>requests/<request_id>  the allocation id a client's request_id produced
<prefix>gpus/<uuid>            empty; rewritten by every placement on the GPU, so a
                               transaction can compare its revision (no over-commit)
<prefix>agents/<node>          the coordinator an agent is connected to, on the node's
                               lease: while it exists the agent's node is schedulable
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.v1 import types_pb2

DEFAULT_PREFIX = "/kaiwo-gpu/v1/"
SOURCE_LABEL = "kaiwo.ai/source"
"""The node label that says who wrote the record: "inventory" or "agent"."""
FROM_INVENTORY = "inventory"
FROM_AGENT = "agent"


def source_of(record: types_pb2.NodeStatus) -> str:
    """Who wrote a node record (FROM_INVENTORY, FROM_AGENT; "" for a record of neither)."""
    return record.labels.get(SOURCE_LABEL, "")


_PREFIX = re.compile(r"^/[A-Za-z0-9._/-]{0,200}/$")


class KeyKind(Enum):
    NODE = "nodes"
    ALLOCATION = "allocations"
    REQUEST = "requests"
    GPU = "gpus"
    AGENT = "agents"


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix) or "//" in self.prefix:
            raise InvalidArgumentError(
                "etcd key prefix",
                self.prefix,
                "a path like /kaiwo-gpu/v1/ (starts and ends with /)",
            )

    def key(self, kind: KeyKind, name: str) -> bytes:
        return f"{self.prefix}{kind.value}/{name}".encode()

    def node(self, name: str) -> bytes:
        return self.key(KeyKind.NODE, name)

    def allocation(self, allocation_id: str) -> bytes:
        return self.key(KeyKind.ALLOCATION, allocation_id)

    def request(self, request_id: str) -> bytes:
        return self.key(KeyKind.REQUEST, request_id)

    def gpu(self, uuid: str) -> bytes:
        return self.key(KeyKind.GPU, uuid)

    def agent(self, node: str) -> bytes:
        return self.key(KeyKind.AGENT, node)

    @property
    def all_keys(self) -> bytes:
        return self.prefix.encode()

    def parse(self, key: bytes) -> tuple[KeyKind, str] | None:
        """(kind, name) of one of our keys; None for anything else under the prefix."""
        text = key.decode(errors="replace")
        if not text.startswith(self.prefix):
            return None
        kind_name, _, name = text[len(self.prefix) :].partition("/")
        if not name:
            return None
        try:
            kind = KeyKind(kind_name)
        except ValueError:
            return None
        if "/" in name and kind is not KeyKind.REQUEST:
            return None  # another prefix nested inside ours (request ids may hold "/")
        return kind, name
