"""Removing node records: `kaiwo-gpu node remove` and the expiry of agentless nodes.

Hardening review, item 12: node records that agents (or anyone) registered never went away.
A node may now be removed when its agent is gone, no allocation names it and no inventory
file lists it; a coordinator can be told to expire such nodes after a set time.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import grpc
import pytest
import structlog.testing

from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.node_expiry import NodeExpiry
from kaiwo_gpu.coordinator.state.changes import Put, Txn
from kaiwo_gpu.coordinator.state.keys import FROM_AGENT, SOURCE_LABEL, KeyLayout
from kaiwo_gpu.coordinator.state.node_removal import removal_txn
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import allocation_pb2, types_pb2
from tests.agents import agents_running, eventually, nodes_by_name
from tests.conftest import Running, coordinator_running
from tests.harness import request, status_of
from tests.test_cli_client import cli

pytestmark = pytest.mark.integration
FAST = {"node_ttl_s": 2, "sample_interval_ms": 200}


def _remove(running: Running, node: str) -> object:
    return running.api.RemoveNode(allocation_pb2.RemoveNodeRequest(node=node))


async def _agentless(running: Running, node: str) -> bool | None:
    """True once the coordinator's view has the node without its presence key."""
    state = running.coordinator.view.state
    return True if node in state.nodes and node not in state.agents else None


async def _present(running: Running, node: str) -> bool | None:
    return True if node in running.coordinator.view.state.agents else None


async def test_a_node_is_removed_once_its_agent_is_gone_and_nothing_holds_it(
    etcd: LocalEtcd, prefix: str
) -> None:
    layout = KeyLayout(prefix)
    store = EtcdStore([etcd.endpoint])
    async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as running:
        async with agents_running(running.target, ["leaving"]):
            await eventually(lambda: _present(running, "leaving"))
            granted = await running.api.Allocate(
                request("held", fraction_millis=500, selector=types_pb2.Selector(nodes=["leaving"]))
            )
            code, message = await status_of(_remove(running, "leaving"))
            assert code is grpc.StatusCode.FAILED_PRECONDITION
            assert "agent connected" in message, message
        uuids = [gpu.inventory.uuid for gpu in running.coordinator.view.state.nodes["leaving"].gpus]
        await eventually(lambda: _agentless(running, "leaving"))

        code, message = await status_of(_remove(running, "leaving"))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert f"holds 1 allocation(s) (e.g. {granted.allocation.id})" in message, message
        assert "leaving" in await nodes_by_name(running.api)

        await running.api.Release(
            allocation_pb2.ReleaseRequest(allocation_id=granted.allocation.id)
        )
        exit_status, out, err = await cli(running, "node", "remove", "leaving")
        assert (exit_status, out.strip()) == (0, "removed node leaving"), err
        assert "leaving" not in await nodes_by_name(running.api)  # the same coordinator, at once
        try:
            assert (await store.read(layout.node("leaving")))[1] is None
            for uuid in uuids:  # its GPUs' version keys go with it
                assert (await store.read(layout.gpu(uuid)))[1] is None
        finally:
            await store.close()

        exit_status, _, err = await cli(running, "node", "remove", "leaving")
        assert exit_status == 3  # not found
        assert "no node named 'leaving'" in err, err


