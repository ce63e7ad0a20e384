"""Which etcd lease a client session's next allocation joins (pure: the time comes in).

Allocations of one (caller identity, session, TTL) share one lease, so a client that vanishes
costs etcd one lease expiry, not one per allocation: etcd revokes at most ~1,000 expired
leases a second, which is 100 s for 100,000 allocations on leases of their own. The caller
identity is the authenticated one, so nobody can join or extend another tenant's lease.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

SESSIONS_REMEMBERED = 65_536
"""Sessions whose lease a coordinator keeps for the next allocation; a forgotten one costs
that session a second lease, nothing else."""


@dataclass(frozen=True, slots=True)
class SessionKey:
    holder: str
    """The authenticated caller, as `Identity` prints it."""
    session: str
    ttl_s: int
    owner: str = ""
    """Whom the allocation is for: an admin allocating for alice and for bob in one session
    gets two leases, or bob's renewals would keep alice's allocation alive."""


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """The lease an allocation commits with, and what the allocator must know of it."""

    lease_id: int
    expires_at: datetime
    """As this coordinator knows it: the grant's TTL, or a later renewal's."""
    shared: bool = False
    """A session's lease: never revoked on behalf of one allocation."""
    joined: bool = False
    """Granted before this batch: it may have expired or been revoked since."""


def joinable(lease: LeaseGrant, ttl_s: int, now: datetime) -> bool:
    """Whether a new allocation may join `lease`: at least half its TTL left as far as this
    coordinator knows (the allocator then renews it before the commit, so the joiner gets
    its whole TTL, as its client counts it)."""
    return lease.expires_at - now >= timedelta(seconds=ttl_s / 2)


class SessionLeases:
    """The lease of each session this coordinator granted one for, newest use last."""

    def __init__(self, limit: int = SESSIONS_REMEMBERED) -> None:
        self._limit = limit
        self._by_key: OrderedDict[SessionKey, LeaseGrant] = OrderedDict()
        self._key_by_lease: dict[int, SessionKey] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def join(
        self, key: SessionKey, now: datetime, renewed_until: Mapping[int, datetime]
    ) -> LeaseGrant | None:
        """The session's lease for one more allocation, or None: grant a fresh one.
        `renewed_until` holds the latest renewal this coordinator made of each lease."""
        lease = self._by_key.get(key)
        if lease is None:
            return None
        renewed = renewed_until.get(lease.lease_id)
        if renewed is not None and renewed > lease.expires_at:
            lease = replace(lease, expires_at=renewed)
        if not joinable(lease, key.ttl_s, now):
            self.lost(lease.lease_id)
            return None
        self._by_key[key] = lease
        self._by_key.move_to_end(key)
        return replace(lease, joined=True)

    def granted(self, key: SessionKey, lease_id: int, expires_at: datetime) -> LeaseGrant:
        """Books a fresh lease as the session's, in place of the one it had."""
        old = self._by_key.pop(key, None)
        if old is not None:
            self._key_by_lease.pop(old.lease_id, None)
        lease = LeaseGrant(lease_id, expires_at, shared=True)
        self._by_key[key] = lease
        self._key_by_lease[lease_id] = key
        if len(self._by_key) > self._limit:
            _, oldest = self._by_key.popitem(last=False)
            self._key_by_lease.pop(oldest.lease_id, None)
        return lease

    def lost(self, lease_id: int) -> None:
        """The lease is gone (expired, revoked) or too short to join: its session's next
        allocation gets a fresh one."""
        key = self._key_by_lease.pop(lease_id, None)
        if key is not None:
            self._by_key.pop(key, None)
