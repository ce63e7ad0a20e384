"""Turns a batch of placement decisions into one guarded etcd transaction (pure).

The transaction compares, for every GPU a decision used, the revision of the GPU's version
key that the view read, for every node the revision of its record and, for a node whose
agent the view saw connected, the revision of its presence key; it also requires each
request_id to be new. If any of that moved, nothing is written and the allocator decides
again on a fresher view. This is what keeps several coordinators from over-committing a
GPU, and a coordinator whose view missed a node lease's expiry (it was cut off from etcd
meanwhile) from placing on that node.
"""

from __future__ import annotations

from kaiwo_gpu.coordinator.state.changes import Put, Txn
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.view_state import ViewState, binding_value
from kaiwo_gpu.v1 import types_pb2

MAX_TXN_OPS = 128
"""etcd's default --max-txn-ops: the most compares, or operations, in one transaction."""


class CommitPlan:
    """Accumulates decisions until the next one would not fit in one transaction."""

    def __init__(self, layout: KeyLayout, state: ViewState) -> None:
        self._layout = layout
        self._state = state
        self._expect: dict[bytes, int] = {}
        self._puts: list[Put] = []
        self.allocations: list[types_pb2.Allocation] = []

    def _growth(self, record: types_pb2.Allocation) -> tuple[dict[bytes, int], list[Put]]:
        layout, state = self._layout, self._state
        expect: dict[bytes, int] = {}
        puts: list[Put] = []
        node_key = layout.node(record.node)
        if node_key not in self._expect:
            expect[node_key] = state.node_revisions.get(record.node, 0)
            presence = state.agent_revisions.get(record.node)
            if presence is not None:  # gone or re-put since: the view is behind on the node
                expect[layout.agent(record.node)] = presence
        for grant in record.gpus:
            gpu_key, revision = state.gpu_guard(grant.uuid)
            if gpu_key not in self._expect:
                expect[gpu_key] = revision
                puts.append(Put(gpu_key, b""))
        # A new request_id, or one whose tombstone (another owner's) this replaces.
        released = state.released_requests.get(record.request_id)
        expect[layout.request(record.request_id)] = released.revision if released else 0
        return expect, puts

    def add(self, record: types_pb2.Allocation) -> bool:
        """Plans `record` if it fits in the transaction; False (and no change) if not.

        Its lease may still be filled in before `txn()` is called.
        """
        expect, puts = self._growth(record)
        compares = len(self._expect) + len(expect)
        operations = len(self._puts) + len(puts) + 2 * (len(self.allocations) + 1)
        if max(compares, operations) > MAX_TXN_OPS:
            return False
        self._expect.update(expect)
        self._puts.extend(puts)
        self.allocations.append(record)
        return True

    def _binding(self, record: types_pb2.Allocation) -> bytes:
        """The request key's value; one that replaces a tombstone keeps its owners."""
        released = self._state.released_requests.get(record.request_id)
        return binding_value(record.id, released.owner_tags if released else frozenset())

    def txn(self) -> Txn:
        records = [
            Put(self._layout.allocation(a.id), a.SerializeToString(), a.lease_id)
            for a in self.allocations
        ]
        requests = [
            Put(self._layout.request(a.request_id), self._binding(a), a.lease_id)
            for a in self.allocations
        ]
        return Txn(
            expect_mod_revision=tuple(self._expect.items()),
            puts=(*records, *requests, *self._puts),
            read_on_failure=tuple(self._expect),
        )
