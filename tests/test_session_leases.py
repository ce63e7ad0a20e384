"""Client sessions share one etcd lease per (caller identity, session, TTL): the pure book of
session leases, then the semantics end to end over real gRPC on loopback and a real etcd.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from kaiwo_gpu.client import AsyncClient, ClientSettings
from kaiwo_gpu.client import calls as client_calls
from kaiwo_gpu.common import pki
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.identity import Identity, Role
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.common.wire import session_from_proto
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.coordinator.session_leases import SessionKey, SessionLeases, joinable
from kaiwo_gpu.coordinator.state.changes import Txn
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.v1 import allocation_pb2, types_pb2
from tests.conftest import Running, coordinator_running
from tests.harness import audit_etcd, request
from tests.harness import status_of as _code
from tests.test_identity import Pki, client, secured

T0 = datetime(2026, 1, 1, tzinfo=UTC)
KEY = SessionKey("user/alice", "s-1", 30)


# --- the pure book ------------------------------------------------------------------------


def test_a_session_without_a_lease_gets_none_and_a_granted_one_is_joined() -> None:
    book = SessionLeases()
    assert book.join(KEY, T0, {}) is None
    granted = book.granted(KEY, 7, T0 + timedelta(seconds=30))
    assert granted.shared
    assert not granted.joined
    joined = book.join(KEY, T0 + timedelta(seconds=1), {})
    assert joined is not None
    assert (joined.lease_id, joined.shared, joined.joined) == (7, True, True)
    other = SessionKey("user/bob", "s-1", 30)  # the same session id from another identity
    assert book.join(other, T0, {}) is None
    assert book.join(SessionKey("user/alice", "s-1", 60), T0, {}) is None  # another TTL


def test_a_lease_with_less_than_half_its_ttl_left_is_not_joined_unless_renewed() -> None:
    book = SessionLeases()
    book.granted(KEY, 7, T0 + timedelta(seconds=30))
    later = T0 + timedelta(seconds=16)  # 14 s left of 30
    renewed = {7: later + timedelta(seconds=30)}
    joined = book.join(KEY, later, renewed)
    assert joined is not None
    assert joined.expires_at == later + timedelta(seconds=30)  # the record shows the renewal
    much_later = later + timedelta(seconds=16)  # 14 s left of the renewal
    assert book.join(KEY, much_later, {}) is None
    assert len(book) == 0, "a lease too short to join is forgotten"
    assert joinable(joined, 30, later + timedelta(seconds=15))
    assert not joinable(joined, 30, later + timedelta(seconds=15, microseconds=1))


def test_a_lost_lease_is_forgotten_and_a_new_grant_replaces_the_old() -> None:
    book = SessionLeases()
    book.granted(KEY, 7, T0 + timedelta(seconds=30))
    book.lost(8)  # not a session lease: nothing happens
    assert book.join(KEY, T0, {}) is not None
    book.lost(7)
    assert book.join(KEY, T0, {}) is None
    book.granted(KEY, 9, T0 + timedelta(seconds=30))
    book.granted(KEY, 10, T0 + timedelta(seconds=30))
    book.lost(9)  # the replaced lease no longer stands for the session
    joined = book.join(KEY, T0, {})
    assert joined is not None
    assert joined.lease_id == 10


def test_the_book_forgets_the_least_recently_used_session_past_its_limit() -> None:
    book = SessionLeases(limit=2)
    keys = [SessionKey("user/alice", f"s-{n}", 30) for n in range(3)]
    book.granted(keys[0], 1, T0 + timedelta(seconds=30))
    book.granted(keys[1], 2, T0 + timedelta(seconds=30))
    assert book.join(keys[0], T0, {}) is not None  # used: now the newest
    book.granted(keys[2], 3, T0 + timedelta(seconds=30))
    assert len(book) == 2
    assert book.join(keys[1], T0, {}) is None
    assert book.join(keys[0], T0, {}) is not None
    assert book.join(keys[2], T0, {}) is not None


def test_a_session_follows_the_request_id_rule_at_both_ends() -> None:
    message = types_pb2.AllocationRequest(request_id="r", fraction_millis=100, session="a b")
    with pytest.raises(InvalidArgumentError) as refused:
        session_from_proto(message)
    assert refused.value.field == "request.session"
    assert session_from_proto(types_pb2.AllocationRequest(request_id="r")) == ""
    assert session_from_proto(types_pb2.AllocationRequest(session="ok-1:/x")) == "ok-1:/x"
    asked = AllocationRequest(request_id="r", fraction_millis=100)
    with pytest.raises(InvalidArgumentError) as refused:
        client_calls.allocate(asked, "x" * 129)
    assert refused.value.field == "session"
    sent = client_calls.allocate(asked, "s-1").message
    assert isinstance(sent, allocation_pb2.AllocateRequest)
    assert sent.request.session == "s-1"
    unsent = client_calls.allocate(asked).message
    assert isinstance(unsent, allocation_pb2.AllocateRequest)
    assert unsent.request.session == ""


# --- end to end ---------------------------------------------------------------------------


def sessioned(
    request_id: str, session: str, ttl_s: int = 60, **fields: object
) -> allocation_pb2.AllocateRequest:
    made = request(request_id, ttl_seconds=ttl_s, **{"fraction_millis": 100, **fields})
    made.request.session = session
    return made


async def allocate(
    running: Running, message: allocation_pb2.AllocateRequest
) -> types_pb2.Allocation:
    return (await running.api.Allocate(message)).allocation


async def keep_alive(running: Running, allocation_id: str) -> allocation_pb2.KeepAliveResponse:
    return await running.api.KeepAlive(allocation_pb2.KeepAliveRequest(allocation_id=allocation_id))


async def exists(running: Running, allocation_id: str) -> bool:
    audit = await audit_etcd(running.endpoint, running.prefix)
    return allocation_id in audit.allocations


async def lease_ttl_s(endpoint: str, lease_id: int) -> int:
    store = EtcdStore([endpoint])
    try:
        return await store.lease_ttl(lease_id)
    finally:
        await store.close()


async def until_gone(running: Running, ids: set[str], limit_s: float) -> float:
    """Seconds until none of `ids` is in etcd (polled, at most `limit_s`)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if not ids & set((await audit_etcd(running.endpoint, running.prefix)).allocations):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"still in etcd after {limit_s} s")


