"""Allocate, release and renew against etcd: decide on the view, commit with a guarded txn.

Allocate requests queue up while a transaction is in flight; the committer takes them as a
batch, decides each on a snapshot that already holds the earlier ones, and commits the
batch in one transaction. A conflict (another coordinator got there first) means: wait
for the view to see what changed, decide again, at most `max_attempts` times. Replies wait
until etcd has the change; reads through this coordinator wait until its view holds the
coordinator's own last write, so a client reads its own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from kaiwo_gpu.common.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    KaiwoGpuError,
    NotFoundError,
    UnavailableError,
)
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.coordinator.placement.engine import NoFit, place
from kaiwo_gpu.coordinator.placement.strategies import DEFAULT_STRATEGY, SchedulerState
from kaiwo_gpu.coordinator.state.changes import KeyValue, Put, Txn
from kaiwo_gpu.coordinator.state.commit_plan import CommitPlan
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.records import allocation_record, same_request, timestamp
from kaiwo_gpu.coordinator.state.store import EtcdStore
from kaiwo_gpu.coordinator.state.view import ClusterView
from kaiwo_gpu.coordinator.state.view_state import RELEASED_PREFIX
from kaiwo_gpu.v1 import types_pb2

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
TOMBSTONE_TTL_S = 3600
"""How long a released request_id stays taken (between half and all of this)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_allocation_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class AllocatorSettings:
    default_strategy: str = DEFAULT_STRATEGY
    default_ttl_s: int | None = None
    max_batch: int = 64
    max_attempts: int = 8
    catch_up_timeout_s: float = 5.0


