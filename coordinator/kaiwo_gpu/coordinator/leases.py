"""The allocator's leases: grants for placements, revocation of those that never committed,
the shared tombstone lease, renewals, and the expiry an allocation shows.

An allocation with a TTL lives on an etcd lease, so etcd itself reclaims it when its holder
stops renewing: its own lease, or its client session's, which the session's allocations of
that TTL share (`session_leases`), so a vanished client's allocations expire as one.
Renewing is one keep-alive on the lease and nothing else: the record keeps the expiry of its
grant (grant time + TTL, written once), and reads derive the later expiry from the renewals
this coordinator made, or ask etcd when what they know has passed (the lease was renewed
through another coordinator).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from kaiwo_gpu.common.errors import KaiwoGpuError
from kaiwo_gpu.common.wire import moment_of
from kaiwo_gpu.coordinator.instruments import Instruments
from kaiwo_gpu.coordinator.session_leases import LeaseGrant, SessionKey, SessionLeases
from kaiwo_gpu.coordinator.state.changes import Store
from kaiwo_gpu.v1 import types_pb2

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
TOMBSTONE_TTL_S = 3600
"""How long a released request_id stays taken (between half and all of this)."""
BACKGROUND_GRACE_S = 1.0
"""How long `stop` lets revocations under way finish."""
EXPIRY_QUERIES_IN_FLIGHT = 32
"""At most this many lease-TTL reads in flight for one List, so a big page spares etcd."""
EXPIRY_QUERY_TIMEOUT_S = 0.5
"""How long a read waits for etcd to say a lease's TTL before it shows what it knows."""
EXPIRY_QUERY_PAUSE_S = 5.0
"""After a lease-TTL read failed, reads show what they know for this long without asking,
so a stalled etcd costs one List at most one timeout, not one per page or per call."""
REVOKED_REMEMBERED = 4096
"""Recently revoked leases, so a renewal or TTL read that was in flight when its lease was
revoked does not put the lease back in the renewal book."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class Leases:
    """The leases one coordinator grants, renews and revokes."""

    def __init__(
        self, store: Store, clock: Clock = utc_now, instruments: Instruments | None = None
    ) -> None:
        self._instruments = instruments or Instruments()
        self._store = store
        self._clock = clock
        self._background: set[asyncio.Task[Any]] = set()
        self._tombstone: tuple[int, datetime] | None = None
        self._tombstone_lock = asyncio.Lock()
        self._renewed_until: dict[int, datetime] = {}  # lease id -> expiry after our renewal
        self._pruned_at_size = 0
        self._revoked: OrderedDict[int, None] = OrderedDict()
        self._queries_paused_until: datetime | None = None
        self.sessions = SessionLeases()

    async def stop(self) -> None:
        """Lets revocations under way land, briefly; the rest expire on their own."""
        if self._background:
            await asyncio.wait(tuple(self._background), timeout=BACKGROUND_GRACE_S)

    async def grant(self, ttls_s: Sequence[int]) -> list[tuple[int, int] | BaseException]:
        """One lease per TTL, all at once: (lease id, granted TTL) or what failed, in order.

        Leases are granted after the decision, so a refused request costs no lease."""
        granted = await asyncio.gather(
            *(self._store.grant_lease(ttl_s) for ttl_s in ttls_s), return_exceptions=True
        )
        self._instruments.lease_grants.inc(sum(not isinstance(g, BaseException) for g in granted))
        return granted

    async def grant_for(
        self, wanted: Sequence[tuple[int, SessionKey | None]]
    ) -> list[LeaseGrant | BaseException]:
        """The lease for each (TTL, session) in order, or what failed: a session's lease
        while it is joinable, else one fresh grant per session, and a lease of its own for
        each allocation without a session; the fresh ones granted all at once.

        A joined lease is renewed first, in one keep-alive for all of them: its joiner's
        client counts a whole TTL from its request, so the lease must last that long (one
        with half its TTL left would lapse while the client still thinks it holds the GPU).
        One that cannot be renewed is replaced by a fresh grant."""
        now = self._clock()
        joined = await self._renewed_joins(
            {key: self.sessions.join(key, now, self._renewed_until) for _, key in wanted if key}
        )
        leases: list[LeaseGrant | int] = []  # joined, or the index of its fresh grant
        fresh_keys: list[SessionKey | None] = []
        fresh_ttls_s: list[int] = []
        fresh_by_key: dict[SessionKey, int] = {}
        for ttl_s, key in wanted:
            if key is not None:
                if key in joined:
                    leases.append(joined[key])
                    continue
                if key in fresh_by_key:
                    leases.append(fresh_by_key[key])
                    continue
                fresh_by_key[key] = len(fresh_ttls_s)
            leases.append(len(fresh_ttls_s))
            fresh_keys.append(key)
            fresh_ttls_s.append(ttl_s)
        granted = await self.grant(fresh_ttls_s) if fresh_ttls_s else []
        fresh = [self._booked(k, g, now) for k, g in zip(fresh_keys, granted, strict=True)]
        return [lease if isinstance(lease, LeaseGrant) else fresh[lease] for lease in leases]

    async def _renewed_joins(
        self, joins: Mapping[SessionKey, LeaseGrant | None]
    ) -> dict[SessionKey, LeaseGrant]:
        """The joinable leases renewed to a whole TTL from now; the others (gone, or their
        renewal failed) are forgotten, for fresh grants."""
        lease_ids = sorted({lease.lease_id for lease in joins.values() if lease is not None})
        if not lease_ids:
            return {}
        try:
            ttls_s = await self._store.refresh_leases(lease_ids)
        except KaiwoGpuError:
            ttls_s = {}
        now = self._clock()
        renewed: dict[SessionKey, LeaseGrant] = {}
        for key, lease in joins.items():
            if lease is None:
                continue
            ttl_s = ttls_s.get(lease.lease_id, 0)
            if ttl_s <= 0:
                self.session_lease_lost(lease.lease_id)
                continue
            expires_at = now + timedelta(seconds=ttl_s)
            self._remember(lease.lease_id, expires_at)
            renewed[key] = replace(lease, expires_at=expires_at)
        self._instruments.lease_renewals.inc(len({lease.lease_id for lease in renewed.values()}))
        return renewed

    def _booked(
        self, key: SessionKey | None, grant: tuple[int, int] | BaseException, granted_at: datetime
    ) -> LeaseGrant | BaseException:
        if isinstance(grant, BaseException):
            return grant
        lease_id, ttl_s = grant
        expires_at = granted_at + timedelta(seconds=ttl_s)
        if key is None:
            return LeaseGrant(lease_id, expires_at)
        return self.sessions.granted(key, lease_id, expires_at)

    def session_lease_lost(self, lease_id: int) -> None:
        """A session's lease was found gone: the session's next allocation gets a new one."""
        self.sessions.lost(lease_id)
        self._renewed_until.pop(lease_id, None)

    def revoke_soon(self, lease_id: int) -> None:
        """Drops a lease that holds nothing of ours any more (its request did not commit) in
        the background; if that fails, it expires."""
        if lease_id:
            self._forget(lease_id)
            self._in_background(self._revoke_quietly(lease_id))

    async def revoke_now(self, lease_id: int) -> None:
        """Drops a released allocation's lease before the release is answered, so a renewal
        sent after the answer, through any coordinator, finds it gone."""
        if lease_id:
            self._forget(lease_id)
            await self._revoke_quietly(lease_id)

    def _forget(self, lease_id: int) -> None:
        self.sessions.lost(lease_id)
        self._renewed_until.pop(lease_id, None)
        self._revoked[lease_id] = None
        if len(self._revoked) > REVOKED_REMEMBERED:
            self._revoked.popitem(last=False)

    def _remember(self, lease_id: int, expires_at: datetime) -> None:
        """Books an expiry learnt after an await, unless the lease was revoked meanwhile."""
        if lease_id not in self._revoked:
            self._renewed_until[lease_id] = expires_at
            self._prune()

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._store.revoke_lease(lease_id)
        except KaiwoGpuError as error:  # it expires on its own
            log.info("lease not revoked", lease_id=lease_id, error=error.message)

    async def tombstone_lease(self) -> int:
        """A lease shared by released request_ids, replaced half-way through its TTL."""
        async with self._tombstone_lock:  # concurrent releases share one grant
            now = self._clock()
            if self._tombstone is not None:
                lease_id, granted_at = self._tombstone
                if now - granted_at < timedelta(seconds=TOMBSTONE_TTL_S / 2):
                    return lease_id
            lease_id, _ = await self._store.grant_lease(TOMBSTONE_TTL_S)
            self._tombstone = (lease_id, now)
            return lease_id

    def tombstone_lost(self) -> None:
        """The tombstone lease vanished (etcd restored from a backup?): grant a new one."""
        self._tombstone = None

    async def renew(self, lease_id: int) -> tuple[int, datetime | None]:
        """Renews the lease in etcd, and nothing else: (TTL in seconds, the new expiry), or
        (0, None) when the lease is gone."""
        ttl_s = await self._store.refresh_lease(lease_id)
        if ttl_s <= 0:
            self.session_lease_lost(lease_id)
            return 0, None
        self._instruments.lease_renewals.inc()
        expires_at = self._clock() + timedelta(seconds=ttl_s)
        self._remember(lease_id, expires_at)
        return ttl_s, expires_at

    def _prune(self) -> None:
        """Forgets renewals that have expired, whenever the book has doubled since."""
        if len(self._renewed_until) <= max(2 * self._pruned_at_size, 1024):
            return
        now = self._clock()
        for lease_id in [i for i, until in self._renewed_until.items() if until < now]:
            del self._renewed_until[lease_id]
        self._pruned_at_size = len(self._renewed_until)

    def known_expiry(self, record: types_pb2.Allocation) -> datetime | None:
        """The latest expiry this coordinator knows: its last renewal's, else the grant's."""
        if not record.lease_id:
            return None
        granted = moment_of(record.expires_at) if record.HasField("expires_at") else None
        renewed = self._renewed_until.get(record.lease_id)
        if granted is None or (renewed is not None and renewed > granted):
            return renewed
        return granted

    async def current_expiry(self, record: types_pb2.Allocation) -> datetime | None:
        """The expiry etcd has for the record's lease now (one etcd call; etcd counts whole
        seconds, so a renewal this coordinator made may know better), or what this
        coordinator knows when etcd cannot say (the lease is gone, etcd is unreachable or
        slower than EXPIRY_QUERY_TIMEOUT_S, or a read failed in the last
        EXPIRY_QUERY_PAUSE_S): a read waits on etcd briefly, never for a store timeout."""
        known = self.known_expiry(record)
        if not record.lease_id or self._queries_paused():
            return known
        try:
            ttl_s = await asyncio.wait_for(
                self._store.lease_ttl(record.lease_id), EXPIRY_QUERY_TIMEOUT_S
            )
        except (KaiwoGpuError, TimeoutError) as error:
            self._queries_paused_until = self._clock() + timedelta(seconds=EXPIRY_QUERY_PAUSE_S)
            reason = (
                error.message
                if isinstance(error, KaiwoGpuError)
                else f"etcd did not answer in {EXPIRY_QUERY_TIMEOUT_S} s"
            )
            log.info("lease TTL not read; showing the known expiry", error=reason)
            return known
        if ttl_s <= 0:
            return known
        from_etcd = self._clock() + timedelta(seconds=ttl_s)
        best = from_etcd if known is None else max(known, from_etcd)
        self._remember(record.lease_id, best)  # asked once per renewal elsewhere
        return best

    def _queries_paused(self) -> bool:
        paused_until = self._queries_paused_until
        return paused_until is not None and self._clock() < paused_until

    async def expiries(self, records: Sequence[types_pb2.Allocation]) -> list[datetime | None]:
        """The expiry to show for each record: what this coordinator knows, and for a lease
        whose known expiry has passed while its record lives on (it was renewed through
        another coordinator) what etcd says, asked for those alone and remembered, so the
        next List asks again only once that has passed too."""
        shown = [self.known_expiry(record) for record in records]
        now = self._clock()
        stale = [n for n, expiry in enumerate(shown) if expiry is not None and expiry <= now]
        if not stale:  # the usual case, an Allocate's own record: no semaphore, no gather
            return shown
        gate = asyncio.Semaphore(EXPIRY_QUERIES_IN_FLIGHT)

        async def asked(record: types_pb2.Allocation) -> datetime | None:
            async with gate:
                return await self.current_expiry(record)

        fresh = await asyncio.gather(*(asked(records[n]) for n in stale))
        for n, expiry in zip(stale, fresh, strict=True):
            shown[n] = expiry
        return shown
