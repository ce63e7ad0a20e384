"""The store, the commit guard and the view against a real etcd, plus their pure parts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kaiwo_gpu.common.errors import InvalidArgumentError, UnavailableError
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.placement.engine import Placement, place
from kaiwo_gpu.coordinator.state.changes import Change, Put, Txn, TxnResult
from kaiwo_gpu.coordinator.state.commit_plan import MAX_TXN_OPS, CommitPlan
from kaiwo_gpu.coordinator.state.inventory import (
    load_inventory,
    parse_inventory,
    synthetic_inventory,
)
from kaiwo_gpu.coordinator.state.keys import KeyKind, KeyLayout
from kaiwo_gpu.coordinator.state.records import allocation_record, placed_from_record
from kaiwo_gpu.coordinator.state.registration import register_nodes
from kaiwo_gpu.coordinator.state.store import EtcdStore, parse_endpoints
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.coordinator.state.view_state import AllocationEvent, ViewState
from kaiwo_gpu.v1 import types_pb2
from tests.harness import INVENTORY, audit_etcd

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_key_layout_round_trips_and_rejects_foreign_keys() -> None:
    layout = KeyLayout("/k/v1/")
    assert layout.parse(layout.request("slurm/123")) == (KeyKind.REQUEST, "slurm/123")
    assert layout.parse(layout.gpu("GPU-1")) == (KeyKind.GPU, "GPU-1")
    assert layout.parse(b"/k/v1/other/x") is None
    assert layout.parse(b"/k/v1/nodes/nested/nodes/n") is None  # a prefix inside ours
    assert layout.parse(b"/elsewhere/nodes/x") is None
    for bad in ("k/v1/", "/k/v1", "/k//v1/", "/k v/"):
        with pytest.raises(InvalidArgumentError, match="prefix"):
            KeyLayout(bad)


def test_endpoints_become_one_grpc_target() -> None:
    assert parse_endpoints(["127.0.0.1:2379"])[2] == "127.0.0.1:2379"
    assert parse_endpoints(["http://10.0.0.1:2379", "10.0.0.2:2379"])[2] == (
        "ipv4:10.0.0.1:2379,10.0.0.2:2379"
    )
    for bad in (["nohost"], ["a:0"], [], ["etcd-a:2379", "etcd-b:2379"]):
        with pytest.raises(InvalidArgumentError, match="etcd"):
            parse_endpoints(bad)


def test_inventory_expands_counts_and_names_bad_paths() -> None:
    nodes = parse_inventory(INVENTORY)
    assert [n.name for n in nodes] == ["node-a", "node-b"]
    assert [g.inventory.index for g in nodes[0].gpus] == [0, 1, 2, 3]
    assert nodes[1].gpus[0].inventory.vram_mib == 65536
    assert len({g.inventory.uuid for n in nodes for g in n.gpus}) == 6
    assert parse_inventory(INVENTORY) == nodes  # UUIDs are derived, so stable
    cases = {
        "nodes: []": "nodes",
        "nodes: [{name: A, gpus: [{model: MI300X, count: 1}]}]": "nodes[0].name",
        "nodes: [{name: a, gpus: [{model: MI300X, count: 0}]}]": "nodes[0].gpus[0].count",
        "nodes: [{name: a, gpus: [{model: H100, count: 1}]}]": "nodes[0].gpus[0].vram_mib",
        "nodes: [{name: a, gpus: [{model: MI300X, count: 1, colour: red}]}]": "nodes[0].gpus[0]",
        "nodes: [{name: a, gpus: [{model: MI300X, count: 1, compute_partition: XPX}]}]": (
            "compute_partition"
        ),
        "nodes: [{name: a, gpus: [{model: MI300X, count: 1}]}, {name: a, gpus: []}]": (
            "nodes[1].name"
        ),
        "nodes: [{name: a, gpus: [{model: MI300X, uuid: X}, {model: MI300X, uuid: X}]}]": "UUIDs",
        "nodes: {": "YAML",
    }
    for text, named in cases.items():
        with pytest.raises(InvalidArgumentError, match=named.replace("[", r"\[")):
            parse_inventory(text)


async def _loaded(etcd: LocalEtcd, prefix: str) -> tuple[EtcdStore, KeyLayout, ViewState]:
    store = EtcdStore([etcd.endpoint])
    layout = KeyLayout(prefix)
    await register_nodes(store, layout, parse_inventory(INVENTORY))
    revision, kvs = await store.read_prefix(layout.all_keys)
    return store, layout, ViewState.load(layout, revision, kvs)


async def test_a_plan_decided_on_a_stale_view_is_refused(etcd: LocalEtcd, prefix: str) -> None:
    store, layout, stale = await _loaded(etcd, prefix)
    first = CommitPlan(layout, stale)
    made = _record(stale, "r-1", 700)
    assert first.add(made)
    assert (await store.commit(first.txn())).succeeded

    # Another coordinator still holds the old view and puts 700 more on the same GPU.
    second = CommitPlan(layout, stale)
    again = _record(stale, "r-2", 700)
    uuid = made.gpus[0].uuid
    assert again.gpus[0].uuid == uuid
    assert second.add(again)
    result = await store.commit(second.txn())
    assert not result.succeeded
    assert result.current[layout.gpu(uuid)].mod_revision > stale.gpu_revisions.get(uuid, 0)

    # The same request_id twice is refused even on a fresh view.
    revision, kvs = await store.read_prefix(layout.all_keys)
    fresh = ViewState.load(layout, revision, kvs)
    twin = CommitPlan(layout, fresh)
    assert twin.add(_record(fresh, "r-1", 100, allocation_id="another"))
    assert not (await store.commit(twin.txn())).succeeded
    await store.close()


async def test_a_plan_on_a_view_that_missed_the_node_lease_expiring_is_refused(
    etcd: LocalEtcd, prefix: str
) -> None:
    """Found by the fault suite: a coordinator cut off from etcd kept placing on nodes whose
    agents' leases had lapsed meanwhile, and committed once the partition healed."""
    store, layout, _ = await _loaded(etcd, prefix)
    presences = tuple(Put(layout.agent(node), b"coordinator-1") for node in ("node-a", "node-b"))
    await store.commit(Txn(puts=presences))
    stale = ViewState.load(layout, *(await store.read_prefix(layout.all_keys)))
    record = _record(stale, "r-1", 500)
    assert record.node in stale.agents
    await store.commit(Txn(deletes=(layout.agent(record.node),)))  # its node lease lapsed
    plan = CommitPlan(layout, stale)
    assert plan.add(record)
    assert not (await store.commit(plan.txn())).succeeded
    fresh = ViewState.load(layout, *(await store.read_prefix(layout.all_keys)))
    again = CommitPlan(layout, fresh)
    assert again.add(_record(fresh, "r-1", 500))
    assert (await store.commit(again.txn())).succeeded  # an inventory node needs no agent
    await store.close()


