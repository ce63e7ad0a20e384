"""The uplink's decisions, without its I/O: which coordinator next, how long to back off,
when to tick, and what a directive changes.

`UplinkState.handle(event)` returns the commands for the async shell (`uplink`) to perform.
Time arrives inside the events and randomness is injected, so the whole reconnect policy
can be tested without a clock, a thread or a network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kaiwo_gpu.agent.backend import PlacedShare
from kaiwo_gpu.common.keepalive import HEARTBEAT_S, MISSED_HEARTBEATS
from kaiwo_gpu.v1 import agent_pb2

MIN_INTERVAL_MS = 100
MAX_INTERVAL_MS = 60_000
STEADY_SESSION_S = 30.0
"""A session shorter than this does not reset the backoff (two agents sharing a node name,
or a coordinator that refuses us, must not turn into a reconnect storm)."""
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0


class Uniform(Protocol):
    """The randomness the backoff needs; a `random.Random` is one."""

    def uniform(self, a: float, b: float, /) -> float: ...


def backoff_delay(attempt: int, rng: Uniform, base_s: float, cap_s: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return rng.uniform(0.0, min(cap_s, base_s * 2 ** min(attempt, 30)))


def placed_shares(placed: agent_pb2.PlacedAllocations) -> dict[str, PlacedShare]:
    """What the allocations hold per GPU UUID of this node."""
    shares: dict[str, PlacedShare] = {}
    for allocation in placed.allocations:
        for grant in allocation.gpus:
            before = shares.get(grant.uuid, PlacedShare(0, 0, 0))
            shares[grant.uuid] = PlacedShare(
                millis=before.millis + grant.granted_millis,
                memory_mib=before.memory_mib + grant.granted_memory_mib,
                allocations=before.allocations + 1,
            )
    return shares


@dataclass
class UplinkStatus:
    """What the uplink has seen; tests and logs read it."""

    coordinator: str = ""
    connected: bool = False
    registrations: int = 0
    batches_sent: int = 0
    heartbeats: int = 0
    interval_ms: int = 1000
    last_error: str = ""
    placed: Mapping[str, PlacedShare] = field(default_factory=dict)


# Events: what happened. `session` numbers the stream an event comes from; an event from a
# stream that is already over is ignored. `at_s` is the shell's monotonic clock.


@dataclass(frozen=True, slots=True)
class Start:
    at_s: float


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The stream is open and the Register message written."""

    session: int
    at_s: float


@dataclass(frozen=True, slots=True)
class DirectiveReceived:
    session: int
    directive: agent_pb2.CoordinatorDirective


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The stream is over (or could not be opened): its status name and details, or no
    status when it closed cleanly."""

    session: int
    at_s: float
    status: str | None = None
    details: str = ""


@dataclass(frozen=True, slots=True)
class TickDue:
    session: int
    at_s: float


@dataclass(frozen=True, slots=True)
class Sampled:
    session: int
    at_s: float
    batch: agent_pb2.TelemetryBatch


@dataclass(frozen=True, slots=True)
class BatchSent:
    session: int
    at_s: float


@dataclass(frozen=True, slots=True)
class TickFailed:
    """The sample or the batch's write raised; that ends the stream."""

    session: int
    at_s: float
    status: str
    details: str


@dataclass(frozen=True, slots=True)
class BackoffOver:
    at_s: float


Event = (
    Start
    | Stop
    | StreamOpened
    | DirectiveReceived
    | StreamEnded
    | TickDue
    | Sampled
    | BatchSent
    | TickFailed
    | BackoffOver
)


# Commands: what the shell does. Each one that takes time answers with the event named.


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a Connect stream to `address` and write Register (-> StreamOpened, then
    DirectiveReceived for each directive, then StreamEnded)."""

    session: int
    address: str


@dataclass(frozen=True, slots=True)
class Sample:
    """Run the before-tick hook, then read the GPUs waiting at most `wait_s` (-> Sampled)."""

    session: int
    wait_s: float


@dataclass(frozen=True, slots=True)
class SendBatch:
    """Write the batch to the stream (-> BatchSent)."""

    session: int
    batch: agent_pb2.TelemetryBatch


@dataclass(frozen=True, slots=True)
class WaitForTick:
    """Sleep until `until_s` on the shell's clock (-> TickDue)."""

    session: int
    until_s: float