async def test_a_sessions_allocations_of_one_ttl_share_one_lease(running: Running) -> None:
    a = await allocate(running, sessioned("a", "s-1"))
    b = await allocate(running, sessioned("b", "s-1"))
    other_ttl = await allocate(running, sessioned("c", "s-1", ttl_s=90))
    other_session = await allocate(running, sessioned("d", "s-2"))
    alone = [
        await allocate(running, request(f"e{n}", fraction_millis=100, ttl_seconds=60))
        for n in range(2)
    ]
    assert a.lease_id
    assert a.lease_id == b.lease_id
    assert all(x.lease_shared for x in (a, b, other_ttl, other_session))
    assert (
        len({a.lease_id, other_ttl.lease_id, other_session.lease_id, *(x.lease_id for x in alone)})
        == 5
    )
    assert not any(x.lease_shared for x in alone), "no session: a lease of its own, as before"
    audit = await audit_etcd(running.endpoint, running.prefix)
    assert audit.allocations[b.id].lease_id == a.lease_id, "the record names the shared lease"
    assert audit.allocations[b.id].request.session == "", "a replay does not match on it"


async def test_keep_alive_of_any_allocation_of_the_session_renews_the_shared_lease(
    running: Running,
) -> None:
    a = await allocate(running, sessioned("ka", "s-1", ttl_s=3))
    b = await allocate(running, sessioned("kb", "s-1", ttl_s=3))
    for _ in range(17):  # about 5 s, past the TTL: only `a` is renewed
        assert (await keep_alive(running, a.id)).ttl_seconds >= 1
        await asyncio.sleep(0.3)
    assert await exists(running, b.id)
    got = await running.api.GetAllocation(allocation_pb2.GetAllocationRequest(allocation_id=b.id))
    assert got.allocation.expires_at.seconds >= b.expires_at.seconds + 2


@pytest.mark.timeout(60)
async def test_an_allocation_joining_an_older_lease_gets_its_whole_ttl(running: Running) -> None:
    """Found by review: a joiner got the lease's remaining time (half its TTL, at worst),
    while its client counts a whole TTL from its request and would think it held the GPU
    after etcd had dropped it. Joining now renews the lease first."""
    first = await allocate(running, sessioned("ja", "s-join", ttl_s=6))
    await asyncio.sleep(2.5)  # 3.5 s left: still joinable
    asked = time.time()
    joined = await allocate(running, sessioned("jb", "s-join", ttl_s=6))
    assert joined.lease_id == first.lease_id
    assert joined.expires_at.ToDatetime(tzinfo=UTC).timestamp() >= asked + 5.5
    assert await lease_ttl_s(running.endpoint, joined.lease_id) >= 5


async def test_one_session_for_two_owners_is_two_leases(running: Running) -> None:
    """An admin allocating for alice and bob in one session: bob's renewals must not keep
    alice's allocation alive."""
    for_alice = await allocate(running, sessioned("oa", "s-own", owner="alice"))
    for_bob = await allocate(running, sessioned("ob", "s-own", owner="bob"))
    assert for_alice.lease_id != for_bob.lease_id


