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
from kaiwo_gpu.common.client import Client, HeldAllocation
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
EXIT_LEASE_LOST = 1
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
# A release at exit gets this long at most: Slurm's KillWait (30 s by default) follows SIGTERM.
RELEASE_TIMEOUT_S = 10.0


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
    parser.add_argument(
        "--kill-after",
        metavar="DURATION",
        type=flags.duration_within(1, 3600, "a duration like 10s (1s-1h)"),
        default=10,
        help="after a lost lease, SIGKILL the command this long after SIGTERM (default 10s)",
    )
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


class Interrupted(BaseException):
    """A signal that ends `run` before the command started or after it ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Forwarder:
    """Signal handling for the three phases of `run`.

    Before the command starts, a signal stops `run` at once (an allocation already placed is
    released, or its lease lapses); while it runs, signals go to the command; after it ended,
    a signal abandons the release (the lease lapses). Python runs signal handlers in the
    main thread only, so the handler needs no lock.
    """

    def __init__(self, kill_after_s: float) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.lost_reason = ""
        self._kill_after_s = kill_after_s
        self._starting = False
        self._pending: list[int] = []

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self._starting:  # inside Popen: neither a command to forward to nor safe to stop
            self._pending.append(signum)
            return
        child = self.child
        if child is None or child.returncode is not None:
            raise Interrupted(signum)
        if not terminal_delivers(signum):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def start(self, argv: list[str], environment: dict[str, str]) -> subprocess.Popen[bytes]:
        self._starting = True
        try:
            self.child = subprocess.Popen(argv, env=environment)
        finally:
            self._starting = False
        for signum in self._pending:  # arrived while the command was being started
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)
        return self.child

    def lease_lost(self, reason: str) -> None:
        """From the renewal thread: the share may go to others, so the command must stop."""
        self.lost_reason = reason
        child = self.child
        if child is None or child.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        with contextlib.suppress(OSError):  # stderr may be a closed pipe; stopping matters more
            print(
                f"kaiwo-gpu run: the allocation's lease is gone ({reason}); stopping the "
                f"command (SIGKILL in {self._kill_after_s:g}s if it does not exit)",
                file=sys.stderr,
            )
        try:
            child.wait(self._kill_after_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.kill()

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
        print("kaiwo-gpu run: error: no command given; put it after --", file=sys.stderr)
        return 2
    forwarder = Forwarder(args.kill_after)
    try:
        with forwarder.installed():
            pinned = () if args.any_node or args.node else (local_node(),)
            request = request_from_flags(args, default_nodes=pinned)
            settings = ClientSettings(target=args.coordinator, timeout_s=args.timeout)
            with Client(settings=settings) as client:
                return _hold_and_run(
                    client, with_lease(request, DEFAULT_HELD_TTL_S), argv, forwarder, args
                )
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"kaiwo-gpu run: stopped by {name}", file=sys.stderr)
        return 128 + stop.signum
    except argparse.ArgumentTypeError as error:
        print(f"kaiwo-gpu run: error: {error}", file=sys.stderr)
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
    held = client.allocation(request, on_lost=forwarder.lease_lost)
    try:
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
        status = exit_status(child.wait())
        if forwarder.lost_reason:
            return status or EXIT_LEASE_LOST  # never report success for work without a share
        return status
    finally:
        _release(held, min(args.timeout, RELEASE_TIMEOUT_S))


def _release(held: HeldAllocation, timeout_s: float) -> None:
    """The command's status is what `run` reports; a failed release is only a warning."""
    try:
        held.release(timeout_s=timeout_s)
    except KaiwoGpuError as error:
        print(
            f"kaiwo-gpu run: could not release {held.id} ({error.message}); "
            f"its lease expires within {held.allocation.request.ttl_seconds}s",
            file=sys.stderr,
        )