@dataclass(frozen=True, slots=True)
class Backoff:
    """Sleep `delay_s` (-> BackoffOver)."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Close the session's stream and channel and drop its pending tick; half-close the
    stream first when we are the ones ending it."""

    session: int
    done_writing: bool


@dataclass(frozen=True, slots=True)
class ApplyPlacements:
    """Tell the backend what is placed on each GPU (a failure ends the stream)."""

    session: int
    shares: Mapping[str, PlacedShare]


@dataclass(frozen=True, slots=True)
class Log:
    level: Literal["info", "warning"]
    message: str
    fields: Mapping[str, object]


Command = Connect | Sample | SendBatch | WaitForTick | Backoff | CloseStream | ApplyPlacements | Log

Phase = Literal["idle", "streaming", "backing_off", "finished"]


class UplinkState:
    """One agent's link to its coordinators, as a state machine.

    Per session (one stream) at most one operation is in flight: opening the stream,
    sampling, or writing a batch. An end or a stop that arrives meanwhile waits for it, so
    a read is never started twice and the backend is never closed under one.

    A coordinator that has said nothing for MISSED_HEARTBEATS of the heartbeats it promised
    when it answered the registration (or has not answered it in MISSED_HEARTBEATS x
    HEARTBEAT_S) is taken for frozen: the stream ends and the next address is tried. One
    that promises none (an older version) is only held to the registration answer.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        node: str,
        *,
        rng: Uniform,
        status: UplinkStatus | None = None,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        if not addresses:
            raise ValueError("at least one coordinator address")
        self.addresses = tuple(addresses)
        self.node = node
        self.rng = rng
        self.status = status if status is not None else UplinkStatus()
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.phase: Phase = "idle"
        self.attempt = 0
        """Backoffs since the last steady session."""
        self.turn = 0
        """Sessions ended so far; the next one goes to addresses[turn % len]."""
        self.session = 0
        self.stopping = False
        # The current session:
        self.address = ""
        self.started_at_s = 0.0
        self.registered = False
        self.in_flight: Literal["open", "sample", "send"] | None = None
        self.ending: tuple[str | None, str] | None = None
        """(status, details) of an end that waits for the operation in flight."""
        self.tick_interval_s = 0.0
        self.next_tick_s = 0.0
        self.heard_at_s = 0.0  # when the coordinator last said something, as ticks saw it
        self.heard_since = False  # it said something since heard_at_s
        self.silence_limit_s: float | None = MISSED_HEARTBEATS * HEARTBEAT_S

    @property
    def finished(self) -> bool:
        return self.phase == "finished"

    def handle(self, event: Event) -> list[Command]:
        match event:
            case Start(at_s=at_s):
                return self._connect(at_s) if self.phase == "idle" else []
            case Stop():
                return self._stop()
            case BackoffOver(at_s=at_s):
                return self._connect(at_s) if self.phase == "backing_off" else []
        if self.phase != "streaming" or event.session != self.session:
            return []  # from a stream that is over
        match event:
            case StreamOpened(at_s=at_s):
                self.in_flight = None
                self.next_tick_s = at_s
                self.heard_at_s = at_s
                return self._close() if self.stopping else self._tick()
            case DirectiveReceived(directive=directive):
                self.heard_since = True
                return [] if self.ending else self._follow(directive)
            case TickDue():
                return [] if self.in_flight else self._tick()
            case Sampled(at_s=at_s, batch=batch):
                self.in_flight = None
                self._check_heard(at_s)
                if self.ending:
                    return self._end(at_s)
                if self.registered:  # a batch before the answer could race a refusal
                    self.in_flight = "send"
                    return [SendBatch(self.session, batch)]
                return self._after_tick(at_s)
            case BatchSent(at_s=at_s):
                self.in_flight = None
                self.status.batches_sent += 1
                self._check_heard(at_s)
                return self._end(at_s) if self.ending else self._after_tick(at_s)
            case TickFailed(at_s=at_s, status=status, details=details):
                self.in_flight = None
                self.ending = self.ending or (status, details)
                return self._end(at_s)
            case StreamEnded(at_s=at_s, status=status, details=details):
                self.ending = self.ending or (status, details)
                if self.in_flight in ("sample", "send"):
                    return []  # its answer comes first
                self.in_flight = None
                return self._end(at_s)

    def _check_heard(self, at_s: float) -> None:
        """Ends the session (at the caller's next step) when the coordinator went silent."""
        if self.heard_since:
            self.heard_at_s, self.heard_since = at_s, False
        silent_s = at_s - self.heard_at_s
        limit_s = self.silence_limit_s
        if limit_s is not None and silent_s > limit_s and self.ending is None:
            self.ending = (
                "UNAVAILABLE",
                f"the coordinator has sent nothing for {silent_s:.0f}s (frozen or cut off?)",
            )

    def _connect(self, at_s: float) -> list[Command]:
        self.session += 1
        self.phase = "streaming"
        self.address = self.addresses[self.turn % len(self.addresses)]
        self.started_at_s = at_s
        self.registered = False
        self.in_flight = "open"
        self.ending = None
        self.heard_since = False
        self.silence_limit_s = MISSED_HEARTBEATS * HEARTBEAT_S  # for the registration answer
        return [Connect(self.session, self.address)]

    def _stop(self) -> list[Command]:
        if self.phase != "streaming":
            self.phase = "finished"
            return []
        self.stopping = True
        return [] if self.in_flight else self._close()  # else once it is back

    def _close(self) -> list[Command]:
        self.status.connected = False
        self.phase = "finished"
        return [CloseStream(self.session, done_writing=True)]

    def _tick(self) -> list[Command]:
        self.tick_interval_s = self.status.interval_ms / 1000
        self.in_flight = "sample"
        return [Sample(self.session, wait_s=self.tick_interval_s / 2)]

    def _after_tick(self, at_s: float) -> list[Command]:
        if self.stopping:
            return self._close()
        self.next_tick_s = max(self.next_tick_s + self.tick_interval_s, at_s)
        return [WaitForTick(self.session, self.next_tick_s)]

    def _follow(self, directive: agent_pb2.CoordinatorDirective) -> list[Command]:
        body = directive.WhichOneof("body")
        if body == "registered":
            self._set_interval(directive.registered.sample_interval_ms)
            promised_ms = directive.registered.heartbeat_ms
            self.silence_limit_s = MISSED_HEARTBEATS * promised_ms / 1000 if promised_ms else None
            self.registered = True
            self.status.coordinator = self.address
            self.status.connected = True
            self.status.registrations += 1
            return [
                Log(
                    "info",
                    "registered with coordinator",
                    {
                        "node": self.node,
                        "coordinator": self.address,
                        "coordinator_id": directive.registered.coordinator_id,
                        "interval_ms": self.status.interval_ms,
                    },
                )
            ]
        if body == "heartbeat":
            self.status.heartbeats += 1
        elif body == "set_sample_interval":
            self._set_interval(directive.set_sample_interval.sample_interval_ms)
        elif body == "placed_allocations":
            shares = placed_shares(directive.placed_allocations)
            self.status.placed = shares
            return [ApplyPlacements(self.session, shares)]
        return []

    def _set_interval(self, interval_ms: int) -> None:
        if interval_ms:  # unset: keep the one we have
            self.status.interval_ms = min(max(interval_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS)

    def _end(self, at_s: float) -> list[Command]:
        status, details = self.ending or (None, "")
        self.status.connected = False
        commands: list[Command] = [CloseStream(self.session, done_writing=False)]
        if status is not None:
            self.status.last_error = f"{status}: {details}"
            fields = {"node": self.node, "coordinator": self.address, "status": status}
            commands.append(Log("warning", "coordinator stream ended", fields | {"error": details}))
        if self.stopping:
            self.phase = "finished"
            return commands
        # Next time, the next address: this one did not answer, or it ended our stream
        # (a coordinator that is stopping closes its streams).
        self.turn += 1
        if self.registered and at_s - self.started_at_s >= STEADY_SESSION_S:
            self.attempt = 0  # it worked for a while: start the backoff over
        delay_s = backoff_delay(self.attempt, self.rng, self.backoff_base_s, self.backoff_cap_s)
        self.attempt += 1
        self.phase = "backing_off"
        commands.append(Backoff(delay_s))
        return commands
