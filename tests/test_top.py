"""`kaiwo-gpu top`: the state, the rendered frame, and the shell over an in-process fake source."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from kaiwo_gpu.cli.top import TopState, render, run_top
from kaiwo_gpu.common.errors import KaiwoGpuError, UnavailableError
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
GIB = 1024
ADDED = allocation_pb2.AllocationEvent.KIND_ADDED
REMOVED = allocation_pb2.AllocationEvent.KIND_REMOVED


def gpu(
    index: int,
    *,
    allocated_millis: int = 0,
    allocated_gib: int = 0,
    health: types_pb2.Health.ValueType = types_pb2.HEALTH_HEALTHY,
    reason: str = "",
    count: int = 0,
    telemetry: types_pb2.GpuTelemetry | None = None,
) -> types_pb2.GpuStatus:
    return types_pb2.GpuStatus(
        inventory=types_pb2.GpuInventory(
            uuid=f"GPU-{index}", index=index, model="MI300X", vram_mib=192 * GIB, compute_units=304
        ),
        health=health,
        health_reason=reason,
        allocated_millis=allocated_millis,
        allocated_memory_mib=allocated_gib * GIB,
        free_millis=1000 - allocated_millis,
        free_memory_mib=(192 - allocated_gib) * GIB,
        allocation_count=count,
        telemetry=telemetry,
    )


def node(
    name: str, *gpus: types_pb2.GpuStatus, schedulable: bool = True, reason: str = ""
) -> types_pb2.NodeStatus:
    return types_pb2.NodeStatus(
        name=name, schedulable=schedulable, unschedulable_reason=reason, gpus=gpus
    )


def allocation(
    allocation_id: str,
    node_name: str = "node-a",
    *,
    indices: Sequence[int] = (0,),
    millis: int = 500,
    memory_gib: int = 96,
    owner: str = "slurm/42",
    expires_in: timedelta | None = None,
) -> types_pb2.Allocation:
    record = types_pb2.Allocation(
        id=allocation_id,
        request=types_pb2.AllocationRequest(owner=owner),
        node=node_name,
        gpus=[
            types_pb2.GpuGrant(
                uuid=f"GPU-{index}",
                index=index,
                granted_millis=millis,
                granted_memory_mib=memory_gib * GIB,
            )
            for index in indices
        ],
        isolation=types_pb2.ISOLATION_CU_MASK,
        strategy="best-fit",
    )
    if expires_in is not None:
        record.expires_at.FromDatetime(NOW + expires_in)
    return record


def event(
    kind: allocation_pb2.AllocationEvent.Kind.ValueType, record: types_pb2.Allocation
) -> allocation_pb2.AllocationEvent:
    return allocation_pb2.AllocationEvent(kind=kind, allocation=record, revision=1)


def text_of(state: TopState, now: datetime = NOW) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=120, color_system=None).print(render(state, now))
    return buffer.getvalue()


CLUSTER = (
    node(
        "node-b",
        gpu(1, health=types_pb2.HEALTH_UNHEALTHY, reason="hotspot 112 C over the 105 C limit"),
        gpu(0),
        schedulable=False,
        reason="agent lease expired",
    ),
    node(
        "node-a",
        gpu(
            0,
            allocated_millis=500,
            allocated_gib=96,
            count=1,
            telemetry=types_pb2.GpuTelemetry(
                gfx_activity_percent=37, hotspot_temperature_c=71.4, socket_power_w=412.0
            ),
        ),
        gpu(1, allocated_millis=250, allocated_gib=48, count=1),
    ),
)


# --- state -------------------------------------------------------------------------------


def test_added_then_removed_leaves_nothing_and_never_mutates() -> None:
    empty = TopState()
    with_one = empty.apply(event(ADDED, allocation("a1")))
    assert set(with_one.allocations) == {"a1"}
    assert not empty.allocations
    assert not with_one.apply(event(REMOVED, allocation("a1"))).allocations
    assert set(with_one.allocations) == {"a1"}


def test_reset_at_reconnect_drops_allocations_released_while_disconnected() -> None:
    before = (
        TopState().apply(event(ADDED, allocation("kept"))).apply(event(ADDED, allocation("gone")))
    )
    after = before.watch_failed("stream ended").reset_allocations()
    after = after.apply(event(ADDED, allocation("kept")))
    assert set(after.allocations) == {"kept"}


def test_errors_clear_when_their_source_answers_again() -> None:
    state = TopState().watch_failed("down").nodes_failed("no route")
    assert state.reset_allocations().watch_error == "down"
    assert state.apply(event(ADDED, allocation("a1"))).watch_error is None
    assert state.watch_settled().watch_error is None
    refreshed = state.with_nodes(CLUSTER, NOW)
    assert refreshed.nodes_error is None
    assert refreshed.nodes_at == NOW
    assert refreshed.watch_error == "down"


def test_an_unknown_event_kind_changes_no_allocation() -> None:
    state = TopState().apply(event(ADDED, allocation("a1")))
    unknown = allocation_pb2.AllocationEvent(kind=allocation_pb2.AllocationEvent.KIND_UNSPECIFIED)
    assert state.apply(unknown).allocations == state.allocations


# --- render ------------------------------------------------------------------------------


def test_frame_shows_totals_gpus_health_and_shares() -> None:
    state = TopState().with_nodes(CLUSTER, NOW)
    text = text_of(state)
    assert "nodes 2 (1 unschedulable)" in text
    assert "GPUs 4 (1 unhealthy)" in text
    assert "compute 0.75/4 GPUs" in text
    assert "memory 144/768 GiB" in text
    assert "0.5/1" in text
    assert "0.25/1" in text
    assert "96/192 GiB" in text
    assert "37%" in text
    assert "71°C" in text
    assert "412 W" in text
    assert "healthy" in text
    assert "node-b GPU 1: unhealthy: hotspot 112 C over the 105 C limit" in text
    assert "node-b: unschedulable: agent lease expired" in text
    assert text.index("node-a") < text.index("node-b")


def test_unreported_telemetry_is_a_dash_not_zero() -> None:
    state = TopState().with_nodes([node("node-a", gpu(0))], NOW)
    row = next(line for line in text_of(state).splitlines() if "MI300X" in line)
    assert "0%" not in row
    assert "0°C" not in row
    assert row.count(" - ") >= 3


def test_frame_lists_allocations_in_order_with_full_ids_at_120_columns() -> None:
    long_id = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    state = (
        TopState()
        .with_nodes(CLUSTER, NOW)
        .apply(event(ADDED, allocation("a2", "node-b", indices=(1, 0), millis=250, memory_gib=48)))
        .apply(event(ADDED, allocation(long_id, expires_in=timedelta(minutes=4, seconds=5))))
    )
    text = text_of(state)
    assert "allocations 2" in text
    assert long_id in text
    assert "4m05s" in text
    assert "cu-mask" in text
    assert "slurm/42" in text
    assert "0,1" in text
    assert "48 GiB" in text
    assert text.index(long_id) < text.index("a2 ")
    assert max(len(line) for line in text.splitlines()) <= 120


def test_error_lines_say_what_failed_and_how_old_the_nodes_are() -> None:
    state = (
        TopState()
        .with_nodes(CLUSTER, NOW)
        .watch_failed("coordinator unreachable")
        .nodes_failed("deadline exceeded")
    )
    text = text_of(state, NOW + timedelta(seconds=75))
    assert "watch: coordinator unreachable (reconnecting)" in text
    assert "nodes: deadline exceeded (retrying; nodes as of 1m15s ago)" in text


def test_empty_state_says_it_is_waiting() -> None:
    text = text_of(TopState())
    assert "waiting for the coordinator" in text
    assert "no nodes" in text
    assert "no allocations" in text


# --- run_top -----------------------------------------------------------------------------

# A stream step: an event to send, an error to raise, or a number of nodes() calls to wait for.
Step = allocation_pb2.AllocationEvent | KaiwoGpuError | int


class FakeSource:
    """Each watch() plays the next script; the last one stays open once played out."""

    def __init__(
        self,
        streams: Sequence[Sequence[Step]],
        nodes: Sequence[types_pb2.NodeStatus] = CLUSTER,
        node_errors: Sequence[KaiwoGpuError] = (),
    ) -> None:
        self.streams = list(streams)
        self.node_list = list(nodes)
        self.node_errors = list(node_errors)
        self.nodes_calls = 0
        self.watch_calls = 0
        self.closed_streams = 0
        self.polled = asyncio.Event()

    async def nodes(self) -> Sequence[types_pb2.NodeStatus]:
        self.nodes_calls += 1
        self.polled.set()
        if self.node_errors:
            raise self.node_errors.pop(0)
        return self.node_list

    async def wait_for_nodes_calls(self, count: int) -> None:
        while self.nodes_calls < count:
            self.polled.clear()
            await self.polled.wait()

    async def watch(self) -> AsyncIterator[allocation_pb2.AllocationEvent]:
        script = self.streams[min(self.watch_calls, len(self.streams) - 1)]
        last = self.watch_calls >= len(self.streams) - 1
        self.watch_calls += 1
        try:
            for step in script:
                if isinstance(step, KaiwoGpuError):
                    raise step
                if isinstance(step, int):
                    await self.wait_for_nodes_calls(step)
                else:
                    yield step
            if last:
                await asyncio.Event().wait()
        finally:
            self.closed_streams += 1


async def frames_of(source: FakeSource, frames: int) -> list[str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None)
    await run_top(source, console, refresh_s=0.01, frames=frames, clock=lambda: NOW)
    return ["kaiwo-gpu top" + frame for frame in buffer.getvalue().split("kaiwo-gpu top")[1:]]


async def test_a_frame_shows_an_allocation_added_after_start() -> None:
    source = FakeSource([[event(ADDED, allocation("first")), 2, event(ADDED, allocation("later"))]])
    frames = await frames_of(source, 5)
    assert len(frames) == 5
    assert "later" not in frames[0]
    assert "first" in frames[-1]
    assert "later" in frames[-1]
    assert "node-a" in frames[-1]
    assert source.closed_streams == 1


async def test_a_failing_watch_shows_the_error_then_recovers() -> None:
    source = FakeSource(
        [[UnavailableError("coordinator unreachable")], [3, event(ADDED, allocation("a1"))]]
    )
    frames = await frames_of(source, 6)
    assert any("watch: coordinator unreachable" in frame for frame in frames)
    assert "a1" in frames[-1]
    assert "coordinator unreachable" not in frames[-1]
    assert source.watch_calls == 2


async def test_a_reconnect_drops_allocations_released_while_the_stream_was_down() -> None:
    source = FakeSource(
        [
            [event(ADDED, allocation("kept")), event(ADDED, allocation("gone")), 2],
            [event(ADDED, allocation("kept"))],
        ]
    )
    frames = await frames_of(source, 6)
    assert any("gone" in frame for frame in frames)
    assert "kept" in frames[-1]
    assert "gone" not in frames[-1]
    assert "stream ended" not in frames[-1]


async def test_failing_node_polls_show_an_error_line_and_are_retried() -> None:
    source = FakeSource([[]], node_errors=[UnavailableError("no route to coordinator")])
    frames = await frames_of(source, 3)
    assert "nodes: no route to coordinator (retrying)" in frames[0]
    assert "node-a" not in frames[0]
    assert "node-a" in frames[-1]
    assert "no route" not in frames[-1]
    assert source.nodes_calls == 3


async def test_without_a_frame_limit_it_runs_until_cancelled_and_closes_the_stream() -> None:
    source = FakeSource([[event(ADDED, allocation("a1"))]])
    console = Console(file=io.StringIO(), width=120, color_system=None)
    task = asyncio.create_task(run_top(source, console, refresh_s=0.01))
    await source.wait_for_nodes_calls(3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed_streams == 1


async def test_on_a_terminal_it_redraws_in_place() -> None:
    source = FakeSource([[event(ADDED, allocation("a1"))]])
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, force_terminal=True, color_system=None)
    await run_top(source, console, refresh_s=0.01, frames=3, clock=lambda: NOW)
    output = buffer.getvalue()
    assert "\x1b[" in output  # cursor movement: the frame was redrawn, not appended
    assert "node-a" in output
    assert "a1" in output