async def test_an_inventory_node_an_unknown_node_and_a_bad_name_are_refused(
    running: Running,
) -> None:
    code, message = await status_of(_remove(running, "node-a"))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "inventory file" in message, message
    assert (await status_of(_remove(running, "ghost")))[0] is grpc.StatusCode.NOT_FOUND
    code, message = await status_of(_remove(running, "Bad_Name"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("node"), message
    assert "DNS-1123" in message, message
    assert set(await nodes_by_name(running.api)) == {"node-a", "node-b"}


async def test_no_node_is_removed_while_an_allocation_record_cannot_be_read(
    etcd: LocalEtcd, prefix: str
) -> None:
    """Review finding: a record this coordinator cannot read (a newer version's, a hand
    edit) may name the node; placement fails closed on it, and now removal does too."""
    layout = KeyLayout(prefix)
    store = EtcdStore([etcd.endpoint])
    async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as running:
        async with agents_running(running.target, ["unsure"]):
            await eventually(lambda: _present(running, "unsure"))
        await eventually(lambda: _agentless(running, "unsure"))
        try:
            written = await store.commit(
                Txn(puts=(Put(layout.allocation("mystery"), b"\xff\xff\xff\xff\x01"),))
            )
            await running.coordinator.view.wait_for(written.revision, 10)
            code, message = await status_of(_remove(running, "unsure"))
            assert code is grpc.StatusCode.FAILED_PRECONDITION
            assert "cannot read" in message, message
            expiry = NodeExpiry(running.coordinator.store, running.coordinator.view, after_s=1)
            assert await expiry.check(0.0) == []
            assert await expiry.check(5.0) == []  # quietly kept, and placement is blocked
            assert "unsure" in await nodes_by_name(running.api)
            gone = await store.commit(Txn(deletes=(layout.allocation("mystery"),)))
            await running.coordinator.view.wait_for(gone.revision, 10)
            assert await expiry.check(10.0) == ["unsure"]
        finally:
            await store.close()


async def test_a_removal_decided_on_a_stale_view_changes_nothing(
    etcd: LocalEtcd, prefix: str
) -> None:
    """The delete is guarded: a placement on one of its GPUs (which rewrites the GPU's
    version key) or an agent that connects (its presence key) after the view was read
    makes it fail, so a removal never takes a node from under a grant or an agent."""
    layout = KeyLayout(prefix)
    record = types_pb2.NodeStatus(
        name="old",
        labels={SOURCE_LABEL: FROM_AGENT},
        gpus=[
            types_pb2.GpuStatus(
                inventory=types_pb2.GpuInventory(
                    uuid="gpu-old-0", model="MI300X", vram_mib=196_608, compute_units=304
                )
            )
        ],
    )
    store = EtcdStore([etcd.endpoint])
    try:
        await store.commit(Txn(puts=(Put(layout.node("old"), record.SerializeToString()),)))
        for late in (Put(layout.gpu("gpu-old-0"), b""), Put(layout.agent("old"), b"c")):
            revision, kvs = await store.read_prefix(layout.all_keys)
            stale = ViewState.load(layout, revision, kvs)
            assert "old" in stale.nodes  # a record placement reads
            await store.commit(Txn(puts=(late,)))
            assert not (await store.commit(removal_txn(stale, "old"))).succeeded
            assert (await store.read(layout.node("old")))[1] is not None
            await store.commit(Txn(deletes=(layout.agent("old"),)))
        revision, kvs = await store.read_prefix(layout.all_keys)
        assert (
            await store.commit(removal_txn(ViewState.load(layout, revision, kvs), "old"))
        ).succeeded
        assert (await store.read(layout.gpu("gpu-old-0")))[1] is None
    finally:
        await store.close()


async def test_agentless_nodes_expire_after_the_set_time_unless_held_or_back(
    etcd: LocalEtcd, prefix: str
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as running:
        coordinator = running.coordinator
        expiry = NodeExpiry(coordinator.store, coordinator.view, after_s=100)
        async with agents_running(running.target, ["staying"]):
            async with agents_running(running.target, ["gone", "holding", "back"]):
                for name in ("gone", "holding", "back", "staying"):
                    await eventually(functools.partial(_present, running, name))
                await running.api.Allocate(
                    request(
                        "keep", fraction_millis=250, selector=types_pb2.Selector(nodes=["holding"])
                    )
                )
            for name in ("gone", "holding", "back"):
                await eventually(functools.partial(_agentless, running, name))
            assert await expiry.check(0.0) == []
            async with agents_running(running.target, ["back"]):
                await eventually(lambda: _present(running, "back"))
                assert await expiry.check(50.0) == []  # back in time: its clock stops
            await eventually(lambda: _agentless(running, "back"))
            assert await expiry.check(60.0) == []  # and starts again from here
            assert await expiry.check(100.0) == ["gone"]  # "holding" holds an allocation
            assert await expiry.check(159.0) == []
            assert await expiry.check(160.0) == ["back"]
            assert set(await nodes_by_name(running.api)) == {"holding", "staying"}


async def test_a_coordinator_told_to_expire_agentless_nodes_does_it_by_itself(
    etcd: LocalEtcd, prefix: str, tmp_path: Path
) -> None:
    async with coordinator_running(
        etcd.endpoint, prefix, None, agentless_node_expiry_s=1, **FAST
    ) as running:
        async with agents_running(running.target, ["short-lived"]):
            await eventually(lambda: _present(running, "short-lived"))
        started = asyncio.get_running_loop().time()

        async def gone() -> bool | None:
            return True if "short-lived" not in await nodes_by_name(running.api) else None

        await eventually(gone)
        # The presence key goes with the stream; then 1 s without an agent, checked every 0.25 s.
        assert asyncio.get_running_loop().time() - started >= 1.0


async def test_two_coordinators_expiring_at_once_remove_each_node_once_and_quietly(
    etcd: LocalEtcd, prefix: str
) -> None:
    """Review finding: the coordinator that lost the race logged a warning for each node the
    other had removed; a node already gone is the job done."""
    async with (
        coordinator_running(etcd.endpoint, prefix, None, **FAST) as first,
        coordinator_running(etcd.endpoint, prefix, None, **FAST) as second,
    ):
        names = ["x1", "x2", "x3"]
        async with agents_running(first.target, names):
            for name in names:
                await eventually(functools.partial(_present, second, name))
        for name in names:
            await eventually(functools.partial(_agentless, first, name))
            await eventually(functools.partial(_agentless, second, name))
        expiries = [
            NodeExpiry(running.coordinator.store, running.coordinator.view, after_s=10)
            for running in (first, second)
        ]
        for expiry in expiries:
            assert await expiry.check(0.0) == []
        with structlog.testing.capture_logs() as logs:
            removed = await asyncio.gather(*(expiry.check(10.0) for expiry in expiries))
        assert sorted(removed[0] + removed[1]) == names
        assert [entry for entry in logs if entry["log_level"] == "warning"] == []
