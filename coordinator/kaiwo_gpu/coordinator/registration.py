"""Writes node records to etcd: the static inventory now, agents' registrations later.

A record that is already there unchanged is left alone, so restarting a coordinator with
the same inventory does not bump node revisions (and so conflict with placements).
"""

from __future__ import annotations

from collections.abc import Sequence

from kaiwo_gpu.coordinator.changes import Put, Txn
from kaiwo_gpu.coordinator.commit_plan import MAX_TXN_OPS
from kaiwo_gpu.coordinator.keys import KeyLayout
from kaiwo_gpu.coordinator.store import EtcdStore
from kaiwo_gpu.v1 import types_pb2


async def register_nodes(
    store: EtcdStore, layout: KeyLayout, nodes: Sequence[types_pb2.NodeStatus]
) -> int:
    """Puts the nodes whose record differs; returns how many were written."""
    _, existing = await store.read_prefix(layout.node(""))
    current = {kv.key: kv.value for kv in existing}
    puts = [
        Put(layout.node(node.name), value)
        for node in nodes
        if current.get(layout.node(node.name))
        != (value := node.SerializeToString(deterministic=True))
    ]
    for start in range(0, len(puts), MAX_TXN_OPS):
        await store.commit(Txn(puts=tuple(puts[start : start + MAX_TXN_OPS])))
    return len(puts)
