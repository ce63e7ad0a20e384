"""`kaiwo-gpu top`: a live terminal view of nodes, GPUs and allocations.

The view is a pure function of an immutable `TopState`; only `run_top` talks to the coordinator
(through a `TopSource`) and to the terminal, so the screen can be tested without either.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kaiwo_gpu.cli.output import format_duration, format_expiry, isolation_name, now_utc
from kaiwo_gpu.common.errors import KaiwoGpuError
from kaiwo_gpu.common.names import escaped
from kaiwo_gpu.common.units import MILLIS_PER_GPU, format_fraction
from kaiwo_gpu.v1 import allocation_pb2, types_pb2

_WATCH_SETTLED_S = 3.0  # a stream open this long without failing counts as reconnected
_MAX_BACKOFF_S = 5.0
_MIN_NODES_TIMEOUT_S = 3.0
_BAR_WIDTH = 8
_HEALTH_STYLES: Mapping[int, tuple[str, str]] = {
    types_pb2.HEALTH_HEALTHY: ("healthy", "green"),
    types_pb2.HEALTH_DEGRADED: ("degraded", "yellow"),
    types_pb2.HEALTH_UNHEALTHY: ("unhealthy", "bold red"),
}


class TopSource(Protocol):
    """Where the view gets its data; both calls may raise KaiwoGpuError, and the watch may end."""

    def watch(self) -> AsyncIterator[allocation_pb2.AllocationEvent]:
        """Every current allocation as ADDED, then each change."""
        ...

    async def nodes(self) -> Sequence[types_pb2.NodeStatus]: ...


@dataclass(frozen=True)
class TopState:
    """What the screen shows: the latest allocations, nodes and errors. Never mutated."""

    allocations: Mapping[str, types_pb2.Allocation] = field(default_factory=dict)
    nodes: tuple[types_pb2.NodeStatus, ...] = ()
    nodes_at: datetime | None = None
    watch_error: str | None = None
    nodes_error: str | None = None

    def apply(self, event: allocation_pb2.AllocationEvent) -> TopState:
        """An event proves the stream is alive, so it also clears the watch error."""
        allocations = dict(self.allocations)
        if event.kind == allocation_pb2.AllocationEvent.KIND_ADDED:
            allocations[event.allocation.id] = event.allocation
        elif event.kind == allocation_pb2.AllocationEvent.KIND_REMOVED:
            allocations.pop(event.allocation.id, None)
        else:
            return replace(self, watch_error=None)
        return replace(self, allocations=allocations, watch_error=None)

    def reset_allocations(self) -> TopState:
        """At each (re)connect: the new stream re-sends every current allocation as ADDED,
        so anything released while disconnected must not linger."""
        return replace(self, allocations={})

    def with_nodes(self, nodes: Sequence[types_pb2.NodeStatus], at: datetime) -> TopState:
        return replace(self, nodes=tuple(nodes), nodes_at=at, nodes_error=None)

    def watch_failed(self, message: str) -> TopState:
        return replace(self, watch_error=message)

    def watch_settled(self) -> TopState:
        return replace(self, watch_error=None)

    def nodes_failed(self, message: str) -> TopState:
        return replace(self, nodes_error=message)


def render(state: TopState, now: datetime) -> RenderableType:
    """One frame: totals, status lines, the GPU table, notes and the allocation table."""
    nodes = sorted(state.nodes, key=lambda node: node.name)
    parts: list[RenderableType] = [_header(state, nodes, now), *_status_lines(state, now)]
    parts.append(_gpu_table(nodes) if nodes else Text("no nodes", style="dim"))
    parts.extend(_notes(nodes))
    parts.append(
        _allocation_table(state.allocations.values(), now)
        if state.allocations
        else Text("no allocations", style="dim")
    )
    return Group(*parts)


def _header(state: TopState, nodes: Sequence[types_pb2.NodeStatus], now: datetime) -> Text:
    gpus = [gpu for node in nodes for gpu in node.gpus]
    unschedulable = sum(1 for node in nodes if not node.schedulable)
    unhealthy = sum(1 for gpu in gpus if gpu.health == types_pb2.HEALTH_UNHEALTHY)
    allocated_millis = sum(gpu.allocated_millis for gpu in gpus)
    allocated_mib = sum(gpu.allocated_memory_mib for gpu in gpus)
    capacity_mib = sum(gpu.inventory.vram_mib for gpu in gpus)
    header = Text.assemble(("kaiwo-gpu top", "bold"), f"  {now:%H:%M:%S}  ")
    header.append(f"nodes {len(nodes)}")
    if unschedulable:
        header.append(f" ({unschedulable} unschedulable)", style="yellow")
    header.append(f"  GPUs {len(gpus)}")
    if unhealthy:
        header.append(f" ({unhealthy} unhealthy)", style="red")
    header.append(
        f"  allocations {len(state.allocations)}\n"
        f"allocated: compute {format_fraction(allocated_millis)}/{len(gpus)} GPUs"
        f"  memory {_gib(allocated_mib)}/{_gib(capacity_mib)} GiB"
    )
    return header


def _status_lines(state: TopState, now: datetime) -> list[Text]:
    lines = []
    if state.watch_error is not None:
        lines.append(Text(f"watch: {state.watch_error} (reconnecting)", style="bold red"))
    if state.nodes_error is not None:
        stale = ""
        if state.nodes_at is not None:
            stale = (
                f"; nodes as of {format_duration(int((now - state.nodes_at).total_seconds()))} ago"
            )
        lines.append(Text(f"nodes: {state.nodes_error} (retrying{stale})", style="bold red"))
    elif state.nodes_at is None:
        lines.append(Text("waiting for the coordinator", style="dim"))
    return lines


def _table(*headers: str, right: Collection[str], flexible: Collection[str]) -> Table:
    """Only the `flexible` (text) columns give way on a narrow screen; numbers never wrap."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in headers:
        table.add_column(
            header,
            justify="right" if header in right else "left",
            no_wrap=header not in flexible,
            overflow="ellipsis",
            max_width=32 if header in flexible else None,
        )
    return table


