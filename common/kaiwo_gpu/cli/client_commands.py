"""The commands that talk to a coordinator: allocate, release, get, list, nodes, watch, stats,
top and node remove.

Each parses its flags, makes one or a few client calls and prints the answer as a table,
JSON, YAML or KEY=value lines. Failures exit with a status scripts can rely on (EXIT_CODES).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from kaiwo_gpu.cli import flags
from kaiwo_gpu.cli.output import (
    EVENT_HEADERS,
    EVENT_WIDTHS,
    OutputFormat,
    allocation_details,
    allocations_table,
    environment_lines,
    event_row,
    fixed_columns,
    message_data,
    nodes_table,
    now_utc,
    stats_table,
    structured,
)
from kaiwo_gpu.cli.request_flags import (
    add_allocation_flags,
    key_value,
    request_from_flags,
    request_from_pod_flags,
)
from kaiwo_gpu.client.blocking import Client
from kaiwo_gpu.client.support import (
    COORDINATOR_VARIABLE,
    DEFAULT_COORDINATOR,
    ClientSettings,
    coordinator_target,
)
from kaiwo_gpu.common.annotations import AUTO_UNIT_RULE, AmdGpuUnit
from kaiwo_gpu.common.errors import InvalidArgumentError, KaiwoGpuError, described
from kaiwo_gpu.v1 import types_pb2

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_CODES = {
    "INVALID_ARGUMENT": 2,
    "NOT_FOUND": 3,
    "RESOURCE_EXHAUSTED": 4,
    "UNAVAILABLE": 5,
    "DEADLINE_EXCEEDED": 5,
    "ALREADY_EXISTS": 6,
    "ABORTED": 6,
}
"""gRPC status of a failed call -> exit status; anything else exits 1."""

AMD_GPU_UNIT_VARIABLE = "KAIWO_GPU_AMD_GPU_UNIT"
timeout = flags.duration_within(1, 3600, "a timeout like 30s or 2m (1s-1h)")


def exit_code(error: KaiwoGpuError) -> int:
    return EXIT_CODES.get(error.status_code, 1)


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator",
        metavar="TARGET",
        type=flags.checked(coordinator_target),
        default=os.environ.get(COORDINATOR_VARIABLE, "").strip() or DEFAULT_COORDINATOR,
        help=f"coordinator host:port, a gRPC target, or IPv4 host:port list "
        f"(${COORDINATOR_VARIABLE}; default {DEFAULT_COORDINATOR})",
    )
    parser.add_argument(
        "--timeout",
        metavar="DURATION",
        type=timeout,
        default=30,
        help="how long a call may take, retries included (default 30s)",
    )
    flags.add_credential_flags(parser)


def connection_settings(args: argparse.Namespace) -> ClientSettings:
    """The client settings the connection flags describe."""
    return ClientSettings(
        target=args.coordinator, timeout_s=args.timeout, credentials=flags.credentials_of(args)
    )


def add_output_flag(parser: argparse.ArgumentParser, *extra: OutputFormat) -> None:
    choices = [OutputFormat.TABLE, OutputFormat.JSON, OutputFormat.YAML, *extra]
    parser.add_argument(
        "-o",
        "--output",
        metavar="FORMAT",
        type=flags.one_of("output format", choices),
        default=OutputFormat.TABLE.value,
        help=f"{' | '.join(choices)} (default table)",
    )


def _answer_flags(parser: argparse.ArgumentParser, *extra: OutputFormat) -> None:
    """How a command prints and whom it asks: every client command but `top` takes both."""
    add_output_flag(parser, *extra)
    add_connection_flags(parser)


def _filter_flags(parser: argparse.ArgumentParser, *, owner_and_node: bool, label: bool) -> None:
    if owner_and_node:
        parser.add_argument("--owner", default="")
        parser.add_argument("--node", default="")
    if label:
        parser.add_argument(
            "-l", "--label", metavar="K=V", type=key_value, action="append", default=[]
        )


def add_client_parsers(commands: Subcommands) -> None:
    allocate = commands.add_parser(
        "allocate",
        help="ask for a share of a GPU and print what was granted",
        description="Places a request and prints the grant: node, GPUs, share and the "
        "environment to start work with. Without --ttl the allocation lasts until released.",
        epilog="examples:\n"
        "  kaiwo-gpu allocate --fraction 0.5 --memory 4Gi --ttl 10m\n"
        "  kaiwo-gpu allocate --fraction 0.25 --count 2 --isolation cu-mask -o json\n"
        "  kaiwo-gpu allocate --from-pod pod.yaml\n"
        '  eval "$(kaiwo-gpu allocate --fraction 0.5 -o env | sed s/^/export\\ /)"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_allocation_flags(allocate)
    allocate.add_argument(
        "--from-pod",
        metavar="FILE",
        help="read the request from a pod (or workload) manifest; - for stdin",
    )
    allocate.add_argument(
        "--amd-gpu-unit",
        metavar="UNIT",
        type=flags.one_of("amd.com/gpu unit", [u.value for u in AmdGpuUnit]),
        default=os.environ.get(AMD_GPU_UNIT_VARIABLE, AmdGpuUnit.AUTO.value),
        help="what one amd.com/gpu means: auto (the default), milli or device; "
        f"{AUTO_UNIT_RULE} (${AMD_GPU_UNIT_VARIABLE})",
    )
    _answer_flags(allocate, OutputFormat.ENV)

    release = commands.add_parser(
        "release",
        help="release allocations by id, or all of one owner",
        epilog="examples:\n  kaiwo-gpu release 3f2a...\n  kaiwo-gpu release --owner slurm/1234",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    release.add_argument("ids", nargs="*", metavar="ID")
    release.add_argument("--owner", help="release every allocation this owner holds")
    _answer_flags(release)

    get = commands.add_parser(
        "get",
        help="show one allocation",
        epilog="example: kaiwo-gpu get 3f2a... -o yaml",
    )
    get.add_argument("id", metavar="ID")
    _answer_flags(get, OutputFormat.ENV)

    listing = commands.add_parser(
        "list",
        help="list allocations",
        epilog="example: kaiwo-gpu list --node node-00 -l team=ml -o json",
    )
    _filter_flags(listing, owner_and_node=True, label=True)
    _answer_flags(listing)

    nodes = commands.add_parser(
        "nodes",
        help="per-GPU capacity, free share, health, utilization and temperature",
        epilog="example: kaiwo-gpu nodes -l zone=a",
    )
    _filter_flags(nodes, owner_and_node=False, label=True)
    _answer_flags(nodes)

    watch = commands.add_parser(
        "watch",
        help="print allocations as they come and go",
        description="Prints every current allocation as ADDED, then each change. With -o json "
        "each event is one line of JSON.",
        epilog="example: kaiwo-gpu watch --node node-00 --events 10 -o json",
    )
    _filter_flags(watch, owner_and_node=True, label=False)
    watch.add_argument(
        "--events", type=flags.whole_number(1, 10**9, "a count"), help="stop after N events"
    )
    _answer_flags(watch)

    top = commands.add_parser(
        "top",
        help="a live view of nodes, GPUs and allocations",
        description="Redraws every --refresh from the allocation stream and ListNodes: per GPU "
        "the allocated share against capacity, memory, utilization, temperature and health; "
        "then every allocation. Ctrl-C quits.",
        epilog="examples:\n  kaiwo-gpu top\n  kaiwo-gpu top --once   # one frame, e.g. in a pipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "--refresh",
        metavar="INTERVAL",
        type=flags.interval_ms,
        default=1000,
        help="how often to redraw, e.g. 2s or 500ms (default 1s)",
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    add_connection_flags(top)

    stats = commands.add_parser("stats", help="cluster totals", epilog="example: kaiwo-gpu stats")
    _answer_flags(stats)

    node = commands.add_parser("node", help="manage node records: remove one that is gone")
    actions = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    remove = actions.add_parser(
        "remove",
        help="remove the record of a node whose agent is gone and that holds no allocation",
        description="Deletes node records for good: a node whose agent is not connected (its "
        "node lease has expired), that no allocation names and that no inventory file "
        "lists. An agent that connects again registers its node anew.",
        epilog="example: kaiwo-gpu node remove gpu-17 gpu-18",
    )
    remove.add_argument("nodes", nargs="+", metavar="NODE", type=flags.node_name)
    _answer_flags(remove)


def _client(args: argparse.Namespace) -> Client:
    return Client(settings=connection_settings(args))


def _print_allocation(allocation: types_pb2.Allocation, output: OutputFormat) -> None:
    if output is OutputFormat.TABLE:
        print(allocation_details(allocation, now_utc()))
    elif output is OutputFormat.ENV:
        print("\n".join(environment_lines(allocation)))
    else:
        print(structured(message_data(allocation), output))


def _print_allocations(allocations: Sequence[types_pb2.Allocation], output: OutputFormat) -> None:
    if output is OutputFormat.TABLE:
        print(allocations_table(allocations, now_utc()))
    else:
        print(structured({"allocations": [message_data(a) for a in allocations]}, output))


def run_client_command(args: argparse.Namespace) -> int:
    """Runs one client command; returns its exit status."""
    output = OutputFormat(getattr(args, "output", OutputFormat.TABLE.value))
    try:
        with _client(args) as client:
            if args.command == "allocate":
                from_pod = args.from_pod is not None
                request = request_from_pod_flags(args) if from_pod else request_from_flags(args)
                _print_allocation(client.allocate(request), output)
            elif args.command == "release":
                return _release(client, args, output)
            elif args.command == "get":
                _print_allocation(client.get(args.id), output)
            elif args.command == "list":
                found = client.list(owner=args.owner, node=args.node, labels=dict(args.label))
                _print_allocations(found, output)
            elif args.command == "nodes":
                found_nodes = client.nodes(labels=dict(args.label))
                if output is OutputFormat.TABLE:
                    print(nodes_table(found_nodes))
                else:
                    print(structured({"nodes": [message_data(n) for n in found_nodes]}, output))
            elif args.command == "stats":
                stats = client.stats()
                if output is OutputFormat.TABLE:
                    print(stats_table(stats))
                else:
                    print(structured(message_data(stats), output))
            elif args.command == "watch":
                _watch(client, args, output)
            elif args.command == "top":
                _top(client, args)
            elif args.command == "node":
                return _remove_nodes(client, args, output)
    except KaiwoGpuError as error:
        command = "node remove" if args.command == "node" else args.command
        print(f"kaiwo-gpu {command}: {described(error)}", file=sys.stderr)
        return exit_code(error)
    return 0


T = TypeVar("T")


def _each(label: str, names: Sequence[str], act: Callable[[str], T | None]) -> tuple[list[T], int]:
    """Does `act` for each name once; a failure is reported (`label: name: why`) and the
    rest still go. What they returned (None left out), and the first failure's status."""
    done: list[T] = []
    status = 0
    for name in dict.fromkeys(names):
        try:
            result = act(name)
        except KaiwoGpuError as error:
            print(f"kaiwo-gpu {label}: {name}: {described(error)}", file=sys.stderr)
            status = status or exit_code(error)
            continue
        if result is not None:
            done.append(result)
    return done, status


