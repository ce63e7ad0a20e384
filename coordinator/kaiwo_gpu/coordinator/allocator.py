"""Allocate, release and renew against etcd: decide on the view, commit with a guarded txn.

Allocate requests queue up while a transaction is in flight; the committer takes them as a
batch, has `decide_batch` (pure) place them on one snapshot, grants the leases the
placements need and commits the plan in one transaction. A conflict (another coordinator
got there first) means: wait for the view to see what changed, decide again, at most
`max_attempts` times. Replies wait until etcd has the change; reads through this
coordinator wait until its view holds the coordinator's own last write, so a client reads
its own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from kaiwo_gpu.common import tracing
from kaiwo_gpu.common.errors import (
    ConflictError,
    FailedPreconditionError,
    KaiwoGpuError,
    NotFoundError,
    UnavailableError,
)
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.coordinator.instruments import Instruments
from kaiwo_gpu.coordinator.leases import Clock, Leases, utc_now
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.placement.strategies import (
    BUILTIN_STRATEGIES,
    DEFAULT_STRATEGY,
    SchedulerState,
    Strategy,
)
from kaiwo_gpu.coordinator.session_leases import LeaseGrant, SessionKey
from kaiwo_gpu.coordinator.state.batch import BatchDecision, BatchItem, DecisionPolicy, decide_batch
from kaiwo_gpu.coordinator.state.changes import KeyValue, Put, Store, Txn
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.records import timestamp
from kaiwo_gpu.coordinator.state.replays import replay_of
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.coordinator.state.view_state import (
    bound_allocation,
    inherited_owners,
    owner_tag,
    tombstone_value,
)
from kaiwo_gpu.v1 import types_pb2

log = structlog.get_logger(__name__)


RecordCheck = Callable[[types_pb2.Allocation], None]
"""Sees a record before a change to it, and raises to refuse the change."""


def _allowed(record: types_pb2.Allocation) -> None:
    return None


def new_allocation_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class AllocatorSettings:
    default_strategy: str = DEFAULT_STRATEGY
    default_ttl_s: int | None = None
    strategies: Mapping[str, Strategy] = field(default_factory=lambda: BUILTIN_STRATEGIES)
    max_batch: int = 64
    max_attempts: int = 8
    catch_up_timeout_s: float = 5.0

    @property
    def policy(self) -> DecisionPolicy:
        return DecisionPolicy(self.strategies, self.default_strategy, self.default_ttl_s)


@dataclass(slots=True, eq=False)
class _Pending:
    request: AllocationRequest
    future: asyncio.Future[tuple[types_pb2.Allocation, bool]]
    holder: str = ""
    """The authenticated caller: a session's lease is shared by one holder's allocations."""
    session: str = ""
    lease: LeaseGrant | None = None
    attempts: int = 0
    queued: bool = True
    trace_context: object | None = None
    """The caller's trace context (tracing on): the decision and the commit join its trace."""

    def session_key(self, ttl_s: int) -> SessionKey | None:
        if not self.session:
            return None
        return SessionKey(self.holder, self.session, ttl_s, self.request.owner)

    def resolve(self, record: types_pb2.Allocation, replayed: bool) -> None:
        if not self.future.done():  # the caller may have gone away meanwhile
            self.future.set_result((record, replayed))

    def reject(self, error: KaiwoGpuError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def _traced(
    items: list[_Pending], name: str, kind: str = "internal"
) -> contextlib.AbstractContextManager[Any]:
    """A span for work done for `items` in the commit loop's task: a child of the first
    caller's server span, linking the others (nothing when tracing is off)."""
    contexts = [item.trace_context for item in items if item.trace_context is not None]
    if not contexts:
        return contextlib.nullcontext()
    return tracing.span(name, kind=kind, parent=contexts[0], links=contexts[1:])


def _txn_attributes(txn: Txn, owned: list[_Pending]) -> dict[str, object]:
    return {
        "db.system": "etcd",
        "db.operation": "txn",
        "db.etcd.compares": len(txn.expect_mod_revision),
        "db.etcd.puts": len(txn.puts),
        "kaiwo_gpu.conflicts_retried": max(item.attempts for item in owned),
    }


class Allocator:
    def __init__(
        self,
        store: Store,
        view: ClusterView,
        layout: KeyLayout,
        settings: AllocatorSettings,
        *,
        clock: Clock = utc_now,
        new_id: Callable[[], str] = new_allocation_id,
        instruments: Instruments | None = None,
    ) -> None:
        self.instruments = instruments or Instruments()
        self.store = store
        self.view = view
        self.layout = layout
        self.settings = settings
        self.leases = Leases(store, clock, self.instruments)
        self._policy = settings.policy
        self._clock = clock
        self._new_id = new_id
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._scheduler_state = SchedulerState()
        self._last_write_revision = 0  # of any write of ours: reads wait for it
        self._last_placement_revision = 0  # of our placements: decisions wait for it
        self._last_release_revision = 0  # of our releases: refusals wait for it
        self._task: asyncio.Task[None] | None = None
        self.conflicts = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._commit_loop(), name="allocator-commit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            self._queue.get_nowait().reject(UnavailableError("the coordinator is shutting down"))
        await self.leases.stop()

    # -- allocate ------------------------------------------------------------------------

    async def allocate(
        self, request: AllocationRequest, *, holder: str = "", session: str = ""
    ) -> tuple[types_pb2.Allocation, bool]:
        """(allocation, replayed): a request_id seen before returns its allocation again.

        With a `session`, the allocation shares one lease with `holder`'s other allocations
        of that session and TTL (the session is not part of the request a replay matches)."""
        replay = await self._confirmed_replay(request)
        if replay is not None:
            return replay, True
        future: asyncio.Future[tuple[types_pb2.Allocation, bool]] = (
            asyncio.get_running_loop().create_future()
        )
        context = tracing.current_context()
        self._enqueue(_Pending(request, future, holder, session, trace_context=context))
        return await future

    async def _confirmed_replay(self, request: AllocationRequest) -> types_pb2.Allocation | None:
        """The allocation `request` already made, checked against etcd, or None.

        The view may lag: our own release or renewal, or another coordinator's release, may
        not be in it yet. A hit is therefore confirmed by reading the request key; when
        etcd disagrees, the view catches up to that read and is asked again (a tombstone
        then raises ALREADY_EXISTS, an expiry gives None).
        """
        if replay_of(self.view.state, request) is None:
            return None
        await self.caught_up()  # our own last write (a release, a renewal) first
        replay = replay_of(self.view.state, request)
        if replay is None:
            return None
        revision, kv = await self.store.read(self.layout.request(request.request_id))
        if kv is not None and bound_allocation(kv.value) == replay.id:
            return replay
        await self.view.wait_for(revision, self.settings.catch_up_timeout_s)
        return replay_of(self.view.state, request)

    def _enqueue(self, item: _Pending) -> None:
        item.queued = True
        self._queue.put_nowait(item)

    async def _commit_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.settings.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for item in batch:
                item.queued = False
            try:
                await self._commit_batch(batch)
            except KaiwoGpuError as error:
                self._fail(batch, error)
            except Exception:  # never let one bad batch stop the committer
                log.exception("allocation batch failed", size=len(batch))
                self._fail(batch, UnavailableError("allocation failed inside the coordinator"))

    def _fail(self, items: list[_Pending], error: KaiwoGpuError, *, revoke: bool = True) -> None:
        """Rejects the items this batch still owns (not those handed back to the queue)."""
        for item in items:
            if item.queued:
                continue
            if revoke:
                self._drop_lease(item)  # also for callers that have gone away
            item.reject(error)

    def _refusal(self, refused: tuple[int, KaiwoGpuError]) -> tuple[int, KaiwoGpuError]:
        """No room, as the view says; but a view cut off from etcd may be stale (releases
        it has not seen), so then the honest answer is UNAVAILABLE, not "no capacity"."""
        index, error = refused
        if self.view.connected:
            return refused
        return index, UnavailableError(
            "etcd is unreachable, so this coordinator's view of the cluster may be stale; "
            f"nothing was placed (the last view had no room: {error.message}); retry"
        )

    def _drop_lease(self, item: _Pending) -> None:
        """A lease granted for a request that did not commit is dropped, not left to expire;
        a session's lease stays (other allocations may hold it), and lapses unless renewed."""
        lease, item.lease = item.lease, None
        if lease is not None and not lease.shared:
            self.leases.revoke_soon(lease.lease_id)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        pending = self._still_wanted(batch)
        while pending:
            # Decisions need our own placements in the view (else they double-book and
            # conflict); our own releases only free room, so only a refusal waits for them.
            timeout_s = self.settings.catch_up_timeout_s
            await self.view.wait_for(self._last_placement_revision, timeout_s)
            pending = await self._answer_replays(pending)
            if not pending:
                return
            decision = self._decide(pending)
            if decision.refused and self.view.state.revision < self._last_release_revision:
                await self.view.wait_for(self._last_release_revision, timeout_s)
                pending = self._still_wanted(pending)
                if not pending:
                    return
                decision = self._decide(pending)  # the first decision never happened
            self._scheduler_state = decision.scheduler_state
            for index, error in (*decision.failed, *map(self._refusal, decision.refused)):
                self._drop_lease(pending[index])
                pending[index].reject(error)
            for index in decision.leftover:
                self._enqueue(pending[index])
            if not decision.placed:
                return
            owned = [pending[index] for index, _ in decision.placed]
            try:
                await self._grant_leases(decision, pending)
            except KaiwoGpuError as error:
                self._fail(owned, error)
                return
            started = time.perf_counter()
            txn = decision.plan.txn()
            try:
                with _traced(owned, "etcd txn", kind="client") as span:
                    if span is not None:  # tracing off: not even the attributes are built
                        tracing.set_attributes(span, _txn_attributes(txn, owned))
                    result = await self.store.commit(txn)
                    tracing.set_attributes(span, {"db.etcd.succeeded": result.succeeded})
            except NotFoundError:  # a lease ran out between grant and commit
                if not self._session_leases_lost(owned):
                    self._fail(owned, UnavailableError("a lease expired before the commit; retry"))
                    return
                pending = self._still_wanted(owned)  # decided again, with fresh session leases
                continue
            except UnavailableError as error:
                # The commit may have landed: keep its leases, and let the retry replay it.
                self._fail(
                    owned,
                    UnavailableError(
                        f"{error.message}; the outcome is unknown, retry with the same request_id"
                    ),
                    revoke=False,
                )
                return
            self.instruments.commit_seconds.observe(time.perf_counter() - started)
            if result.succeeded:
                self.instruments.commit_allocations.observe(len(decision.placed))
                self._last_write_revision = max(self._last_write_revision, result.revision)
                self._last_placement_revision = max(self._last_placement_revision, result.revision)
                for index, record in decision.placed:
                    pending[index].resolve(record, False)
                return
            pending = await self._after_conflict(owned, result.current)

    def _session_leases_lost(self, owned: list[_Pending]) -> bool:
        """After a commit refused for a missing lease: whether a session lease granted before
        this batch (which may have expired or been revoked since) was among its leases; if
        so those are given up, for fresh grants, so a cached lease's death never fails an
        Allocate. Only once per batch: then no lease of the commit predates it."""
        lost = {i.lease.lease_id for i in owned if i.lease is not None and i.lease.joined}
        for lease_id in lost:
            self.leases.session_lease_lost(lease_id)
        for item in owned:
            if item.lease is not None and item.lease.lease_id in lost:
                item.lease = None
        return bool(lost)

    def _still_wanted(self, items: list[_Pending]) -> list[_Pending]:
        """Items whose caller still waits; the others' leases are dropped."""
        wanted = []
        for item in items:
            if item.future.done():
                self._drop_lease(item)
            else:
                wanted.append(item)
        return wanted

    def _decide(self, pending: list[_Pending]) -> BatchDecision:
        items = [
            BatchItem(item.request, self._new_id(), has_lease=item.lease is not None)
            for item in pending
        ]
        with (
            _traced(pending, "kaiwo_gpu.decide") as span,
            self.instruments.decision_seconds.time(),
        ):
            snapshot = self.view.decision_snapshot()
            decision = decide_batch(
                items,
                snapshot,
                self.view.state,
                scheduler_state=self._scheduler_state,
                policy=self._policy,
                now=self._clock(),
            )
            if span is not None:
                tracing.set_attributes(span, self._decision_attributes(pending, snapshot, decision))
            return decision

    def _decision_attributes(
        self, pending: list[_Pending], snapshot: ClusterSnapshot, decision: BatchDecision
    ) -> dict[str, object]:
        strategies = {item.request.strategy or self.settings.default_strategy for item in pending}
        reasons = sorted({name for _, error in decision.refused for name, _ in error.reasons})
        return {
            "kaiwo_gpu.batch_size": len(pending),
            "kaiwo_gpu.strategy": ",".join(sorted(strategies)),
            "kaiwo_gpu.gpus_considered": len(snapshot.gpus),
            "kaiwo_gpu.placed": len(decision.placed),
            "kaiwo_gpu.refused": len(decision.refused),
            "kaiwo_gpu.failed": len(decision.failed),
            "kaiwo_gpu.nofit_reasons": ",".join(reasons),
        }

    async def caught_up(self) -> None:
        """Waits until the view holds this coordinator's own last write, so reads see it.

        Writes reply as soon as etcd has them; reads (and the next decision) wait here
        instead, which costs nothing when the watch has already delivered. A slow view
        delays a read, never fails it.
        """
        try:
            await self.view.wait_for(self._last_write_revision, self.settings.catch_up_timeout_s)
        except UnavailableError as error:
            log.warning("view behind this coordinator's writes", error=error.message)

    async def _after_conflict(
        self, owned: list[_Pending], current: Mapping[bytes, KeyValue]
    ) -> list[_Pending]:
        """Gives up on items out of attempts; the rest are decided again on a fresher view."""
        self.conflicts += 1
        self.instruments.commit_conflicts.inc()
        newest = max((kv.mod_revision for kv in current.values()), default=0)
        if newest <= self.view.state.revision:
            # The view already holds what etcd showed (a deleted key shows nothing): back
            # off instead of spinning on the same decision.
            await asyncio.sleep(min(0.002 * 2 ** max(i.attempts for i in owned), 0.2))
        self._last_placement_revision = max(self._last_placement_revision, newest)
        retry = []
        for item in self._still_wanted(owned):
            item.attempts += 1
            if item.attempts >= self.settings.max_attempts:
                self._drop_lease(item)
                item.reject(
                    ConflictError(
                        f"gave up after {item.attempts} conflicting commits with other "
                        "coordinators; retry with the same request_id"
                    )
                )
            else:
                retry.append(item)
        return retry

    async def _answer_replays(self, pending: list[_Pending]) -> list[_Pending]:
        """Answers requests whose request_id is already committed (or repeated in the batch)."""
        fresh: list[_Pending] = []
        seen: set[str] = set()
        for item in self._still_wanted(pending):
            try:
                replay = await self._confirmed_replay(item.request)
            except KaiwoGpuError as error:
                self._drop_lease(item)
                item.reject(error)
                continue
            if replay is not None:
                self._drop_lease(item)
                item.resolve(replay, True)
            elif item.request.request_id in seen:
                self._enqueue(item)  # decided after its twin is committed
            else:
                seen.add(item.request.request_id)
                fresh.append(item)
        return fresh

    async def _grant_leases(self, decision: BatchDecision, pending: list[_Pending]) -> None:
        """Grants the leases the placements want (all at once; a session's lease is joined
        while it lasts) and writes them into the records; a request decided again after a
        conflict keeps the lease it has."""
        wanted = [(pending[index], ttl_s) for index, ttl_s in decision.leases_wanted]
        grants: list[LeaseGrant | BaseException] = []
        if wanted:  # none wanted (no TTL): no span, no gather
            with _traced([item for item, _ in wanted], "etcd lease grant", kind="client") as span:
                if span is not None:
                    attributes = {"db.system": "etcd", "kaiwo_gpu.leases": len(wanted)}
                    tracing.set_attributes(span, attributes)
                grants = await self.leases.grant_for(
                    [(ttl_s, item.session_key(ttl_s)) for item, ttl_s in wanted]
                )
        failure: BaseException | None = None
        for (item, _), grant in zip(wanted, grants, strict=True):
            if isinstance(grant, BaseException):
                failure = failure or grant
            else:
                item.lease = grant
        if failure is not None:
            raise failure  # the batch fails; leases granted so far are revoked with it
        for index, record in decision.placed:
            lease = pending[index].lease
            if lease is not None:
                record.lease_id = lease.lease_id
                record.expires_at.CopyFrom(timestamp(lease.expires_at))
                record.lease_shared = lease.shared

    # -- release, renew, read ------------------------------------------------------------

    async def record(self, allocation_id: str) -> tuple[types_pb2.Allocation, int]:
        """(record, its mod revision) from the view, or from etcd when the view lacks it."""
        state = self.view.state
        record = state.allocations.get(allocation_id)
        if record is not None:
            return record, state.allocation_revisions[allocation_id]
        kv = await self.store.get(self.layout.allocation(allocation_id))
        if kv is None:
            raise NotFoundError(
                f"allocation {allocation_id!r} does not exist (released or expired)"
            )
        record = types_pb2.Allocation()
        try:
            record.ParseFromString(kv.value)
        except Exception:
            raise UnavailableError(f"allocation {allocation_id!r} is unreadable in etcd") from None
        return record, kv.mod_revision

    async def release(
        self, allocation_id: str, check: RecordCheck = _allowed
    ) -> types_pb2.Allocation:
        """Deletes the allocation and keeps its request_id taken for a while (a tombstone).

        A late duplicate of the Allocate that made it then gets ALREADY_EXISTS instead of
        silently making a second allocation nobody will release. `check` sees the record
        first and raises to refuse (its owner never changes, so what it saw is what goes).
        """
        record, _ = await self.record(allocation_id)
        check(record)
        key = self.layout.allocation(allocation_id)
        request_key = self.layout.request(record.request_id)
        # Its owner, and the owners of the tombstone it replaced, if it took a released id
        # (a binding does not change while its allocation lives; when this view has not
        # seen it yet, etcd says).
        state = self.view.state
        if state.request_keys.get(record.request_id) == allocation_id:
            inherited = state.inherited_tags.get(record.request_id, frozenset())
        else:
            _, binding = await self.store.read(request_key)
            inherited = inherited_owners(binding.value) if binding is not None else frozenset()
        tombstone = tombstone_value(inherited | {owner_tag(record.request.owner)})
        for attempt in range(2):
            lease_id = await self.leases.tombstone_lease()
            try:
                result = await self.store.commit(
                    Txn(
                        expect_present=(key,),
                        puts=(Put(request_key, tombstone, lease_id),),
                        deletes=(key,),
                    )
                )
                break
            except NotFoundError:  # the tombstone lease vanished (etcd restored?): a new one
                self.leases.tombstone_lost()
                if attempt:
                    raise
        if not result.succeeded:
            raise NotFoundError(f"allocation {allocation_id!r} was already released or expired")
        self._last_write_revision = max(self._last_write_revision, result.revision)
        self._last_release_revision = max(self._last_release_revision, result.revision)
        if not record.lease_shared:  # a session's lease may hold others: it lapses unless renewed
            await self.leases.revoke_now(record.lease_id)
        released = types_pb2.Allocation()
        released.CopyFrom(record)
        released.state = types_pb2.ALLOCATION_STATE_RELEASED
        return released

    async def keep_alive(
        self, allocation_id: str, check: RecordCheck = _allowed
    ) -> tuple[datetime, int]:
        """Renews the allocation's lease, and only the lease; (new expiry, TTL in seconds),
        if `check` passes the record."""
        await self.caught_up()
        record, _ = await self.record(allocation_id)
        check(record)
        if not record.lease_id:
            raise FailedPreconditionError(
                f"allocation {allocation_id!r} has no lease (it was made with ttl_seconds 0); "
                "there is nothing to keep alive"
            )
        gone = NotFoundError(
            f"allocation {allocation_id!r} is gone (released or expired); nothing to renew"
        )
        # A session's lease outlives a release (through another coordinator, perhaps, whose
        # release this view has not seen yet) for the session's others: etcd says.
        if (
            record.lease_shared
            and await self.store.get(self.layout.allocation(allocation_id)) is None
        ):
            raise gone
        ttl_s, expires_at = await self.leases.renew(record.lease_id)
        if expires_at is None:
            raise gone
        return expires_at, ttl_s
