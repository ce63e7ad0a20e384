"""`kaiwo-gpu run [allocation flags] -- COMMAND...`: a command with a GPU share for its lifetime.

Allocates (pinned to this host unless told otherwise), starts COMMAND with the allocation's
environment, renews the lease while it runs, forwards signals to it, releases when it ends
and exits with its status, so a batch script or a plain host can use a fractional GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import FrameType

from kaiwo_gpu.cli import flags
from kaiwo_gpu.cli.client_commands import add_connection_flags, exit_code
from kaiwo_gpu.cli.request_flags import add_allocation_flags, request_from_flags
from kaiwo_gpu.common.client import Client
from kaiwo_gpu.common.client_support import (
    COORDINATOR_VARIABLE,
    DEFAULT_HELD_TTL_S,
    ClientSettings,
    with_lease,
)
from kaiwo_gpu.common.errors import KaiwoGpuError
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.common.units import format_fraction

NODE_VARIABLE = "KAIWO_GPU_NODE"
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,  # Slurm's --signal warns a job before its time limit this way
    signal.SIGUSR2,
)
# Ctrl-C and Ctrl-\ reach every process of the terminal's foreground group, the command too.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT)
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


def add_run_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "run",
        help="run a command with a GPU share, released when it exits",
        description="Allocates, runs COMMAND with ROCR_VISIBLE_DEVICES, HSA_CU_MASK and "
        "KAIWO_GPU_* set, renews the lease while it runs and releases it when the command "
        "exits. SIGTERM, SIGHUP, SIGUSR1/2 (and SIGINT not from the terminal) are forwarded "
        "to the command; kaiwo-gpu exits with the command's status (128+N if signal N "
        "ended it). If the lease is lost, the command gets SIGTERM. The share lands on this "
        f"host (${NODE_VARIABLE} or the host name) unless --node or --any-node says otherwise.",
        epilog="examples:\n"
        "  kaiwo-gpu run --fraction 0.5 --memory 48Gi -- python train.py\n"
        "  kaiwo-gpu run --node node-00 --fraction 0.25 --isolation cu-mask -- ./bench\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_allocation_flags(parser)
    parser.add_argument("--any-node", action="store_true", help="let the coordinator pick any node")
    parser.add_argument("--quiet", action="store_true", help="no line about the grant")
    add_connection_flags(parser)
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")


def local_node() -> str:
    name = os.environ.get(NODE_VARIABLE) or flags.default_node_name()
    return flags.node_name(name)


def exit_status(returncode: int) -> int:
    """A shell's convention: a command killed by signal N exits 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def terminal_delivers(signum: int) -> bool:
    """Whether the terminal sent this signal to the command as well as to us."""
    if signum not in TERMINAL_SIGNALS:
        return False
    try:
        terminal = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal: a batch job, a service, a test
    try:
        return os.tcgetpgrp(terminal) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(terminal)


class Forwarder:
    """Signal handlers that pass signals to the command, or remember them until it starts.

    Python runs signal handlers in the main thread only, so `handle` needs no lock; the
    renewal thread only ever asks the command to stop.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.child is None:
            self.pending.append(signum)
        elif not terminal_delivers(signum):
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def start(self, argv: list[str], environment: dict[str, str]) -> subprocess.Popen[bytes]:
        self.child = subprocess.Popen(argv, env=environment)
        for signum in self.pending:  # arrived while the command was being started
            self.handle(signum, None)
        return self.child

    def stop_child(self, reason: str) -> None:
        print(
            f"kaiwo-gpu run: the allocation's lease is gone ({reason}); stopping the command",
            file=sys.stderr,
        )
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle) for s in FORWARDED_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def run_command(args: argparse.Namespace) -> int:
    argv = list(args.argv[1:] if args.argv[:1] == ["--"] else args.argv)
    if not argv:
        print("kaiwo-gpu run: no command given; put it after --", file=sys.stderr)
        return 2
    forwarder = Forwarder()
    try:
        pinned = () if args.any_node or args.node else (local_node(),)
        request = with_lease(request_from_flags(args, default_nodes=pinned), DEFAULT_HELD_TTL_S)
        settings = ClientSettings(target=args.coordinator, timeout_s=args.timeout)
        with forwarder.installed(), Client(settings=settings) as client:
            return _hold_and_run(client, request, argv, forwarder, args)
    except argparse.ArgumentTypeError as error:
        print(f"kaiwo-gpu run: {error}", file=sys.stderr)
        return 2
    except KaiwoGpuError as error:
        print(f"kaiwo-gpu run: {error.message}", file=sys.stderr)
        return exit_code(error)


def _hold_and_run(
    client: Client,
    request: AllocationRequest,
    argv: list[str],
    forwarder: Forwarder,
    args: argparse.Namespace,
) -> int:
    with client.allocation(request, on_lost=forwarder.stop_child) as held:
        if forwarder.pending:  # told to stop while allocating: release, never start
            return 128 + forwarder.pending[0]
        grants = held.allocation.gpus
        if not args.quiet:
            share = ",".join(sorted({format_fraction(g.granted_millis) for g in grants}))
            print(
                f"kaiwo-gpu run: allocation {held.id} on {held.allocation.node}, "
                f"GPU {','.join(str(g.index) for g in grants)}, share {share}",
                file=sys.stderr,
            )
        environment = {**os.environ, **held.environment, COORDINATOR_VARIABLE: args.coordinator}
        try:
            child = forwarder.start(argv, environment)
        except FileNotFoundError:
            print(f"kaiwo-gpu run: {argv[0]}: command not found", file=sys.stderr)
            return EXIT_NOT_FOUND
        except PermissionError:
            print(f"kaiwo-gpu run: {argv[0]}: permission denied", file=sys.stderr)
            return EXIT_NOT_EXECUTABLE
        return exit_status(child.wait())
