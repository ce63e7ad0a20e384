"""`kaiwo-gpu run [allocation flags] -- COMMAND...`: a command with a GPU share for its lifetime.

Allocates (pinned to this host unless told otherwise), starts COMMAND with the allocation's
environment, renews the lease while it runs, forwards signals to it, releases when it ends
and exits with its status, so a batch script or a plain host can use a fractional GPU.
"""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import replace

from kaiwo_gpu.cli import flags
from kaiwo_gpu.cli.client_commands import add_connection_flags, connection_settings, exit_code
from kaiwo_gpu.cli.request_flags import add_allocation_flags, request_from_flags
from kaiwo_gpu.cli.supervise import Interrupted, Supervisor, say
from kaiwo_gpu.client.blocking import Client, HeldAllocation
from kaiwo_gpu.client.support import (
    COORDINATOR_VARIABLE,
    DEFAULT_HELD_TTL_S,
    ClientSettings,
    with_lease,
    workload_environment,
)
from kaiwo_gpu.common import names
from kaiwo_gpu.common.errors import KaiwoGpuError, NoCapacityError, described
from kaiwo_gpu.common.models import AllocationRequest
from kaiwo_gpu.common.units import format_fraction

NODE_VARIABLE = "KAIWO_GPU_NODE"
EXIT_LEASE_LOST = 1
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
# A release at exit gets this long at most: Slurm's KillWait (30 s by default) follows SIGTERM.
RELEASE_TIMEOUT_S = 10.0
# Withdrawing an allocation placed while a signal stopped `run` gets this long.
WITHDRAW_TIMEOUT_S = 5.0
MAX_NODES_NAMED = 8


def add_run_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "run",
        help="run a command with a GPU share, released when it exits",
        description="Allocates, runs COMMAND with ROCR_VISIBLE_DEVICES, HSA_CU_MASK and "
        "KAIWO_GPU_* set, renews the lease while it runs and releases it when the command "
        "exits. SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1/2 are forwarded to the "
        "command's process group; kaiwo-gpu exits with the command's status (128+N if "
        "signal N ended it). If the lease is lost, the command gets SIGTERM, then SIGKILL "
        "after --kill-after. The share lands on this "
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


def run_command(args: argparse.Namespace) -> int:
    argv = list(args.argv[1:] if args.argv[:1] == ["--"] else args.argv)
    if not argv:
        say("error: no command given; put it after --")
        return 2
    supervisor = Supervisor(args.kill_after)
    request: AllocationRequest | None = None
    placed: list[HeldAllocation] = []
    try:
        settings = connection_settings(args)
    except KaiwoGpuError as error:
        say(described(error))
        return exit_code(error)
    with supervisor.installed():  # also while withdrawing: a second signal is handled too
        try:
            pinned = () if args.any_node or args.node else (local_node(),)
            request = with_lease(request_from_flags(args, default_nodes=pinned), DEFAULT_HELD_TTL_S)
            with Client(settings=settings) as client:
                try:
                    return _hold_and_run(client, request, argv, supervisor, args, placed=placed)
                except NoCapacityError as error:
                    say(described(error))
                    if pinned and (hint := _not_a_node(client, pinned[0])):
                        say(hint)
                    return exit_code(error)
        except Interrupted as stop:
            say(f"stopped by {signal.Signals(stop.signum).name}")
            if request is not None and not placed:  # stopped inside the allocate call
                _withdraw(settings, request)
            return 128 + stop.signum
        except argparse.ArgumentTypeError as error:
            say(f"error: {error}")
            return 2
        except KaiwoGpuError as error:
            say(described(error))
            return exit_code(error)


def _not_a_node(client: Client, node: str) -> str | None:
    """Why a share pinned to this host was refused when the host is no node of the
    cluster (a laptop against `kaiwo-gpu up`, a login node): None when it is one."""
    try:
        known = sorted(one.name for one in client.nodes())
    except KaiwoGpuError:
        return None
    if node in known:
        return None
    shown = ", ".join(names.escaped(name) for name in known[:MAX_NODES_NAMED]) or "none"
    if len(known) > MAX_NODES_NAMED:
        shown += f" and {len(known) - MAX_NODES_NAMED} more"
    return (
        f"this host ({node}, from ${NODE_VARIABLE} or the host name) is not a node of this "
        f"cluster, whose nodes are {shown}: pass --node NAME to pick one, or --any-node to "
        "let the coordinator choose"
    )


def _hold_and_run(
    client: Client,
    request: AllocationRequest,
    argv: list[str],
    supervisor: Supervisor,
    args: argparse.Namespace,
    *,
    placed: list[HeldAllocation],
) -> int:
    held = client.allocation(request, on_lost=supervisor.stop)
    placed.append(held)
    try:
        grants = held.allocation.gpus
        if not args.quiet:
            share = ",".join(sorted({format_fraction(g.granted_millis) for g in grants}))
            say(
                f"allocation {held.id} on {held.allocation.node}, "
                f"GPU {','.join(str(g.index) for g in grants)}, share {share}"
            )
        if held.lost:
            say(f"the allocation's lease is gone ({held.lost_reason}); not starting the command")
            return EXIT_LEASE_LOST
        environment = workload_environment(os.environ, held.allocation)
        environment[COORDINATOR_VARIABLE] = args.coordinator
        # The command proves the same identity with the same files, wherever it starts.
        environment.update(client.settings.credentials.environment())
        try:
            status = exit_status(supervisor.run(argv, environment))
        except FileNotFoundError:
            say(f"{argv[0]}: command not found")
            return EXIT_NOT_FOUND
        except PermissionError:
            say(f"{argv[0]}: permission denied")
            return EXIT_NOT_EXECUTABLE
        if supervisor.lost_reason:
            return status or EXIT_LEASE_LOST  # never report success for work without a share
        return status
    finally:
        _release(held, min(args.timeout, RELEASE_TIMEOUT_S))


def _release(held: HeldAllocation, timeout_s: float) -> None:
    """The command's status is what `run` reports; a failed release is only a warning."""
    try:
        held.release(timeout_s=timeout_s)
    except KaiwoGpuError as error:
        ttl_s = held.allocation.request.ttl_seconds
        say(f"could not release {held.id} ({error.message}); its lease expires within {ttl_s}s")


def _withdraw(settings: ClientSettings, request: AllocationRequest) -> None:
    """A signal cut the allocate call short: whatever it placed is found by its request id
    (replaying it) and released, so it does not stay held for a whole TTL."""
    quick = replace(settings, timeout_s=WITHDRAW_TIMEOUT_S)
    try:
        with Client(settings=quick) as client:
            client.release(client.allocate(request).id)
    except (KaiwoGpuError, Interrupted) as error:
        reason = error.message if isinstance(error, KaiwoGpuError) else "signalled again"
        say(f"could not withdraw request {request.request_id} ({reason}); its lease lapses")
