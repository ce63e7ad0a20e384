"""`kaiwo-gpu coordinator` and `kaiwo-gpu up`: the commands that run services.

Flags fall back to KAIWO_GPU_* environment variables, so a systemd unit or a container can
configure the coordinator either way; the settings are built once here and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kaiwo_gpu.common.errors import FailedPreconditionError, InvalidArgumentError
from kaiwo_gpu.common.gpu_models import GPU_MODELS
from kaiwo_gpu.common.logs import configure_logging
from kaiwo_gpu.common.models import MAX_TTL_SECONDS
from kaiwo_gpu.common.units import parse_duration_s
from kaiwo_gpu.coordinator.inventory import synthetic_inventory_yaml
from kaiwo_gpu.coordinator.keys import DEFAULT_PREFIX, KeyLayout
from kaiwo_gpu.coordinator.local_etcd import LocalEtcd
from kaiwo_gpu.coordinator.server import Coordinator
from kaiwo_gpu.coordinator.settings import (
    DEFAULT_ETCD,
    DEFAULT_LISTEN,
    ENVIRONMENT,
    CoordinatorSettings,
)
from kaiwo_gpu.coordinator.store import parse_endpoints
from kaiwo_gpu.coordinator.strategies import BUILTIN_STRATEGIES, DEFAULT_STRATEGY

T = TypeVar("T")

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def _duration(text: str) -> int:
    try:
        seconds = parse_duration_s(text)
    except InvalidArgumentError:
        seconds = -1
    if not 0 <= seconds <= MAX_TTL_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration like 90s, 10m or 2h, up to 30d"
        )
    return seconds


def _address(text: str) -> str:
    if text.startswith("unix:") and len(text) > len("unix:"):
        return text  # a Unix socket path, as gRPC spells it
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port, e.g. 127.0.0.1:50051")
    return text


def _checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from one of our parsers: its InvalidArgumentError is a usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except InvalidArgumentError as error:
            raise argparse.ArgumentTypeError(error.message) from None

    return convert


def _one_of(what: str, choices: Iterable[str]) -> Callable[[str], str]:
    """An argparse type that also checks values from the environment (choices= does not)."""
    allowed = sorted(choices)

    def convert(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {what}; choose from {', '.join(allowed)}"
            )
        return text

    return convert


def _split_endpoints(text: str) -> tuple[str, ...]:
    endpoints = tuple(e.strip() for e in text.split(",") if e.strip())
    parse_endpoints(endpoints)
    return endpoints


_endpoints = _checked(_split_endpoints)
_prefix = _checked(lambda text: KeyLayout(text).prefix)
_strategy = _one_of("strategy", BUILTIN_STRATEGIES)
_log_format = _one_of("log format", ("console", "json"))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0-3600)")
    return value


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number 1-1000")
    return int(text)


def _env_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    help_text: str,
    *,
    default: str | None = None,
    parse: Callable[[str], object] = str,
) -> None:
    """A flag whose default comes from its KAIWO_GPU_* variable; both go through `parse`."""
    variable = ENVIRONMENT[flag.removeprefix("--").replace("-", "_")]
    shown = "; default %(default)s" if default is not None else ""
    parser.add_argument(
        flag,
        type=parse,
        default=os.environ.get(variable, default),
        help=f"{help_text} (${variable}{shown})",
    )


def _add_service_flags(parser: argparse.ArgumentParser) -> None:
    _env_flag(parser, "--listen", "host:port to serve on", default=DEFAULT_LISTEN, parse=_address)
    _env_flag(
        parser,
        "--strategy",
        f"default placement strategy: {', '.join(sorted(BUILTIN_STRATEGIES))}",
        default=DEFAULT_STRATEGY,
        parse=_strategy,
    )
    _env_flag(
        parser,
        "--default-ttl",
        "lease for requests without ttl_seconds, e.g. 90s or 10m; 0 = no lease",
        default="0",
        parse=_duration,
    )
    _env_flag(
        parser,
        "--log-format",
        "console for people, json for log collectors",
        default="console",
        parse=_log_format,
    )


def add_coordinator_parser(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "coordinator",
        help="serve the allocation API, keeping state in etcd",
        description="Serves Allocate, Release, KeepAlive, Get, List, Watch, ListNodes and "
        "GetClusterStats over gRPC, with gRPC health and reflection, keeping allocations "
        "in etcd. Several coordinators may share one etcd and never over-commit a GPU. "
        "SIGTERM stops it gracefully. Each flag can also come from the environment "
        "variable named in its help.",
        epilog="example: kaiwo-gpu coordinator --etcd 10.0.0.5:2379,10.0.0.6:2379 "
        "--inventory /etc/kaiwo-gpu/nodes.yaml --default-ttl 10m",
    )
    _env_flag(
        parser,
        "--etcd",
        "comma-separated etcd endpoints",
        default=DEFAULT_ETCD,
        parse=_endpoints,
    )
    _env_flag(parser, "--prefix", "etcd key prefix", default=DEFAULT_PREFIX, parse=_prefix)
    _env_flag(parser, "--inventory", "YAML file of static nodes to register")
    parser.add_argument(
        "--etcd-wait",
        type=_seconds,
        default=30.0,
        help="seconds to wait for etcd at startup before giving up (default %(default)s)",
    )
    _add_service_flags(parser)


def run_coordinator(args: argparse.Namespace) -> None:
    configure_logging(args.log_format)
    settings = CoordinatorSettings(
        listen=args.listen,
        etcd_endpoints=args.etcd,
        prefix=args.prefix,
        default_strategy=args.strategy,
        default_ttl_s=args.default_ttl or None,
        inventory=Path(args.inventory) if args.inventory else None,
        startup_wait_s=args.etcd_wait,
    )

    async def serve() -> None:
        # Built inside the loop: grpc.aio objects belong to the loop that creates them.
        await Coordinator(settings).run()

    asyncio.run(serve())


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kaiwo-gpu"


def add_up_parser(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "up",
        help="run a local cluster: etcd and a coordinator over simulated nodes",
        description="Starts a throwaway etcd on a free loopback port and a coordinator "
        "serving on --listen, with N static nodes of simulated GPUs registered, and runs "
        "until Ctrl-C. etcd's data lives under the state directory and is wiped at start.",
        epilog="example: kaiwo-gpu up --nodes 3 --gpus 8 --model MI300X",
    )
    parser.add_argument("--nodes", type=_count, default=3)
    parser.add_argument("--gpus", type=_count, default=8, help="GPUs per node")
    parser.add_argument("--model", choices=sorted(GPU_MODELS), default="MI300X")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=_state_dir(),
        help="where etcd keeps its data and log (default %(default)s)",
    )
    _add_service_flags(parser)


def run_up(args: argparse.Namespace) -> None:
    configure_logging(args.log_format)
    state_dir: Path = args.state_dir.resolve()  # the leftover check compares full paths
    state_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(state_dir / "up.lock"):
        data_dir = state_dir / "etcd"
        _stop_leftover_etcd(state_dir / "etcd.pid", data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        etcd = LocalEtcd(data_dir, log_path=state_dir / "etcd.log", pid_path=state_dir / "etcd.pid")
        try:
            etcd.start()
            inventory = state_dir / "nodes.yaml"
            inventory.write_text(synthetic_inventory_yaml(args.nodes, args.gpus, args.model))
            settings = CoordinatorSettings(
                listen=args.listen,
                etcd_endpoints=(etcd.endpoint,),
                default_strategy=args.strategy,
                default_ttl_s=args.default_ttl or None,
                inventory=inventory,
            )

            async def serve() -> None:
                coordinator = Coordinator(settings)
                await coordinator.run(on_ready=lambda: _print_next_steps(args, etcd, inventory))

            asyncio.run(serve())
        finally:
            etcd.stop()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One `kaiwo-gpu up` per state directory: a second one would wipe the first's etcd."""
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FailedPreconditionError(
                f"another kaiwo-gpu up is running with state directory {lock_path.parent}; "
                "stop it, or pass --state-dir"
            ) from None
        yield


def _stop_leftover_etcd(pid_path: Path, data_dir: Path) -> None:
    """Stops an etcd that an earlier `up` left running (it was killed before cleaning up)."""
    try:
        pid = int(pid_path.read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if f"--data-dir={data_dir}".encode() in command:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


def _print_next_steps(args: argparse.Namespace, etcd: LocalEtcd, inventory: Path) -> None:
    print(
        f"\nkaiwo-gpu is up: coordinator on {args.listen}, etcd on {etcd.endpoint}, "
        f"{args.nodes} nodes x {args.gpus} {args.model} (inventory {inventory}).\n"
        "Try (grpcurl, through server reflection):\n"
        f"  grpcurl -plaintext {args.listen} kaiwo_gpu.v1.AllocationService/GetClusterStats\n"
        f'  grpcurl -plaintext -d \'{{"request": {{"request_id": "try-1", '
        f'"fraction_millis": 250}}}}\' {args.listen} kaiwo_gpu.v1.AllocationService/Allocate\n'
        "Ctrl-C stops the coordinator and etcd.\n",
        flush=True,
    )
