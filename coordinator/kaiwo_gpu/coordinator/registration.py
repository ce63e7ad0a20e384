"""Writes node records to etcd: the static inventory now, agents' registrations later.

A record that is already there unchanged is left alone, so restarting a coordinator with
the same inventory does not bump node revisions (and so conflict with placements). Every
coordinator that is given an inventory must be given the same one.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from kaiwo_gpu.coordinator.changes import Put, Txn
from kaiwo_gpu.coordinator.commit_plan import MAX_TXN_OPS
from kaiwo_gpu.coordinator.inventory import SOURCE_LABEL
from kaiwo_gpu.coordinator.keys import KeyLayout
from kaiwo_gpu.coordinator.store import EtcdStore
from kaiwo_gpu.v1 import types_pb2


async def register_nodes(
    store: EtcdStore, layout: KeyLayout, nodes: Sequence[types_pb2.NodeStatus]
) -> tuple[int, int]:
    """Makes etcd hold exactly the inventory's nodes: (written, removed).

    Unchanged records are left alone; nodes an inventory registered earlier and the file no
    longer lists are deleted. Nodes of any other source (agents) are never touched.
    """
    _, existing = await store.read_prefix(layout.node(""))
    current = {kv.key: kv.value for kv in existing}
    wanted = {layout.node(node.name): node.SerializeToString(deterministic=True) for node in nodes}
    puts = [Put(key, value) for key, value in wanted.items() if current.get(key) != value]
    deletes = [
        key for key, value in current.items() if key not in wanted and _from_inventory(value)
    ]
    for start in range(0, len(puts), MAX_TXN_OPS):
        await store.commit(Txn(puts=tuple(puts[start : start + MAX_TXN_OPS])))
    for start in range(0, len(deletes), MAX_TXN_OPS):
        await store.commit(Txn(deletes=tuple(deletes[start : start + MAX_TXN_OPS])))
    return len(puts), len(deletes)


def _from_inventory(value: bytes) -> bool:
    record = types_pb2.NodeStatus()
    try:
        record.ParseFromString(value)
    except DecodeError:
        return False
    return record.labels.get(SOURCE_LABEL) == "inventory"
