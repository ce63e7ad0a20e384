"""Changes to etcd as plain data: what the allocator builds and the store applies.

Keeping them here, apart from the store, lets the pure modules (view state, commit plans)
speak about keys and transactions without importing an etcd client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


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
