"""Allocate, release and renew against etcd: decide on the view, commit with a guarded txn.

Allocate requests queue up while a transaction is in flight; the committer takes them as a
batch, decides each on a snapshot that already holds the earlier ones, and commits the
batch in one transaction. A conflict (another coordinator got there first) means: wait
for the view to see what changed, decide again, at most `max_attempts` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from kaiwo_gpu.common.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    KaiwoGpuError,
    NotFoundError,
    UnavailableError,
)
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.coordinator.changes import Put, Txn
from kaiwo_gpu.coordinator.commit_plan import CommitPlan
from kaiwo_gpu.coordinator.engine import NoFit, place
from kaiwo_gpu.coordinator.keys import KeyLayout
from kaiwo_gpu.coordinator.records import allocation_record, same_request, timestamp
from kaiwo_gpu.coordinator.store import EtcdStore
from kaiwo_gpu.coordinator.strategies import DEFAULT_STRATEGY, SchedulerState
from kaiwo_gpu.coordinator.view import ClusterView
from kaiwo_gpu.v1 import types_pb2

Clock = Callable[[], datetime]


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
    attempts: int = field(default=0)

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
        self._last_commit_revision = 0
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

    async def allocate(self, request: AllocationRequest) -> tuple[types_pb2.Allocation, bool]:
        """(allocation, replayed): a request_id seen before returns its allocation again."""
        replay = self._replay(request)
        if replay is not None:
            return replay, True
        future: asyncio.Future[tuple[types_pb2.Allocation, bool]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.put_nowait(_Pending(request, future))
        return await future

    def _replay(self, request: AllocationRequest) -> types_pb2.Allocation | None:
        state = self.view.state
        allocation_id = state.allocation_by_request.get(request.request_id)
        if allocation_id is None:
            return None
        record = state.allocations[allocation_id]
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
            try:
                await self._commit_batch(batch)
            except KaiwoGpuError as error:
                self._fail(batch, error)
            except Exception as error:  # never let one bad batch stop the committer
                self._fail(batch, UnavailableError(f"allocation failed: {error!r}"))

    def _fail(self, batch: list[_Pending], error: KaiwoGpuError) -> None:
        for pending in batch:
            pending.reject(error)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        pending = [p for p in batch if not p.future.done()]
        while pending:
            await self.view.wait_for(self._last_commit_revision, self.settings.catch_up_timeout_s)
            pending = self._answer_replays(pending)
            plan, planned, leftover = self._decide(pending)
            if not plan.allocations:
                return
            for item in leftover:
                self._queue.put_nowait(item)
            try:
                await self._grant_leases(planned)
                result = await self.store.commit(plan.txn())
            except UnavailableError as error:
                self._fail(
                    [item for item, _ in planned],
                    UnavailableError(
                        f"{error.message}; the outcome is unknown, retry with the same request_id"
                    ),
                )
                return
            except NotFoundError:  # a lease ran out between grant and commit
                self._fail(
                    [item for item, _ in planned],
                    UnavailableError("a lease expired before the allocation was committed; retry"),
                )
                return
            committed = {record.request_id: record for record in plan.allocations}
            if result.succeeded:
                self._last_commit_revision = result.revision
                for item in pending:
                    record = committed.get(item.request.request_id)
                    if record is not None:
                        item.resolve(record, False)
                return
            self.conflicts += 1
            newest = max((kv.mod_revision for kv in result.current.values()), default=0)
            self._last_commit_revision = max(self._last_commit_revision, newest)
            retry = []
            for item in pending:
                if item in leftover or item.future.done():
                    continue
                item.attempts += 1
                if item.attempts >= self.settings.max_attempts:
                    self._revoke_later(item)
                    item.reject(
                        ConflictError(
                            f"gave up after {item.attempts} conflicting commits with other "
                            "coordinators; retry with the same request_id"
                        )
                    )
                else:
                    retry.append(item)
            pending = retry

    def _answer_replays(self, pending: list[_Pending]) -> list[_Pending]:
        """Answers requests whose request_id is already committed (or repeated in the batch)."""
        fresh: list[_Pending] = []
        seen: dict[str, _Pending] = {}
        for item in pending:
            if item.future.done():
                continue
            try:
                replay = self._replay(item.request)
            except KaiwoGpuError as error:
                self._revoke_later(item)
                item.reject(error)
                continue
            if replay is not None:
                self._revoke_later(item)
                item.resolve(replay, True)
            elif item.request.request_id in seen:
                self._queue.put_nowait(item)  # decided after its twin is committed
            else:
                seen[item.request.request_id] = item
                fresh.append(item)
        return fresh

    async def _grant_leases(self, planned: list[tuple[_Pending, types_pb2.Allocation]]) -> None:
        """Grants the leases of placed requests (all at once) and writes them into the records.

        Leases come after the decision so a refused request costs no lease; a request that
        is decided again after a conflict keeps the lease it already has.
        """
        wanted = [item for item, _ in planned if not item.lease_id and self._ttl_s(item.request)]
        grants = await asyncio.gather(
            *(self.store.grant_lease(self._ttl_s(item.request) or 0) for item in wanted)
        )
        for item, (lease_id, ttl_s) in zip(wanted, grants, strict=True):
            item.lease_id, item.lease_ttl_s = lease_id, ttl_s
        for item, record in planned:
            if item.lease_id:
                record.lease_id = item.lease_id
                created = record.created_at.ToDatetime(tzinfo=UTC)
                record.expires_at.CopyFrom(timestamp(created + timedelta(seconds=item.lease_ttl_s)))

    def _ttl_s(self, request: AllocationRequest) -> int | None:
        return request.ttl_seconds or self.settings.default_ttl_s

    def _decide(
        self, pending: list[_Pending]
    ) -> tuple[CommitPlan, list[tuple[_Pending, types_pb2.Allocation]], list[_Pending]]:
        """Places each request on a snapshot holding the ones before it; (plan, planned, rest)."""
        state = self.view.state
        snapshot = state.snapshot()
        scheduler_state = self._scheduler_state
        plan = CommitPlan(self.layout, state)
        planned: list[tuple[_Pending, types_pb2.Allocation]] = []
        leftover: list[_Pending] = []
        now = self._clock()
        for item in pending:
            if plan.allocations and leftover:
                leftover.append(item)
                continue
            try:
                decision = place(
                    item.request,
                    snapshot,
                    scheduler_state,
                    default_strategy=self.settings.default_strategy,
                )
            except KaiwoGpuError as error:
                self._revoke_later(item)
                item.reject(error)
                continue
            if isinstance(decision, NoFit):
                self._revoke_later(item)
                item.reject(decision.to_error())
                continue
            allocation_id = self._new_id()
            record = allocation_record(
                item.request, decision, allocation_id, lease_id=0, created_at=now, expires_at=None
            )
            if not plan.fits(record):
                leftover.append(item)
                continue
            plan.add(record)
            planned.append((item, record))
            snapshot = snapshot.with_allocation(decision.as_allocation(allocation_id))
            scheduler_state = decision.state
        self._scheduler_state = scheduler_state
        return plan, planned, leftover

    def _revoke_later(self, item: _Pending) -> None:
        """A lease granted for a request that did not commit is dropped, not left to expire."""
        if item.lease_id:
            lease_id, item.lease_id = item.lease_id, 0
            task = asyncio.create_task(self._revoke_quietly(lease_id))
            task.add_done_callback(lambda _: None)

    async def _revoke_quietly(self, lease_id: int) -> None:
        with contextlib.suppress(KaiwoGpuError):
            await self.store.revoke_lease(lease_id)

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
        record.ParseFromString(kv.value)
        return record, kv.mod_revision

    async def release(self, allocation_id: str) -> types_pb2.Allocation:
        record, _ = await self.record(allocation_id)
        key = self.layout.allocation(allocation_id)
        result = await self.store.commit(
            Txn(
                expect_present=(key,),
                deletes=(key, self.layout.request(record.request_id)),
            )
        )
        if not result.succeeded:
            raise NotFoundError(f"allocation {allocation_id!r} was already released or expired")
        if record.lease_id:
            self._revoke_later_id(record.lease_id)
        released = types_pb2.Allocation()
        released.CopyFrom(record)
        released.state = types_pb2.ALLOCATION_STATE_RELEASED
        return released

    def _revoke_later_id(self, lease_id: int) -> None:
        task = asyncio.create_task(self._revoke_quietly(lease_id))
        task.add_done_callback(lambda _: None)

    async def keep_alive(self, allocation_id: str) -> tuple[datetime, int]:
        """Renews the allocation's lease; (new expiry, TTL in seconds)."""
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
        # Best effort: if the record changed meanwhile, the lease is renewed all the same.
        await self.store.commit(
            Txn(
                expect_mod_revision=((key, revision),),
                puts=(Put(key, renewed.SerializeToString(), record.lease_id),),
            )
        )
        return expires_at, ttl_s