@pytest.mark.parametrize("strategy", ["best-fit", "worst-fit"])
async def test_commit_plan_stays_within_etcd_txn_limits(
    etcd: LocalEtcd, prefix: str, strategy: str
) -> None:
    """best-fit stacks allocations on few GPUs (puts bind), worst-fit spreads (compares bind)."""
    store = EtcdStore([etcd.endpoint])
    layout = KeyLayout(prefix)
    await register_nodes(store, layout, synthetic_inventory(10, 8, "MI300X"))
    state = ViewState.load(layout, *(await store.read_prefix(layout.all_keys)))
    snapshot = state.snapshot
    plan = CommitPlan(layout, state)
    for i in range(400):
        request = AllocationRequest(f"m-{i}", fraction_millis=100, strategy=strategy)
        decision = place(request, snapshot)
        assert isinstance(decision, Placement)
        record = allocation_record(request, decision, f"id-{i}", lease_id=0, created_at=NOW)
        if not plan.add(record):
            break
        snapshot = snapshot.with_allocation(decision.as_allocation(f"id-{i}"))
    assert 30 < len(plan.allocations) < 400
    assert plan.txn().size <= MAX_TXN_OPS
    assert (await store.commit(plan.txn())).succeeded
    await store.close()
    await audit_etcd(etcd.endpoint, prefix)


