"""`kaiwo-gpu up`: a local cluster of etcd, coordinators and simulated node agents.

For laptops, demos and the README's first command: everything runs on loopback, etcd's data
lives under a state directory that is wiped at start, and Ctrl-C stops it all. Each etcd
member and each coordinator is a process of its own, started as an operator would start it,
so one can be killed alone; the agents run in this process. With `--tls`
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
import socket
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
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import (
    EtcdServingTls,
    LocalEtcd,
    client_endpoints,
    free_port,
    local_etcd_cluster,
    start_cluster,
    stop_cluster,
)
from kaiwo_gpu.coordinator.state.etcd_security import EtcdSecurity
from kaiwo_gpu.coordinator.state.keys import DEFAULT_PREFIX

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


METRICS_HOST = "127.0.0.1"
METRICS_PORT = 9400
"""Coordinator i's /metrics; agent i serves on METRICS_PORT + coordinators + i (free ones
if taken)."""


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kaiwo-gpu"


def add_up_parser(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "up",
        help="run a local cluster: etcd, coordinators and simulated node agents",
        description="Starts a throwaway etcd (one member or a cluster) on free loopback "
        "ports, coordinators serving on --listen (and the ports after it), and N node agents "
        "with simulated GPUs whose load follows what is placed on them, and runs until "
        "Ctrl-C. Every etcd member and coordinator is a process of its own, with its log "
        "and pid file under the state directory; etcd's data is wiped at start.",
        epilog="examples: kaiwo-gpu up --nodes 3 --gpus 8 --model MI300X; "
        "kaiwo-gpu up --etcd-members 3 --coordinators 2",
    )
    parser.add_argument("--nodes", type=flags.count, default=3)
    parser.add_argument("--gpus", type=flags.gpu_count, default=8, help="GPUs per node")
    parser.add_argument("--model", choices=sorted(GPU_MODELS), default="MI300X")
    parser.add_argument(
        "--etcd-members",
        type=flags.whole_number(1, 7, "an etcd member count"),
        default=1,
        help="etcd members, each a process of its own (3 tolerates the loss of one)",
    )
    parser.add_argument(
        "--coordinators",
        type=flags.whole_number(1, 16, "a coordinator count"),
        default=1,
        help="coordinator processes sharing the etcd cluster, on --listen's port, port + 1, "
        "...; the agents are spread over them and fail over between them",
    )
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


def coordinator_addresses(listen: str, count: int) -> list[str]:
    """Coordinator i serves on --listen's port + i, as the banner says."""
    host, _, port_text = listen.rpartition(":")
    port = int(port_text) if port_text.isascii() and port_text.isdigit() else 0
    if listen.startswith("unix:") or not 0 < port <= 65536 - count:
        raise InvalidArgumentError(
            "--listen", listen, f"host:port with a port of 1-{65536 - count} (one per coordinator)"
        )
    return [f"{host}:{port + n}" for n in range(count)]


def _port_preferring(host: str, port: int) -> int:
    """`port` when it is free on `host`, else a free one: a coordinator's /metrics."""
    with contextlib.suppress(OSError), socket.socket() as probe:
        probe.bind((host, port))
        return port
    return free_port(host)


def _coordinator_flags(local_pki: LocalPki | None) -> list[str]:
    """The TLS flags each coordinator of `up --tls` is started with."""
    if local_pki is None:
        return []
    served, etcd = local_pki.coordinator, local_pki.etcd_client
    return [
        f"--tls-ca={served.tls_ca}",
        f"--tls-cert={served.tls_cert}",
        f"--tls-key={served.tls_key}",
        f"--etcd-ca={etcd.ca}",
        f"--etcd-cert={etcd.cert}",
        f"--etcd-key={etcd.key}",
    ]


