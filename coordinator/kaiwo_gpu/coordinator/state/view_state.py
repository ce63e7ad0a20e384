"""What the coordinator knows of etcd: records, their revisions, and the snapshot they make.

A small synchronous state with two entry points, both called only by the view:
`apply(revision, changes)` for etcd's changes, which returns the allocation events that
watchers should see, and `apply_telemetry(readings)` for live readings. The placement
snapshot is kept current where its input arrives: etcd changes are folded in by `apply`,
readings by `fold_telemetry` (which the view calls before a decision, for every reading
that arrived since the last), so reads take `snapshot` as it is. The one exception is a
node that came, went or moved GPUs: that needs a rebuild, which the next read of
`snapshot` does, once, so a thousand nodes registering cost one rebuild, not a thousand.

It fails closed: a node record it cannot read takes that node out of placement, and an
allocation record it cannot read stops all placement (`blocked_reason`), because the
capacity that allocation holds is unknown.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from kaiwo_gpu.coordinator.placement.cluster import GpuUsage, Node, PlacedAllocation, Telemetry
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.state.changes import Change, KeyValue
from kaiwo_gpu.coordinator.state.keys import FROM_AGENT, KeyKind, KeyLayout, source_of
from kaiwo_gpu.coordinator.state.records import node_from_record, placed_from_record
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

AllocationEvent = allocation_pb2.AllocationEvent
RELEASED_PREFIX = b"released:"
"""A request key whose value starts with this marks a request_id whose allocation is gone:
`released::<owner tags>` (comma-separated). Tombstones of 0.1 name the allocation,
`released:<allocation id>:<owner tags>` (the first ones no owner): read, never written, since
the id cost every tombstone 32 of its 50 bytes and only ever went into a message. A live
binding that took a released id anew keeps the tags it replaced: `<allocation id>|<owner
tags>`, so its own release keeps refusing their late duplicates."""
MAX_TOMBSTONE_OWNERS = 8
"""Past this many owners, a tombstone holds its id for everyone (ALL_OWNERS)."""
ALL_OWNERS = "*"


def owner_tag(owner: str) -> str:
    """8 hex characters that tell owners apart in a tombstone, whatever an owner's length:
    the tombstone costs the same for every owner."""
    return hashlib.sha256(owner.encode()).hexdigest()[:8]


def _tags(tags: frozenset[str]) -> str:
    return ALL_OWNERS if len(tags) > MAX_TOMBSTONE_OWNERS else ",".join(sorted(tags))


def tombstone_value(owner_tags: frozenset[str]) -> bytes:
    """What a released request key holds: the owners whose late duplicates it refuses."""
    return RELEASED_PREFIX + f":{_tags(owner_tags)}".encode()


def binding_value(allocation_id: str, inherited_tags: frozenset[str]) -> bytes:
    """A request key's value while its allocation lives."""
    if not inherited_tags:
        return allocation_id.encode()
    return f"{allocation_id}|{_tags(inherited_tags)}".encode()


def bound_allocation(value: bytes) -> str:
    """The allocation id a live request key names."""
    return value.decode(errors="replace").partition("|")[0]


def inherited_owners(value: bytes) -> frozenset[str]:
    """The owners of the tombstone a live request key replaced (none for most)."""
    return _parse_tags(value.decode(errors="replace").partition("|")[2])


def released_allocation(value: bytes) -> tuple[str, frozenset[str]]:
    """The allocation a tombstone names ("" for today's, which name none), and the owners
    that released its id."""
    text = value.removeprefix(RELEASED_PREFIX).decode(errors="replace")
    allocation_id, _, tags = text.partition(":")
    return allocation_id, _parse_tags(tags)