def _gpu_table(nodes: Sequence[types_pb2.NodeStatus]) -> Table:
    table = _table(
        *("NODE", "GPU", "MODEL", "HEALTH", "SHARE", "MEMORY", "USED", "UTIL", "HOTSPOT"),
        *("POWER", "ALLOCS"),
        right={"GPU", "MEMORY", "USED", "UTIL", "HOTSPOT", "POWER", "ALLOCS"},
        flexible={"NODE", "MODEL"},
    )
    for node in nodes:
        name = Text(escaped(node.name), style="" if node.schedulable else "yellow")
        if not node.gpus:
            table.add_row(name, "-", Text("no GPUs", style="dim"))
        for position, gpu in enumerate(sorted(node.gpus, key=lambda gpu: gpu.inventory.index)):
            # Unset telemetry means the agent did not report it, which is not the same as zero.
            sample, has = gpu.telemetry, gpu.telemetry.HasField
            table.add_row(
                name if position == 0 else "",
                str(gpu.inventory.index),
                escaped(gpu.inventory.model) or "-",
                _health(gpu.health),
                _share_bar(gpu.allocated_millis),
                f"{_gib(gpu.allocated_memory_mib)}/{_gib(gpu.inventory.vram_mib)} GiB",
                f"{_gib(sample.used_vram_mib)} GiB" if has("used_vram_mib") else "-",
                f"{sample.gfx_activity_percent}%" if has("gfx_activity_percent") else "-",
                f"{sample.hotspot_temperature_c:.0f}°C" if has("hotspot_temperature_c") else "-",
                f"{sample.socket_power_w:.0f} W" if has("socket_power_w") else "-",
                str(gpu.allocation_count),
            )
    return table


def _notes(nodes: Sequence[types_pb2.NodeStatus]) -> list[Text]:
    """Reasons live below the table, so a long one never squeezes the columns."""
    notes = []
    for node in nodes:
        if not node.schedulable:
            reason = node.unschedulable_reason or "no reason given"
            notes.append(Text(escaped(f"{node.name}: unschedulable: {reason}"), style="yellow"))
        for gpu in sorted(node.gpus, key=lambda gpu: gpu.inventory.index):
            if gpu.health in (types_pb2.HEALTH_DEGRADED, types_pb2.HEALTH_UNHEALTHY):
                word, style = _HEALTH_STYLES[gpu.health]
                reason = gpu.health_reason or "no reason given"
                notes.append(
                    Text(escaped(f"{node.name} GPU {gpu.inventory.index}: {word}: {reason}"), style)
                )
            if gpu.overcommit:
                notes.append(
                    Text(
                        escaped(
                            f"{node.name} GPU {gpu.inventory.index}: over-committed: "
                            f"{gpu.overcommit}"
                        ),
                        style="bold red",
                    )
                )
    return notes


