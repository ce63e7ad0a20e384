"""An immutable snapshot of the cluster: inventory, placements, telemetry, and what follows.

Decisions read only a snapshot. Usage per GPU, each GPU's class (what the rules read of
it), the count of GPUs per class and the capacity indexes are derived once when a snapshot
is built; `with_allocation` and `without_allocation` derive the next snapshot by touching
only the GPUs that changed, and every per-GPU column is a persistent vector that shares what
did not change, so a commit costs about the same at 100 GPUs as at 10,000.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TypeVar

import immutables

from kaiwo_gpu.common.models import Health, Isolation
from kaiwo_gpu.common.units import MILLIS_PER_GPU
from kaiwo_gpu.coordinator.placement.capacity_index import CapacityIndex, IndexEntry
from kaiwo_gpu.coordinator.placement.cluster import (
    Gpu,
    GpuClass,
    GpuKey,
    GpuUsage,
    Node,
    PlacedAllocation,
    Telemetry,
)
from kaiwo_gpu.coordinator.placement.load import load_score
from kaiwo_gpu.coordinator.placement.persistent import ChunkedVector

_NO_TELEMETRY: Mapping[str, Telemetry] = MappingProxyType({})
K = TypeVar("K")


class ClusterSnapshot:
    """Read-only view of the cluster; positions index GPUs in (node, device index) order."""

    __slots__ = (
        "allocations",
        "class_counts",
        "classes",
        "closed_index",
        "cu_mask_index",
        "gpus",
        "holders",
        "idle_by_node",
        "keys",
        "kind_counts",
        "max_vram_mib",
        "node_of",
        "nodes",
        "nodes_by_idle",
        "position",
        "shared_index",
        "telemetry",
        "usage",
    )

    nodes: Mapping[str, Node]
    allocations: immutables.Map[str, PlacedAllocation]
    telemetry: MappingProxyType[str, Telemetry]
    gpus: tuple[Gpu, ...]
    keys: tuple[GpuKey, ...]
    node_of: tuple[Node, ...]
    position: Mapping[str, int]
    usage: ChunkedVector[GpuUsage]
    holders: ChunkedVector[tuple[str, ...]]
    classes: ChunkedVector[GpuClass]
    class_counts: immutables.Map[GpuClass, int]
    """How many GPUs are of each class (never zero): the refusal path reads these."""
    kind_counts: immutables.Map[GpuClass, int]
    """The same for classes without their labels: all a request without a label selector
    needs, and a few dozen however many label sets the nodes have."""
    idle_by_node: immutables.Map[str, int]
    """How many GPUs of each node could take a whole-GPU request (open, nothing on them), so
    a request for several whole GPUs skips nodes that cannot hold it without checking them."""
    nodes_by_idle: immutables.Map[int, immutables.Map[str, bool]]
    """The nodes with each count of such GPUs: the nodes that can hold k whole GPUs, and how
    many idle GPUs they have, without a walk over the nodes."""
    shared_index: CapacityIndex
    cu_mask_index: CapacityIndex
    closed_index: CapacityIndex
    """As many positions as GPUs, none open: what a restricted index is built from."""
    max_vram_mib: int

    @classmethod
    def build(
        cls,
        nodes: Iterable[Node],
        allocations: Iterable[PlacedAllocation] = (),
        telemetry: Mapping[str, Telemetry] = _NO_TELEMETRY,
    ) -> ClusterSnapshot:
        """Derives everything from scratch: O(n log n) in GPUs plus O(shares)."""
        snapshot = cls.__new__(cls)
        node_map = {node.name: node for node in sorted(nodes, key=lambda n: n.name)}
        gpus: list[Gpu] = []
        node_of: list[Node] = []
        for node in node_map.values():
            for gpu in sorted(node.gpus, key=lambda g: g.index):
                gpus.append(gpu)
                node_of.append(node)
        position = {gpu.uuid: pos for pos, gpu in enumerate(gpus)}
        if len(position) != len(gpus):
            raise ValueError("GPU UUIDs must be unique across the cluster")
        allocation_map = {a.allocation_id: a for a in allocations}
        usage = [GpuUsage()] * len(gpus)
        holders: list[tuple[str, ...]] = [()] * len(gpus)
        for allocation in allocation_map.values():
            for share in allocation.shares:
                pos = position.get(share.gpu_uuid)
                if pos is None:
                    continue  # the GPU left the inventory; its allocation still counts nowhere
                usage[pos] = usage[pos].plus(share, allocation.blocks_sharing)
                holders[pos] = (*holders[pos], allocation.allocation_id)
        classes = [GpuClass.of(g, n, u) for g, n, u in zip(gpus, node_of, usage, strict=True)]
        snapshot.nodes = MappingProxyType(node_map)
        snapshot.allocations = immutables.Map(allocation_map)
        snapshot.telemetry = MappingProxyType(dict(telemetry))
        snapshot.gpus = tuple(gpus)
        snapshot.keys = tuple(gpu.key for gpu in gpus)
        snapshot.node_of = tuple(node_of)
        snapshot.position = MappingProxyType(position)
        snapshot.usage = ChunkedVector(usage)
        snapshot.holders = ChunkedVector(holders)
        snapshot.classes = ChunkedVector(classes)
        snapshot.class_counts = immutables.Map(Counter(classes))
        snapshot.kind_counts = immutables.Map(Counter(c.without_labels() for c in classes))
        idle = Counter(gpu.node for gpu, c in zip(gpus, classes, strict=True) if c.open_and_idle)
        snapshot.idle_by_node = immutables.Map(idle)
        by_count: dict[int, dict[str, bool]] = {}
        for name, count in idle.items():
            by_count.setdefault(count, {})[name] = True
        snapshot.nodes_by_idle = immutables.Map(
            {count: immutables.Map(nodes) for count, nodes in by_count.items()}
        )
        snapshot.max_vram_mib = max((gpu.vram_mib for gpu in gpus), default=0)
        entries = [snapshot._index_entries(pos) for pos in range(len(gpus))]
        snapshot.shared_index = CapacityIndex.build(shared for shared, _ in entries)
        snapshot.cu_mask_index = CapacityIndex.build(cu_mask for _, cu_mask in entries)
        snapshot.closed_index = CapacityIndex.build(None for _ in entries)
        return snapshot

    def index_for(self, isolation: Isolation) -> CapacityIndex:
        """cu-mask and time-shared work never mix on a GPU, so each has its own index."""
        return self.cu_mask_index if isolation is Isolation.CU_MASK else self.shared_index

    def _index_entries(self, pos: int) -> tuple[IndexEntry | None, IndexEntry | None]:
        """The GPU's entries in the (time-shared, cu-mask) indexes: None where it is closed to
        that kind of work. One entry serves both where both are open (an idle GPU)."""
        gpu = self.gpus[pos]
        usage = self.usage[pos]
        if gpu.health is Health.UNHEALTHY or not self.node_of[pos].schedulable or usage.blocked:
            return None, None
        free_millis = MILLIS_PER_GPU - usage.allocated_millis
        if free_millis <= 0:
            return None, None
        entry = IndexEntry(
            free_millis=free_millis,
            free_memory_mib=gpu.vram_mib - usage.allocated_memory_mib,
            load=load_score(gpu, usage, self.telemetry.get(gpu.uuid)),
        )
        return (
            None if usage.cu_mask_holders else entry,
            None if usage.shared_holders else entry,
        )

    def _derive(
        self,
        allocations: immutables.Map[str, PlacedAllocation],
        changed_usage: dict[int, GpuUsage],
        changed_holders: dict[int, tuple[str, ...]],
    ) -> ClusterSnapshot:
        snapshot = self._copy()
        snapshot.allocations = allocations
        snapshot.usage = self.usage.replaced(changed_usage)
        snapshot.holders = self.holders.replaced(changed_holders)
        snapshot._reclassify(changed_usage)
        snapshot._reindex(changed_usage)
        return snapshot

    def _reclassify(self, positions: Iterable[int]) -> None:
        """Refreshes the class of `positions` and the counts (only on a fresh derivation)."""
        changes: dict[int, GpuClass] = {}
        moves: Counter[GpuClass] = Counter()
        idle_moves: Counter[str] = Counter()
        for pos in positions:
            old = self.classes[pos]
            new = GpuClass.of(self.gpus[pos], self.node_of[pos], self.usage[pos])
            if new == old:
                continue
            changes[pos] = new
            moves[old] -= 1
            moves[new] += 1
            idle_moves[self.gpus[pos].node] += new.open_and_idle - old.open_and_idle
        if not changes:
            return
        self.classes = self.classes.replaced(changes)
        self.class_counts = _moved(self.class_counts, moves)
        kinds: Counter[GpuClass] = Counter()
        for gpu_class, moved in moves.items():
            kinds[gpu_class.without_labels()] += moved
        self.kind_counts = _moved(self.kind_counts, kinds)
        self._move_idle(idle_moves)

    def _move_idle(self, moves: Mapping[str, int]) -> None:
        """Moves nodes' idle counts, in both idle_by_node and nodes_by_idle."""
        with self.idle_by_node.mutate() as idle, self.nodes_by_idle.mutate() as by_count:
            for node, moved in moves.items():
                if not moved:
                    continue
                before = idle.get(node, 0)
                after = before + moved
                if before:
                    left = by_count[before].delete(node)
                    if left:
                        by_count[before] = left
                    else:
                        del by_count[before]
                if after:
                    idle[node] = after
                    by_count[after] = by_count.get(after, immutables.Map()).set(node, True)
                else:
                    idle.pop(node, None)
            self.idle_by_node = idle.finish()
            self.nodes_by_idle = by_count.finish()

    def _copy(self) -> ClusterSnapshot:
        """A shallow copy for a derivation to replace some fields of."""
        snapshot = ClusterSnapshot.__new__(ClusterSnapshot)
        for slot in ClusterSnapshot.__slots__:
            setattr(snapshot, slot, getattr(self, slot))
        return snapshot

    def _reindex(self, positions: Iterable[int]) -> None:
        """Refreshes both indexes' entries for `positions` (only on a fresh derivation). An
        index whose entries did not move is kept: a GPU holding time-shared work stays out
        of the cu-mask index whatever is added to it, so most commits touch one index."""
        shared, cu_mask = self.shared_index, self.cu_mask_index
        shared_moved: dict[int, IndexEntry | None] = {}
        cu_mask_moved: dict[int, IndexEntry | None] = {}
        for pos in positions:
            shared_entry, cu_mask_entry = self._index_entries(pos)
            if shared_entry != shared.entries[pos]:
                shared_moved[pos] = shared_entry
            if cu_mask_entry != cu_mask.entries[pos]:
                cu_mask_moved[pos] = cu_mask_entry
        if shared_moved:
            self.shared_index = shared.updated(shared_moved)
        if cu_mask_moved:
            self.cu_mask_index = cu_mask.updated(cu_mask_moved)

    def with_allocation(self, allocation: PlacedAllocation) -> ClusterSnapshot:
        """The snapshot after `allocation` was committed (replacing one with the same id)."""
        return self.with_changes((allocation,), ())

    def without_allocation(self, allocation_id: str) -> ClusterSnapshot:
        """The snapshot after `allocation_id` was released; unknown ids change nothing."""
        if allocation_id not in self.allocations:
            return self
        return self.with_changes((), (allocation_id,))

    def with_changes(
        self, upserts: Iterable[PlacedAllocation], removals: Iterable[str]
    ) -> ClusterSnapshot:
        """The snapshot after any number of commits and releases: one derivation for all.

        Only the GPUs they touch change: arrivals are added to a GPU's usage, and a GPU
        something left is summed again from its holders. The view applies
        everything that changed since its last snapshot this way, so the per-snapshot
        copying is paid once per decision, not once per allocation.
        """
        upserts = tuple(upserts)
        replaced: set[str] = set()
        emptied: set[int] = set()  # GPUs something left: their usage is summed again
        with self.allocations.mutate() as edit:
            for allocation_id in (*removals, *(a.allocation_id for a in upserts)):
                old = edit.pop(allocation_id, None)
                if old is not None:
                    replaced.add(allocation_id)
                    emptied.update(self._positions(old))
            fresh = {a.allocation_id: a for a in upserts}
            edit.update(fresh)
            allocations = edit.finish()
        added: dict[int, list[str]] = {}
        for allocation in fresh.values():
            for pos in self._positions(allocation):
                added.setdefault(pos, []).append(allocation.allocation_id)
        changed_usage: dict[int, GpuUsage] = {}
        changed_holders: dict[int, tuple[str, ...]] = {}
        for pos in emptied | added.keys():
            if pos in emptied:
                kept = tuple(h for h in self.holders[pos] if h not in replaced)
                usage, counted = GpuUsage(), (*kept, *added.get(pos, ()))
            else:  # only arrivals: add them to what is there, whatever the holder count
                kept, counted = self.holders[pos], tuple(added[pos])
                usage = self.usage[pos]
            uuid = self.gpus[pos].uuid
            for holder_id in counted:
                holder = allocations[holder_id]
                for share in holder.shares:
                    if share.gpu_uuid == uuid:
                        usage = usage.plus(share, holder.blocks_sharing)
            changed_usage[pos] = usage
            changed_holders[pos] = (*kept, *added.get(pos, ()))
        return self._derive(allocations, changed_usage, changed_holders)

    def with_nodes(self, nodes: Iterable[Node]) -> ClusterSnapshot:
        """The snapshot with nodes replaced in place: same GPU UUIDs at the same positions,
        new health, schedulability, labels or figures. Agents change these at their own
        pace (connects, health verdicts), so this must not cost a rebuild."""
        node_map = dict(self.nodes)
        gpus = list(self.gpus)
        node_of = list(self.node_of)
        moved: set[int] = set()
        for node in nodes:
            node_map[node.name] = node
            for gpu in node.gpus:
                pos = self.position[gpu.uuid]
                gpus[pos] = gpu
                node_of[pos] = node
                moved.add(pos)
        snapshot = self._copy()
        snapshot.nodes = MappingProxyType(node_map)
        snapshot.gpus = tuple(gpus)
        snapshot.node_of = tuple(node_of)
        snapshot.max_vram_mib = max((gpu.vram_mib for gpu in gpus), default=0)
        snapshot._reclassify(moved)
        snapshot._reindex(moved)
        return snapshot

    def with_telemetry(self, changes: Mapping[str, Telemetry | None]) -> ClusterSnapshot:
        """The snapshot with newer readings (None: forget the GPU's reading).

        A reading moves only the load score, so only the load order of the indexes is
        touched, and only for GPUs whose score moved: a stream of samples that changes
        nothing placement cares about costs a dictionary copy, not an index rebuild.
        """
        telemetry = self.telemetry.copy()  # the dict beneath: a C copy, not a walk
        loads: dict[int, int] = {}
        for uuid, reading in changes.items():
            if reading is None:
                telemetry.pop(uuid, None)
            else:
                telemetry[uuid] = reading
            pos = self.position.get(uuid)
            if pos is not None:
                loads[pos] = load_score(self.gpus[pos], self.usage[pos], reading)
        snapshot = self._copy()
        snapshot.telemetry = MappingProxyType(telemetry)
        snapshot.shared_index = self.shared_index.with_loads(loads)
        snapshot.cu_mask_index = self.cu_mask_index.with_loads(loads)
        return snapshot

    def _positions(self, allocation: PlacedAllocation) -> set[int]:
        return {
            pos
            for share in allocation.shares
            if (pos := self.position.get(share.gpu_uuid)) is not None
        }

    def positions_on(self, node_names: Iterable[str]) -> list[int]:
        """The positions of the GPUs of these nodes (names that are no node's give none)."""
        position = self.position
        return [
            position[gpu.uuid]
            for name in node_names
            if (node := self.nodes.get(name)) is not None
            for gpu in node.gpus
        ]

    def allocated_millis(self) -> int:
        """Compute share granted over the whole cluster, in millis (an O(n) sum, for reads)."""
        return sum(usage.allocated_millis for usage in self.usage)

    def free_millis(self, pos: int) -> int:
        return MILLIS_PER_GPU - self.usage[pos].allocated_millis

    def free_compute_units(self, pos: int) -> int:
        """The GPU's compute units that no grant holds (grants of ids it does not have, after
        its record shrank, take none of them)."""
        units = self.gpus[pos].compute_units
        held = self.usage[pos].used_compute_units_mask & ((1 << units) - 1)
        return units - held.bit_count()


def _moved(counts: immutables.Map[K, int], moves: Mapping[K, int]) -> immutables.Map[K, int]:
    """`counts` with `moves` added, keys whose count reaches 0 dropped."""
    with counts.mutate() as edit:
        for key, moved in moves.items():
            if moved:
                left = edit.get(key, 0) + moved
                if left:
                    edit[key] = left
                else:
                    edit.pop(key, None)
        moved_counts = edit.finish()
    return moved_counts