def _parse_tags(text: str) -> frozenset[str]:
    return frozenset(filter(None, text.split(",")))


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A released request_id: the owners that released it, and the revision of its key (a new
    allocation of another owner replaces it, guarded by that revision); the allocation it
    made only when an older tombstone names it."""

    allocation_id: str
    """Empty but for tombstones of 0.1, which named the allocation."""
    owner_tags: frozenset[str]
    """Empty for an older tombstone, which named no owner: it holds the id for everyone."""
    revision: int


AGENT_MISSING = "its agent is not connected (stopped, or its node lease expired)"


class ViewState:
    """Records from etcd as of `revision`; mutated only through `apply` and
    `apply_telemetry` (and `fold_telemetry`, which folds the readings in)."""

    def __init__(self, layout: KeyLayout) -> None:
        self.layout = layout
        self.revision = 0
        self.nodes: dict[str, types_pb2.NodeStatus] = {}
        self.node_revisions: dict[str, int] = {}
        self.allocations: dict[str, types_pb2.Allocation] = {}
        self._placed: dict[str, PlacedAllocation] = {}  # what each record holds
        self.allocation_revisions: dict[str, int] = {}
        self.allocation_by_request: dict[str, str] = {}
        self.released_requests: dict[str, Tombstone] = {}
        self.request_keys: dict[str, str] = {}  # request_id -> the allocation it made
        self.inherited_tags: dict[str, frozenset[str]] = {}  # owners a live binding replaced
        self.gpu_revisions: dict[str, int] = {}
        self.unreadable_nodes: set[str] = set()
        self.unreadable_allocations: set[str] = set()
        self._excluded_nodes: set[str] = set()  # as of the last rebuild
        self.allocations_by_node: dict[str, set[str]] = {}
        self.nodes_by_gpu: dict[str, set[str]] = {}  # GPU UUID -> the nodes naming it
        self.removed_allocations: Counter[str] = Counter()  # "released" / "expired", as seen
        self.agents: dict[str, str] = {}  # node -> what its presence key says (a coordinator)
        self.agent_revisions: dict[str, int] = {}
        self.telemetry: dict[str, Telemetry] = {}  # by GPU UUID; fed by agents, never stored
        self._telemetry_unsnapped: dict[str, Telemetry | None] = {}
        self._snapshot = ClusterSnapshot.build(())
        self._rebuild_due = True  # a node came, went or moved since `_snapshot` was built
        self._unsnapped: set[str] = set()  # allocation ids changed since the last refresh
        self._nodes_unsnapped: set[str] = set()  # nodes whose record or presence changed

    @classmethod
    def load(cls, layout: KeyLayout, revision: int, kvs: Iterable[KeyValue]) -> ViewState:
        state = cls(layout)
        state.apply(revision, [Change(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in kvs])
        return state

    @property
    def blocked_reason(self) -> str | None:
        """Why no placement may be made on this state, or None."""
        if not self.unreadable_allocations:
            return None
        example = min(self.unreadable_allocations)
        return (
            f"etcd holds {len(self.unreadable_allocations)} allocation record(s) this "
            f"coordinator cannot read (e.g. {example!r}), so the capacity they hold is unknown; "
            "placement is refused until they are removed or the coordinator is upgraded"
        )

    def apply(self, revision: int, changes: Sequence[Change]) -> list[AllocationEvent]:
        events: list[AllocationEvent] = []
        for change in changes:
            parsed = self.layout.parse(change.key)
            if parsed is None:
                continue
            kind, name = parsed
            if kind is KeyKind.ALLOCATION:
                event = self._apply_allocation(name, change)
                if event is not None:
                    events.append(event)
            elif kind is KeyKind.NODE:
                self._apply_node(name, change)
            elif kind is KeyKind.REQUEST:
                self._apply_request(name, change)
            elif kind is KeyKind.AGENT:
                self._apply_agent(name, change)
            elif change.value is None:
                self.gpu_revisions.pop(name, None)
            else:
                self.gpu_revisions[name] = change.revision
        self.revision = max(self.revision, revision)
        self._refresh_snapshot()
        return events

    def _apply_request(self, request_id: str, change: Change) -> None:
        self.released_requests.pop(request_id, None)
        self.request_keys.pop(request_id, None)
        self.inherited_tags.pop(request_id, None)
        if change.value is None:
            return
        if change.value.startswith(RELEASED_PREFIX):
            allocation_id, tags = released_allocation(change.value)
            self.released_requests[request_id] = Tombstone(allocation_id, tags, change.revision)
        else:
            self.request_keys[request_id] = bound_allocation(change.value)
            if inherited := inherited_owners(change.value):
                self.inherited_tags[request_id] = inherited

    def _apply_agent(self, node: str, change: Change) -> None:
        self._nodes_unsnapped.add(node)
        if change.value is None:
            self.agents.pop(node, None)
            self.agent_revisions.pop(node, None)
        else:
            self.agents[node] = change.value.decode(errors="replace")
            self.agent_revisions[node] = change.revision

    def apply_telemetry(self, readings: Mapping[str, Telemetry | None]) -> None:
        """Newer readings by GPU UUID (None forgets one), kept until `fold_telemetry`."""
        for uuid, reading in readings.items():
            if reading is None:
                self.telemetry.pop(uuid, None)
            else:
                self.telemetry[uuid] = reading
        self._telemetry_unsnapped.update(readings)

    @property
    def snapshot(self) -> ClusterSnapshot:
        """The engine's view of the cluster, current with every change applied."""
        if self._rebuild_due:
            self._rebuild()
        return self._snapshot

    def fold_telemetry(self) -> None:
        """Folds the readings that arrived since the last fold into the snapshot: one
        re-index for any number of batches, which is why the view coalesces them."""
        if self._rebuild_due:  # the rebuild weighs every reading
            self._telemetry_unsnapped.clear()
        elif self._telemetry_unsnapped:
            changes, self._telemetry_unsnapped = self._telemetry_unsnapped, {}
            self._snapshot = self._snapshot.with_telemetry(changes)

    def orphaned_request(self, request_id: str) -> str | None:
        """The allocation id a request key names when that allocation is gone, else None.

        A request key and its allocation are written and expire together; a key left alone
        means someone removed the record by hand.
        """
        allocation_id = self.request_keys.get(request_id)
        if allocation_id is None or allocation_id in self.allocations:
            return None
        if allocation_id in self.unreadable_allocations:
            return None
        return allocation_id

    def _forget_allocation(self, allocation_id: str) -> types_pb2.Allocation | None:
        self.unreadable_allocations.discard(allocation_id)
        previous = self.allocations.pop(allocation_id, None)
        self._placed.pop(allocation_id, None)
        self.allocation_revisions.pop(allocation_id, None)
        if previous is not None:
            if self.allocation_by_request.get(previous.request_id) == allocation_id:
                del self.allocation_by_request[previous.request_id]
            self._unsnapped.add(allocation_id)
            _unindex(self.allocations_by_node, previous.node, allocation_id)
        return previous

    def _apply_allocation(self, allocation_id: str, change: Change) -> AllocationEvent | None:
        if change.value is None:
            previous = self._forget_allocation(allocation_id)
            if previous is None:
                return None
            # A release puts the tombstone in the transaction that deletes the record; an
            # expiry (or a revoked lease) deletes the record and its request key together.
            tombstone = self.released_requests.get(previous.request_id)
            released = tombstone is not None and tombstone.revision == change.revision
            self.removed_allocations["released" if released else "expired"] += 1
            return AllocationEvent(
                kind=AllocationEvent.KIND_REMOVED, allocation=previous, revision=change.revision
            )
        record = types_pb2.Allocation()
        try:
            record.ParseFromString(change.value)
            if record.id != allocation_id:
                raise ValueError(f"record {record.id!r} stored under {allocation_id!r}")
            placed = placed_from_record(record)
        except Exception:  # any record we cannot account for blocks placement
            self._forget_allocation(allocation_id)
            self.unreadable_allocations.add(allocation_id)
            return None
        self.unreadable_allocations.discard(allocation_id)
        previous = self.allocations.get(allocation_id)
        if (
            previous is not None
            and previous.request_id != record.request_id
            and self.allocation_by_request.get(previous.request_id) == allocation_id
        ):
            del self.allocation_by_request[previous.request_id]
        if previous is not None and previous.node != record.node:
            _unindex(self.allocations_by_node, previous.node, allocation_id)
        self.allocations_by_node.setdefault(record.node, set()).add(allocation_id)
        self.allocations[allocation_id] = record
        self._placed[allocation_id] = placed
        self.allocation_revisions[allocation_id] = change.revision
        self.allocation_by_request[record.request_id] = allocation_id
        self._unsnapped.add(allocation_id)
        if previous is not None:
            return None
        return AllocationEvent(
            kind=AllocationEvent.KIND_ADDED, allocation=record, revision=change.revision
        )

    def _apply_node(self, name: str, change: Change) -> None:
        self._nodes_unsnapped.add(name)
        self.unreadable_nodes.discard(name)
        old = self.nodes.get(name)
        for status in old.gpus if old is not None else ():
            _unindex(self.nodes_by_gpu, status.inventory.uuid, name)
        if change.value is None:
            self.nodes.pop(name, None)
            self.node_revisions.pop(name, None)
            return
        # The revision is kept even for a record we cannot read, so commits compare right.
        self.node_revisions[name] = change.revision
        record = types_pb2.NodeStatus()
        try:
            record.ParseFromString(change.value)
            if record.name != name:  # placement keys nodes by the record's name
                raise ValueError(f"record {record.name!r} stored under {name!r}")
            node_from_record(record)
        except Exception:  # an unreadable node takes no placements
            self.nodes.pop(name, None)
            self.unreadable_nodes.add(name)
            return
        self.nodes[name] = record
        for status in record.gpus:
            self.nodes_by_gpu.setdefault(status.inventory.uuid, set()).add(name)

    def granted_on(self, node: str) -> dict[str, GpuUsage]:
        """By GPU UUID: what the allocations on `node` hold (a share named twice counts
        twice, as placement counts it)."""
        granted: dict[str, GpuUsage] = {}
        for allocation_id in sorted(self.allocations_by_node.get(node, ())):
            placed = self._placed.get(allocation_id)
            if placed is None:  # an unreadable record: it blocks all placement anyway
                continue
            for share in placed.shares:
                before = granted.get(share.gpu_uuid, GpuUsage())
                granted[share.gpu_uuid] = before.plus(share, placed.blocks_sharing)
        return granted

    def gpu_owner(self, uuid: str, besides: str = "") -> str | None:
        """A node other than `besides` whose record names the GPU, if any."""
        return min((n for n in self.nodes_by_gpu.get(uuid, ()) if n != besides), default=None)

    def _placeable_nodes(self) -> list[Node]:
        """Nodes in name order; a node naming a GPU UUID an earlier node has is left out."""
        seen: set[str] = set()
        nodes: list[Node] = []
        self._excluded_nodes = set()
        for name in sorted(self.nodes):
            node = self._node(name, self.nodes[name])
            uuids = [gpu.uuid for gpu in node.gpus]
            if seen.intersection(uuids) or len(set(uuids)) != len(uuids):
                self._excluded_nodes.add(name)
                continue
            seen.update(uuids)
            nodes.append(node)
        return nodes

    def agentless(self, name: str) -> bool:
        """Whether `name` is an agent's node whose agent is not connected (its presence key
        is gone): out of placement, and a candidate for removal."""
        record = self.nodes.get(name)
        return record is not None and source_of(record) == FROM_AGENT and name not in self.agents

    def gpu_guard(self, uuid: str) -> tuple[bytes, int]:
        """The compare that a write depending on what is placed on the GPU makes: its
        version key at the revision this state has for it (0: never placed on)."""
        return self.layout.gpu(uuid), self.gpu_revisions.get(uuid, 0)

    def _node(self, name: str, record: types_pb2.NodeStatus) -> Node:
        """The node as placement sees it: an agent's node needs its agent connected."""
        node = node_from_record(record)
        if node.schedulable and self.agentless(name):
            node = replace(node, schedulable=False, unschedulable_reason=AGENT_MISSING)
        return node

    def _changed_nodes(self, snapshot: ClusterSnapshot) -> list[Node] | None:
        """Nodes changed in place (same GPUs at the same positions), or None when the
        change needs a rebuild: a node that came, went, turned unreadable or moved GPUs."""
        changed: list[Node] = []
        for name in self._nodes_unsnapped:
            record = self.nodes.get(name)
            old = snapshot.nodes.get(name)
            if record is None or old is None or name in self._excluded_nodes:
                if record is None and old is None and name not in self._excluded_nodes:
                    continue  # a presence key for a node that has no record: nothing to do
                return None
            node = self._node(name, record)
            if _layout(node) != _layout(old):
                return None
            changed.append(node)
        return changed

    def _refresh_snapshot(self) -> None:
        """Folds the etcd changes since the last refresh into the snapshot in one step (a
        renewal, same placement and new expiry, changes nothing), or, when a node came,
        went or moved GPUs, leaves the rebuild to the next read of `snapshot`."""
        if not self._rebuild_due and self._nodes_unsnapped:
            changed = self._changed_nodes(self._snapshot)
            if changed is None:
                self._rebuild_due = True
            elif changed:
                self._snapshot = self._snapshot.with_nodes(changed)
        self._nodes_unsnapped.clear()
        if self._rebuild_due:  # the rebuild places every allocation
            self._unsnapped.clear()
            return
        if self._unsnapped:
            current = self._snapshot.allocations
            upserts = []
            removals = []
            for allocation_id in self._unsnapped:
                placed = self._placed.get(allocation_id)
                if placed is None:
                    if allocation_id in current:
                        removals.append(allocation_id)
                elif current.get(allocation_id) != placed:
                    upserts.append(placed)
            self._unsnapped.clear()
            if upserts or removals:
                self._snapshot = self._snapshot.with_changes(upserts, removals)

    def _rebuild(self) -> None:
        self._telemetry_unsnapped.clear()
        self._snapshot = ClusterSnapshot.build(
            self._placeable_nodes(), self._placed.values(), self.telemetry
        )
        self._rebuild_due = False


def _unindex(index: dict[str, set[str]], key: str, member: str) -> None:
    """Takes `member` out of `index[key]`, and the key with its last member."""
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]


def _layout(node: Node) -> list[tuple[str, int]]:
    return sorted((gpu.uuid, gpu.index) for gpu in node.gpus)