def run_up(args: argparse.Namespace) -> None:
    configure_logging(args.log_format)
    tracing.configure(tracing.AGENT_SERVICE)  # the agents; each coordinator traces itself
    state_dir: Path = args.state_dir.resolve()  # the leftover check compares full paths
    state_dir.mkdir(parents=True, exist_ok=True)
    addresses = coordinator_addresses(args.listen, args.coordinators)
    with _exclusive(state_dir / "up.lock"):
        _stop_leftovers(state_dir)
        faults_dir = state_dir / "faults"
        shutil.rmtree(faults_dir, ignore_errors=True)
        faults_dir.mkdir()
        nodes = [f"node-{n:02d}" for n in range(args.nodes)]
        local_pki = make_local_pki(state_dir / "tls", nodes) if args.tls else None
        cluster = local_etcd_cluster(
            state_dir, args.etcd_members, tls=local_pki.etcd_serving if local_pki else None
        )
        metrics_ports = [
            _port_preferring(METRICS_HOST, METRICS_PORT + n) for n in range(len(addresses))
        ]
        coordinators = [
            CoordinatorProcess(
                client_endpoints(cluster),
                DEFAULT_PREFIX,
                None,
                state_dir / f"coordinator-{n}.log",
                address=address,
                pid_path=state_dir / f"coordinator-{n}.pid",
                extra_args=[
                    f"--strategy={args.strategy}",
                    f"--default-ttl={args.default_ttl}s",
                    f"--metrics-listen={METRICS_HOST}:{metrics_ports[n]}",
                    *_coordinator_flags(local_pki),
                ],
            )
            for n, address in enumerate(addresses)
        ]
        reachable = [_local_address(address) for address in addresses]
        agents = [
            AgentSettings(
                node=node,
                # Spread over the coordinators, each agent failing over to the others.
                coordinators=tuple(
                    reachable[n % len(reachable) :] + reachable[: n % len(reachable)]
                ),
                credentials=local_pki.agents[node] if local_pki else Credentials(),
                backend="simulated",
                simulated_model=args.model,
                simulated_gpus=args.gpus,
                faults_file=faults_dir / f"{node}.yaml",
                seed=n,
            )
            for n, node in enumerate(nodes)
        ]
        try:
            for member in cluster:
                shutil.rmtree(member.data_dir, ignore_errors=True)
            start_cluster(cluster)
            for coordinator in coordinators:
                coordinator.start()
            asyncio.run(
                _serve_local_cluster(
                    LocalCluster(args, cluster, coordinators, metrics_ports, faults_dir, local_pki),
                    agents,
                )
            )
        finally:
            for coordinator in coordinators:  # all at once, then a wait for each
                if coordinator.alive():
                    coordinator.send(signal.SIGTERM)
            for coordinator in coordinators:
                if coordinator.process is not None:
                    coordinator.stop()
            stop_cluster(cluster)
            tracing.shutdown()


@dataclass(frozen=True, slots=True)
class LocalCluster:
    """What `up` started, for the banner."""

    args: argparse.Namespace
    etcd: list[LocalEtcd]
    coordinators: list[CoordinatorProcess]
    metrics_ports: list[int]
    faults_dir: Path
    local_pki: LocalPki | None


