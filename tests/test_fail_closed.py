"""Records the coordinator cannot fully read must never free capacity or stop the service."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.state.changes import Put, Txn
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.v1 import allocation_pb2, types_pb2
from tests.conftest import Running, coordinator_running
from tests.harness import request, status_of

if TYPE_CHECKING:
    from kaiwo_gpu.v1.allocation_pb2_grpc import AllocationServiceAsyncStub

ZONE_B = types_pb2.Selector(node_labels={"zone": "b"})


async def _put(running: Running, key: bytes, value: bytes) -> None:
    """Writes behind the coordinator's back, then waits until its view has seen it."""
    store = EtcdStore([running.endpoint])
    try:
        result = await store.commit(Txn(puts=(Put(key, value),)))
        assert result.succeeded
    finally:
        await store.close()
    await running.coordinator.view.wait_for(result.revision, 10)


def _blocked(running: Running) -> bool:
    return running.coordinator.view.state.blocked_reason is not None


async def _node_b_gpus(api: AllocationServiceAsyncStub) -> list[str]:
    reply = await api.ListNodes(allocation_pb2.ListNodesRequest(labels={"zone": "b"}))
    return [gpu.inventory.uuid for node in reply.nodes for gpu in node.gpus]


async def test_unknown_isolation_in_a_record_blocks_its_gpu(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        uuid = (await _node_b_gpus(running.api))[0]
        record = types_pb2.Allocation(
            id="from-the-future",
            request_id="future-1",
            node="node-b",
            isolation=42,  # type: ignore[arg-type]
            gpus=[types_pb2.GpuGrant(uuid=uuid, granted_millis=100, granted_memory_mib=1)],
        )
        await _put(running, KeyLayout(prefix).allocation(record.id), record.SerializeToString())
        await _put(running, KeyLayout(prefix).request("future-1"), b"from-the-future")
        placed = [
            (await running.api.Allocate(request(f"b-{i}", fraction_millis=500, selector=ZONE_B)))
            .allocation.gpus[0]
            .uuid
            for i in range(2)
        ]
        assert uuid not in placed, "a GPU held by an unknown isolation counts as exclusive"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.api.Allocate(request("b-2", fraction_millis=500, selector=ZONE_B))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_an_undecodable_allocation_stops_placement_not_the_service(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        await _put(running, KeyLayout(prefix).allocation("garbled"), b"\xff\xfe not a record")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.api.Allocate(request("after-garbage", fraction_millis=100))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "cannot read" in (refused.value.details() or "")
        stats = await running.api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
        assert stats.node_count == 2  # reads still work
        store = EtcdStore([etcd.endpoint])
        await store.commit(Txn(deletes=(KeyLayout(prefix).allocation("garbled"),)))
        await store.close()
        for _ in range(100):  # once the record is gone, placement resumes
            if running.coordinator.view.state.blocked_reason is None:
                break
            await asyncio.sleep(0.05)
        resumed = await running.api.Allocate(request("after-cleanup", fraction_millis=100))
        assert resumed.allocation.id


async def test_an_unreadable_node_takes_no_placements_and_others_still_do(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        await _put(running, KeyLayout(prefix).node("node-b"), b"\xff\xfe junk")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.api.Allocate(request("on-b", fraction_millis=100, selector=ZONE_B))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        made = await running.api.Allocate(request("anywhere", fraction_millis=100))
        assert made.allocation.node == "node-a"


async def test_a_gpu_uuid_on_two_nodes_excludes_the_second_node(
    etcd: LocalEtcd, prefix: str, tmp_path: Path
) -> None:
    inventory = tmp_path / "nodes.yaml"
    inventory.write_text(
        "nodes:\n"
        "  - {name: node-a, gpus: [{model: MI210, uuid: GPU-same}]}\n"
        "  - {name: node-z, gpus: [{model: MI210, uuid: GPU-other}]}\n"
    )
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        clash = types_pb2.NodeStatus(
            name="node-z",
            schedulable=True,
            gpus=[
                types_pb2.GpuStatus(
                    inventory=types_pb2.GpuInventory(
                        uuid="GPU-same", model="MI210", vram_mib=65536, compute_units=104
                    )
                )
            ],
        )
        await _put(running, KeyLayout(prefix).node("node-z"), clash.SerializeToString())
        first = await running.api.Allocate(request("whole-1", fraction_millis=1000))
        assert first.allocation.node == "node-a"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.api.Allocate(request("whole-2", fraction_millis=1000))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_repaired_record_unblocks_placement(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        made = (await running.api.Allocate(request("fixme", fraction_millis=100))).allocation
        key = KeyLayout(prefix).allocation(made.id)
        await _put(running, key, b"\xff\xfe garbled")
        assert _blocked(running)
        await _put(running, key, made.SerializeToString())
        assert not _blocked(running)
        assert (await running.api.Allocate(request("after-fix", fraction_millis=100))).allocation


async def test_a_record_rewritten_as_exclusive_takes_its_gpu_whole(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        made = (
            await running.api.Allocate(request("shared", fraction_millis=100, selector=ZONE_B))
        ).allocation
        exclusive = types_pb2.Allocation()
        exclusive.CopyFrom(made)
        exclusive.isolation = types_pb2.ISOLATION_EXCLUSIVE
        await _put(running, KeyLayout(prefix).allocation(made.id), exclusive.SerializeToString())
        for i in range(2):  # 2 x 0.5 fit only on the other MI210
            placed = await running.api.Allocate(
                request(f"half-{i}", fraction_millis=500, selector=ZONE_B)
            )
            assert placed.allocation.gpus[0].uuid != made.gpus[0].uuid


async def test_an_orphaned_request_key_names_itself_and_blocks_nobody_else(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        made = (await running.api.Allocate(request("orphan", fraction_millis=100))).allocation
        store = EtcdStore([etcd.endpoint])
        deleted = await store.commit(Txn(deletes=(KeyLayout(prefix).allocation(made.id),)))
        await store.close()
        await running.coordinator.view.wait_for(deleted.revision, 10)
        outcomes = await asyncio.gather(
            *(
                running.api.Allocate(request(rid, fraction_millis=100))
                for rid in ("orphan", "other-1", "other-2", "other-3")
            ),
            return_exceptions=True,
        )
        orphan, *others = outcomes
        assert isinstance(orphan, grpc.aio.AioRpcError)
        assert orphan.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "requests/orphan" in (orphan.details() or "")
        assert all(isinstance(o, allocation_pb2.AllocateResponse) for o in others)


async def test_a_gpu_granted_more_than_it_has_is_flagged_and_every_read_still_answers(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    """Review finding: once a GPU's granted compute units exceeded its count (its record
    shrank under its grants), ListNodes failed with INTERNAL for the whole cluster, because
    the negative free count does not fit a uint32. Now it is clamped and the GPU flagged."""
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        nodes = await running.api.ListNodes(allocation_pb2.ListNodesRequest(labels={"zone": "b"}))
        gpu = nodes.nodes[0].gpus[0]
        units = gpu.inventory.compute_units
        record = types_pb2.Allocation(
            id="over-granted",
            request_id="over-1",
            node=nodes.nodes[0].name,
            isolation=types_pb2.ISOLATION_CU_MASK,
            gpus=[
                types_pb2.GpuGrant(
                    uuid=gpu.inventory.uuid,
                    granted_millis=1500,
                    granted_memory_mib=gpu.inventory.vram_mib + 1024,
                    compute_units=range(units + 20),
                )
            ],
        )
        await _put(running, KeyLayout(prefix).allocation(record.id), record.SerializeToString())
        await _put(running, KeyLayout(prefix).request("over-1"), b"over-granted")
        listed = await running.api.ListNodes(allocation_pb2.ListNodesRequest())
        shown = next(
            g for node in listed.nodes for g in node.gpus if g.inventory.uuid == gpu.inventory.uuid
        )
        assert shown.free_compute_units == 0
        assert (shown.free_millis, shown.free_memory_mib) == (0, 0)
        assert "1500 millis granted of 1000" in shown.overcommit
        assert f"compute unit {units + 19} granted of 0-{units - 1}" in shown.overcommit
        others = [
            g for node in listed.nodes for g in node.gpus if g.inventory.uuid != gpu.inventory.uuid
        ]
        assert others
        assert not any(g.overcommit for g in others)
        stats = await running.api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
        assert stats.allocated_millis >= 1500
        got = await running.api.GetAllocation(
            allocation_pb2.GetAllocationRequest(allocation_id="over-granted")
        )
        assert got.allocation.id == "over-granted"


async def test_a_request_that_does_not_fit_while_etcd_is_down_is_unavailable(
    own_etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    """Review finding: it answered RESOURCE_EXHAUSTED (exit 4, "no capacity") from a view
    that may be stale, when etcd being away is the truth: UNAVAILABLE, retry."""
    async with coordinator_running(own_etcd.endpoint, prefix, inventory) as running:
        too_big = request("too-big", fraction_millis=1000, count=64)
        code, _ = await status_of(running.api.Allocate(too_big))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED  # etcd up: the view is the truth
        own_etcd.stop(kill=True)
        try:
            for _ in range(400):  # the watch notices the loss (20 s at most)
                if not running.coordinator.view.connected:
                    break
                await asyncio.sleep(0.05)
            code, message = await status_of(
                running.api.Allocate(request("too-big-2", fraction_millis=1000, count=64))
            )
        finally:
            await asyncio.to_thread(own_etcd.start)
        assert code is grpc.StatusCode.UNAVAILABLE, message
        assert "etcd is unreachable" in message


async def test_etcd_nearing_its_quota_is_said_before_writes_fail(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    """Review finding: one stream filled a 64 MB quota in 10 s and then every Allocate and
    Release failed with nothing said before. The coordinator reads etcd's database size and
    warns from 80% of the quota it is told (here one far below what etcd already holds)."""
    async with coordinator_running(
        etcd.endpoint, prefix, inventory, etcd_quota_bytes=4096, space_check_s=0.1
    ) as running:
        for _ in range(100):  # 10 s at most
            stats = await running.api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
            if stats.etcd_space_warning:
                break
            await asyncio.sleep(0.1)
        assert "of its 0 MiB quota" in stats.etcd_space_warning
        assert "etcdctl defrag" in stats.etcd_space_warning
    async with coordinator_running(etcd.endpoint, prefix, inventory, space_check_s=0.1) as roomy:
        await asyncio.sleep(0.3)
        stats = await roomy.api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
        assert stats.etcd_space_warning == ""  # 2 GiB: far from it
