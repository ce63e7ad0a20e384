"""`kaiwo-gpu up`: a local cluster of etcd, a coordinator and simulated node agents.

For laptops, demos and the README's first command: everything runs on loopback, etcd's data
lives under a state directory that is wiped at start, and Ctrl-C stops it all. With `--tls`
every process proves itself to the others with a certificate from a CA kept under the state
directory, and the person running it gets an admin certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import getpass
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kaiwo_gpu.agent.service import AgentSettings, NodeAgent
from kaiwo_gpu.cli import flags
from kaiwo_gpu.cli.serve import add_service_flags
from kaiwo_gpu.common import pki, tracing
from kaiwo_gpu.common.credentials import Credentials
from kaiwo_gpu.common.errors import FailedPreconditionError, InvalidArgumentError
from kaiwo_gpu.common.gpu_models import GPU_MODELS
from kaiwo_gpu.common.identity import Identity, Role, identity
from kaiwo_gpu.common.logs import configure_logging
from kaiwo_gpu.common.metrics_http import start_preferring
from kaiwo_gpu.coordinator.local.etcd import EtcdServingTls, LocalEtcd
from kaiwo_gpu.coordinator.server import Coordinator
from kaiwo_gpu.coordinator.settings import CoordinatorSettings
from kaiwo_gpu.coordinator.state.etcd_security import EtcdSecurity

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


METRICS_HOST = "127.0.0.1"
METRICS_PORT = 9400
"""The coordinator's /metrics; agent i serves on METRICS_PORT + 1 + i (free ones if taken)."""


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
        help="where etcd keeps its data and log, and --tls its CA (default %(default)s)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS between every process, with a CA and certificates under "
        "STATE_DIR/tls (the CA is kept across runs), and an admin certificate for you",
    )
    add_service_flags(parser)


@dataclass(frozen=True, slots=True)
class LocalPki:
    """The credentials of every process of a `kaiwo-gpu up --tls` cluster."""

    directory: Path
    coordinator: Credentials
    agents: dict[str, Credentials]
    admin: Credentials
    admin_identity: Identity
    etcd_serving: EtcdServingTls
    etcd_client: EtcdSecurity


def _admin_name(nodes: list[str]) -> str:
    """The login name of whoever runs `up` when it makes a valid identity name that no
    process of the cluster uses, else `admin`."""
    try:
        name = getpass.getuser()
        identity(Role.ADMIN.value, name)
    except (InvalidArgumentError, OSError, KeyError):
        return "admin"
    return name if name not in {*nodes, "coordinator", pki.CA_NAME} else "admin"


def make_local_pki(directory: Path, nodes: list[str]) -> LocalPki:
    """The CA in `directory` (made the first time, so exported paths stay good across
    runs) and fresh certificates for the coordinator, each agent and the admin. etcd gets
    a CA of its own under `directory/etcd`, whose only client certificate is the
    coordinator's: a certificate `certs issue` makes for a user opens no door to etcd."""
    ca = pki.load_or_make_ca(directory)
    ca_path = directory / f"{pki.CA_NAME}.crt"

    def credentials_of(holder: Identity) -> Credentials:
        certificate, key = pki.issue_into(directory, ca, holder)
        return Credentials(tls_ca=ca_path, tls_cert=certificate, tls_key=key)

    etcd_dir = directory / "etcd"
    etcd_ca = pki.load_or_make_ca(etcd_dir)
    etcd_ca_path = etcd_dir / f"{pki.CA_NAME}.crt"
    served = pki.issue_into(etcd_dir, etcd_ca, identity(Role.COORDINATOR.value, "etcd"))
    client = pki.issue_into(etcd_dir, etcd_ca, identity(Role.COORDINATOR.value, "coordinator"))
    admin = identity(Role.ADMIN.value, _admin_name(nodes))
    return LocalPki(
        directory=directory,
        coordinator=credentials_of(identity(Role.COORDINATOR.value, "coordinator")),
        agents={node: credentials_of(identity(Role.AGENT.value, node)) for node in nodes},
        admin=credentials_of(admin),
        admin_identity=admin,
        etcd_serving=EtcdServingTls(cert=served[0], key=served[1], ca=etcd_ca_path),
        etcd_client=EtcdSecurity(ca=etcd_ca_path, cert=client[0], key=client[1]),
    )


