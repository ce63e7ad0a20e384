"""Writes node records to etcd: the static inventory now, agents' registrations later.

A record that is already there unchanged is left alone, so restarting a coordinator with
the same inventory does not bump node revisions (and so conflict with placements). Every
coordinator that is given an inventory must be given the same one.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from google.protobuf.message import DecodeError

from kaiwo_gpu.common.errors import ConflictError
from kaiwo_gpu.coordinator.changes import KeyValue, Put, Txn
from kaiwo_gpu.coordinator.inventory import SOURCE_LABEL
from kaiwo_gpu.coordinator.keys import KeyKind, KeyLayout
from kaiwo_gpu.coordinator.store import EtcdStore
from kaiwo_gpu.v1 import types_pb2

log = structlog.get_logger(__name__)
MAX_ATTEMPTS = 3


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
    changes: list[Txn] = []
    for name, value in wanted.items():
        kv = current.get(name)
        if kv is not None and not _from_inventory(kv.value):
            log.warning("node is registered by someone else; inventory entry ignored", node=name)
        elif kv is None or kv.value != value:
            revision = kv.mod_revision if kv is not None else 0
            changes.append(
                Txn(
                    expect_mod_revision=((layout.node(name), revision),),
                    puts=(Put(layout.node(name), value),),
                )
            )
    removed = [
        Txn(expect_mod_revision=((kv.key, kv.mod_revision),), deletes=(kv.key,))
        for name, kv in current.items()
        if name not in wanted and _from_inventory(kv.value)
    ]
    results = [await store.commit(txn) for txn in (*changes, *removed)]
    if not all(result.succeeded for result in results):
        return None
    return len(changes), len(removed)


def _from_inventory(value: bytes) -> bool:
    """Only records an inventory wrote carry its label; unreadable ones are left alone."""
    record = types_pb2.NodeStatus()
    try:
        record.ParseFromString(value)
    except DecodeError:
        return False
    return record.labels.get(SOURCE_LABEL) == "inventory"
