"""The allocation API end to end: real gRPC on loopback, real etcd, one coordinator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.state.changes import Put, Txn
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.coordinator.state.view_state import owner_tag
from kaiwo_gpu.v1 import allocation_pb2, types_pb2
from tests.cluster_strategies import STRATEGIES, EveryGpuTwice
from tests.conftest import Running, coordinator_running
from tests.harness import audit_etcd, request
from tests.harness import status_of as _code


async def test_allocate_returns_placement_environment_and_lease(running: Running) -> None:
    reply = await running.api.Allocate(
        request("job-1", fraction_millis=500, memory_mib=4000, ttl_seconds=60, owner="slurm/1")
    )
    allocation = reply.allocation
    assert not reply.replayed
    assert allocation.node == "node-b"  # best-fit takes the tightest fit: an MI210 (64 GiB)
    (gpu,) = allocation.gpus
    assert gpu.uuid.startswith("GPU-")
    assert gpu.bdf.startswith("0000:")
    assert (gpu.granted_millis, gpu.granted_memory_mib) == (500, 4000)
    assert allocation.isolation == types_pb2.ISOLATION_NONE
    env = allocation.environment
    assert env["ROCR_VISIBLE_DEVICES"] == str(gpu.index)
    assert env["KAIWO_GPU_ALLOCATION_ID"] == allocation.id
    assert "HSA_CU_MASK" not in env
    assert allocation.lease_id != 0
    lifetime = allocation.expires_at.seconds - allocation.created_at.seconds
    assert 55 <= lifetime <= 65

    got = await running.api.GetAllocation(
        allocation_pb2.GetAllocationRequest(allocation_id=allocation.id)
    )
    assert got.allocation == allocation
    listed = await running.api.ListAllocations(allocation_pb2.ListAllocationsRequest())
    assert [a.id for a in listed.allocations] == [allocation.id]
    stats = await running.api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
    assert (stats.allocated_millis, stats.allocation_count, stats.gpu_count) == (500, 1, 6)
    audit = await audit_etcd(running.endpoint, running.prefix)
    assert set(audit.allocations) == {allocation.id}


async def test_mps_maps_to_cu_mask_with_a_mask_and_a_note(running: Running) -> None:
    reply = await running.api.Allocate(request("mps-1", fraction_millis=250, isolation_name="mps"))
    allocation = reply.allocation
    assert allocation.isolation == types_pb2.ISOLATION_CU_MASK
    assert "mps" in allocation.isolation_note
    assert allocation.environment["HSA_CU_MASK"].startswith("0:0-")
    assert len(allocation.gpus[0].compute_units) >= 1


async def test_retry_with_same_request_id_returns_the_same_allocation(running: Running) -> None:
    first = await running.api.Allocate(request("retry-1", fraction_millis=300))
    again = await running.api.Allocate(request("retry-1", fraction_millis=300))
    assert again.replayed
    assert again.allocation.id == first.allocation.id
    code, message = await _code(running.api.Allocate(request("retry-1", fraction_millis=400)))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert "retry-1" in message


async def test_concurrent_duplicates_make_one_allocation(running: Running) -> None:
    replies = await asyncio.gather(
        *(running.api.Allocate(request("dup-1", fraction_millis=200)) for _ in range(12))
    )
    assert len({r.allocation.id for r in replies}) == 1
    assert sum(not r.replayed for r in replies) == 1
    audit = await audit_etcd(running.endpoint, running.prefix)
    assert len(audit.allocations) == 1


async def test_release_frees_capacity_and_second_release_is_not_found(running: Running) -> None:
    whole = [
        (await running.api.Allocate(request(f"whole-{i}", fraction_millis=1000))).allocation
        for i in range(6)
    ]
    code, message = await _code(running.api.Allocate(request("one-more", fraction_millis=1000)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "6 are in use" in message, message
    released = await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=whole[0].id))
    assert released.allocation.state == types_pb2.ALLOCATION_STATE_RELEASED
    again = await running.api.Allocate(request("one-more", fraction_millis=1000))
    assert again.allocation.gpus[0].uuid == whole[0].gpus[0].uuid
    code, _ = await _code(
        running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=whole[0].id))
    )
    assert code is grpc.StatusCode.NOT_FOUND
    code, _ = await _code(
        running.api.GetAllocation(allocation_pb2.GetAllocationRequest(allocation_id=whole[0].id))
    )
    assert code is grpc.StatusCode.NOT_FOUND


async def test_ttl_expiry_returns_capacity(running: Running) -> None:
    reply = await running.api.Allocate(request("short", fraction_millis=1000, ttl_seconds=2))
    allocation_id = reply.allocation.id
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        listed = await running.api.ListAllocations(allocation_pb2.ListAllocationsRequest())
        if not listed.allocations:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("the lease did not expire")
    code, _ = await _code(
        running.api.GetAllocation(allocation_pb2.GetAllocationRequest(allocation_id=allocation_id))
    )
    assert code is grpc.StatusCode.NOT_FOUND
    stats = await running.api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
    assert stats.allocated_millis == 0
    audit = await audit_etcd(running.endpoint, running.prefix)
    assert audit.allocations == {}
    assert audit.request_keys == {}


async def test_keep_alive_keeps_the_allocation_past_its_ttl(running: Running) -> None:
    reply = await running.api.Allocate(request("kept", fraction_millis=100, ttl_seconds=3))
    allocation_id = reply.allocation.id
    for _ in range(16):  # about 5 s, past the TTL; each renewal has 2.7 s to spare
        renewed = await running.api.KeepAlive(
            allocation_pb2.KeepAliveRequest(allocation_id=allocation_id)
        )
        assert renewed.ttl_seconds >= 1
        await asyncio.sleep(0.3)
    got = await running.api.GetAllocation(
        allocation_pb2.GetAllocationRequest(allocation_id=allocation_id)
    )
    assert got.allocation.expires_at.seconds >= reply.allocation.expires_at.seconds + 2


async def test_keep_alive_without_lease_is_failed_precondition(running: Running) -> None:
    reply = await running.api.Allocate(request("no-lease", fraction_millis=100))
    code, message = await _code(
        running.api.KeepAlive(allocation_pb2.KeepAliveRequest(allocation_id=reply.allocation.id))
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "no lease" in message


async def _next_event(stream: object) -> allocation_pb2.AllocationEvent:
    event = await asyncio.wait_for(stream.read(), 10)  # type: ignore[attr-defined]
    assert isinstance(event, allocation_pb2.AllocationEvent)
    return event


async def test_watch_streams_existing_then_added_and_removed(running: Running) -> None:
    existing = (await running.api.Allocate(request("w-0", fraction_millis=100))).allocation
    stream = running.api.WatchAllocations(allocation_pb2.WatchAllocationsRequest())
    first = await _next_event(stream)
    assert first.kind == allocation_pb2.AllocationEvent.KIND_ADDED
    assert first.allocation.id == existing.id
    added = (await running.api.Allocate(request("w-1", fraction_millis=100))).allocation
    event = await _next_event(stream)
    assert (event.kind, event.allocation.id) == (
        allocation_pb2.AllocationEvent.KIND_ADDED,
        added.id,
    )
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=added.id))
    event = await _next_event(stream)
    assert event.kind == allocation_pb2.AllocationEvent.KIND_REMOVED
    assert event.allocation.id == added.id
    stream.cancel()


async def test_list_filters_and_pages(running: Running) -> None:
    for i in range(5):
        await running.api.Allocate(
            request(f"p-{i}", fraction_millis=100, owner="team-a" if i % 2 else "team-b")
        )
    mine = await running.api.ListAllocations(allocation_pb2.ListAllocationsRequest(owner="team-a"))
    assert len(mine.allocations) == 2
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await running.api.ListAllocations(
            allocation_pb2.ListAllocationsRequest(page_size=2, page_token=token)
        )
        seen += [a.id for a in page.allocations]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 5
    assert seen == sorted(seen)


async def test_list_nodes_shows_capacity_and_use(running: Running) -> None:
    await running.api.Allocate(
        request("n-1", fraction_millis=500, selector=types_pb2.Selector(node_labels={"zone": "b"}))
    )
    reply = await running.api.ListNodes(allocation_pb2.ListNodesRequest(labels={"zone": "b"}))
    (node,) = reply.nodes
    assert node.name == "node-b"
    assert node.schedulable
    assert sorted(g.free_millis for g in node.gpus) == [500, 1000]
    assert {g.inventory.model for g in node.gpus} == {"MI210"}
    assert all(g.health == types_pb2.HEALTH_HEALTHY for g in node.gpus)


async def test_health_and_reflection_are_served(running: Running) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    reply = await health.Check(
        health_pb2.HealthCheckRequest(service="kaiwo_gpu.v1.AllocationService")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    response = await anext(aiter(responses))
    names = {s.name for s in response.list_services_response.service}
    assert "kaiwo_gpu.v1.AllocationService" in names


BAD_REQUESTS = [
    ("request_id", {"request_id": "", "fraction_millis": 500}),
    ("request_id", {"request_id": "bad id!", "fraction_millis": 500}),
    ("count", {"count": 65, "fraction_millis": 500}),
    ("fraction_millis", {"fraction_millis": 99}),
    ("fraction_millis", {"fraction_millis": 1001}),
    ("fraction_millis", {}),
    ("memory_mib", {"memory_mib": 2**62}),
    ("isolation", {"fraction_millis": 500, "isolation": 9}),
    ("isolation_name", {"fraction_millis": 500, "isolation_name": "nvidia-mps"}),
    ("strategy", {"fraction_millis": 500, "strategy": "fastest"}),
    ("owner", {"fraction_millis": 500, "owner": "x" * 300}),
    ("labels", {"fraction_millis": 500, "labels": {"": "v"}}),
    ("ttl_seconds", {"fraction_millis": 500, "ttl_seconds": 10**9}),
]


@pytest.mark.parametrize(("field", "fields"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
async def test_bad_requests_are_invalid_argument_and_change_nothing(
    running: Running, field: str, fields: dict[str, object]
) -> None:
    fields = {"request_id": "bad-1", **fields}
    store = EtcdStore([running.endpoint])
    before = await store.revision()
    code, message = await _code(
        running.api.Allocate(
            allocation_pb2.AllocateRequest(request=types_pb2.AllocationRequest(**fields))  # type: ignore[arg-type]
        )
    )
    after = await store.revision()
    await store.close()
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in message
    assert before == after


@pytest.mark.parametrize("allocation_id", ["", "a/b", "x" * 200])
async def test_malformed_ids_are_invalid_argument(running: Running, allocation_id: str) -> None:
    for call in (
        running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=allocation_id)),
        running.api.GetAllocation(allocation_pb2.GetAllocationRequest(allocation_id=allocation_id)),
        running.api.KeepAlive(allocation_pb2.KeepAliveRequest(allocation_id=allocation_id)),
    ):
        code, message = await _code(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "allocation_id" in message


async def test_unknown_ids_are_not_found(running: Running) -> None:
    for call in (
        running.api.Release(allocation_pb2.ReleaseRequest(allocation_id="nope")),
        running.api.GetAllocation(allocation_pb2.GetAllocationRequest(allocation_id="nope")),
        running.api.KeepAlive(allocation_pb2.KeepAliveRequest(allocation_id="nope")),
    ):
        code, message = await _code(call)
        assert code is grpc.StatusCode.NOT_FOUND
        assert "nope" in message


async def test_no_capacity_names_the_reasons(running: Running) -> None:
    code, message = await _code(running.api.Allocate(request("big", memory_mib=300_000)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "300000 MiB" in message
    assert "6 have less VRAM" in message


async def test_a_released_request_id_is_not_reused(running: Running) -> None:
    made = (await running.api.Allocate(request("once", fraction_millis=100))).allocation
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.id))
    code, message = await _code(running.api.Allocate(request("once", fraction_millis=100)))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert "already made an allocation for this owner, which has been released" in message
    audit = await audit_etcd(running.endpoint, running.prefix)
    assert audit.allocations == {}
    assert audit.tombstones == {"once": frozenset({owner_tag(made.request.owner)})}


async def test_a_tombstone_holds_the_owners_it_refuses_and_nothing_else(
    running: Running,
) -> None:
    """Hardening review, item 4: a tombstone's bytes are paid by every released request for
    30-60 minutes; it named the allocation (32 of its 50 bytes) only for a message. A
    tombstone written before still names it, and the message still does."""
    layout = KeyLayout(running.prefix)
    made = (await running.api.Allocate(request("lean", fraction_millis=100, owner="o"))).allocation
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.id))
    store = EtcdStore([running.endpoint])
    try:
        found = await store.get(layout.request("lean"))
        assert found is not None
        assert found.value == b"released::" + owner_tag("o").encode()
        old = b"released:0123abcd:" + owner_tag("o").encode()
        result = await store.commit(Txn(puts=(Put(layout.request("older"), old),)))
    finally:
        await store.close()
    await running.coordinator.view.wait_for(result.revision, 10)
    code, message = await _code(
        running.api.Allocate(request("older", fraction_millis=100, owner="o"))
    )
    assert code is grpc.StatusCode.ALREADY_EXISTS, message
    assert "already made an allocation (0123abcd) for this owner" in message


async def test_reads_see_the_callers_own_writes_at_once(running: Running) -> None:
    for i in range(20):
        made = (await running.api.Allocate(request(f"ryw-{i}", fraction_millis=1000))).allocation
        listed = await running.api.ListAllocations(allocation_pb2.ListAllocationsRequest())
        assert [a.id for a in listed.allocations] == [made.id]
        await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.id))
        stats = await running.api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
        assert stats.allocation_count == 0


async def waits_on(view: ClusterView, call: asyncio.Future[Any], limit_s: float = 20.0) -> int:
    """The revision `call` waits for the view to reach, once it is seen waiting there.

    Fails if the call is answered first (from a view that lacks what it must see), however
    slow the machine: the wait is observed, not assumed from a sleep.
    """
    deadline = asyncio.get_running_loop().time() + limit_s
    while not call.done():
        if view.awaited_revisions:
            return max(view.awaited_revisions)
        assert asyncio.get_running_loop().time() < deadline, "the call neither waited nor ended"
        await asyncio.sleep(0.01)
    raise AssertionError(f"answered without waiting for the view: {call.result()!r}")


async def test_keep_alive_after_release_is_not_found(running: Running) -> None:
    made = await running.api.Allocate(request("gone", fraction_millis=100, ttl_seconds=30))
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.allocation.id))
    code, _ = await _code(
        running.api.KeepAlive(allocation_pb2.KeepAliveRequest(allocation_id=made.allocation.id))
    )
    assert code is grpc.StatusCode.NOT_FOUND


async def test_a_replay_is_checked_against_etcd_not_only_the_view(
    etcd: LocalEtcd, running: Running, inventory: Path
) -> None:
    """Released through another coordinator while this one's view lags: a retry must not
    get the dead allocation back as if it were alive."""
    async with coordinator_running(etcd.endpoint, running.prefix, inventory) as other:
        made = (await running.api.Allocate(request("lagging", fraction_millis=100))).allocation
        view = running.coordinator.view
        await view.stop()  # this coordinator stops hearing from etcd...
        await other.api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.id))
        retry = asyncio.ensure_future(running.api.Allocate(request("lagging", fraction_millis=100)))
        assert await waits_on(view, retry) > view.state.revision
        await view.start_following()  # ...and catches up
        code, message = await _code(retry)
        assert code is grpc.StatusCode.ALREADY_EXISTS
        assert "released" in message


async def test_a_refusal_waits_for_the_view_to_hold_our_own_release(running: Running) -> None:
    """A whole GPU freed by this coordinator is placeable at once, even if the watch lags."""
    whole = [
        (await running.api.Allocate(request(f"full-{i}", fraction_millis=1000))).allocation
        for i in range(6)
    ]
    view = running.coordinator.view
    await view.stop()  # the release below reaches etcd, not yet this view
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=whole[0].id))
    again = asyncio.ensure_future(running.api.Allocate(request("refill", fraction_millis=1000)))
    assert await waits_on(view, again) > view.state.revision
    await view.start_following()
    placed = (await again).allocation
    assert placed.gpus[0].uuid == whole[0].gpus[0].uuid


async def test_a_retry_after_our_own_release_waits_for_it(running: Running) -> None:
    made = (await running.api.Allocate(request("own", fraction_millis=100))).allocation
    view = running.coordinator.view
    await view.stop()  # the release below reaches etcd, not yet this view
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.id))
    retry = asyncio.ensure_future(running.api.Allocate(request("own", fraction_millis=100)))
    assert await waits_on(view, retry) > view.state.revision
    await view.start_following()
    code, message = await _code(retry)
    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert "released" in message


async def test_keep_alive_through_another_coordinator_after_a_release_is_not_found(
    etcd: LocalEtcd, running: Running, inventory: Path
) -> None:
    """The other coordinator's view still holds the record (its watch is stopped), so only
    the lease can tell it the allocation is gone: the release must drop it before answering
    (review finding: it was dropped in the background, and this renewal succeeded)."""
    async with coordinator_running(etcd.endpoint, running.prefix, inventory) as other:
        made = await running.api.Allocate(
            request("released-here", fraction_millis=100, ttl_seconds=60)
        )
        allocation_id = made.allocation.id
        deadline = asyncio.get_running_loop().time() + 20
        while allocation_id not in other.coordinator.view.state.allocations:
            assert asyncio.get_running_loop().time() < deadline, "never reached the other view"
            await asyncio.sleep(0.01)
        await other.coordinator.view.stop()
        await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=allocation_id))
        assert allocation_id in other.coordinator.view.state.allocations  # still stale
        code, message = await _code(
            other.api.KeepAlive(allocation_pb2.KeepAliveRequest(allocation_id=allocation_id))
        )
        assert code is grpc.StatusCode.NOT_FOUND, message
        await other.coordinator.view.start_following()


async def test_the_coordinator_places_with_the_strategies_it_was_given(
    etcd: LocalEtcd, running: Running, inventory: Path
) -> None:
    # EveryGpuTwice (no built-in) offers the GPUs last first: it places on the last one.
    name = EveryGpuTwice.name
    async with coordinator_running(etcd.endpoint, running.prefix, inventory, STRATEGIES) as own:
        placed = await own.api.Allocate(request("last", fraction_millis=100, strategy=name))
        assert (placed.allocation.node, placed.allocation.gpus[0].index) == ("node-b", 1)
        assert placed.allocation.strategy == name
    code, message = await _code(
        running.api.Allocate(request("not-here", fraction_millis=100, strategy=name))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "strategy" in message
    assert "best-fit" in message


async def test_reads_through_a_coordinator_that_did_not_renew_show_the_live_expiry(
    etcd: LocalEtcd, running: Running, inventory: Path
) -> None:
    """Review finding: Watch and an Allocate replay showed the grant's expiry, long past, for
    an allocation renewed through another coordinator; they now ask etcd, as List does."""
    async with coordinator_running(etcd.endpoint, running.prefix, inventory) as other:
        made = (
            await running.api.Allocate(request("renewed-there", fraction_millis=100, ttl_seconds=2))
        ).allocation
        keep_alive = allocation_pb2.KeepAliveRequest(allocation_id=made.id)
        while time.time() < made.expires_at.seconds + 1.5:  # past the grant's expiry
            await other.api.KeepAlive(keep_alive)
            await asyncio.sleep(0.3)

        async def shown_by_running(read: str) -> float:
            await other.api.KeepAlive(keep_alive)  # alive for 2 s more whatever the pace
            if read == "replay":
                reply = await running.api.Allocate(
                    request("renewed-there", fraction_millis=100, ttl_seconds=2)
                )
                assert reply.replayed
                return reply.allocation.expires_at.ToMicroseconds() / 1e6
            stream = running.api.WatchAllocations(allocation_pb2.WatchAllocationsRequest())
            event = await _next_event(stream)
            stream.cancel()
            assert event.allocation.id == made.id
            return event.allocation.expires_at.ToMicroseconds() / 1e6

        for read in ("replay", "watch"):
            assert await shown_by_running(read) > time.time(), read


async def test_a_huge_bad_value_is_answered_as_a_short_field_error(running: Running) -> None:
    """Review finding: the message repeated the whole value, so a 1 MB owner made a 1 MB
    status that gRPC refused, and the client saw RESOURCE_EXHAUSTED ("no capacity")."""
    code, message = await _code(
        running.api.Allocate(request("huge-owner", fraction_millis=100, owner="x" * 1_000_000))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT, message[:200]
    assert message.startswith("request.owner: 'xxxx"), message[:200]
    assert "(1000000 characters)" in message
    assert len(message) < 300


async def test_a_garbage_page_token_is_a_field_error(running: Running) -> None:
    """Review finding: it was read as "from the start", so a client that mangled its token
    silently got the first page again."""
    code, message = await _code(
        running.api.ListAllocations(allocation_pb2.ListAllocationsRequest(page_token="../x y"))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT, message
    assert message.startswith("page_token:"), message


@pytest.mark.parametrize(
    ("method", "streaming"),
    [("Allocate", False), ("GetAllocation", False), ("WatchAllocations", True)],
)
async def test_bytes_that_are_not_the_request_are_invalid_argument(
    running: Running, method: str, streaming: bool
) -> None:
    """Review finding: raw garbage answered UNKNOWN "DecodeError", which a client cannot
    tell from a bug in the server."""
    path = f"/kaiwo_gpu.v1.AllocationService/{method}"
    garbage = b"\xff\xff\xff\xff not a protobuf"

    async def call() -> None:
        if streaming:
            watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = running.channel.unary_stream(
                path
            )
            async for _ in watch(garbage, timeout=10):
                pass
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = running.channel.unary_unary(
                path
            )
            await unary(garbage, timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call()
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "is not a valid kaiwo_gpu.v1." in (refused.value.details() or "")


async def test_a_released_request_id_is_held_for_its_owner_but_not_against_another(
    running: Running,
) -> None:
    """Review finding: Slurm's request ids are predictable, and anyone who allocated and
    released one first made the real job's prolog fail for 30-60 minutes. The tombstone now
    says whose it was: its owner's late duplicate is still refused, another owner's
    request takes the id anew."""
    squatted = request("slurm-c1-42-node-a", fraction_millis=100, owner="mallory")
    first = (await running.api.Allocate(squatted)).allocation
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=first.id))
    code, message = await _code(running.api.Allocate(squatted))
    assert code is grpc.StatusCode.ALREADY_EXISTS, message
    assert "for this owner, which has been released" in message
    job = request("slurm-c1-42-node-a", fraction_millis=100, owner="slurm/42")
    taken = await running.api.Allocate(job)
    assert not taken.replayed
    assert taken.allocation.id != first.id
    assert (await running.api.Allocate(job)).replayed  # and it is idempotent again
    code, _ = await _code(running.api.Allocate(squatted))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    audit = await audit_etcd(running.endpoint, running.prefix)
    assert list(audit.allocations) == [taken.allocation.id]


async def test_a_tombstone_that_names_no_owner_holds_its_id_for_everyone(
    running: Running,
) -> None:
    """Tombstones written before they named owners stay as strict as they were."""
    store = EtcdStore([running.endpoint])
    try:
        key = KeyLayout(running.prefix).request("old-released")
        result = await store.commit(Txn(puts=(Put(key, b"released:0123abcd"),)))
    finally:
        await store.close()
    await running.coordinator.view.wait_for(result.revision, 10)
    code, message = await _code(
        running.api.Allocate(request("old-released", fraction_millis=100, owner="anyone"))
    )
    assert code is grpc.StatusCode.ALREADY_EXISTS, message


async def test_an_owners_late_duplicate_stays_refused_after_another_owner_used_the_id(
    running: Running,
) -> None:
    """Review finding: once another owner took a released id and released it in turn, the
    tombstone named only the second, and the first owner's late duplicate made a new
    allocation nobody would release. A binding keeps the owners of the tombstone it
    replaced, and its own tombstone names them all."""
    alice = request("shared-id", fraction_millis=100, owner="alice")
    bob = request("shared-id", fraction_millis=100, owner="bob")
    for turn in (alice, bob):
        made = (await running.api.Allocate(turn)).allocation
        await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=made.id))
    for late in (alice, bob):
        code, message = await _code(running.api.Allocate(late))
        assert code is grpc.StatusCode.ALREADY_EXISTS, message
    carol = await running.api.Allocate(request("shared-id", fraction_millis=100, owner="carol"))
    assert not carol.replayed  # a third owner still takes it
    audit = await audit_etcd(running.endpoint, running.prefix)
    assert list(audit.allocations) == [carol.allocation.id]
