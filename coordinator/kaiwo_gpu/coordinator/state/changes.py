"""Changes to etcd as plain data, and the Store protocol that applies them.

Keeping them here, apart from the store, lets the pure modules (view state, commit plans)
speak about keys and transactions without importing an etcd client, and lets the allocator,
the view and the servicers depend on the protocol: tests hand them the real EtcdStore, or a
wrapper around it that injects a fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """One key's change from the watch; `value` None means the key was deleted."""

    key: bytes
    value: bytes | None
    revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Txn:
    """An all-or-nothing change.

    `expect_mod_revision` pairs a key with the revision it must still have (0: absent);
    `expect_present` keys must exist. On failure nothing is written and the current values
    of `read_on_failure` come back, so the caller learns what changed under it.
    """

    expect_mod_revision: tuple[tuple[bytes, int], ...] = ()
    expect_present: tuple[bytes, ...] = ()
    puts: tuple[Put, ...] = ()
    deletes: tuple[bytes, ...] = ()
    read_on_failure: tuple[bytes, ...] = ()

    @property
    def size(self) -> int:
        """The larger of compares and operations; etcd caps both (--max-txn-ops, 128)."""
        return max(
            len(self.expect_mod_revision) + len(self.expect_present),
            len(self.puts) + len(self.deletes),
            len(self.read_on_failure),
        )


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    current: Mapping[bytes, KeyValue] = field(default_factory=dict)


class Store(Protocol):
    """What the coordinator asks of etcd; every failure is a KaiwoGpuError (UnavailableError
    when etcd cannot be reached, NotFoundError for a lease that is gone)."""

    target: str
    """Where etcd is, for messages and logs."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def read_prefix(
        self, prefix: bytes, page_size: int = 5000
    ) -> tuple[int, list[KeyValue]]: ...

    async def get(self, key: bytes) -> KeyValue | None: ...

    async def read(self, key: bytes) -> tuple[int, KeyValue | None]: ...

    async def revision(self) -> int: ...

    async def commit(self, txn: Txn) -> TxnResult: ...

    async def grant_lease(self, ttl_s: int) -> tuple[int, int]: ...

    async def refresh_lease(self, lease_id: int) -> int: ...

    async def refresh_leases(self, lease_ids: Sequence[int]) -> dict[int, int]: ...

    async def lease_ttl(self, lease_id: int) -> int: ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    def watch(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[Change]]]: ...