def _release(client: Client, args: argparse.Namespace, output: OutputFormat) -> int:
    """Releases each id it can (a retried release that found it gone counts as done)."""
    if not args.ids and not args.owner:
        raise InvalidArgumentError("ID", "", "one or more allocation ids, or --owner")
    ids = list(dict.fromkeys(args.ids))
    if args.owner:
        ids.extend(a.id for a in client.list(owner=args.owner) if a.id not in ids)
    released, status = _each("release", ids, client.release)
    if released or not status:
        _print_allocations(released, output)
    return status


def _remove_nodes(client: Client, args: argparse.Namespace, output: OutputFormat) -> int:
    removed, status = _each("node remove", args.nodes, client.remove_node)
    names = [node.name for node in removed]
    if output is OutputFormat.TABLE:
        for name in names:
            print(f"removed node {name}")
    else:
        print(structured({"removed": names}, output))
    return status


def _watch(client: Client, args: argparse.Namespace, output: OutputFormat) -> None:
    if output is OutputFormat.TABLE:
        print(fixed_columns(EVENT_HEADERS, EVENT_WIDTHS), flush=True)
    for seen, event in enumerate(client.watch(owner=args.owner, node=args.node), start=1):
        if output is OutputFormat.TABLE:
            print(fixed_columns(event_row(event, now_utc()), EVENT_WIDTHS), flush=True)
        else:
            print(structured(message_data(event), output, stream=True), flush=True)
        if args.events is not None and seen >= args.events:
            return


def _top(client: Client, args: argparse.Namespace) -> None:
    from rich.console import Console

    from kaiwo_gpu.cli.top import TopState, render, run_top
    from kaiwo_gpu.client.aio import AsyncClient

    console = Console()
    if args.once:
        allocations = {a.id: a for a in client.list()}
        state = TopState(allocations=allocations).with_nodes(client.nodes(), now_utc())
        console.print(render(state, now_utc()))
        return

    async def follow() -> None:
        # Short calls: top shows an unreachable coordinator now and keeps trying each frame.
        settings = replace(client.settings, timeout_s=min(client.settings.timeout_s, 2.0))
        async with AsyncClient(settings=settings) as live:
            await run_top(live, console, refresh_s=args.refresh / 1000)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one leaves top
        asyncio.run(follow())