def _allocation_table(allocations: Collection[types_pb2.Allocation], now: datetime) -> Table:
    table = _table(
        *("ALLOCATION", "OWNER", "NODE", "GPUS", "SHARE/GPU", "MEMORY/GPU", "ISOLATION"),
        "EXPIRES",
        right={"GPUS", "SHARE/GPU", "MEMORY/GPU", "EXPIRES"},
        flexible={"OWNER", "NODE"},
    )
    for allocation in sorted(allocations, key=lambda allocation: (allocation.node, allocation.id)):
        grants = sorted(allocation.gpus, key=lambda grant: grant.index)
        shares = dict.fromkeys(format_fraction(grant.granted_millis) for grant in grants)
        memory = dict.fromkeys(_gib(grant.granted_memory_mib) for grant in grants)
        table.add_row(
            escaped(allocation.id),
            escaped(allocation.request.owner) or "-",
            escaped(allocation.node),
            ",".join(str(grant.index) for grant in grants) or "-",
            ",".join(shares) or "-",
            f"{','.join(memory)} GiB" if memory else "-",
            isolation_name(allocation.isolation),
            format_expiry(allocation, now),
        )
    return table


def _health(health: int) -> Text:
    word, style = _HEALTH_STYLES.get(health, ("unknown", "dim"))
    return Text(word, style=style)


def _share_bar(millis: int) -> Text:
    filled = min(_BAR_WIDTH, (millis * _BAR_WIDTH + MILLIS_PER_GPU // 2) // MILLIS_PER_GPU)
    bar = Text("█" * filled, style="cyan")
    bar.append("·" * (_BAR_WIDTH - filled), style="dim")
    bar.append(f" {format_fraction(millis)}/1")
    return bar


def _gib(mib: int) -> str:
    whole, rest = divmod(mib, 1024)
    return str(whole) if rest == 0 else f"{mib / 1024:.1f}"


@dataclass
class _Cell:
    """The one mutable place: the watch task and the draw loop each swap in a new state."""

    state: TopState


async def run_top(
    source: TopSource,
    console: Console,
    *,
    refresh_s: float = 1.0,
    frames: int | None = None,
    clock: Callable[[], datetime] = now_utc,
) -> None:
    """Follows the allocation stream and polls nodes, drawing a frame every `refresh_s`.

    Stops after `frames` frames, or when cancelled if `frames` is None. Errors from the
    source become status lines and are retried; they never end the view.
    """
    cell = _Cell(TopState())
    nodes_timeout_s = max(refresh_s, _MIN_NODES_TIMEOUT_S)
    async with asyncio.TaskGroup() as tasks:
        watcher = tasks.create_task(_follow_allocations(source, cell, refresh_s))
        with _screen(console) as show:
            drawn = 0
            while frames is None or drawn < frames:
                if drawn:
                    await asyncio.sleep(refresh_s)
                result = await _poll_nodes(source, nodes_timeout_s)
                if isinstance(result, str):
                    cell.state = cell.state.nodes_failed(result)
                else:
                    cell.state = cell.state.with_nodes(result, clock())
                show(render(cell.state, clock()))
                drawn += 1
        watcher.cancel()


async def _poll_nodes(source: TopSource, timeout_s: float) -> Sequence[types_pb2.NodeStatus] | str:
    try:
        async with asyncio.timeout(timeout_s):
            return await source.nodes()
    except KaiwoGpuError as error:
        return error.message
    except TimeoutError:
        return f"no answer in {timeout_s:g}s"


async def _follow_allocations(source: TopSource, cell: _Cell, refresh_s: float) -> None:
    """Keeps `cell` in step with the watch stream, reconnecting with a bounded backoff."""
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        cell.state = cell.state.reset_allocations()
        healthy = False

        def settled() -> None:
            nonlocal healthy
            healthy = True
            cell.state = cell.state.watch_settled()

        timer = loop.call_later(_WATCH_SETTLED_S, settled)
        stream = source.watch()
        try:
            async for event in stream:
                cell.state = cell.state.apply(event)
                healthy = True
            failure = "the allocation stream ended"
        except KaiwoGpuError as error:
            failure = error.message
        finally:
            timer.cancel()
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        cell.state = cell.state.watch_failed(failure)
        failures = 1 if healthy else failures + 1
        await asyncio.sleep(min(refresh_s * 2 ** (failures - 1), _MAX_BACKOFF_S))


@contextlib.contextmanager
def _screen(console: Console) -> Iterator[Callable[[RenderableType], None]]:
    """Redraws in place on a terminal; elsewhere (a pipe, a test) prints each frame."""
    if not console.is_terminal:
        yield console.print
        return
    with Live(console=console, auto_refresh=False) as live:
        yield lambda frame: live.update(frame, refresh=True)
