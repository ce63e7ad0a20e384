"""Writes node records to etcd: the static inventory now, agents' registrations later.

A record that is already there unchanged is left alone, so restarting a coordinator with
the same inventory does not bump node revisions (and so conflict with placements). Every
coordinator that is given an inventory must be given the same one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import structlog
from google.protobuf.message import DecodeError

from kaiwo_gpu.common.errors import ConflictError
from kaiwo_gpu.coordinator.changes import KeyValue, Put, Txn
from kaiwo_gpu.coordinator.commit_plan import MAX_TXN_OPS
from kaiwo_gpu.coordinator.keys import FROM_INVENTORY, SOURCE_LABEL, KeyKind, KeyLayout
from kaiwo_gpu.coordinator.store import EtcdStore
from kaiwo_gpu.v1 import types_pb2

log = structlog.get_logger(__name__)
MAX_ATTEMPTS = 3
T = TypeVar("T")


async def register_nodes(
    store: EtcdStore, layout: KeyLayout, nodes: Sequence[types_pb2.NodeStatus]
) -> tuple[int, int]:
    """Makes etcd hold exactly the inventory's nodes: (written, removed).

    Unchanged records are left alone; nodes an inventory registered earlier and the file no
    longer lists are deleted. A node registered by anyone else (an agent) is never touched,
    not even when the file names it. Every write requires the record it read to be
    unchanged, so a concurrent writer is never overwritten; on a clash it reads again.
    """
    for _ in range(MAX_ATTEMPTS - 1):
        outcome = await _register_once(store, layout, nodes)
        if outcome is not None:
            return outcome
    outcome = await _register_once(store, layout, nodes)
    if outcome is None:
        raise ConflictError("node records kept changing while the inventory was written")
    return outcome


async def _register_once(
    store: EtcdStore, layout: KeyLayout, nodes: Sequence[types_pb2.NodeStatus]
) -> tuple[int, int] | None:
    _, existing = await store.read_prefix(layout.node(""))
    current: dict[str, KeyValue] = {}
    for found in existing:
        parsed = layout.parse(found.key)
        if parsed is not None and parsed[0] is KeyKind.NODE:
            current[parsed[1]] = found
    wanted = {node.name: node.SerializeToString(deterministic=True) for node in nodes}
    writes: list[tuple[bytes, int, bytes]] = []  # (key, revision read, new value)
    for name, value in wanted.items():
        kv = current.get(name)
        if kv is not None and not _from_inventory(kv.value):
            log.warning("node is registered by someone else; inventory entry ignored", node=name)
        elif kv is None or kv.value != value:
            writes.append((layout.node(name), kv.mod_revision if kv is not None else 0, value))
    removals = [
        (kv.key, kv.mod_revision)
        for name, kv in current.items()
        if name not in wanted and _from_inventory(kv.value)
    ]
    txns = [
        Txn(
            expect_mod_revision=tuple((key, revision) for key, revision, _ in chunk),
            puts=tuple(Put(key, value) for key, _, value in chunk),
        )
        for chunk in _chunks(writes)
    ]
    txns += [
        Txn(expect_mod_revision=tuple(chunk), deletes=tuple(key for key, _ in chunk))
        for chunk in _chunks(removals)
    ]
    for txn in txns:  # a few nodes per etcd round trip, each guarded by what we read
        if not (await store.commit(txn)).succeeded:
            return None
    return len(writes), len(removals)


def _chunks(items: list[T]) -> list[list[T]]:
    return [items[start : start + MAX_TXN_OPS] for start in range(0, len(items), MAX_TXN_OPS)]


def _from_inventory(value: bytes) -> bool:
    """Only records an inventory wrote carry its label; unreadable ones are left alone."""
    record = types_pb2.NodeStatus()
    try:
        record.ParseFromString(value)
    except DecodeError:
        return False
    return record.labels.get(SOURCE_LABEL) == FROM_INVENTORY
