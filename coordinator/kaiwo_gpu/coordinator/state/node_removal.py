"""Removing a node record: when a node may go, and the guarded delete that takes it away.

A node may go when nothing depends on it: no agent holds it (its presence key is gone), no
allocation names it, and no inventory file lists it (the coordinator that reads the file
would write it back; take it out of the file instead, and the next start deletes it).
Operators remove nodes by hand (`kaiwo-gpu node remove`); a coordinator can also expire
agent-registered nodes whose agent has been gone for a set time (`agentless_since`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from kaiwo_gpu.common.errors import (
    ConflictError,
    FailedPreconditionError,
    KaiwoGpuError,
    NotFoundError,
    UnavailableError,
)
from kaiwo_gpu.common.names import escaped
from kaiwo_gpu.coordinator.state.changes import Store, Txn
from kaiwo_gpu.coordinator.state.keys import FROM_INVENTORY, source_of
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import types_pb2

MAX_ATTEMPTS = 3
CATCH_UP_S = 5.0
"""How long a removal waits for the view to show what moved under it (or the removal)."""


def removal_refusal(state: ViewState, name: str) -> KaiwoGpuError | None:
    """Why `name` may not be removed now, or None. A record this coordinator cannot read
    may be removed (it takes no placements anyway) once the same rules hold."""
    if name not in state.nodes and name not in state.unreadable_nodes:
        return NotFoundError(f"no node named {name!r}")
    if state.unreadable_allocations:
        # Any of them may name the node: fail closed, as placement does.
        return FailedPreconditionError(f"{state.blocked_reason}; no node is removed meanwhile")
    holder = state.agents.get(name)
    if holder is not None:
        return FailedPreconditionError(
            f"node {name!r} has its agent connected (to coordinator {escaped(holder)!r}); "
            "stop the agent first: the node can be removed once its node lease expires"
        )
    held = state.allocations_by_node.get(name, set())
    if held:
        return FailedPreconditionError(
            f"node {name!r} holds {len(held)} allocation(s) (e.g. {min(held)}); release them first"
        )
    record = state.nodes.get(name)
    if record is not None and source_of(record) == FROM_INVENTORY:
        return FailedPreconditionError(
            f"node {name!r} comes from the coordinator's inventory file, which would write "
            "it back; take it out of the file (the next start removes it)"
        )
    return None


def removal_txn(state: ViewState, name: str) -> Txn:
    """Deletes the record and its GPUs' version keys (those no other node names), if the
    record, the absent presence key and every GPU version key are as `state` read them: an
    agent that connects or a placement that lands meanwhile makes it fail."""
    layout = state.layout
    record = state.nodes.get(name)
    uuids = sorted({gpu.inventory.uuid for gpu in record.gpus}) if record is not None else []
    guards = (
        (layout.node(name), state.node_revisions[name]),
        (layout.agent(name), 0),
        *(state.gpu_guard(uuid) for uuid in uuids),
    )
    unshared = [uuid for uuid in uuids if state.gpu_owner(uuid, besides=name) is None]
    return Txn(
        expect_mod_revision=guards,
        deletes=(layout.node(name), *(layout.gpu(uuid) for uuid in unshared)),
    )


async def remove_node(store: Store, view: ClusterView, name: str) -> types_pb2.NodeStatus:
    """Removes `name` by the rules above; the record as it was (a bare one when it could
    not be read). Refusals raise their error; a node that keeps changing, ConflictError."""
    for _ in range(MAX_ATTEMPTS):
        state = view.state
        refusal = removal_refusal(state, name)
        if refusal is not None:
            raise refusal
        record = state.nodes.get(name, types_pb2.NodeStatus(name=name))
        result = await store.commit(removal_txn(state, name))
        # Either way, let the view show what etcd has now before answering or deciding
        # again, so a listing right after a removal no longer shows the node.
        with contextlib.suppress(UnavailableError):
            await view.wait_for(result.revision, CATCH_UP_S)
        if result.succeeded:
            return record
    raise ConflictError(f"node {name!r} kept changing while it was being removed; try again")


def agentless_since(
    previous: Mapping[str, float], state: ViewState, now: float
) -> dict[str, float]:
    """Since when each agent-registered node has been without its agent, as far as this
    coordinator has seen: a node newly without one starts at `now`, one whose agent is
    back (or whose record is gone) drops out."""
    return {name: previous.get(name, now) for name in state.nodes if state.agentless(name)}


def expired_nodes(since: Mapping[str, float], now: float, after_s: float) -> list[str]:
    """The nodes that have been without their agent for `after_s` or longer."""
    return sorted(name for name, start in since.items() if now - start >= after_s)
