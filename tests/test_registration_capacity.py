"""A registration never leaves more granted on a GPU than the GPU it reports has.

Review finding (hardening issue, item 1): an agent that restarted as MI250X with its MI300X
UUIDs (what a change of partition mode does to a real MI300X) was accepted under grants of
150 GiB and 228 compute units, and a registration that raised VRAM to 16 TiB let grants
land that the real GPU cannot hold. Real etcd, real gRPC over loopback, real agents.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from kaiwo_gpu.common.errors import FailedPreconditionError
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.coordinator.allocator import Allocator, AllocatorSettings
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.state.changes import KeyValue, Put, Txn
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.registration import AgentNodeClaim, claim_agent_node
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.coordinator.state.view_state import ViewState
from kaiwo_gpu.v1 import agent_pb2, allocation_pb2, types_pb2

from .agents import RawAgent, agents_running, eventually, nodes_by_name, raw_inventory
from .conftest import Running, coordinator_running
from .harness import audit_etcd, request

FAST = {"node_ttl_s": 2, "sample_interval_ms": 200}
GIB = 1024


def _address(running: Running) -> str:
    return f"127.0.0.1:{running.coordinator.port}"


async def _stored_node(running: Running, name: str) -> types_pb2.NodeStatus:
    store = EtcdStore([running.endpoint])
    try:
        _, kv = await store.read(KeyLayout(running.prefix).node(name))
    finally:
        await store.close()
    assert kv is not None
    return types_pb2.NodeStatus.FromString(kv.value)


async def test_an_agent_that_comes_back_smaller_under_its_grants_is_refused_until_released(
    etcd: LocalEtcd, prefix: str
) -> None:
    async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as running:
        async with agents_running(_address(running), ["shrunk"], model="MI300X"):
            await eventually(lambda: _node_with(running, "shrunk", "MI300X"))
            made = [
                (
                    await running.api.Allocate(
                        request(
                            f"big-{n}",
                            fraction_millis=750,
                            memory_mib=150 * GIB,
                            isolation=types_pb2.ISOLATION_CU_MASK,
                        )
                    )
                ).allocation
                for n in range(2)
            ]
        assert {a.gpus[0].uuid for a in made} == {
            g.inventory.uuid for g in (await _stored_node(running, "shrunk")).gpus
        }
        async with agents_running(_address(running), ["shrunk"], model="MI250X") as (agent,):

            async def refused() -> str | None:
                error = agent.uplink.status.last_error
                return error if "cannot hold" in error else None

            error = await eventually(refused)
            assert "FAILED_PRECONDITION" in error
            assert made[0].gpus[0].uuid in error or made[1].gpus[0].uuid in error
            assert "150 GiB" in error or f"{150 * GIB} MiB" in error
            stored = await _stored_node(running, "shrunk")
            assert {g.inventory.model for g in stored.gpus} == {"MI300X"}
            await audit_etcd(running.endpoint, running.prefix)

            for allocation in made:
                await running.api.Release(
                    allocation_pb2.ReleaseRequest(allocation_id=allocation.id)
                )
            # Nothing is granted on its GPUs now: the agent's next attempt registers.
            await eventually(lambda: _node_with(running, "shrunk", "MI250X"))
            stored = await _stored_node(running, "shrunk")
            assert {g.inventory.vram_mib for g in stored.gpus} == {64 * GIB}


async def _node_with(running: Running, name: str, model: str) -> types_pb2.NodeStatus | None:
    node = (await nodes_by_name(running.api)).get(name)
    if node is None or not node.schedulable:
        return None
    return node if {g.inventory.model for g in node.gpus} == {model} else None


async def test_a_registration_claiming_more_than_its_model_has_is_refused(
    etcd: LocalEtcd, prefix: str
) -> None:
    """The other half of the finding: an MI300X reporting 16 TiB took 69 grants of 100 GiB."""
    async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as running:
        inventory = raw_inventory("liar", 1)
        inventory[0].vram_mib = 16 * 1024 * GIB
        channel = grpc.aio.insecure_channel(_address(running))
        try:
            agent = RawAgent(channel, "liar", inventory)
            await agent.call.write(_register(agent))
            code, message = await agent.status()
        finally:
            await channel.close()
        assert code is grpc.StatusCode.INVALID_ARGUMENT, message
        assert "register.gpus[0].vram_mib" in message
        assert "an MI300X has that at most" in message
        assert "liar" not in await nodes_by_name(running.api)


def _register(agent: RawAgent) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        register=agent_pb2.Register(node=agent.node, gpus=agent.gpus, backend="simulated")
    )


async def test_a_placement_the_view_has_not_seen_fails_the_smaller_registration(
    etcd: LocalEtcd, prefix: str
) -> None:
    """The check reads grants from the view; a placement committed that it has not seen yet
    (by any coordinator) rewrote the GPU's version key, so the write must not go through."""
    layout = KeyLayout(prefix)
    store = EtcdStore([etcd.endpoint])
    stale_view = ViewState.load(layout, 1, [])  # a view that has seen nothing
    try:
        lease_id, _ = await store.grant_lease(10)
        big = agent_pb2.Register(
            node="racing", gpus=raw_inventory("racing", 1), backend="simulated"
        )
        claim = await _claim(store, layout, big, lease_id, stale_view)
        assert claim is not None
        # A placement through another coordinator: it rewrites the GPU's version key.
        await store.commit(Txn(puts=(Put(layout.gpu(big.gpus[0].uuid), b""),)))
        small = _smaller(big)
        stale = await _claim(store, layout, small, lease_id, stale_view)
        assert stale is None
        _, kv = await store.read(layout.node("racing"))
        assert kv is not None
        assert types_pb2.NodeStatus.FromString(kv.value).gpus[0].inventory.vram_mib == 192 * GIB
    finally:
        await store.close()


