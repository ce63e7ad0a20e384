"""The allocator's branches that a healthy etcd never takes, driven against a real etcd.

`FaultyStore` wraps the real EtcdStore and injects one fault where it lives (a competing
write before each commit, a lease that is gone by the commit, a commit whose answer is
lost), so the allocator meets etcd's real answers rather than a fake's idea of them. The
pure batch decision and the KeepAlive path (the lease alone, no record write) are here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from kaiwo_gpu.common.errors import ConflictError, NoCapacityError, UnavailableError
from kaiwo_gpu.common.models import AllocationRequest, Selector
from kaiwo_gpu.coordinator.allocator import Allocator, AllocatorSettings
from kaiwo_gpu.coordinator.leases import EXPIRY_QUERY_PAUSE_S, Leases
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.placement.strategies import SchedulerState
from kaiwo_gpu.coordinator.state.batch import BatchItem, DecisionPolicy, decide_batch
from kaiwo_gpu.coordinator.state.changes import Change, Put, Txn, TxnResult
from kaiwo_gpu.coordinator.state.inventory import parse_inventory, synthetic_inventory
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.registration import register_nodes
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.coordinator.state.view_state import ViewState
from tests.harness import INVENTORY

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FaultyStore(EtcdStore):
    """The real store, with one fault switched on at a time."""

    def __init__(self, endpoint: str) -> None:
        super().__init__([endpoint])
        self.compete_before_commit: bytes | None = None
        """A key to rewrite just before every commit: another coordinator got there first."""
        self.revoke_before_commit = False
        """Revoke every lease granted so far just before the commit: it ran out meanwhile."""
        self.lose_commit_answers = False
        """Commit for real, then answer as if etcd had become unreachable."""
        self.stall_lease_ttl = False
        """Lease-TTL reads never answer: etcd has stalled."""
        self.hold_renewals: asyncio.Event | None = None
        """A renewal that etcd has answered waits for this before it returns."""
        self.renewal_answered = asyncio.Event()
        self.granted: list[int] = []
        self.revoked: list[int] = []
        self.lease_ttl_reads = 0
        self.commits = 0

    async def grant_lease(self, ttl_s: int) -> tuple[int, int]:
        lease = await super().grant_lease(ttl_s)
        self.granted.append(lease[0])
        return lease

    async def revoke_lease(self, lease_id: int) -> None:
        self.revoked.append(lease_id)
        await super().revoke_lease(lease_id)

    async def lease_ttl(self, lease_id: int) -> int:
        self.lease_ttl_reads += 1
        if self.stall_lease_ttl:
            await asyncio.Event().wait()
        return await super().lease_ttl(lease_id)

    async def refresh_lease(self, lease_id: int) -> int:
        ttl_s = await super().refresh_lease(lease_id)
        if self.hold_renewals is not None:
            self.renewal_answered.set()
            await self.hold_renewals.wait()
        return ttl_s

    async def commit(self, txn: Txn) -> TxnResult:
        if self.compete_before_commit is not None and txn.puts:
            await super().commit(Txn(puts=(Put(self.compete_before_commit, b""),)))
        if self.revoke_before_commit:
            for lease_id in self.granted:
                await super().revoke_lease(lease_id)
        self.commits += 1
        result = await super().commit(txn)
        if self.lose_commit_answers:
            raise UnavailableError(f"etcd at {self.target} is unavailable: connection reset")
        return result


@dataclass
class Rig:
    store: FaultyStore
    view: ClusterView
    allocator: Allocator
    layout: KeyLayout


_prefixes = itertools.count()


@contextlib.asynccontextmanager
async def rig(etcd: LocalEtcd, **settings: object) -> AsyncIterator[Rig]:
    layout = KeyLayout(f"/kaiwo-allocator-{next(_prefixes)}/v1/")
    store = FaultyStore(etcd.endpoint)
    await register_nodes(store, layout, parse_inventory(INVENTORY))
    view = ClusterView(store, layout)
    await view.start()
    allocator = Allocator(
        store,
        view,
        layout,
        AllocatorSettings(**settings),  # type: ignore[arg-type]
        clock=lambda: datetime.now(UTC),
    )
    allocator.start()
    store.commits = 0  # count the allocator's commits only
    try:
        yield Rig(store, view, allocator, layout)
    finally:
        await allocator.stop()
        await view.stop()
        await store.close()


async def stored(rig: Rig) -> dict[str, bytes]:
    _, kvs = await rig.store.read_prefix(rig.layout.allocation(""))
    return {kv.key.decode(): kv.value for kv in kvs}


async def test_conflicts_on_every_attempt_end_in_aborted_with_nothing_written(
    etcd: LocalEtcd,
) -> None:
    async with rig(etcd, max_attempts=3) as r:
        uuids = [g.inventory.uuid for g in r.view.state.nodes["node-b"].gpus]
        r.store.compete_before_commit = r.layout.gpu(uuids[0])
        request = AllocationRequest(
            "conflicted",
            fraction_millis=500,
            ttl_seconds=60,
            strategy="first-fit",
            selector=Selector(nodes=frozenset({"node-b"})),  # first-fit: node-b's GPU 0
        )
        with pytest.raises(ConflictError, match="gave up after 3 conflicting commits"):
            await r.allocator.allocate(request)
        assert r.store.commits == 3
        assert await stored(r) == {}
        assert r.allocator.conflicts == 3
        # The lease granted for the first attempt was kept across the retries, then dropped.
        assert len(r.store.granted) == 1

        async def revoked() -> None:
            while r.store.granted[0] not in r.store.revoked:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(revoked(), 10)


async def test_a_lease_gone_before_the_commit_is_unavailable_and_writes_nothing(
    etcd: LocalEtcd,
) -> None:
    async with rig(etcd) as r:
        r.store.revoke_before_commit = True
        request = AllocationRequest("short-lived", fraction_millis=250, ttl_seconds=60)
        with pytest.raises(UnavailableError, match="a lease expired before the commit"):
            await r.allocator.allocate(request)
        assert await stored(r) == {}
        # Nothing is bound to the request id, so the retry places it afresh.
        r.store.revoke_before_commit = False
        placed, replayed = await r.allocator.allocate(request)
        assert not replayed
        assert list(await stored(r)) == [r.layout.allocation(placed.id).decode()]


async def test_an_unknown_outcome_keeps_its_lease_and_the_retry_replays_it(
    etcd: LocalEtcd,
) -> None:
    async with rig(etcd) as r:
        r.store.lose_commit_answers = True
        request = AllocationRequest("lost-answer", fraction_millis=250, ttl_seconds=60)
        with pytest.raises(UnavailableError, match="outcome is unknown, retry with the same"):
            await r.allocator.allocate(request)
        written = await stored(r)
        assert len(written) == 1  # it did land
        assert r.store.revoked == []  # and its lease was kept
        r.store.lose_commit_answers = False
        placed, replayed = await r.allocator.allocate(request)
        assert replayed
        assert r.layout.allocation(placed.id).decode() in written
        assert placed.lease_id == r.store.granted[0]


async def test_keep_alive_renews_the_lease_without_writing_to_etcd(etcd: LocalEtcd) -> None:
    async with rig(etcd) as r:
        placed, _ = await r.allocator.allocate(
            AllocationRequest("renewed", fraction_millis=100, ttl_seconds=30)
        )
        before = await r.store.revision()
        expires_at, ttl_s = await r.allocator.keep_alive(placed.id)
        assert ttl_s == 30
        assert await r.store.revision() == before  # no record rewritten, no watch event
        # The expiry reads derive from the renewal; the stored record keeps its grant's.
        assert r.allocator.leases.known_expiry(placed) == expires_at
        record, _ = await r.allocator.record(placed.id)
        assert record.expires_at == placed.expires_at
        assert await r.allocator.leases.current_expiry(record) is not None


def test_a_batch_decides_each_request_on_the_placements_before_it() -> None:
    state = ViewState.load(KeyLayout(), 1, [])
    nodes = synthetic_inventory(1, 2, "MI210")
    state.apply(
        2,
        [
            Change(state.layout.node(n.name), n.SerializeToString(deterministic=True), 2)
            for n in nodes
        ],
    )
    items = [
        BatchItem(AllocationRequest("a", fraction_millis=1000), "id-a"),
        BatchItem(AllocationRequest("b", fraction_millis=1000, ttl_seconds=60), "id-b"),
        BatchItem(AllocationRequest("c", fraction_millis=1000), "id-c", has_lease=True),
        BatchItem(AllocationRequest("d", fraction_millis=500, strategy="no-such"), "id-d"),
    ]
    decision = decide_batch(
        items,
        state.snapshot,
        state,
        scheduler_state=SchedulerState(),
        policy=DecisionPolicy(default_ttl_s=None),
        now=NOW,
    )
    placed = dict(decision.placed)
    assert sorted(placed) == [0, 1]
    assert {g.uuid for g in placed[0].gpus}.isdisjoint(g.uuid for g in placed[1].gpus)
    assert [index for index, _ in decision.refused] == [2]  # both GPUs taken by a and b
    assert isinstance(decision.refused[0][1], NoCapacityError)
    assert [index for index, _ in decision.failed] == [3]
    assert "strategy" in decision.failed[0][1].message
    assert decision.leases_wanted == ((1, 60),)  # c has one already, a wants none
    assert [a.id for a in decision.plan.allocations] == ["id-a", "id-b"]
    assert not placed[0].environment  # derived when shown, never stored


async def test_a_release_drops_the_lease_before_it_answers(etcd: LocalEtcd) -> None:
    """Review finding: the lease was revoked in the background, so a renewal sent after the
    release had been answered (through a coordinator whose view still held the record)
    could succeed. Now it finds the lease gone, and the renewal book forgets it."""
    async with rig(etcd) as r:
        placed, _ = await r.allocator.allocate(
            AllocationRequest("released", fraction_millis=100, ttl_seconds=60)
        )
        await r.allocator.keep_alive(placed.id)
        assert r.allocator.leases.known_expiry(placed) != placed.expires_at.ToDatetime(UTC)
        await r.allocator.release(placed.id)
        assert await r.store.refresh_lease(placed.lease_id) == 0
        assert r.allocator.leases.known_expiry(placed) == placed.expires_at.ToDatetime(UTC)


async def test_an_expiry_asked_of_etcd_is_remembered(etcd: LocalEtcd) -> None:
    """A lease renewed elsewhere is asked about once, not at every List: here a coordinator
    whose clock is 30 s on (its known expiry is the grant's) asks etcd and keeps the answer."""
    async with rig(etcd) as r:
        placed, _ = await r.allocator.allocate(
            AllocationRequest("asked", fraction_millis=100, ttl_seconds=60)
        )
        later = Leases(r.store, clock=lambda: datetime.now(UTC) + timedelta(seconds=30))
        asked = await later.current_expiry(placed)
        assert asked is not None
        assert asked > placed.expires_at.ToDatetime(UTC) + timedelta(seconds=20)
        assert later.known_expiry(placed) == asked


async def test_a_renewal_answered_while_its_lease_is_released_stays_out_of_the_book(
    etcd: LocalEtcd,
) -> None:
    """Review finding: a KeepAlive in flight across a Release booked its renewal after the
    release had forgotten the lease, so the book kept a released lease."""
    async with rig(etcd) as r:
        placed, _ = await r.allocator.allocate(
            AllocationRequest("raced", fraction_millis=100, ttl_seconds=60)
        )
        r.store.hold_renewals = asyncio.Event()
        renewal = asyncio.create_task(r.allocator.keep_alive(placed.id))
        await asyncio.wait_for(r.store.renewal_answered.wait(), 10)
        await r.allocator.release(placed.id)
        r.store.hold_renewals.set()
        await asyncio.wait_for(renewal, 10)
        assert r.allocator.leases.known_expiry(placed) == placed.expires_at.ToDatetime(UTC)


async def test_a_stalled_etcd_costs_a_read_one_short_wait_then_none(etcd: LocalEtcd) -> None:
    """Review finding: every List asked etcd for each stale lease with the store's 5 s
    timeout, so a stalled etcd stalled every List. Now a read waits briefly, shows what it
    knows, and does not ask again for EXPIRY_QUERY_PAUSE_S."""
    async with rig(etcd) as r:
        records = [
            (
                await r.allocator.allocate(
                    AllocationRequest(f"s{n}", fraction_millis=100, ttl_seconds=60)
                )
            )[0]
            for n in range(3)
        ]
        offset = [timedelta(seconds=90)]  # every grant's expiry has passed on this clock
        later = Leases(r.store, clock=lambda: datetime.now(UTC) + offset[0])
        granted = [record.expires_at.ToDatetime(UTC) for record in records]
        r.store.stall_lease_ttl = True
        assert await asyncio.wait_for(later.expiries(records), 30) == granted
        assert r.store.lease_ttl_reads == 3
        assert await asyncio.wait_for(later.expiries(records), 30) == granted
        assert r.store.lease_ttl_reads == 3  # paused: nobody asked
        r.store.stall_lease_ttl = False
        offset[0] += timedelta(seconds=EXPIRY_QUERY_PAUSE_S + 1)
        answered = await asyncio.wait_for(later.expiries(records), 30)
        assert r.store.lease_ttl_reads == 6
        assert all(a is not None and a > g for a, g in zip(answered, granted, strict=True))
