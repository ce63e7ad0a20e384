"""The uplink's policy against its state machine alone: events in, commands out, no clock."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kaiwo_gpu.agent.backend import PlacedShare
from kaiwo_gpu.agent.uplink_state import (
    MAX_INTERVAL_MS,
    MIN_INTERVAL_MS,
    STEADY_SESSION_S,
    ApplyPlacements,
    Backoff,
    BackoffOver,
    BatchSent,
    CloseStream,
    Command,
    Connect,
    DirectiveReceived,
    Event,
    Log,
    Sample,
    Sampled,
    SendBatch,
    Start,
    Stop,
    StreamEnded,
    StreamOpened,
    TickDue,
    TickFailed,
    UplinkState,
    WaitForTick,
    backoff_delay,
)
from kaiwo_gpu.v1 import agent_pb2, types_pb2

ADDRESSES = ("a:1", "b:2", "c:3")
BATCH = agent_pb2.TelemetryBatch()


@dataclass
class HighestDraw:
    """Stands in for `random.Random`: always the top of the range, and remembers the ranges."""

    ranges: list[tuple[float, float]] = field(default_factory=list)

    def uniform(self, a: float, b: float, /) -> float:
        self.ranges.append((a, b))
        return b


def new_state(
    addresses: tuple[str, ...] = ADDRESSES, interval_ms: int = 1000
) -> tuple[UplinkState, HighestDraw]:
    rng = HighestDraw()
    state = UplinkState(addresses, "n1", rng=rng)
    state.status.interval_ms = interval_ms
    return state, rng


def registered(interval_ms: int = 0) -> agent_pb2.CoordinatorDirective:
    return agent_pb2.CoordinatorDirective(
        registered=agent_pb2.Registered(coordinator_id="coord-1", sample_interval_ms=interval_ms)
    )


def set_interval(interval_ms: int) -> agent_pb2.CoordinatorDirective:
    return agent_pb2.CoordinatorDirective(
        set_sample_interval=agent_pb2.SetSampleInterval(sample_interval_ms=interval_ms)
    )


T = TypeVar("T")


def only(commands: list[Command], kind: type[T]) -> T:
    """The single command of `kind` in `commands`."""
    found = [command for command in commands if isinstance(command, kind)]
    assert len(found) == 1, commands
    return found[0]


def connect(state: UplinkState, at_s: float) -> Connect:
    """Starts the state, or ends its backoff: the next Connect."""
    event: Event = Start(at_s) if state.phase == "idle" else BackoffOver(at_s)
    commands = state.handle(event)
    assert len(commands) == 1
    return only(commands, Connect)


def open_and_register(
    state: UplinkState, at_s: float, interval_ms: int = 0, *, first_tick_done: bool = True
) -> int:
    """A session that registered; its first tick is back unless `first_tick_done` is false."""
    session = connect(state, at_s).session
    assert state.handle(StreamOpened(session, at_s)) == [Sample(session, 0.5)]
    state.handle(DirectiveReceived(session, registered(interval_ms)))
    if first_tick_done:
        assert state.handle(Sampled(session, at_s, BATCH)) == [SendBatch(session, BATCH)]
        assert only(state.handle(BatchSent(session, at_s)), WaitForTick)
    return session


def fail(state: UplinkState, session: int, at_s: float) -> list[Command]:
    """The stream ends with a status while nothing is in flight."""
    return state.handle(StreamEnded(session, at_s, "UNAVAILABLE", "connection refused"))


def test_every_end_moves_on_to_the_next_address_round_the_list() -> None:
    state, _ = new_state()
    tried = []
    for round_ in range(7):
        command = connect(state, at_s=float(round_))
        tried.append(command.address)
        if round_ % 2:  # a session that worked also moves on: its coordinator ended it
            state.handle(StreamOpened(command.session, round_))
            state.handle(DirectiveReceived(command.session, registered()))
            state.handle(Sampled(command.session, round_, BATCH))
            state.handle(BatchSent(command.session, round_))
            state.handle(StreamEnded(command.session, round_ + 0.5))
        else:
            fail(state, command.session, round_ + 0.5)
    assert tried == ["a:1", "b:2", "c:3", "a:1", "b:2", "c:3", "a:1"]


def test_a_single_address_is_retried() -> None:
    state, _ = new_state(("only:1",))
    for at_s in range(3):
        command = connect(state, at_s)
        assert command.address == "only:1"
        fail(state, command.session, at_s)


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    state, rng = new_state()
    delays = []
    for at_s in range(10):
        session = connect(state, at_s).session
        delays.append(only(fail(state, session, at_s + 0.1), Backoff).delay_s)
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0, 10.0])
    assert all(low == 0.0 for low, _ in rng.ranges)  # full jitter: from zero


def test_the_backoff_is_drawn_from_the_injected_randomness() -> None:
    state = UplinkState(ADDRESSES, "n1", rng=random.Random(3))
    twin = random.Random(3)
    for attempt in range(8):
        session = connect(state, attempt).session
        delay_s = only(fail(state, session, attempt), Backoff).delay_s
        assert delay_s == backoff_delay(attempt, twin, 0.2, 10.0)


def test_the_backoff_settings_are_the_states() -> None:
    rng = HighestDraw()
    state = UplinkState(ADDRESSES, "n1", rng=rng, backoff_base_s=0.05, backoff_cap_s=0.5)
    delays = []
    for at_s in range(5):
        session = connect(state, at_s).session
        delays.append(only(fail(state, session, at_s), Backoff).delay_s)
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5])


def grow_backoff(state: UplinkState, failures: int) -> float:
    """Fails `failures` connections in a row from t=0; returns the time after the last."""
    for at_s in range(failures):
        fail(state, connect(state, at_s).session, at_s)
    return float(failures)


def test_a_short_registered_session_does_not_reset_the_backoff() -> None:
    """Two agents sharing a node name take turns: that must not become a reconnect storm."""
    state, _ = new_state()
    start_s = grow_backoff(state, 4)  # the next delay would be 3.2 s
    session = open_and_register(state, start_s)
    ended = fail(state, session, start_s + STEADY_SESSION_S - 0.01)
    assert only(ended, Backoff).delay_s == pytest.approx(3.2)


def test_a_long_session_that_never_registered_does_not_reset_the_backoff() -> None:
    state, _ = new_state()
    start_s = grow_backoff(state, 4)
    session = connect(state, start_s).session
    state.handle(StreamOpened(session, start_s))
    assert only(state.handle(Sampled(session, start_s, BATCH)), WaitForTick)
    ended = fail(state, session, start_s + 10 * STEADY_SESSION_S)
    assert only(ended, Backoff).delay_s == pytest.approx(3.2)


def test_a_steady_session_starts_the_backoff_over() -> None:
    state, _ = new_state()
    start_s = grow_backoff(state, 6)
    session = open_and_register(state, start_s)
    ended = fail(state, session, start_s + STEADY_SESSION_S)
    assert only(ended, Backoff).delay_s == pytest.approx(0.2)
    # and it grows again from there
    session = connect(state, start_s + 40).session
    assert only(fail(state, session, start_s + 41), Backoff).delay_s == pytest.approx(0.4)


def test_a_session_counts_from_when_it_was_dialled() -> None:
    """The steady-session clock starts at the Connect, not at the answer."""
    state, _ = new_state()
    grow_backoff(state, 3)
    session = connect(state, 100.0).session
    state.handle(StreamOpened(session, 129.0))
    state.handle(DirectiveReceived(session, registered()))
    state.handle(Sampled(session, 129.0, BATCH))
    state.handle(BatchSent(session, 129.0))
    assert only(fail(state, session, 130.0), Backoff).delay_s == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("asked_ms", "kept_ms"),
    [
        (1, MIN_INTERVAL_MS),
        (MIN_INTERVAL_MS, MIN_INTERVAL_MS),
        (250, 250),
        (MAX_INTERVAL_MS, MAX_INTERVAL_MS),
        (10 * MAX_INTERVAL_MS, MAX_INTERVAL_MS),
        (0, 1000),  # unset: the agent's own
    ],
)
def test_the_coordinators_interval_is_clamped(asked_ms: int, kept_ms: int) -> None:
    state, _ = new_state(interval_ms=1000)
    session = open_and_register(state, 0.0, interval_ms=asked_ms)
    assert state.status.interval_ms == kept_ms
    state.handle(DirectiveReceived(session, set_interval(700)))
    assert state.status.interval_ms == 700
    state.handle(DirectiveReceived(session, set_interval(asked_ms)))
    assert state.status.interval_ms == (700 if asked_ms == 0 else kept_ms)


def test_ticks_follow_the_interval_and_wait_half_of_it_for_the_gpus() -> None:
    state, _ = new_state(interval_ms=1000)
    session = open_and_register(state, 10.0, interval_ms=200, first_tick_done=False)
    # The first tick was taken at the agent's own 1 s; the coordinator's counts from the next.
    assert state.handle(Sampled(session, 10.3, BATCH)) == [SendBatch(session, BATCH)]
    assert state.handle(BatchSent(session, 10.31)) == [WaitForTick(session, 11.0)]
    assert state.handle(TickDue(session, 11.0)) == [Sample(session, wait_s=0.1)]
    assert state.handle(Sampled(session, 11.05, BATCH)) == [SendBatch(session, BATCH)]
    assert state.handle(BatchSent(session, 11.06)) == [WaitForTick(session, 11.2)]
    assert state.status.batches_sent == 2


def test_a_slow_tick_does_not_build_up_a_burst_of_ticks() -> None:
    state, _ = new_state(interval_ms=1000)
    session = open_and_register(state, 0.0, first_tick_done=False)
    state.handle(Sampled(session, 0.1, BATCH))
    assert state.handle(BatchSent(session, 5.0)) == [WaitForTick(session, 5.0)]  # not 1.0
    state.handle(TickDue(session, 5.0))
    state.handle(Sampled(session, 5.1, BATCH))
    assert state.handle(BatchSent(session, 5.2)) == [WaitForTick(session, 6.0)]


def test_nothing_is_sent_before_the_coordinator_answers() -> None:
    state, _ = new_state()
    session = connect(state, 0.0).session
    state.handle(StreamOpened(session, 0.0))
    assert state.handle(Sampled(session, 0.2, BATCH)) == [WaitForTick(session, 1.0)]
    assert state.handle(TickDue(session, 1.0)) == [Sample(session, 0.5)]
    state.handle(DirectiveReceived(session, registered()))
    assert state.handle(Sampled(session, 1.2, BATCH)) == [SendBatch(session, BATCH)]


def test_a_stream_that_ends_before_registering() -> None:
    state, _ = new_state()
    session = connect(state, 0.0).session
    state.handle(StreamOpened(session, 0.0))
    state.handle(Sampled(session, 0.1, BATCH))
    ended = state.handle(StreamEnded(session, 0.5, "FAILED_PRECONDITION", "node name taken"))
    assert ended[0] == CloseStream(session, done_writing=False)
    assert only(ended, Backoff).delay_s == pytest.approx(0.2)
    assert state.status.last_error == "FAILED_PRECONDITION: node name taken"
    assert (state.status.registrations, state.status.batches_sent) == (0, 0)
    assert not state.status.connected
    assert state.status.coordinator == ""


def test_registering_is_recorded_and_logged() -> None:
    state, _ = new_state()
    session = connect(state, 0.0).session
    state.handle(StreamOpened(session, 0.0))
    commands = state.handle(DirectiveReceived(session, registered(interval_ms=200)))
    assert commands == [
        Log(
            "info",
            "registered with coordinator",
            {"node": "n1", "coordinator": "a:1", "coordinator_id": "coord-1", "interval_ms": 200},
        )
    ]
    assert state.status.connected
    assert state.status.coordinator == "a:1"
    assert state.status.registrations == 1


def test_an_end_is_logged_with_its_status_and_unsets_connected() -> None:
    state, _ = new_state()
    session = open_and_register(state, 0.0)
    commands = state.handle(StreamEnded(session, 2.0, "UNAVAILABLE", "lease lost"))
    assert only(commands, Log) == Log(
        "warning",
        "coordinator stream ended",
        {"node": "n1", "coordinator": "a:1", "status": "UNAVAILABLE", "error": "lease lost"},
    )
    assert not state.status.connected
    assert state.status.coordinator == "a:1"  # the last one it was registered with
    assert state.status.last_error == "UNAVAILABLE: lease lost"


def test_a_clean_end_is_not_an_error_but_still_moves_on() -> None:
    state, _ = new_state()
    state.status.last_error = "UNAVAILABLE: earlier"
    session = open_and_register(state, 0.0)
    commands = state.handle(StreamEnded(session, 1.0))
    assert not [command for command in commands if isinstance(command, Log)]
    assert state.status.last_error == "UNAVAILABLE: earlier"
    assert only(commands, Backoff)
    assert connect(state, 2.0).address == "b:2"


def test_placements_are_applied_and_recorded() -> None:
    state, _ = new_state()
    session = open_and_register(state, 0.0)
    placed = agent_pb2.PlacedAllocations(
        allocations=[
            types_pb2.Allocation(
                id="a",
                gpus=[types_pb2.GpuGrant(uuid="g0", granted_millis=250, granted_memory_mib=64)],
            )
        ]
    )
    commands = state.handle(
        DirectiveReceived(session, agent_pb2.CoordinatorDirective(placed_allocations=placed))
    )
    shares = {"g0": PlacedShare(millis=250, memory_mib=64, allocations=1)}
    assert commands == [ApplyPlacements(session, shares)]
    assert state.status.placed == shares
    empty = agent_pb2.CoordinatorDirective(placed_allocations=agent_pb2.PlacedAllocations())
    assert state.handle(DirectiveReceived(session, empty)) == [ApplyPlacements(session, {})]
    assert state.status.placed == {}


def test_stop_during_a_backoff_ends_at_once() -> None:
    state, _ = new_state()
    session = connect(state, 0.0).session
    fail(state, session, 0.1)
    assert state.handle(Stop()) == []
    assert state.finished
    assert state.handle(BackoffOver(10.0)) == []  # the sleep that was cut short


def test_stop_between_ticks_half_closes_the_stream() -> None:
    state, _ = new_state()
    session = open_and_register(state, 0.0)
    assert state.handle(Stop()) == [CloseStream(session, done_writing=True)]
    assert state.finished
    assert not state.status.connected
    assert state.handle(TickDue(session, 1.0)) == []


def test_stop_during_a_sample_lets_it_finish_and_sends_it() -> None:
    """The backend is not closed under a read, and the last reading reaches the coordinator."""
    state, _ = new_state()
    session = open_and_register(state, 0.0, first_tick_done=False)
    assert state.handle(Stop()) == []
    assert state.phase == "streaming"  # until the sample is back
    assert state.handle(Sampled(session, 0.3, BATCH)) == [SendBatch(session, BATCH)]
    assert state.handle(BatchSent(session, 0.4)) == [CloseStream(session, done_writing=True)]
    assert state.finished
    assert state.status.batches_sent == 1


def test_stop_while_dialling_waits_for_the_stream_then_closes_it() -> None:
    state, _ = new_state()
    session = connect(state, 0.0).session
    assert state.handle(Stop()) == []
    assert state.handle(StreamOpened(session, 0.1)) == [CloseStream(session, done_writing=True)]
    assert state.finished


def test_stop_while_dialling_a_dead_address_reports_it_and_does_not_retry() -> None:
    state, _ = new_state()
    session = connect(state, 0.0).session
    state.handle(Stop())
    commands = fail(state, session, 0.1)
    assert commands[0] == CloseStream(session, done_writing=False)
    assert only(commands, Log).fields["status"] == "UNAVAILABLE"
    assert not [command for command in commands if isinstance(command, Backoff | Connect)]
    assert state.finished


def test_stop_before_start_never_dials() -> None:
    state, _ = new_state()
    assert state.handle(Stop()) == []
    assert state.handle(Start(0.0)) == []
    assert state.finished


def test_an_end_during_a_sample_waits_for_it_and_drops_the_batch() -> None:
    """A read is never started twice: the next stream does not tick before this one's
    sample is back."""
    state, _ = new_state()
    session = open_and_register(state, 0.0, first_tick_done=False)
    assert state.handle(StreamEnded(session, 0.2, "UNAVAILABLE", "going away")) == []
    assert state.status.connected  # not over until the sample is back
    late = agent_pb2.CoordinatorDirective(placed_allocations=agent_pb2.PlacedAllocations())
    assert state.handle(DirectiveReceived(session, late)) == []
    commands = state.handle(Sampled(session, 0.4, BATCH))
    assert not [command for command in commands if isinstance(command, SendBatch)]
    assert commands[0] == CloseStream(session, done_writing=False)
    assert only(commands, Backoff)
    assert state.status.last_error == "UNAVAILABLE: going away"


def test_an_end_during_a_write_waits_for_it() -> None:
    state, _ = new_state()
    session = open_and_register(state, 0.0, first_tick_done=False)
    assert state.handle(Sampled(session, 0.1, BATCH)) == [SendBatch(session, BATCH)]
    assert state.handle(StreamEnded(session, 0.2, "UNAVAILABLE", "lease lost")) == []
    commands = state.handle(TickFailed(session, 0.3, "CLOSED", "the coordinator closed"))
    assert state.status.last_error == "UNAVAILABLE: lease lost"  # the first word on it
    assert only(commands, Backoff)


def test_a_failed_tick_ends_the_stream() -> None:
    state, _ = new_state()
    session = open_and_register(state, 0.0, first_tick_done=False)
    commands = state.handle(TickFailed(session, 0.1, "KeyError", "'power'"))
    assert commands[0] == CloseStream(session, done_writing=False)
    assert only(commands, Backoff)
    assert state.status.last_error == "KeyError: 'power'"
    assert fail(state, session, 0.2) == []  # the stream's own end comes later: too late
    assert state.status.last_error == "KeyError: 'power'"


def test_events_from_an_earlier_stream_are_ignored() -> None:
    state, _ = new_state()
    first = open_and_register(state, 0.0)
    fail(state, first, 0.5)
    second = connect(state, 1.0).session
    assert second != first
    assert state.handle(TickDue(first, 1.0)) == []
    assert state.handle(DirectiveReceived(first, registered())) == []
    assert state.handle(StreamEnded(first, 1.1, "CANCELLED", "")) == []
    assert state.status.registrations == 1
    assert state.handle(StreamOpened(second, 1.2)) == [Sample(second, 0.5)]


def test_at_least_one_address() -> None:
    with pytest.raises(ValueError, match="address"):
        UplinkState((), "n1", rng=HighestDraw())


class FakeShell:
    """Performs commands the way the async shell does and checks what it is asked to do."""

    def __init__(self, state: UplinkState) -> None:
        self.state = state
        self.now_s = 0.0
        self.open: int | None = None  # the session whose stream is open
        self.dialling: int | None = None
        self.operation: Callable[[float], Event] | None = None  # answers the one in flight
        self.timer: TickDue | BackoffOver | None = None
        self.stopped = False

    def feed(self, event: Event) -> None:
        for command in self.state.handle(event):
            self.perform(command)

    def perform(self, command: Command) -> None:
        match command:
            case Connect(session=session):
                assert not self.stopped
                assert self.open is None, "a second stream while one is open"
                self.open = self.dialling = session
            case Sample(session=session):
                assert self.operation is None, "two operations at once"
                self.operation = functools.partial(Sampled, session, batch=BATCH)
            case SendBatch(session=session):
                assert self.operation is None, "two operations at once"
                self.operation = functools.partial(BatchSent, session)
            case WaitForTick(session=session, until_s=until_s):
                assert until_s >= self.now_s - 1e-9
                self.timer = TickDue(session, until_s)
            case Backoff(delay_s=delay_s):
                assert self.open is None
                assert 0.0 <= delay_s <= 10.0
                self.timer = BackoffOver(self.now_s + delay_s)
            case CloseStream(session=session):
                assert session == self.open
                assert self.operation is None, "closed under an operation"
                self.open = self.dialling = None
                self.timer = None
            case _:
                pass


@given(st.data())
def test_whatever_happens_one_stream_and_one_operation_at_a_time(data: st.DataObject) -> None:
    state = UplinkState(ADDRESSES, "n1", rng=random.Random(data.draw(st.integers(0, 99))))
    shell = FakeShell(state)
    shell.feed(Start(0.0))
    for _ in range(data.draw(st.integers(0, 60))):
        shell.now_s += data.draw(st.floats(0.0, 40.0))
        session = shell.open
        choices = ["stop"]
        if shell.operation is not None:
            choices.append("operation")
        if shell.timer is not None and shell.operation is None:
            choices.append("timer")
        if shell.dialling is not None:
            choices += ["opened", "refused"]
        elif session is not None:
            choices += ["registered", "interval", "ended", "failed"]
        match data.draw(st.sampled_from(choices)):
            case "stop":
                shell.stopped = True
                shell.feed(Stop())
            case "operation":
                assert shell.operation is not None
                answer, shell.operation = shell.operation, None
                shell.feed(answer(shell.now_s))
            case "timer":
                assert shell.timer is not None
                timer, shell.timer = shell.timer, None
                shell.now_s = max(shell.now_s, timer.at_s)
                shell.feed(timer)
            case "opened":
                assert session is not None
                shell.dialling = None
                shell.feed(StreamOpened(session, shell.now_s))
            case "refused" | "ended":
                assert session is not None
                shell.dialling = None
                shell.feed(StreamEnded(session, shell.now_s, "UNAVAILABLE", "gone"))
            case "registered":
                assert session is not None
                shell.feed(DirectiveReceived(session, registered(data.draw(st.integers(0, 10**6)))))
            case "interval":
                assert session is not None
                shell.feed(
                    DirectiveReceived(session, set_interval(data.draw(st.integers(0, 10**6))))
                )
            case "failed":
                if shell.operation is not None:  # the operation in flight is what failed
                    shell.operation = None
                    assert session is not None
                    shell.feed(TickFailed(session, shell.now_s, "CLOSED", "mid-write"))
        assert MIN_INTERVAL_MS <= state.status.interval_ms <= MAX_INTERVAL_MS
        assert not (state.status.connected and shell.open is None)
    # Once stopped, the state finishes as soon as what is in flight is back.
    shell.stopped = True
    shell.feed(Stop())
    for _ in range(3):
        if shell.operation is not None:
            answer, shell.operation = shell.operation, None
            shell.feed(answer(shell.now_s))
        elif shell.dialling is not None:
            session, shell.dialling = shell.dialling, None
            shell.feed(StreamOpened(session, shell.now_s))
    assert state.finished
    assert shell.open is None


def heartbeat() -> agent_pb2.CoordinatorDirective:
    return agent_pb2.CoordinatorDirective(heartbeat=agent_pb2.Heartbeat())


def tick(state: UplinkState, session: int, at_s: float) -> list[Command]:
    """One tick that samples and sends: the commands after the send."""
    state.handle(TickDue(session, at_s))
    commands = state.handle(Sampled(session, at_s, BATCH))
    if any(isinstance(command, SendBatch) for command in commands):
        return state.handle(BatchSent(session, at_s))
    return commands


def test_a_coordinator_silent_past_its_promised_heartbeats_is_left_for_the_next() -> None:
    """Review finding: an agent stayed on a SIGSTOPped coordinator, whose TCP connection
    stays open, while the other one marked its node unschedulable."""
    state, _ = new_state()
    session = connect(state, 0.0).session
    state.handle(StreamOpened(session, 0.0))
    promise = registered()
    promise.registered.heartbeat_ms = 2000
    state.handle(DirectiveReceived(session, promise))
    for second in range(1, 30):  # heartbeats every 2 s keep it
        if second % 2 == 0:
            state.handle(DirectiveReceived(session, heartbeat()))
        assert only(tick(state, session, float(second)), WaitForTick)
    assert state.status.heartbeats == 14
    # Then it freezes after the heartbeat of second 28: past three heartbeats (6 s) of
    # silence the stream ends.
    for second in range(30, 35):
        assert only(tick(state, session, float(second)), WaitForTick)
    ended = tick(state, session, 35.0)
    assert only(ended, CloseStream)
    assert only(ended, Backoff)
    assert "sent nothing for 7s" in state.status.last_error
    assert connect(state, 40.0).address == ADDRESSES[1]


def test_a_coordinator_that_promises_no_heartbeat_is_held_only_to_its_registration() -> None:
    state, _ = new_state()
    session = connect(state, 0.0).session
    state.handle(StreamOpened(session, 0.0))
    state.handle(DirectiveReceived(session, registered()))  # an older coordinator: no promise
    for second in range(1, 60):
        assert only(tick(state, session, float(second)), WaitForTick)
    # One that never answers the registration is left after as long.
    state, _ = new_state()
    session = connect(state, 0.0).session
    state.handle(StreamOpened(session, 0.0))
    for second in range(1, 6):
        assert only(tick(state, session, float(second)), WaitForTick)
    assert only(tick(state, session, 6.5), CloseStream)