class PlacingStore(EtcdStore):
    """The real store; its next read of a node record first lets a placement land."""

    before_next_read: Callable[[], Awaitable[None]] | None = None

    async def read(self, key: bytes) -> tuple[int, KeyValue | None]:
        hook, self.before_next_read = self.before_next_read, None
        if hook is not None:
            await hook()
        return await super().read(key)


async def test_a_placement_landing_while_the_registration_reads_is_counted(
    etcd: LocalEtcd, prefix: str
) -> None:
    """Review finding: the grants were taken before the record was read and the revisions
    after (the view's live map), so a placement the view applied in between was in the
    guard but not in the check, and the smaller record went through over it."""
    layout = KeyLayout(prefix)
    store = PlacingStore([etcd.endpoint])
    view = ClusterView(store, layout)
    await view.start()
    allocator = Allocator(store, view, layout, AllocatorSettings())
    allocator.start()
    try:
        lease_id, _ = await store.grant_lease(30)
        big = agent_pb2.Register(
            node="landing", gpus=raw_inventory("landing", 1), backend="simulated"
        )
        claim = await _claim(store, layout, big, lease_id, view.state)
        assert claim is not None
        await view.wait_for(claim.presence_revision, 10)

        async def placement_lands() -> None:
            request = AllocationRequest("landed", fraction_millis=500, memory_mib=100 * GIB)
            await allocator.allocate(request)
            await view.wait_for(await store.revision(), 10)  # and the view applies it

        store.before_next_read = placement_lands
        with pytest.raises(FailedPreconditionError, match="cannot hold"):
            await _claim(store, layout, _smaller(big), lease_id, view.state)
        await audit_etcd(etcd.endpoint, prefix)
        _, kv = await store.read(layout.node("landing"))
        assert kv is not None
        assert types_pb2.NodeStatus.FromString(kv.value).gpus[0].inventory.vram_mib == 192 * GIB
    finally:
        await allocator.stop()
        await view.stop()
        await store.close()