async def test_release_deletes_only_that_record_and_the_lease_stays(running: Running) -> None:
    a = await allocate(running, sessioned("ra", "s-1"))
    b = await allocate(running, sessioned("rb", "s-1"))
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=a.id))
    assert not await exists(running, a.id)
    assert await exists(running, b.id)
    assert await lease_ttl_s(running.endpoint, b.lease_id) > 0
    code, _ = await _code(keep_alive(running, a.id))
    assert code is grpc.StatusCode.NOT_FOUND
    assert (await keep_alive(running, b.id)).ttl_seconds > 0
    c = await allocate(running, sessioned("rc", "s-1"))
    assert c.lease_id == b.lease_id, "the session's later allocations still join it"


async def test_a_renewal_after_a_release_is_not_found_even_where_the_view_lags(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The released allocation's lease lives on for the session's others, so a coordinator
    whose view has not seen the release (another one made it) must ask etcd."""
    a = await allocate(running, sessioned("la", "s-1"))
    b = await allocate(running, sessioned("lb", "s-1"))
    allocator = running.coordinator.allocator
    stale = await allocator.record(a.id)
    await running.api.Release(allocation_pb2.ReleaseRequest(allocation_id=a.id))

    async def lagging(allocation_id: str) -> tuple[types_pb2.Allocation, int]:
        return stale

    monkeypatch.setattr(allocator, "record", lagging)
    code, _ = await _code(keep_alive(running, a.id))
    assert code is grpc.StatusCode.NOT_FOUND
    assert await lease_ttl_s(running.endpoint, b.lease_id) > 0


async def test_the_leases_expiry_removes_every_allocation_of_the_session_at_once(
    running: Running,
) -> None:
    made = [await allocate(running, sessioned(f"x{n}", "s-1", ttl_s=2)) for n in range(5)]
    assert len({m.lease_id for m in made}) == 1
    await until_gone(running, {m.id for m in made}, limit_s=15)
    stats = await running.api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
    assert stats.allocated_millis == 0
    audit = await audit_etcd(running.endpoint, running.prefix)
    assert audit.request_keys == {}


async def test_a_replay_is_unchanged_whatever_session_it_comes_from(running: Running) -> None:
    first = await running.api.Allocate(sessioned("same", "s-1"))
    again = await running.api.Allocate(sessioned("same", "s-1"))
    from_elsewhere = await running.api.Allocate(sessioned("same", "s-new-process"))
    without = await running.api.Allocate(request("same", fraction_millis=100, ttl_seconds=60))
    assert not first.replayed
    assert all(reply.replayed for reply in (again, from_elsewhere, without))
    assert {again.allocation.id, from_elsewhere.allocation.id, without.allocation.id} == {
        first.allocation.id
    }
    assert len((await audit_etcd(running.endpoint, running.prefix)).allocations) == 1


async def test_a_cached_session_lease_that_etcd_dropped_is_replaced_and_the_allocation_commits(
    running: Running,
) -> None:
    a = await allocate(running, sessioned("da", "s-1"))
    store = EtcdStore([running.endpoint])
    try:
        await store.revoke_lease(a.lease_id)  # behind the coordinator's back
    finally:
        await store.close()
    await until_gone(running, {a.id}, limit_s=5)
    grants_before = running.coordinator.allocator.instruments.lease_grants._value.get()
    b = await allocate(running, sessioned("db", "s-1"))
    assert b.lease_id not in (0, a.lease_id)
    assert b.lease_shared
    assert await exists(running, b.id)
    assert running.coordinator.allocator.instruments.lease_grants._value.get() == grants_before + 1
    c = await allocate(running, sessioned("dc", "s-1"))
    assert c.lease_id == b.lease_id, "the fresh lease is the session's from now on"


async def test_a_placement_that_never_commits_leaves_the_session_lease_alone(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await allocate(running, sessioned("na", "s-1"))
    allocator = running.coordinator.allocator
    real_commit = allocator.store.commit
    refused: list[Txn] = []

    async def refuse_once(txn: Txn) -> object:
        if not refused:
            refused.append(txn)
            raise InvalidArgumentError("txn", "x", "refused by the test")
        return await real_commit(txn)

    monkeypatch.setattr(allocator.store, "commit", refuse_once)
    code, _ = await _code(running.api.Allocate(sessioned("nb", "s-1")))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert refused
    await asyncio.sleep(0.3)  # a revocation would run in the background
    assert await lease_ttl_s(running.endpoint, a.lease_id) > 0
    assert await exists(running, a.id)
    c = await allocate(running, sessioned("nc", "s-1"))
    assert c.lease_id == a.lease_id


async def test_two_coordinators_each_hold_a_lease_for_one_session_and_never_overcommit(
    etcd: LocalEtcd, prefix: str, inventory: Path
) -> None:
    async with (
        coordinator_running(etcd.endpoint, prefix, inventory) as one,
        coordinator_running(etcd.endpoint, prefix, inventory) as two,
    ):
        a = await allocate(one, sessioned("ta", "s-1"))
        b = await allocate(two, sessioned("tb", "s-1"))
        assert a.lease_id != b.lease_id
        assert a.lease_shared
        assert b.lease_shared
        # Released through one, renewed through the other at once: gone, whatever its view.
        await one.api.Release(allocation_pb2.ReleaseRequest(allocation_id=b.id))
        code, _ = await _code(keep_alive(two, b.id))
        assert code is grpc.StatusCode.NOT_FOUND
        # 6 GPUs hold 24 quarter-GPU allocations; 40 are asked for at once, through both.
        sessions = ("s-1", "s-2", "s-3")
        asked = [
            (one, two)[n % 2].api.Allocate(sessioned(f"o{n}", sessions[n % 3], fraction_millis=250))
            for n in range(40)
        ]
        replies = await asyncio.gather(*asked, return_exceptions=True)
        placed = [r.allocation for r in replies if isinstance(r, allocation_pb2.AllocateResponse)]
        failed = [r for r in replies if not isinstance(r, allocation_pb2.AllocateResponse)]
        assert all(
            isinstance(f, grpc.aio.AioRpcError)
            and f.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED)
            for f in failed
        ), failed
        assert 0 < len(placed) <= 24 - 1  # `a` holds a tenth of one GPU
        assert len({p.lease_id for p in placed}) <= 2 * len(sessions)
        audit = await audit_etcd(etcd.endpoint, prefix)  # asserts the invariants itself
        assert all(millis <= 1000 for millis in audit.millis_by_gpu.values())
        assert set(audit.allocations) == {a.id, *(p.id for p in placed)}


async def test_a_bad_session_is_invalid_argument_and_writes_nothing(running: Running) -> None:
    before = (await audit_etcd(running.endpoint, running.prefix)).revision
    code, message = await _code(running.api.Allocate(sessioned("bad", "no spaces")))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "request.session" in message
    assert (await audit_etcd(running.endpoint, running.prefix)).revision == before


async def test_a_client_shares_its_own_session_unless_told_otherwise(running: Running) -> None:
    settings = ClientSettings(target=running.target, timeout_s=5)
    async with AsyncClient(settings=settings) as first, AsyncClient(settings=settings) as second:
        assert first.session != second.session
        one = await first.allocate(request_id="c1", fraction=0.1, ttl=60)
        two = await first.allocate(request_id="c2", fraction=0.1, ttl=60)
        own = await first.allocate(request_id="c3", fraction=0.1, ttl=60, session="")
        given = await first.allocate(request_id="c4", fraction=0.1, ttl=60, session="mine")
        other = await second.allocate(request_id="c5", fraction=0.1, ttl=60)
        async with first.allocation(request_id="c6", fraction=0.1, default_ttl_s=60) as held:
            assert held.allocation.lease_id == one.lease_id
    assert one.lease_id == two.lease_id
    assert one.lease_shared
    assert len({one.lease_id, own.lease_id, given.lease_id, other.lease_id}) == 4
    assert not own.lease_shared


@pytest.fixture
def tenants_pki(tmp_path: Path) -> Pki:
    """A CA and the coordinator's certificate, as tests.test_identity makes them."""
    directory = tmp_path / "tls"
    ca = pki.load_or_make_ca(directory)
    pki.issue_into(directory, ca, Identity(Role.COORDINATOR, "coordinator"))
    return Pki(directory, ca)


async def test_the_shared_lease_is_keyed_by_the_authenticated_caller(
    etcd: LocalEtcd, prefix: str, inventory: Path, tenants_pki: Pki
) -> None:
    async with (
        secured(etcd, prefix, inventory, tenants_pki, client_ca=False) as running,
        client(running, tenants_pki.token("carol-token-1")) as carol,
        client(running, tenants_pki.token("ci-token-1")) as ci,
    ):
        mine = await carol.allocate(request_id="k1", fraction=0.1, ttl=60, session="s-x")
        again = await carol.allocate(request_id="k2", fraction=0.1, ttl=60, session="s-x")
        theirs = await ci.allocate(request_id="k3", fraction=0.1, ttl=60, session="s-x")
    assert mine.lease_id == again.lease_id
    assert theirs.lease_id != mine.lease_id, "the same session id joins nobody else's lease"