def _local_address(listen: str) -> str:
    """Where a process on this host reaches a server listening on `listen`."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        return f"127.0.0.1:{port}"
    return listen


def run_up(args: argparse.Namespace) -> None:
    configure_logging(args.log_format)
    tracing.configure(tracing.COORDINATOR_SERVICE)  # one process: its agents' spans too
    state_dir: Path = args.state_dir.resolve()  # the leftover check compares full paths
    state_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(state_dir / "up.lock"):
        data_dir = state_dir / "etcd"
        _stop_leftover_etcd(state_dir / "etcd.pid", data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        faults_dir = state_dir / "faults"
        shutil.rmtree(faults_dir, ignore_errors=True)
        faults_dir.mkdir()
        nodes = [f"node-{n:02d}" for n in range(args.nodes)]
        local_pki = make_local_pki(state_dir / "tls", nodes) if args.tls else None
        etcd = LocalEtcd(
            data_dir,
            log_path=state_dir / "etcd.log",
            pid_path=state_dir / "etcd.pid",
            tls=local_pki.etcd_serving if local_pki else None,
        )
        try:
            etcd.start()
            settings = CoordinatorSettings(
                listen=args.listen,
                tls=local_pki.coordinator if local_pki else Credentials(),
                etcd_endpoints=(etcd.endpoint,),
                etcd_security=local_pki.etcd_client if local_pki else None,
                default_strategy=args.strategy,
                default_ttl_s=args.default_ttl or None,
            )
            agents = [
                AgentSettings(
                    node=node,
                    coordinators=(_local_address(args.listen),),
                    credentials=local_pki.agents[node] if local_pki else Credentials(),
                    backend="simulated",
                    simulated_model=args.model,
                    simulated_gpus=args.gpus,
                    faults_file=faults_dir / f"{node}.yaml",
                    seed=n,
                )
                for n, node in enumerate(nodes)
            ]
            asyncio.run(
                _serve_local_cluster(settings, agents, args, etcd, faults_dir, local_pki=local_pki)
            )
        finally:
            etcd.stop()
            tracing.shutdown()


async def _serve_local_cluster(
    settings: CoordinatorSettings,
    agent_settings: list[AgentSettings],
    args: argparse.Namespace,
    etcd: LocalEtcd,
    faults_dir: Path,
    *,
    local_pki: LocalPki | None,
) -> None:
    """The coordinator and the simulated agents in one event loop, until Ctrl-C."""
    coordinator = Coordinator(settings)
    agents = [NodeAgent(one) for one in agent_settings]
    stop = asyncio.Event()
    running: list[asyncio.Task[None]] = []
    ports = [start_preferring(coordinator.metrics, METRICS_HOST, METRICS_PORT)]
    ports += [
        start_preferring(agent.metrics, METRICS_HOST, METRICS_PORT + 1 + n)
        for n, agent in enumerate(agents)
    ]

    def ready() -> None:
        running.extend(asyncio.create_task(agent.run(stop)) for agent in agents)
        _print_next_steps(args, etcd, faults_dir, ports, local_pki)

    try:
        await coordinator.run(on_ready=ready)
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        for agent in agents:  # also those that never ran
            agent.metrics.stop()
        coordinator.metrics.stop()


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


def _print_next_steps(
    args: argparse.Namespace,
    etcd: LocalEtcd,
    faults_dir: Path,
    metrics_ports: list[int],
    local_pki: LocalPki | None,
) -> None:
    agents = ", ".join(str(port) for port in metrics_ports[1:])
    address = _local_address(args.listen)
    if local_pki is None:
        grpcurl = "grpcurl -plaintext"
        security = "Authorization is off (no TLS): every caller may do everything.\n"
    else:
        admin = local_pki.admin
        grpcurl = f"grpcurl -cacert {admin.tls_ca} -cert {admin.tls_cert} -key {admin.tls_key}"
        exports = "".join(
            f"  export {name}={value}\n" for name, value in admin.environment().items()
        )
        security = (
            f"Mutual TLS between every process (etcd's own CA under "
            f"{local_pki.directory / 'etcd'}): certificates under {local_pki.directory}; you are "
            f"{local_pki.admin_identity.uri}. From another shell:\n{exports}"
            "A certificate for a user (their own allocations only):\n"
            f"  kaiwo-gpu certs issue --dir {local_pki.directory} --role user alice\n"
            "  # then KAIWO_GPU_TLS_CERT and KAIWO_GPU_TLS_KEY name alice.crt and alice.key\n"
        )
    print(
        f"\nkaiwo-gpu is up: coordinator on {args.listen}, etcd on {etcd.endpoint}, "
        f"{args.nodes} simulated agents (node-00 ...) with {args.gpus} {args.model} each.\n"
        f"{security}"
        f"Prometheus metrics: coordinator http://{METRICS_HOST}:{metrics_ports[0]}/metrics, "
        f"agents on ports {agents} (/metrics).\n"
        "Try (grpcurl, through server reflection):\n"
        f"  {grpcurl} {address} kaiwo_gpu.v1.AllocationService/ListNodes\n"
        f'  {grpcurl} -d \'{{"request": {{"request_id": "try-1", '
        f'"fraction_millis": 250}}}}\' {address} kaiwo_gpu.v1.AllocationService/Allocate\n'
        "Make a simulated GPU overheat (overheat, ecc, vanish or none, by GPU index):\n"
        f"  echo '0: overheat' > {faults_dir}/node-00.yaml\n"
        "Ctrl-C stops the agents, the coordinator and etcd.\n",
        flush=True,
    )