async def test_view_follows_changes_and_resumes_after_etcd_restart(
    own_etcd: LocalEtcd, prefix: str
) -> None:
    store, layout, _ = await _loaded(own_etcd, prefix)
    view = ClusterView(store, layout, retry_max_s=0.2)
    await view.start()
    assert set(view.state.nodes) == {"node-a", "node-b"}
    subscription = view.subscribe()
    record = _record(view.state, "v-1", 500, allocation_id="v1")
    plan = CommitPlan(layout, view.state)
    assert plan.add(record)
    result = await store.commit(plan.txn())
    await view.wait_for(result.revision, 10)
    assert "v1" in view.state.allocations
    event = await asyncio.wait_for(subscription.queue.get(), 5)
    assert event is not None
    assert event.allocation.id == "v1"

    await asyncio.to_thread(own_etcd.restart, kill=True)
    deleted = await _retry(lambda: store.commit(_delete(layout, "v1", "v-1")))
    await view.wait_for(deleted, 20)
    assert "v1" not in view.state.allocations
    assert (
        view.state.snapshot.usage
        == ViewState.load(layout, *(await store.read_prefix(layout.all_keys))).snapshot.usage
    )
    await view.stop()
    await store.close()


def _delete(layout: KeyLayout, allocation_id: str, request_id: str) -> Txn:
    return Txn(deletes=(layout.allocation(allocation_id), layout.request(request_id)))


async def _retry(commit: Callable[[], Awaitable[TxnResult]]) -> int:
    for _ in range(100):
        try:
            return (await commit()).revision
        except UnavailableError:
            await asyncio.sleep(0.1)
    raise AssertionError("etcd did not come back")


def test_unreadable_records_are_counted_not_fatal() -> None:
    layout = KeyLayout("/k/v1/")
    state = ViewState(layout)
    events = state.apply(5, [Change(layout.allocation("x"), b"\xff\xff not proto", 5)])
    assert events == []
    assert state.unreadable_allocations == {"x"}
    assert state.revision == 5


def test_the_shipped_example_inventory_parses() -> None:
    example = Path(__file__).parent.parent / "deploy" / "examples" / "nodes.yaml"
    nodes = load_inventory(example)
    assert [len(node.gpus) for node in nodes] == [8, 2]


async def test_view_relists_after_compaction_and_reports_what_changed(
    own_etcd: LocalEtcd, prefix: str
) -> None:
    store, layout, _ = await _loaded(own_etcd, prefix)
    view = ClusterView(store, layout, retry_max_s=0.2)
    await view.start()
    gone = _record(view.state, "gone", 300)
    plan = CommitPlan(layout, view.state)
    assert plan.add(gone)
    await view.wait_for((await store.commit(plan.txn())).revision, 10)
    await view.stop()  # the coordinator is cut off while etcd moves on
    subscription = view.subscribe()

    fresh_state = ViewState.load(layout, *(await store.read_prefix(layout.all_keys)))
    added = _record(fresh_state, "added", 300)
    plan = CommitPlan(layout, fresh_state)
    assert plan.add(added)
    await store.commit(plan.txn())
    deleted = await store.commit(_delete(layout, gone.id, gone.request_id))
    await store.compact(deleted.revision)

    await view.start_following()
    await view.wait_for(deleted.revision, 10)
    events = [await asyncio.wait_for(subscription.queue.get(), 5) for _ in range(2)]
    kinds = {(e.kind, e.allocation.id) for e in events if e is not None}
    assert kinds == {
        (AllocationEvent.KIND_REMOVED, gone.id),
        (AllocationEvent.KIND_ADDED, added.id),
    }
    assert set(view.state.allocations) == {added.id}
    await view.stop()
    await store.close()


def _record(
    state: ViewState, request_id: str, millis: int, allocation_id: str = ""
) -> types_pb2.Allocation:
    request = AllocationRequest(request_id, fraction_millis=millis)
    decision = place(request, state.snapshot)
    assert isinstance(decision, Placement)
    return allocation_record(
        request,
        decision,
        allocation_id or f"id-{request_id}",
        lease_id=0,
        created_at=NOW,
    )


