"""Writes node records to etcd: the static inventory's, and those of nodes whose agents connect.

A record that is already there unchanged is left alone, so restarting a coordinator with
the same inventory does not bump node revisions (and so conflict with placements). Every
coordinator that is given an inventory must be given the same one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog
from google.protobuf.message import DecodeError

from kaiwo_gpu.common.errors import ConflictError, FailedPreconditionError
from kaiwo_gpu.coordinator.state.agent_reports import check_grants_fit, node_record
from kaiwo_gpu.coordinator.state.changes import KeyValue, Put, Store, Txn
from kaiwo_gpu.coordinator.state.commit_plan import MAX_TXN_OPS
from kaiwo_gpu.coordinator.state.keys import FROM_INVENTORY, KeyKind, KeyLayout, source_of
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import agent_pb2, types_pb2

log = structlog.get_logger(__name__)
MAX_ATTEMPTS = 3
T = TypeVar("T")


async def register_nodes(
    store: Store, layout: KeyLayout, nodes: Sequence[types_pb2.NodeStatus]
) -> tuple[int, int]:
    """Makes etcd hold exactly the inventory's nodes: (written, removed).

    Unchanged records are left alone; nodes an inventory registered earlier and the file no
    longer lists are deleted, unless allocations hold their GPUs. A node registered by
    anyone else (an agent) is never touched,
    not even when the file names it. Every write requires the record it read to be
    unchanged, so a concurrent writer is never overwritten; on a clash it reads again. A
    changed record must hold what is granted on its GPUs (`check_grants_fit`, as for agents:
    FailedPreconditionError, and the coordinator does not start), guarded by the GPUs'
    version keys as read before the grants.
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
    store: Store, layout: KeyLayout, nodes: Sequence[types_pb2.NodeStatus]
) -> tuple[int, int] | None:
    _, existing = await store.read_prefix(layout.node(""))
    current: dict[str, KeyValue] = {}
    for found in existing:
        parsed = layout.parse(found.key)
        if parsed is not None and parsed[0] is KeyKind.NODE:
            current[parsed[1]] = found
    by_name = {node.name: node for node in nodes}
    wanted = {name: node.SerializeToString(deterministic=True) for name, node in by_name.items()}
    writes: list[tuple[bytes, int, bytes]] = []  # (key, revision read, new value)
    replaced: list[tuple[types_pb2.NodeStatus, types_pb2.NodeStatus, KeyValue]] = []
    for name, value in wanted.items():
        kv = current.get(name)
        if kv is not None and not _from_inventory(kv.value):
            log.warning("node is registered by someone else; inventory entry ignored", node=name)
        elif kv is None:
            writes.append((layout.node(name), 0, value))
        elif kv.value != value:
            replaced.append((by_name[name], types_pb2.NodeStatus.FromString(kv.value), kv))
    # A node the file no longer lists is a record with no GPUs: it must hold no grants.
    removed = [
        (types_pb2.NodeStatus(name=name), types_pb2.NodeStatus.FromString(kv.value), kv)
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
    # A record that replaces or removes one is its own transaction, with its GPUs' guards.
    changed = replaced + removed
    for (new, _, kv), gpu_guards in zip(
        changed, await _grants_checked(store, layout, changed), strict=True
    ):
        guards = ((kv.key, kv.mod_revision), *gpu_guards)
        if new.name in wanted:
            txns.append(Txn(expect_mod_revision=guards, puts=(Put(kv.key, wanted[new.name]),)))
        else:
            txns.append(Txn(expect_mod_revision=guards, deletes=(kv.key,)))
    for txn in txns:  # a few nodes per etcd round trip, each guarded by what we read
        if not (await store.commit(txn)).succeeded:
            return None
    return len(writes) + len(replaced), len(removed)


async def _grants_checked(
    store: Store,
    layout: KeyLayout,
    replaced: list[tuple[types_pb2.NodeStatus, types_pb2.NodeStatus, KeyValue]],
) -> list[tuple[tuple[bytes, int], ...]]:
    """Refuses a replacing record that cannot hold its grants; for each, the GPU version
    keys its write must find unchanged (read before the grants, so a placement landing in
    between is counted, or fails the compare)."""
    if not replaced:
        return []
    _, gpu_keys = await store.read_prefix(layout.gpu(""))
    _, records = await store.read_prefix(layout.allocation(""))
    revisions = {kv.key: kv.mod_revision for kv in gpu_keys}
    state = ViewState.load(layout, 1, records)  # the grants as placement reads them
    guards = []
    for new, old, _ in replaced:
        check_grants_fit(new, state.granted_on(new.name), old)
        keys = [layout.gpu(status.inventory.uuid) for status in old.gpus]
        guards.append(tuple((key, revisions.get(key, 0)) for key in keys))
    return guards


def _chunks(items: list[T]) -> list[list[T]]:
    return [items[start : start + MAX_TXN_OPS] for start in range(0, len(items), MAX_TXN_OPS)]


def _from_inventory(value: bytes) -> bool:
    """Only records an inventory wrote carry its label; unreadable ones are left alone."""
    record = types_pb2.NodeStatus()
    try:
        record.ParseFromString(value)
    except DecodeError:
        return False
    return source_of(record) == FROM_INVENTORY


@dataclass(frozen=True, slots=True)
class AgentNodeClaim:
    """What a connection wrote when it took a node: its guards for later health writes."""

    record: types_pb2.NodeStatus
    record_revision: int
    presence_revision: int


async def claim_agent_node(
    store: Store,
    layout: KeyLayout,
    register: agent_pb2.Register,
    *,
    lease_id: int,
    holder: str,
    owner_of: Callable[[str], str | None],
    view: ViewState,
) -> AgentNodeClaim | None:
    """Writes the node record (when it changed) and the presence key on `lease_id`, in one
    transaction guarded by the record as read; None when it changed meanwhile (read again).

    A changed record must hold what the allocations in `view` grant on the node's GPUs
    (`check_grants_fit`), and the transaction also requires each of those GPUs' version
    keys to be at the revision `view` has for it, both taken at one instant after the
    record was read, so a placement the view had not seen makes the commit fail rather
    than slip under the new figures. The presence key is put whoever held it: the newest
    connection of a node takes it.
    """
    node_key = layout.node(register.node)
    _, current = await store.read(node_key)
    previous = None
    if current is not None:
        previous = types_pb2.NodeStatus()
        try:
            previous.ParseFromString(current.value)
        except DecodeError:  # an unreadable record is replaced by the agent's
            previous = None
    record = node_record(register, previous, owner_of)
    value = record.SerializeToString(deterministic=True)
    presence = Put(layout.agent(register.node), holder.encode(), lease=lease_id)
    revision_read = current.mod_revision if current is not None else 0
    unchanged = current is not None and current.value == value
    guards: tuple[tuple[bytes, int], ...] = ((node_key, revision_read),)
    if not unchanged:
        # No await from here to the commit's compare: the grants and the revisions that
        # guard them are one reading of the view.
        granted = view.granted_on(register.node)
        check_grants_fit(record, granted, previous)
        # A placement needs the GPU in the record: only the GPUs the record had can have
        # gained one since the view was read.
        uuids = set(granted)
        if previous is not None:
            uuids |= {status.inventory.uuid for status in previous.gpus}
        guards += tuple(view.gpu_guard(uuid) for uuid in sorted(uuids))
    result = await store.commit(
        Txn(
            expect_mod_revision=guards,
            puts=(presence,) if unchanged else (Put(node_key, value), presence),
        )
    )
    if not result.succeeded:
        return None
    return AgentNodeClaim(
        record=record,
        record_revision=revision_read if unchanged else result.revision,
        presence_revision=result.revision,
    )


async def write_agent_health(
    store: Store, layout: KeyLayout, record: types_pb2.NodeStatus, claim: AgentNodeClaim
) -> AgentNodeClaim:
    """Writes new health verdicts while `claim` still holds the node (record and presence
    key unchanged since); the claim to guard the next write with."""
    node_key = layout.node(record.name)
    result = await store.commit(
        Txn(
            expect_mod_revision=(
                (node_key, claim.record_revision),
                (layout.agent(record.name), claim.presence_revision),
            ),
            puts=(Put(node_key, record.SerializeToString(deterministic=True)),),
        )
    )
    if not result.succeeded:
        raise FailedPreconditionError(
            f"node {record.name!r} changed under this connection (another connection "
            "registered it, or its record was edited); reconnect to register again"
        )
    return AgentNodeClaim(record, result.revision, claim.presence_revision)