async def _claim(
    store: EtcdStore,
    layout: KeyLayout,
    register: agent_pb2.Register,
    lease_id: int,
    view: ViewState,
) -> AgentNodeClaim | None:
    """A registration by coordinator "c1" with no other node owning its GPUs."""
    return await claim_agent_node(
        store, layout, register, lease_id=lease_id, holder="c1", owner_of=lambda _: None, view=view
    )


def _smaller(register: agent_pb2.Register) -> agent_pb2.Register:
    small = agent_pb2.Register()
    small.CopyFrom(register)
    small.gpus[0].vram_mib = 64 * GIB
    return small


async def test_a_granted_gpu_that_moves_to_another_index_is_refused(
    etcd: LocalEtcd, prefix: str
) -> None:
    """Review finding: two GPUs that swapped indexes under an exclusive grant were accepted,
    so the next exclusive allocation got the same device (ROCR_VISIBLE_DEVICES=0) twice."""
    async with coordinator_running(etcd.endpoint, prefix, None, **FAST) as running:
        inventory = raw_inventory("swap", 2)
        channel = grpc.aio.insecure_channel(_address(running))
        try:
            agent = RawAgent(channel, "swap", inventory)
            await agent.register()
            held = (
                await running.api.Allocate(
                    request("held", fraction_millis=1000, isolation=types_pb2.ISOLATION_EXCLUSIVE)
                )
            ).allocation
            agent.close()
            swapped = [types_pb2.GpuInventory() for _ in inventory]
            for new, old, other in zip(swapped, inventory, reversed(inventory), strict=True):
                new.CopyFrom(old)
                new.index, new.bdf = other.index, other.bdf
            again = RawAgent(channel, "swap", swapped)
            await again.call.write(_register(again))
            code, message = await again.status()
        finally:
            await channel.close()
        assert code is grpc.StatusCode.FAILED_PRECONDITION, message
        assert held.gpus[0].uuid in message
        assert "moved from index" in message


async def test_an_inventory_file_that_shrinks_a_gpu_under_its_grants_is_refused(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    """Review finding: the static inventory bypassed the check, so a coordinator restarted
    with smaller figures in the file wrote 64 GiB under a 150 GiB grant."""
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        held = (
            await running.api.Allocate(
                request("held", memory_mib=150 * GIB, selector=types_pb2.Selector(nodes=["node-a"]))
            )
        ).allocation
    shrunk = inventory.with_name("shrunk.yaml")
    shrunk.write_text(
        inventory.read_text().replace(
            "gpus: [{model: MI300X, count: 4}]",
            "gpus: [{model: MI300X, count: 4, vram_mib: 65536, compute_units: 80}]",
        )
    )
    with pytest.raises(FailedPreconditionError, match=f"GPU {held.gpus[0].uuid} holds 1"):
        async with coordinator_running(etcd.endpoint, prefix, shrunk):
            pass
    audit = await audit_etcd(etcd.endpoint, prefix)
    assert {g.inventory.vram_mib for g in audit.nodes["node-a"].gpus} == {192 * GIB}


async def test_an_inventory_file_that_drops_a_node_under_its_grants_is_refused(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    """Review finding: a coordinator started with a file that no longer listed node-b deleted
    its record and left two allocations on a node that did not exist."""
    async with coordinator_running(etcd.endpoint, prefix, inventory) as running:
        await running.api.Allocate(
            request("on-b", fraction_millis=500, selector=types_pb2.Selector(nodes=["node-b"]))
        )
    only_a = inventory.with_name("only-a.yaml")
    only_a.write_text(inventory.read_text().split("  - name: node-b")[0])
    with pytest.raises(FailedPreconditionError, match="the new record does not list it"):
        async with coordinator_running(etcd.endpoint, prefix, only_a):
            pass
    audit = await audit_etcd(etcd.endpoint, prefix)
    assert "node-b" in audit.nodes
