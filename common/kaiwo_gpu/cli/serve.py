"""`kaiwo-gpu coordinator`, `kaiwo-gpu agent` and `kaiwo-gpu up`: the commands that run services.

Flags fall back to KAIWO_GPU_* environment variables, so a systemd unit or a container can
configure the coordinator either way; the settings are built once here and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import functools
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kaiwo_gpu.agent.service import BACKENDS as AGENT_BACKENDS
from kaiwo_gpu.agent.service import ENVIRONMENT as AGENT_ENVIRONMENT
from kaiwo_gpu.agent.service import AgentSettings, NodeAgent, run_until_signalled
from kaiwo_gpu.cli import flags
from kaiwo_gpu.common.errors import FailedPreconditionError
from kaiwo_gpu.common.gpu_models import GPU_MODELS
from kaiwo_gpu.common.logs import configure_logging
from kaiwo_gpu.coordinator.keys import DEFAULT_PREFIX
from kaiwo_gpu.coordinator.local_etcd import LocalEtcd
from kaiwo_gpu.coordinator.server import Coordinator
from kaiwo_gpu.coordinator.settings import (
    DEFAULT_ETCD,
    DEFAULT_LISTEN,
    CoordinatorSettings,
)
from kaiwo_gpu.coordinator.strategies import BUILTIN_STRATEGIES, DEFAULT_STRATEGY

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def _add_service_flags(parser: argparse.ArgumentParser) -> None:
    flags.env_flag(
        parser, "--listen", "host:port to serve on", default=DEFAULT_LISTEN, parse=flags.address
    )
    flags.env_flag(
        parser,
        "--strategy",
        f"default placement strategy: {', '.join(sorted(BUILTIN_STRATEGIES))}",
        default=DEFAULT_STRATEGY,
        parse=flags.strategy,
    )
    flags.env_flag(
        parser,
        "--default-ttl",
        "lease for requests without ttl_seconds, e.g. 90s or 10m; 0 = no lease",
        default="0",
        parse=flags.duration,
    )
    flags.env_flag(
        parser,
        "--log-format",
        "console for people, json for log collectors",
        default="console",
        parse=flags.log_format,
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
    flags.env_flag(
        parser,
        "--etcd",
        "comma-separated etcd endpoints",
        default=DEFAULT_ETCD,
        parse=flags.endpoints,
    )
    flags.env_flag(
        parser, "--prefix", "etcd key prefix", default=DEFAULT_PREFIX, parse=flags.prefix
    )
    flags.env_flag(parser, "--inventory", "YAML file of static nodes to register")
    flags.env_flag(
        parser,
        "--node-ttl",
        "how long an agent's node stays schedulable after its coordinator last heard of it",
        default="15s",
        parse=flags.node_ttl,
    )
    flags.env_flag(
        parser,
        "--sample-interval",
        "the telemetry interval agents are asked for, e.g. 1s or 500ms",
        default="1s",
        parse=flags.interval_ms,
    )
    parser.add_argument(
        "--etcd-wait",
        type=flags.seconds,
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
        node_ttl_s=args.node_ttl,
        sample_interval_ms=args.sample_interval,
    )

    async def serve() -> None:
        # Built inside the loop: grpc.aio objects belong to the loop that creates them.
        await Coordinator(settings).run()

    asyncio.run(serve())


def add_agent_parser(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "agent",
        help="run the node agent: sample this node's GPUs and stream them to a coordinator",
        description="Discovers this node's GPUs through amdsmi (or a simulated backend), "
        "registers them with a coordinator and streams one telemetry batch per interval, "
        "with each GPU's health. Reconnects to the next coordinator address with jittered "
        "backoff. While it is connected the node is schedulable. Each flag can also come "
        "from the environment variable named in its help.",
        epilog="examples:\n  kaiwo-gpu agent --coordinator 10.0.0.2:50051,10.0.0.3:50051\n"
        "  kaiwo-gpu agent --backend simulated --node sim-0 --model MI250X --gpus 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flag = functools.partial(flags.env_flag, parser, environment=AGENT_ENVIRONMENT)
    flag("--node", "this node's name", default=flags.default_node_name(), parse=flags.node_name)
    flag(
        "--coordinator",
        "comma-separated coordinator addresses, tried in turn",
        default=DEFAULT_LISTEN,
        parse=flags.addresses,
    )
    flag(
        "--backend",
        "auto (amdsmi, failing when it cannot load), amdsmi or simulated",
        default="auto",
        parse=flags.one_of("backend", AGENT_BACKENDS),
    )
    flag(
        "--interval",
        "sampling interval until the coordinator sets one",
        default="1s",
        parse=flags.interval_ms,
    )
    flag("--labels", "node labels, k=v,k=v", default="", parse=flags.labels)
    flag("--log-format", "console or json", default="console", parse=flags.log_format)
    simulated = parser.add_argument_group("simulated backend")
    simulated.add_argument("--model", choices=sorted(GPU_MODELS), default="MI300X")
    simulated.add_argument("--gpus", type=flags.gpu_count, default=8, help="GPUs on the node")
    simulated.add_argument(
        "--faults",
        type=Path,
        help="YAML file of injected faults, e.g. '0: overheat' (overheat, ecc, vanish, "
        "none); re-read when it changes",
    )
    simulated.add_argument("--seed", type=int, default=0)


def run_agent(args: argparse.Namespace) -> None:
    configure_logging(args.log_format)
    settings = AgentSettings(
        node=args.node,
        coordinators=args.coordinator,
        backend=args.backend,
        interval_ms=args.interval,
        labels=args.labels,
        simulated_model=args.model,
        simulated_gpus=args.gpus,
        faults_file=args.faults,
        seed=args.seed,
    )
    agent = NodeAgent(settings)  # fails here, with the reason, when the backend cannot run
    asyncio.run(run_until_signalled(agent))


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kaiwo-gpu"


def add_up_parser(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "up",
        help="run a local cluster: etcd, a coordinator and simulated node agents",
        description="Starts a throwaway etcd on a free loopback port, a coordinator serving "
        "on --listen, and N node agents with simulated GPUs whose load follows what is "
        "placed on them, and runs until Ctrl-C. etcd's data lives under the state "
        "directory and is wiped at start.",
        epilog="example: kaiwo-gpu up --nodes 3 --gpus 8 --model MI300X",
    )
    parser.add_argument("--nodes", type=flags.count, default=3)
    parser.add_argument("--gpus", type=flags.gpu_count, default=8, help="GPUs per node")
    parser.add_argument("--model", choices=sorted(GPU_MODELS), default="MI300X")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=_state_dir(),
        help="where etcd keeps its data and log (default %(default)s)",
    )
    _add_service_flags(parser)


def _local_address(listen: str) -> str:
    """Where a process on this host reaches a server listening on `listen`."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        return f"127.0.0.1:{port}"
    return listen