@dataclass(slots=True, eq=False)
class _Pending:
    request: AllocationRequest
    future: asyncio.Future[tuple[types_pb2.Allocation, bool]]
    lease_id: int = 0
    lease_ttl_s: int = 0
    lease_granted_at: datetime | None = None
    attempts: int = 0
    queued: bool = True

    def resolve(self, record: types_pb2.Allocation, replayed: bool) -> None:
        if not self.future.done():  # the caller may have gone away meanwhile
            self.future.set_result((record, replayed))

    def reject(self, error: KaiwoGpuError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Allocator:
    def __init__(
        self,
        store: EtcdStore,
        view: ClusterView,
        layout: KeyLayout,
        settings: AllocatorSettings,
        *,
        clock: Clock = utc_now,
        new_id: Callable[[], str] = new_allocation_id,
    ) -> None:
        self.store = store
        self.view = view
        self.layout = layout
        self.settings = settings
        self._clock = clock
        self._new_id = new_id
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._scheduler_state = SchedulerState()
        self._last_write_revision = 0  # of any write of ours: reads wait for it
        self._last_placement_revision = 0  # of our placements: decisions wait for it
        self._last_release_revision = 0  # of our releases: refusals wait for it
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._tombstone_lease: tuple[int, datetime] | None = None
        self._tombstone_lock = asyncio.Lock()
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
        for task in tuple(self._background):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 1.0)

    # -- allocate ------------------------------------------------------------------------

    async def allocate(self, request: AllocationRequest) -> tuple[types_pb2.Allocation, bool]:
        """(allocation, replayed): a request_id seen before returns its allocation again."""
        replay = await self._confirmed_replay(request)
        if replay is not None:
            return replay, True
        future: asyncio.Future[tuple[types_pb2.Allocation, bool]] = (
            asyncio.get_running_loop().create_future()
        )
        self._enqueue(_Pending(request, future))
        return await future

    async def _confirmed_replay(self, request: AllocationRequest) -> types_pb2.Allocation | None:
        """The allocation `request` already made, checked against etcd, or None.

        The view may lag: our own release or renewal, or another coordinator's release, may
        not be in it yet. A hit is therefore confirmed by reading the request key; when
        etcd disagrees, the view catches up to that read and is asked again (a tombstone
        then raises ALREADY_EXISTS, an expiry gives None).
        """
        if self._replay(request) is None:
            return None
        await self.caught_up()  # our own last write (a release, a renewal) first
        replay = self._replay(request)
        if replay is None:
            return None
        revision, kv = await self.store.read(self.layout.request(request.request_id))
        if kv is not None and kv.value == replay.id.encode():
            return replay
        await self.view.wait_for(revision, self.settings.catch_up_timeout_s)
        return self._replay(request)

    def _enqueue(self, item: _Pending) -> None:
        item.queued = True
        self._queue.put_nowait(item)

    def _replay(self, request: AllocationRequest) -> types_pb2.Allocation | None:
        state = self.view.state
        released = state.released_requests.get(request.request_id)
        if released is not None:
            raise AlreadyExistsError(
                f"request_id {request.request_id!r} already made allocation {released}, which "
                "has been released; use a new request_id"
            )
        orphaned = state.orphaned_request(request.request_id)
        if orphaned is not None:
            raise FailedPreconditionError(
                f"request_id {request.request_id!r} is still bound to allocation {orphaned}, "
                f"whose record was removed from etcd by hand; use a new request_id or delete "
                f"{self.layout.request(request.request_id).decode()}"
            )
        allocation_id = state.allocation_by_request.get(request.request_id)
        record = state.allocations.get(allocation_id or "")
        if record is None:
            return None
        if not same_request(record.request, request):
            raise AlreadyExistsError(
                f"request_id {request.request_id!r} already made allocation {allocation_id} "
                "with a different request; use a new request_id"
            )
        return record

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
                self._revoke_lease_of(item)  # also for callers that have gone away
            item.reject(error)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        pending = [item for item in batch if not item.future.done()]
        while pending:
            # Decisions need our own placements in the view (else they double-book and
            # conflict); our own releases only free room, so only a refusal waits for them.
            timeout_s = self.settings.catch_up_timeout_s
            await self.view.wait_for(self._last_placement_revision, timeout_s)
            pending = await self._answer_replays(pending)
            scheduler_state = self._scheduler_state
            plan, planned, leftover, refused = self._decide(pending)
            if refused and self.view.state.revision < self._last_release_revision:
                await self.view.wait_for(self._last_release_revision, timeout_s)
                self._scheduler_state = scheduler_state  # the first decision never happened
                plan, planned, leftover, refused = self._decide(pending)
            for item, error in refused:
                self._revoke_lease_of(item)
                item.reject(error)
            for item in leftover:
                self._enqueue(item)
            if not plan.allocations:
                return
            owned = [item for item, _ in planned]
            try:
                await self._grant_leases(planned)
            except KaiwoGpuError as error:
                self._fail(owned, error)
                return
            try:
                result = await self.store.commit(plan.txn())
            except NotFoundError:  # a lease ran out between grant and commit
                self._fail(owned, UnavailableError("a lease expired before the commit; retry"))
                return
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
            if result.succeeded:
                self._last_write_revision = max(self._last_write_revision, result.revision)
                self._last_placement_revision = max(self._last_placement_revision, result.revision)
                for item, record in planned:
                    item.resolve(record, False)
                return
            pending = await self._after_conflict(owned, result.current)

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
        newest = max((kv.mod_revision for kv in current.values()), default=0)
        if newest <= self.view.state.revision:
            # The view already holds what etcd showed (a deleted key shows nothing): back
            # off instead of spinning on the same decision.
            await asyncio.sleep(min(0.002 * 2 ** max(i.attempts for i in owned), 0.2))
        self._last_placement_revision = max(self._last_placement_revision, newest)
        retry = []
        for item in owned:
            if item.future.done():
                self._revoke_lease_of(item)
                continue
            item.attempts += 1
            if item.attempts >= self.settings.max_attempts:
                self._revoke_lease_of(item)
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
        for item in pending:
            if item.future.done():
                self._revoke_lease_of(item)
                continue
            try:
                replay = await self._confirmed_replay(item.request)
            except KaiwoGpuError as error:
                self._revoke_lease_of(item)
                item.reject(error)
                continue
            if replay is not None:
                self._revoke_lease_of(item)
                item.resolve(replay, True)
            elif item.request.request_id in seen:
                self._enqueue(item)  # decided after its twin is committed
            else:
                seen.add(item.request.request_id)
                fresh.append(item)
        return fresh

    async def _grant_leases(self, planned: list[tuple[_Pending, types_pb2.Allocation]]) -> None:
        """Grants the leases of placed requests (all at once) and writes them into the records.

        Leases come after the decision so a refused request costs no lease; a request that
        is decided again after a conflict keeps the lease it already has.
        """
        wanted = [item for item, _ in planned if not item.lease_id and self._ttl_s(item.request)]
        granted_at = self._clock()
        grants = await asyncio.gather(
            *(self.store.grant_lease(self._ttl_s(item.request) or 0) for item in wanted),
            return_exceptions=True,
        )
        failure: BaseException | None = None
        for item, grant in zip(wanted, grants, strict=True):
            if isinstance(grant, BaseException):
                failure = failure or grant
            else:
                item.lease_id, item.lease_ttl_s = grant
                item.lease_granted_at = granted_at
        if failure is not None:
            raise failure  # the batch fails; leases granted so far are revoked with it
        for item, record in planned:
            if item.lease_id and item.lease_granted_at is not None:
                record.lease_id = item.lease_id
                expires_at = item.lease_granted_at + timedelta(seconds=item.lease_ttl_s)
                record.expires_at.CopyFrom(timestamp(expires_at))

    def _ttl_s(self, request: AllocationRequest) -> int | None:
        return request.ttl_seconds or self.settings.default_ttl_s

    def _decide(
        self, pending: list[_Pending]
    ) -> tuple[
        CommitPlan,
        list[tuple[_Pending, types_pb2.Allocation]],
        list[_Pending],
        list[tuple[_Pending, KaiwoGpuError]],
    ]:
        """Places each request on a snapshot holding the ones before it.

        Returns the plan, what it places, what did not fit in one transaction, and what
        was refused (with the error to answer).
        """
        state = self.view.state
        plan = CommitPlan(self.layout, state)
        planned: list[tuple[_Pending, types_pb2.Allocation]] = []
        leftover: list[_Pending] = []
        refused: list[tuple[_Pending, KaiwoGpuError]] = []
        blocked = state.blocked_reason
        if blocked is not None:
            for item in pending:
                self._revoke_lease_of(item)
                item.reject(UnavailableError(blocked))
            return plan, planned, leftover, refused
        snapshot = state.snapshot()
        scheduler_state = self._scheduler_state
        now = self._clock()
        for item in pending:
            if item.future.done():  # the caller went away
                self._revoke_lease_of(item)
                continue
            if leftover:
                leftover.append(item)  # keep arrival order once the transaction is full
                continue
            try:
                decision = place(
                    item.request,
                    snapshot,
                    scheduler_state,
                    default_strategy=self.settings.default_strategy,
                )
            except KaiwoGpuError as error:
                self._revoke_lease_of(item)
                item.reject(error)
                continue
            if isinstance(decision, NoFit):
                refused.append((item, decision.to_error()))
                continue
            allocation_id = self._new_id()
            record = allocation_record(
                item.request, decision, allocation_id, lease_id=0, created_at=now, expires_at=None
            )
            if not plan.add(record):
                leftover.append(item)
                continue
            planned.append((item, record))
            snapshot = snapshot.with_allocation(decision.as_allocation(allocation_id))
            scheduler_state = decision.state
        self._scheduler_state = scheduler_state
        return plan, planned, leftover, refused

    # -- leases --------------------------------------------------------------------------

    def _revoke_lease_of(self, item: _Pending) -> None:
        """A lease granted for a request that did not commit is dropped, not left to expire."""
        if item.lease_id:
            lease_id, item.lease_id = item.lease_id, 0
            self._in_background(self._revoke_quietly(lease_id))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self.store.revoke_lease(lease_id)
        except KaiwoGpuError as error:  # it expires on its own
            log.info("lease not revoked", lease_id=lease_id, error=error.message)

    async def _tombstone_lease_id(self) -> int:
        """A shared lease for released request_ids, renewed by replacing it half-way."""
        async with self._tombstone_lock:  # concurrent releases share one grant
            now = self._clock()
            if self._tombstone_lease is not None:
                lease_id, granted_at = self._tombstone_lease
                if now - granted_at < timedelta(seconds=TOMBSTONE_TTL_S / 2):
                    return lease_id
            lease_id, _ = await self.store.grant_lease(TOMBSTONE_TTL_S)
            self._tombstone_lease = (lease_id, now)
            return lease_id

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

    async def release(self, allocation_id: str) -> types_pb2.Allocation:
        """Deletes the allocation and keeps its request_id taken for a while (a tombstone).

        A late duplicate of the Allocate that made it then gets ALREADY_EXISTS instead of
        silently making a second allocation nobody will release.
        """
        record, _ = await self.record(allocation_id)
        key = self.layout.allocation(allocation_id)
        request_key = self.layout.request(record.request_id)
        tombstone = RELEASED_PREFIX + allocation_id.encode()
        for attempt in range(2):
            lease_id = await self._tombstone_lease_id()
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
                self._tombstone_lease = None
                if attempt:
                    raise
        if not result.succeeded:
            raise NotFoundError(f"allocation {allocation_id!r} was already released or expired")
        self._last_write_revision = max(self._last_write_revision, result.revision)
        self._last_release_revision = max(self._last_release_revision, result.revision)
        if record.lease_id:
            self._in_background(self._revoke_quietly(record.lease_id))
        released = types_pb2.Allocation()
        released.CopyFrom(record)
        released.state = types_pb2.ALLOCATION_STATE_RELEASED
        return released

    async def keep_alive(self, allocation_id: str) -> tuple[datetime, int]:
        """Renews the allocation's lease; (new expiry, TTL in seconds)."""
        await self.caught_up()
        record, revision = await self.record(allocation_id)
        if not record.lease_id:
            raise FailedPreconditionError(
                f"allocation {allocation_id!r} has no lease (it was made with ttl_seconds 0); "
                "there is nothing to keep alive"
            )
        ttl_s = await self.store.refresh_lease(record.lease_id)
        if ttl_s <= 0:
            raise NotFoundError(f"allocation {allocation_id!r} expired before it was renewed")
        expires_at = self._clock() + timedelta(seconds=ttl_s)
        renewed = types_pb2.Allocation()
        renewed.CopyFrom(record)
        renewed.expires_at.CopyFrom(timestamp(expires_at))
        key = self.layout.allocation(allocation_id)
        try:  # best effort: the lease is renewed whether or not the record says so
            result = await self.store.commit(
                Txn(
                    expect_mod_revision=((key, revision),),
                    puts=(Put(key, renewed.SerializeToString(), record.lease_id),),
                )
            )
        except KaiwoGpuError as error:
            log.info("expiry not recorded", allocation_id=allocation_id, error=error.message)
            return expires_at, ttl_s
        if result.succeeded:
            self._last_write_revision = max(self._last_write_revision, result.revision)
        elif await self.store.get(key) is None:
            raise NotFoundError(f"allocation {allocation_id!r} was released while being renewed")
        return expires_at, ttl_s
