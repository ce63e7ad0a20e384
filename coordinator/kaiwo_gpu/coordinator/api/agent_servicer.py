"""The AgentService: node agents register, stream telemetry and receive directives.

One `Connect` stream per agent. Registration writes the node record (no lease: the node
stays listed while its agent is away) and a presence key `agents/<node>` on a node lease
this coordinator keeps alive while the stream is up. Without that key an agent's node is
not schedulable, so a node whose agent died leaves placement within the lease TTL, and at
once when its stream ends cleanly. Telemetry is kept in memory; only health changes are
written, each guarded by the record and presence revisions this session wrote, so a
session that lost its node to a newer connection cannot overwrite it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError

from kaiwo_gpu.common import keepalive, tracing
from kaiwo_gpu.common.errors import (
    ConflictError,
    FailedPreconditionError,
    InvalidArgumentError,
    KaiwoGpuError,
    UnavailableError,
)
from kaiwo_gpu.common.identity import Identity
from kaiwo_gpu.coordinator.api import permissions
from kaiwo_gpu.coordinator.api.callers import Callers, refused
from kaiwo_gpu.coordinator.state.agent_reports import node_record
from kaiwo_gpu.coordinator.state.changes import Store
from kaiwo_gpu.coordinator.state.keys import KeyLayout
from kaiwo_gpu.coordinator.state.records import timestamp
from kaiwo_gpu.coordinator.state.registration import (
    AgentNodeClaim,
    claim_agent_node,
    write_agent_health,
)
from kaiwo_gpu.coordinator.state.view import ClusterView, Subscription
from kaiwo_gpu.v1 import agent_pb2, agent_pb2_grpc, types_pb2

log = structlog.get_logger(__name__)

REGISTER_WAIT_S = 10.0
PLACEMENT_COALESCE_S = 0.05
MAX_REGISTER_ATTEMPTS = 3

Context = grpc.aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.CoordinatorDirective]


@dataclass(frozen=True, slots=True)
class AgentStreamSettings:
    """How this coordinator runs agent streams: node lease TTL, asked interval, waits."""

    node_ttl_s: int = 15
    sample_interval_ms: int = 1000
    view_wait_s: float = 5.0

    @property
    def silent_limit_s(self) -> float:
        """How long a connected agent may send nothing before its stream is ended."""
        return 3 * self.sample_interval_ms / 1000 + 2.0


RESTORE_GAP_S = 1.0
"""How often the coordinator may put back a connected node's deleted keys."""
HEALTH_WRITE_MIN_GAP_S = 1.0
"""A node's record is rewritten for health at most once per this (or per sample interval,
if longer): verdicts that flip faster are coalesced, the latest written (2,000 flipping
batches made 2,002 etcd revisions in 2.3 s, and one stream could fill etcd's quota)."""


HEARTBEAT = agent_pb2.CoordinatorDirective(heartbeat=agent_pb2.Heartbeat())


async def _heartbeats(context: Context) -> None:
    """A heartbeat every HEARTBEAT_S, until cancelled."""
    while True:
        await asyncio.sleep(keepalive.HEARTBEAT_S)
        await context.write(HEARTBEAT)


AGENT_MESSAGE = agent_pb2.AgentMessage.DESCRIPTOR.full_name


async def _read(context: Context, timeout_s: float) -> object:
    """The agent's next message (grpc.aio.EOF once it closed its side); bytes that do not
    decode are INVALID_ARGUMENT (gRPC decodes stream messages outside any handler, and
    would end the stream UNKNOWN)."""
    try:
        return await asyncio.wait_for(context.read(), timeout_s)
    except DecodeError:
        raise InvalidArgumentError(
            "message", "bytes that do not decode", f"a {AGENT_MESSAGE}"
        ) from None


def _body(message: object) -> str:
    """What a message carries, for a refusal: its body's name, or what came instead."""
    if not isinstance(message, agent_pb2.AgentMessage):
        return "the end of the stream"
    return message.WhichOneof("body") or "an empty message"