def run_up(args: argparse.Namespace) -> None:
    configure_logging(args.log_format)
    state_dir: Path = args.state_dir.resolve()  # the leftover check compares full paths
    state_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(state_dir / "up.lock"):
        data_dir = state_dir / "etcd"
        _stop_leftover_etcd(state_dir / "etcd.pid", data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        faults_dir = state_dir / "faults"
        shutil.rmtree(faults_dir, ignore_errors=True)
        faults_dir.mkdir()
        etcd = LocalEtcd(data_dir, log_path=state_dir / "etcd.log", pid_path=state_dir / "etcd.pid")
        try:
            etcd.start()
            settings = CoordinatorSettings(
                listen=args.listen,
                etcd_endpoints=(etcd.endpoint,),
                default_strategy=args.strategy,
                default_ttl_s=args.default_ttl or None,
            )
            agents = [
                AgentSettings(
                    node=f"node-{n:02d}",
                    coordinators=(_local_address(args.listen),),
                    backend="simulated",
                    simulated_model=args.model,
                    simulated_gpus=args.gpus,
                    faults_file=faults_dir / f"node-{n:02d}.yaml",
                    seed=n,
                )
                for n in range(args.nodes)
            ]
            asyncio.run(_serve_local_cluster(settings, agents, args, etcd, faults_dir))
        finally:
            etcd.stop()


async def _serve_local_cluster(
    settings: CoordinatorSettings,
    agent_settings: list[AgentSettings],
    args: argparse.Namespace,
    etcd: LocalEtcd,
    faults_dir: Path,
) -> None:
    """The coordinator and the simulated agents in one event loop, until Ctrl-C."""
    coordinator = Coordinator(settings)
    agents = [NodeAgent(one) for one in agent_settings]
    stop = asyncio.Event()
    running: list[asyncio.Task[None]] = []

    def ready() -> None:
        running.extend(asyncio.create_task(agent.run(stop)) for agent in agents)
        _print_next_steps(args, etcd, faults_dir)

    try:
        await coordinator.run(on_ready=ready)
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)


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


def _print_next_steps(args: argparse.Namespace, etcd: LocalEtcd, faults_dir: Path) -> None:
    print(
        f"\nkaiwo-gpu is up: coordinator on {args.listen}, etcd on {etcd.endpoint}, "
        f"{args.nodes} simulated agents (node-00 ...) with {args.gpus} {args.model} each.\n"
        "Try (grpcurl, through server reflection):\n"
        f"  grpcurl -plaintext {args.listen} kaiwo_gpu.v1.AllocationService/ListNodes\n"
        f'  grpcurl -plaintext -d \'{{"request": {{"request_id": "try-1", '
        f'"fraction_millis": 250}}}}\' {args.listen} kaiwo_gpu.v1.AllocationService/Allocate\n'
        "Make a simulated GPU overheat (overheat, ecc, vanish or none, by GPU index):\n"
        f"  echo '0: overheat' > {faults_dir}/node-00.yaml\n"
        "Ctrl-C stops the agents, the coordinator and etcd.\n",
        flush=True,
    )
