"""The coordinator's live view of etcd: a range read at revision R, then a watch from R + 1.

When the watch breaks (etcd restarted, lost its leader) it resumes from the last revision
seen + 1; when that history is compacted it re-lists and tells watchers what changed in
between. Allocation events fan out to subscribers through bounded queues.

The view also owns the live telemetry its agents send (`ingest`): readings wait for the
next decision (`decision_snapshot`), which folds every one that arrived meanwhile into the
placement snapshot in one step. Only decisions weigh them (ListNodes shows the agents'
rows), so a cluster that places nothing folds nothing: a fold per second of 8,000 readings
cost 10 points of a core and held the event loop for up to 250 ms at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime

import structlog

from kaiwo_gpu.common.errors import UnavailableError
from kaiwo_gpu.coordinator.placement.snapshot import ClusterSnapshot
from kaiwo_gpu.coordinator.state.changes import Store
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.store import CompactedError
from kaiwo_gpu.coordinator.state.telemetry import Ingested, LiveTelemetry
from kaiwo_gpu.coordinator.state.view_state import AllocationEvent, ViewState
from kaiwo_gpu.v1 import agent_pb2, types_pb2

log = structlog.get_logger(__name__)

SUBSCRIBER_QUEUE_LIMIT = 1_000
"""Events a watcher may be behind before it is ended (it watches again to resynchronize)."""


class Subscription:
    """Allocation events for one watcher; `None` in the queue means it fell too far behind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[AllocationEvent | None] = asyncio.Queue(SUBSCRIBER_QUEUE_LIMIT)
        self.overflowed = False

    def offer(self, event: AllocationEvent) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= SUBSCRIBER_QUEUE_LIMIT - 1:
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(event)


class ClusterView:
    def __init__(
        self,
        store: Store,
        layout: KeyLayout,
        *,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        self.store = store
        self.layout = layout
        self.state = ViewState(layout)
        self.telemetry = LiveTelemetry()
        self._connected = False
        self.on_connected_change: Callable[[bool], None] = lambda connected: None
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._subscribers: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether the watch on etcd is up; the server reports it through gRPC health."""
        return self._connected

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            self.on_connected_change(connected)

    async def start(self) -> None:
        """Loads the state (raises UnavailableError when etcd is down) and starts watching."""
        revision, kvs = await self.store.read_prefix(self.layout.all_keys)
        self.state = ViewState.load(self.layout, revision, kvs)
        self._set_connected(True)
        await self.start_following()

    async def start_following(self) -> None:
        """Follows etcd from the state's revision on (again, after `stop`)."""
        self._task = asyncio.create_task(self._follow(), name="cluster-view-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UnavailableError("the coordinator is shutting down"))
        self._waiters.clear()

    @property
    def awaited_revisions(self) -> tuple[int, ...]:
        """The revisions callers are waiting for the view to reach, for health and tests."""
        return tuple(revision for revision, waiter in self._waiters if not waiter.done())

    async def wait_for(self, revision: int, timeout_s: float) -> None:
        """Returns once every change up to `revision` is in the state."""
        if self.state.revision >= revision:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, waiter))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"the coordinator's view of etcd is behind (at revision {self.state.revision}, "
                f"needs {revision}); etcd may be unreachable"
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove((revision, waiter))

    def ingest(
        self,
        node: str,
        batch: agent_pb2.TelemetryBatch,
        record: types_pb2.NodeStatus,
        owner_of: Callable[[str], str | None],
        received_at: datetime,
    ) -> Ingested:
        """Takes one agent batch (see LiveTelemetry.ingest); its readings reach placement
        at the next decision."""
        ingested = self.telemetry.ingest(node, batch, record, owner_of, received_at)
        self.state.apply_telemetry(ingested.readings)
        return ingested

    def forget_telemetry(self, node: str) -> None:
        """The node's agent is gone: placement stops weighing its readings."""
        self.state.apply_telemetry(self.telemetry.disconnected(node))

    def decision_snapshot(self) -> ClusterSnapshot:
        """The snapshot with every reading received so far: what a decision reads."""
        self.state.fold_telemetry()
        return self.state.snapshot

    def subscribe(self) -> Subscription:
        subscription = Subscription()
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def _publish(self, events: list[AllocationEvent]) -> None:
        for subscription in tuple(self._subscribers):
            for event in events:
                subscription.offer(event)
        revision = self.state.revision
        for wanted, waiter in self._waiters:
            if wanted <= revision and not waiter.done():
                waiter.set_result(None)

    async def _follow(self) -> None:
        """Follows etcd for as long as the coordinator runs; no failure ends it."""
        delay = self._retry_initial_s
        relist = False
        while True:
            try:
                if relist:
                    await self._relist()
                    relist = False
                async for revision, changes in self.store.watch(
                    self.layout.all_keys, self.state.revision + 1
                ):
                    self._set_connected(True)
                    delay = self._retry_initial_s
                    self._publish(self.state.apply(revision, changes))
            except asyncio.CancelledError:
                raise
            except CompactedError as error:
                log.warning(
                    "watch history compacted; re-listing", compact_revision=error.compact_revision
                )
                relist = True
                continue
            except UnavailableError as error:
                log.warning("etcd watch interrupted", error=error.message, resume_in_s=delay)
            except Exception:  # a bug must not freeze the view: start over from a fresh read
                log.exception("cluster view failed; re-listing from etcd", retry_s=delay)
                relist = True
            self._set_connected(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def _relist(self) -> None:
        """Replaces the state by a fresh read and publishes the difference as events."""
        revision, kvs = await self.store.read_prefix(self.layout.all_keys)
        fresh = ViewState.load(self.layout, revision, kvs)
        old = self.state.allocations
        events = [
            AllocationEvent(kind=AllocationEvent.KIND_REMOVED, allocation=record, revision=revision)
            for allocation_id, record in old.items()
            if allocation_id not in fresh.allocations
        ]
        events += [
            AllocationEvent(kind=AllocationEvent.KIND_ADDED, allocation=record, revision=revision)
            for allocation_id, record in fresh.allocations.items()
            if allocation_id not in old
        ]
        fresh.apply_telemetry(self.state.telemetry)  # telemetry lives only in memory
        # Counted since start (what went while the watch was away is not told apart).
        fresh.removed_allocations = self.state.removed_allocations
        fresh.fold_telemetry()
        self.state = fresh
        self._publish(events)