async def _serve_local_cluster(cluster: LocalCluster, agent_settings: list[AgentSettings]) -> None:
    """The simulated agents in this process once every coordinator serves, until Ctrl-C
    or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    held = cluster.local_pki.admin if cluster.local_pki else None

    async def all_serving() -> None:
        await asyncio.gather(*(one.wait_serving(held=held) for one in cluster.coordinators))

    async def stopped() -> None:
        await stop.wait()

    waiting = asyncio.ensure_future(all_serving())
    signalled = asyncio.ensure_future(stopped())
    await asyncio.wait((waiting, signalled), return_when=asyncio.FIRST_COMPLETED)
    if signalled.done():
        waiting.cancel()
        return
    await waiting  # raises with the log of a coordinator that did not start
    agents = [NodeAgent(one) for one in agent_settings]
    first_port = METRICS_PORT + len(cluster.coordinators)
    ports = [
        start_preferring(agent.metrics, METRICS_HOST, first_port + n)
        for n, agent in enumerate(agents)
    ]
    running = [asyncio.create_task(agent.run(stop)) for agent in agents]
    try:
        _print_next_steps(cluster, ports)
        await signalled
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        for agent in agents:
            agent.metrics.stop()


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


def _stop_leftovers(state_dir: Path) -> None:
    """Stops the etcd members and coordinators an earlier `up` on this state directory left
    running (it was killed before cleaning up), found by their pid files."""
    for pid_path in state_dir.glob("etcd*.pid"):
        _stop_if_running(pid_path, f"--data-dir={state_dir}/etcd".encode())
    for pid_path in state_dir.glob("coordinator-*.pid"):
        _stop_if_running(pid_path, b"kaiwo_gpu.cli.main\0coordinator\0")


def _stop_if_running(pid_path: Path, marker: bytes) -> None:
    """SIGTERM to the pid in `pid_path` if its command line holds `marker` (so a recycled
    pid is left alone), and a wait of up to 5 s for it to go."""
    try:
        pid = int(pid_path.read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        pid_path.unlink(missing_ok=True)
        return
    if marker in command:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
    pid_path.unlink(missing_ok=True)


def _print_next_steps(cluster: LocalCluster, agent_ports: list[int]) -> None:
    args, local_pki = cluster.args, cluster.local_pki
    addresses = [one.address for one in cluster.coordinators]
    reachable = ",".join(_local_address(address) for address in addresses)
    metrics = ", ".join(f"http://{METRICS_HOST}:{port}/metrics" for port in cluster.metrics_ports)
    logs = cluster.coordinators[0].log_path.parent
    if local_pki is None:
        grpcurl = "grpcurl -plaintext"
        security = "Authorization is off (no TLS): every caller may do everything.\n"
        exports = f"  export KAIWO_GPU_COORDINATOR={reachable}\n"
    else:
        admin = local_pki.admin
        grpcurl = f"grpcurl -cacert {admin.tls_ca} -cert {admin.tls_cert} -key {admin.tls_key}"
        exports = f"  export KAIWO_GPU_COORDINATOR={reachable}\n" + "".join(
            f"  export {name}={value}\n" for name, value in admin.environment().items()
        )
        security = (
            f"Mutual TLS between every process (etcd's own CA under "
            f"{local_pki.directory / 'etcd'}): certificates under {local_pki.directory}; you are "
            f"{local_pki.admin_identity.uri}.\n"
            "A certificate for a user (their own allocations only):\n"
            f"  kaiwo-gpu certs issue --dir {local_pki.directory} --role user alice\n"
            "  # then KAIWO_GPU_TLS_CERT and KAIWO_GPU_TLS_KEY name alice.crt and alice.key\n"
        )
    plural = "s" if len(addresses) > 1 else ""
    print(
        f"\nkaiwo-gpu is up: coordinator{plural} on {', '.join(addresses)}, "
        f"etcd on {', '.join(member.endpoint for member in cluster.etcd)}, "
        f"{args.nodes} simulated agents (node-00 ...) with {args.gpus} {args.model} each.\n"
        f"{security}"
        f"Try it from another shell:\n{exports}"
        "  kaiwo-gpu nodes\n"
        "  kaiwo-gpu allocate --fraction 0.25 --ttl 10m\n"
        "  kaiwo-gpu run --any-node --fraction 0.5 -- env   # ROCR_VISIBLE_DEVICES and more\n"
        "  kaiwo-gpu top\n"
        "Make a simulated GPU overheat (overheat, ecc, vanish or none, by GPU index):\n"
        f"  echo '0: overheat' > {cluster.faults_dir}/node-00.yaml\n"
        f"Prometheus metrics: coordinator{plural} {metrics}; agents on ports "
        f"{', '.join(str(port) for port in agent_ports)} (/metrics).\n"
        f"Logs, pid files and etcd data under {logs}.\n"
        f"(grpcurl works too, through server reflection: {grpcurl} "
        f"{_local_address(addresses[0])} list)\n"
        "Ctrl-C stops the agents, the coordinators and etcd.\n",
        flush=True,
    )