class _Session:
    """One agent's connection: what it registered and the revisions it wrote."""

    def __init__(self, register: agent_pb2.Register, lease_id: int) -> None:
        self.register = register
        self.node = register.node
        self.lease_id = lease_id
        self.claim = AgentNodeClaim(types_pb2.NodeStatus(), 0, 0)
        self.placements_changed = asyncio.Event()
        self.placements_changed.set()  # the first list goes out at once
        self.closing = asyncio.Event()  # end the stream now: stopping, or replaced
        self.closed_because: KaiwoGpuError | None = None  # None: end it with OK
        self.health_written_at = -math.inf  # loop time of this session's last health write
        self.pending_health: types_pb2.NodeStatus | None = None  # verdicts not written yet
        self.health_flush_due = False
        self.health_lock = asyncio.Lock()
        self.restored_at = -math.inf  # loop time of the last repair of its keys


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        store: Store,
        view: ClusterView,
        layout: KeyLayout,
        settings: AgentStreamSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        *,
        callers: Callers | None = None,
    ) -> None:
        self.callers = callers or Callers(None, client_certificates=False)
        self.store = store
        self.view = view
        self.layout = layout
        self.settings = settings
        self.clock = clock
        self.coordinator_id = "coordinator"
        self.dropped_batches = 0
        self.health_writes_deferred = 0
        self._health_write_gap_s = max(HEALTH_WRITE_MIN_GAP_S, settings.sample_interval_ms / 1000)
        self._sessions: dict[str, _Session] = {}
        self._stopping = False
        self._feed: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._registering: dict[str, asyncio.Lock] = {}
        self._last_registration = 0  # etcd revision of this coordinator's latest one
        self._background: set[asyncio.Task[None]] = set()

    def connected_nodes(self) -> list[str]:
        """The nodes whose agents stream to this coordinator now."""
        return list(self._sessions)

    def start(self, coordinator_id: str) -> None:
        self.coordinator_id = coordinator_id
        self._feed = asyncio.create_task(self._follow_placements(), name="agent-placement-feed")
        self._renewal = asyncio.create_task(self._keep_leases(), name="agent-node-leases")

    async def stop(self) -> None:
        """Before the server stops: sessions then end without revoking their node leases,
        so agents that reconnect to another coordinator within the TTL do not flap."""
        self._stopping = True
        for session in self._sessions.values():
            session.closing.set()
        for task in (self._feed, self._renewal):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._background:  # revokes already under way: let them land, briefly
            await asyncio.wait(self._background, timeout=2.0)

    async def _follow_placements(self) -> None:
        subscription = self.view.subscribe()
        try:
            while True:
                event = await subscription.queue.get()
                if event is None:  # fell behind: tell every session to resend
                    subscription = self._resubscribe(subscription)
                    for session in self._sessions.values():
                        session.placements_changed.set()
                    continue
                listener = self._sessions.get(event.allocation.node)
                if listener is not None:
                    listener.placements_changed.set()
        finally:
            self.view.unsubscribe(subscription)

    def _resubscribe(self, old: Subscription) -> Subscription:
        self.view.unsubscribe(old)
        return self.view.subscribe()

    async def Connect(  # type: ignore[override]
        self,
        request_iterator: Any,
        context: Context,
    ) -> None:
        session: _Session | None = None
        caller: Identity | None = None
        try:
            caller = self.callers.identify(context)
            first = await _read(context, REGISTER_WAIT_S)
            if not isinstance(first, agent_pb2.AgentMessage) or not first.HasField("register"):
                raise InvalidArgumentError("first message", _body(first), "register")
            # Before anything is read of the node or written: only its own agent speaks for it.
            permissions.check_speaks_for(caller, first.register.node)
            # Registering takes several etcd round trips, which a slow etcd stretches:
            # heartbeats meanwhile tell the agent this coordinator is alive, only slow.
            pinger = asyncio.create_task(_heartbeats(context))
            try:
                session = await self._register(first.register)
            finally:
                pinger.cancel()
                await asyncio.gather(pinger, return_exceptions=True)
            await self._serve(session, context)
        except TimeoutError:
            detail = f"no register message within {REGISTER_WAIT_S:g}s of connecting"
            log.warning("agent stream dropped", peer=context.peer(), error=detail)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, detail)
        except KaiwoGpuError as error:
            refused("Connect", caller, error, context.peer())
            log.warning(
                "agent stream refused",
                identity=str(caller) if caller else None,
                node=session.node if session else None,
                status=error.status_code,
                error=error.message,
            )
            await context.abort(grpc.StatusCode[error.status_code], error.status_message)
        finally:
            if session is not None:
                self._end(session)

    async def _serve(self, session: _Session, context: Context) -> None:
        tasks = [
            asyncio.create_task(self._read_batches(session, context)),
            asyncio.create_task(self._send_directives(session, context)),
            asyncio.create_task(session.closing.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # raises what ended the session, if anything
        if session.closing.is_set() and session.closed_because is not None:
            raise session.closed_because

    def _end(self, session: _Session) -> None:
        if self._sessions.get(session.node) is not session:
            # A newer connection holds the node, its presence key on its own lease: this
            # session's lease holds nothing any more.
            self._in_background(self._revoke(session.lease_id))
            return
        del self._sessions[session.node]
        # The last report stays, so ListNodes shows when the node was last seen; placement
        # forgets its readings (the node is unschedulable until its agent returns).
        self.view.forget_telemetry(session.node)
        log.info("agent disconnected", node=session.node)
        if not self._stopping:
            self._in_background(self._revoke(session.lease_id))

    async def _revoke(self, lease_id: int) -> None:
        with contextlib.suppress(KaiwoGpuError):
            await self.store.revoke_lease(lease_id)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _register(self, register: agent_pb2.Register) -> _Session:
        """Writes the node record (when it changed) and the presence key, on a new lease
        (a span of its own, inside the stream's, with tracing on)."""
        attributes = {"kaiwo_gpu.node": register.node, "kaiwo_gpu.gpus": len(register.gpus)}
        with tracing.span("kaiwo_gpu.register_node", attributes=attributes):
            return await self._register_traced(register)

    async def _register_traced(self, register: agent_pb2.Register) -> _Session:
        # GPU ownership is read from the view: let it hold this coordinator's own
        # registrations first, or two quick ones could claim one GPU for two nodes.
        await self.view.wait_for(self._last_registration, self.settings.view_wait_s)
        others = self._owner_besides(register.node)
        node_record(register, None, others)  # refuse bad input before granting anything
        # One registration of a node at a time here, so the session this coordinator keeps
        # is the one whose presence key etcd kept (the later write).
        lock = self._registering.setdefault(register.node, asyncio.Lock())
        async with lock:  # one small lock per node name this coordinator has seen
            return await self._take_node(register, others)

    async def _take_node(
        self, register: agent_pb2.Register, others: Callable[[str], str | None]
    ) -> _Session:
        lease_id, _ = await self.store.grant_lease(self.settings.node_ttl_s)
        session = _Session(register, lease_id)
        try:
            for _ in range(MAX_REGISTER_ATTEMPTS):
                claim = await claim_agent_node(
                    self.store,
                    self.layout,
                    register,
                    lease_id=lease_id,
                    holder=self.coordinator_id,
                    owner_of=others,
                    view=self.view.state,
                )
                if claim is not None:
                    session.claim = claim
                    self._last_registration = max(self._last_registration, claim.presence_revision)
                    break
                # The record or a placement on its GPUs moved: read them again once the view
                # holds what etcd holds now.
                await self.view.wait_for(await self.store.revision(), self.settings.view_wait_s)
            else:
                raise ConflictError(f"node {register.node!r} kept changing while it registered")
        except BaseException:
            self._in_background(self._revoke(lease_id))
            raise
        replaced = self._sessions.get(session.node)
        if replaced is not None:  # the older stream of this node ends now
            replaced.closed_because = FailedPreconditionError(
                f"node {session.node!r} registered through another connection; this one ends"
            )
            replaced.closing.set()
        self._sessions[session.node] = session
        known = self.view.state.nodes.keys() | self._sessions.keys()
        self.view.telemetry.registered(session.node, self.clock(), known)
        log.info(
            "agent registered",
            node=session.node,
            gpus=len(register.gpus),
            backend=register.backend,
            agent_version=register.agent_version,
            replaced_connection=replaced is not None,
        )
        return session

    async def _read_batches(self, session: _Session, context: Context) -> None:
        limit_s = self.settings.silent_limit_s
        loop = asyncio.get_running_loop()
        min_gap_s = self.settings.sample_interval_ms / 2000
        last_ingest = -math.inf
        while True:
            try:
                message = await _read(context, limit_s)
            except TimeoutError:
                raise UnavailableError(
                    f"no telemetry from node {session.node!r} for {limit_s:g}s; reconnect"
                ) from None
            if not isinstance(message, agent_pb2.AgentMessage):
                return  # grpc.aio.EOF: the agent closed its side
            if not message.HasField("telemetry"):
                raise InvalidArgumentError("message", _body(message), "telemetry after registering")
            self._check_still_held(session)
            await self._restore_if_lost(session)
            now = loop.time()
            if now - last_ingest < min_gap_s and not _new_verdicts(session, message.telemetry):
                self.dropped_batches += 1  # faster than asked, and it changes no verdict
                continue
            last_ingest = now
            await self._ingest(session, message.telemetry)

    async def _restore_if_lost(self, session: _Session) -> None:
        """Puts back the node record or presence key of a node whose agent is still here,
        when something deleted it (`etcdctl del`, a restore from backup): the coordinator
        that holds the stream owns both. At most once per RESTORE_GAP_S per node."""
        state, now = self.view.state, asyncio.get_running_loop().time()
        seen_ours = self.view.connected and state.revision >= session.claim.presence_revision
        missing = {
            "record_was_missing": session.node not in state.nodes,
            "presence_was_missing": session.node not in state.agents,
        }
        if not (seen_ours and any(missing.values())) or now - session.restored_at < RESTORE_GAP_S:
            return
        session.restored_at = now
        try:
            claim = await claim_agent_node(
                self.store,
                self.layout,
                session.register,
                lease_id=session.lease_id,
                holder=self.coordinator_id,
                owner_of=self._owner_besides(session.node),
                view=state,
            )
        except UnavailableError as error:
            log.warning("node keys not restored", node=session.node, error=error.message)
            return
        if claim is not None:
            session.claim = claim
            log.warning("node keys restored", node=session.node, **missing)

    def _check_still_held(self, session: _Session) -> None:
        """Another coordinator took the node when etcd shows a newer presence key."""
        seen = self.view.state.agent_revisions.get(session.node, 0)
        if seen > session.claim.presence_revision:
            raise FailedPreconditionError(
                f"node {session.node!r} registered through another connection; this one ends"
            )

    async def _ingest(self, session: _Session, batch: agent_pb2.TelemetryBatch) -> None:
        ingested = self.view.ingest(
            session.node, batch, session.claim.record, self._owner_of, self.clock()
        )
        # The latest verdicts to write: None when the record already says them.
        session.pending_health = ingested.health_change
        if session.pending_health is None:
            return
        wait_s = (
            session.health_written_at + self._health_write_gap_s - asyncio.get_running_loop().time()
        )
        if wait_s <= 0:
            await self._write_pending_health(session)
            return
        # At most one write per node per gap, so a flipping GPU cannot fill etcd; the
        # latest verdicts are written when the gap is over, whatever comes meanwhile.
        self.health_writes_deferred += 1
        if not session.health_flush_due:
            session.health_flush_due = True
            self._in_background(self._flush_health(session, wait_s))

    async def _flush_health(self, session: _Session, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        session.health_flush_due = False
        if self._sessions.get(session.node) is session:  # still this node's connection
            with contextlib.suppress(FailedPreconditionError):  # taken over meanwhile
                await self._write_pending_health(session)

    async def _write_pending_health(self, session: _Session) -> None:
        async with session.health_lock:  # one write at a time, each on the claim before
            record, session.pending_health = session.pending_health, None
            if record is None:
                return
            session.health_written_at = asyncio.get_running_loop().time()
            try:
                await self._write_health(session, record)
            except UnavailableError as error:  # the next batch carries the verdict again
                log.warning("health change not written", node=session.node, error=error.message)

    def _owner_besides(self, node: str) -> Callable[[str], str | None]:
        """Which other node names a GPU, as the view has it when asked."""
        return lambda uuid: self.view.state.gpu_owner(uuid, besides=node)

    def _owner_of(self, uuid: str) -> str | None:
        """Which node names the GPU (only asked when a batch is refused)."""
        return self.view.state.gpu_owner(uuid)

    async def _write_health(self, session: _Session, record: types_pb2.NodeStatus) -> None:
        """Writes health verdicts while this session still holds the node."""
        session.claim = await write_agent_health(self.store, self.layout, record, session.claim)
        log.info(
            "gpu health changed",
            node=session.node,
            gpus={
                status.inventory.uuid: types_pb2.Health.Name(status.health)
                for status in record.gpus
            },
        )

    async def _send_directives(self, session: _Session, context: Context) -> None:
        await context.write(
            agent_pb2.CoordinatorDirective(
                registered=agent_pb2.Registered(
                    coordinator_id=self.coordinator_id,
                    sample_interval_ms=self.settings.sample_interval_ms,
                    heartbeat_ms=round(keepalive.HEARTBEAT_S * 1000),
                )
            )
        )
        while True:
            try:
                await asyncio.wait_for(session.placements_changed.wait(), keepalive.HEARTBEAT_S)
            except TimeoutError:  # nothing to say: say that we are alive
                await context.write(HEARTBEAT)
                continue
            session.placements_changed.clear()
            await context.write(
                agent_pb2.CoordinatorDirective(placed_allocations=self._placed_on(session.node))
            )
            await asyncio.sleep(PLACEMENT_COALESCE_S)  # one message for a burst of changes

    def _placed_on(self, node: str) -> agent_pb2.PlacedAllocations:
        state = self.view.state
        held = sorted(state.allocations_by_node.get(node, ()))
        return agent_pb2.PlacedAllocations(
            allocations=[state.allocations[i] for i in held],
            as_of=timestamp(self.clock()),
        )

    async def _keep_leases(self) -> None:
        """Renews every connected node's lease, all over one keep-alive stream, every
        third of the TTL; a session whose lease is gone ends (its agent registers again)."""
        interval_s = max(self.settings.node_ttl_s / 3, 0.5)
        while True:
            await asyncio.sleep(interval_s)
            sessions = list(self._sessions.values())
            try:
                ttls = await self.store.refresh_leases([s.lease_id for s in sessions])
            except KaiwoGpuError as error:  # etcd keeps leases alive across its restart
                log.warning("cannot renew node leases", nodes=len(sessions), error=error.message)
                continue
            except Exception:  # renewal must outlive any one failure, or every node expires
                log.exception("renewing node leases failed", nodes=len(sessions))
                continue
            for session in sessions:
                if ttls.get(session.lease_id, 1) <= 0:  # missing: its chunk failed, unknown
                    session.closed_because = UnavailableError(
                        f"the lease of node {session.node!r} expired; reconnect to register again"
                    )
                    session.closing.set()


def _new_verdicts(session: _Session, batch: agent_pb2.TelemetryBatch) -> bool:
    """Whether the batch carries a health verdict the node record does not have yet."""
    known = {
        status.inventory.uuid: (status.health, status.health_reason)
        for status in session.claim.record.gpus
    }
    return any(
        known.get(sample.uuid) != (sample.health, sample.health_reason) for sample in batch.samples
    )
