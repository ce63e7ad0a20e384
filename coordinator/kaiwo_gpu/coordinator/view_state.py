"""What the coordinator knows of etcd: records, their revisions, and the snapshot they make.

A small synchronous state with one entry point, `apply(revision, changes)`, which returns the
allocation events that watchers should see. The async shell (`view`) feeds it from the
etcd watch; decisions read `snapshot()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf.message import DecodeError

from kaiwo_gpu.coordinator.changes import Change, KeyValue
from kaiwo_gpu.coordinator.keys import KeyKind, KeyLayout
from kaiwo_gpu.coordinator.records import node_from_record, placed_from_record
from kaiwo_gpu.coordinator.snapshot import ClusterSnapshot
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

AllocationEvent = allocation_pb2.AllocationEvent


class ViewState:
    """Records from etcd as of `revision`; mutated only through `apply`."""

    def __init__(self, layout: KeyLayout) -> None:
        self.layout = layout
        self.revision = 0
        self.nodes: dict[str, types_pb2.NodeStatus] = {}
        self.node_revisions: dict[str, int] = {}
        self.allocations: dict[str, types_pb2.Allocation] = {}
        self.allocation_revisions: dict[str, int] = {}
        self.allocation_by_request: dict[str, str] = {}
        self.gpu_revisions: dict[str, int] = {}
        self.unreadable_keys = 0
        self._snapshot: ClusterSnapshot | None = None

    @classmethod
    def load(cls, layout: KeyLayout, revision: int, kvs: Iterable[KeyValue]) -> ViewState:
        state = cls(layout)
        state.apply(revision, [Change(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in kvs])
        return state

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
            elif kind is KeyKind.GPU:
                if change.value is None:
                    self.gpu_revisions.pop(name, None)
                else:
                    self.gpu_revisions[name] = change.revision
        self.revision = max(self.revision, revision)
        return events

    def _apply_allocation(self, allocation_id: str, change: Change) -> AllocationEvent | None:
        previous = self.allocations.get(allocation_id)
        if change.value is None:
            if previous is None:
                return None
            del self.allocations[allocation_id]
            del self.allocation_revisions[allocation_id]
            if self.allocation_by_request.get(previous.request_id) == allocation_id:
                del self.allocation_by_request[previous.request_id]
            if self._snapshot is not None:
                self._snapshot = self._snapshot.without_allocation(allocation_id)
            return AllocationEvent(
                kind=AllocationEvent.KIND_REMOVED, allocation=previous, revision=change.revision
            )
        record = types_pb2.Allocation()
        try:
            record.ParseFromString(change.value)
            placed = placed_from_record(record)
        except (DecodeError, ValueError):
            self.unreadable_keys += 1
            return None
        self.allocations[allocation_id] = record
        self.allocation_revisions[allocation_id] = change.revision
        self.allocation_by_request[record.request_id] = allocation_id
        if previous is not None:
            return None  # a renewal rewrote the record; the placement is the same
        if self._snapshot is not None:
            self._snapshot = self._snapshot.with_allocation(placed)
        return AllocationEvent(
            kind=AllocationEvent.KIND_ADDED, allocation=record, revision=change.revision
        )

    def _apply_node(self, name: str, change: Change) -> None:
        self._snapshot = None
        if change.value is None:
            self.nodes.pop(name, None)
            self.node_revisions.pop(name, None)
            return
        record = types_pb2.NodeStatus()
        try:
            record.ParseFromString(change.value)
            node_from_record(record)
        except (DecodeError, ValueError):
            self.unreadable_keys += 1
            return
        self.nodes[name] = record
        self.node_revisions[name] = change.revision

    def snapshot(self) -> ClusterSnapshot:
        """The engine's view; rebuilt after node changes, derived incrementally otherwise."""
        if self._snapshot is None:
            self._snapshot = ClusterSnapshot.build(
                (node_from_record(record) for record in self.nodes.values()),
                (placed_from_record(record) for record in self.allocations.values()),
            )
        return self._snapshot