def test_odd_records_count_for_more_never_less() -> None:
    record = types_pb2.Allocation(
        id="odd",
        request_id="odd-1",
        isolation=types_pb2.ISOLATION_CU_MASK,
        gpus=[
            types_pb2.GpuGrant(uuid="G", granted_millis=300, compute_units=[2**32 - 1]),
            types_pb2.GpuGrant(uuid="G", granted_millis=300, granted_memory_mib=7),
        ],
    )
    placed = placed_from_record(record)
    (share,) = placed.shares
    assert (share.millis, share.memory_mib, share.compute_units) == (600, 7, ())
    assert placed.blocks_sharing  # a CU id no GPU has: the GPU is held whole


def test_a_rewritten_request_id_drops_the_old_binding() -> None:
    layout = KeyLayout("/k/v1/")
    state = ViewState(layout)
    first = types_pb2.Allocation(id="a", request_id="e-1")
    second = types_pb2.Allocation(id="a", request_id="e-other")
    state.apply(2, [Change(layout.allocation("a"), first.SerializeToString(), 2)])
    state.apply(3, [Change(layout.allocation("a"), second.SerializeToString(), 3)])
    assert state.allocation_by_request == {"e-other": "a"}


async def test_the_inventory_cordons_and_removes_its_own_nodes_only(
    etcd: LocalEtcd, prefix: str
) -> None:
    store = EtcdStore([etcd.endpoint])
    layout = KeyLayout(prefix)
    agent_node = types_pb2.NodeStatus(name="from-an-agent", schedulable=True)
    await store.commit(
        Txn(puts=(Put(layout.node("from-an-agent"), agent_node.SerializeToString()),))
    )
    assert await register_nodes(store, layout, parse_inventory(INVENTORY)) == (2, 0)
    assert await register_nodes(store, layout, parse_inventory(INVENTORY)) == (0, 0)
    # A nested prefix is another cluster: registering there leaves these nodes alone...
    nested = KeyLayout(f"{prefix}nodes/other/")
    assert await register_nodes(store, nested, parse_inventory(INVENTORY)) == (2, 0)
    # ...and a file naming an agent's node does not overwrite it.
    clash = parse_inventory(
        INVENTORY + "  - {name: from-an-agent, gpus: [{model: MI210, count: 1}]}\n"
    )
    assert await register_nodes(store, layout, clash) == (0, 0)
    smaller = parse_inventory(
        "nodes:\n"
        "  - {name: node-a, schedulable: false, reason: drained for repair,"
        " gpus: [{model: MI300X, count: 4}]}\n"
    )
    assert await register_nodes(store, layout, smaller) == (1, 1)
    state = ViewState.load(layout, *(await store.read_prefix(layout.all_keys)))
    assert set(state.nodes) == {"node-a", "from-an-agent"}
    assert not state.nodes["from-an-agent"].gpus
    assert len((await store.read_prefix(nested.node("")))[1]) == 2
    node_a = state.snapshot.nodes["node-a"]
    assert not node_a.schedulable
    assert node_a.unschedulable_reason == "drained for repair"
    await store.close()


async def test_reads_a_prefix_in_pages(etcd: LocalEtcd, prefix: str) -> None:
    store = EtcdStore([etcd.endpoint])
    layout = KeyLayout(prefix)
    keys = [layout.request(f"r-{i:03d}") for i in range(25)]
    await store.commit(Txn(puts=tuple(Put(key, b"x") for key in keys)))
    revision, kvs = await store.read_prefix(layout.all_keys, page_size=4)
    assert [kv.key for kv in kvs] == keys
    await store.commit(Txn(deletes=tuple(keys)))
    assert revision < await store.revision()
    await store.close()


def test_a_record_under_another_allocations_key_is_unreadable() -> None:
    layout = KeyLayout("/k/v1/")
    state = ViewState(layout)
    record = types_pb2.Allocation(id="x", request_id="r-x")
    state.apply(2, [Change(layout.allocation("a1"), record.SerializeToString(), 2)])
    assert state.unreadable_allocations == {"a1"}
    assert state.blocked_reason is not None
    state.apply(3, [Change(layout.allocation("a1"), None, 3)])
    assert state.blocked_reason is None
