"""A kaiwo-gpu cluster on hosts in network namespaces, started as an operator starts one.

Three etcd members, two coordinators and three simulated agents, each on a host of its own,
plus a client host for the workload and the auditor. Every process is the real command
with its flags (`etcd ...`, `kaiwo-gpu coordinator ...`, `kaiwo-gpu agent ...`), speaking
mutual TLS with certificates that `kaiwo-gpu certs` made: nothing is imported and started
in this process, so what the fault suite breaks is what an operator runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kaiwo_gpu.coordinator.local.etcd import find_etcd
from tests.netns.network import Network, remove_leftovers

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
COORDINATOR_PORT = 50051
NODE_TTL_S = 4
"""Short, so a partition outlasts it within a short suite; the real default is 15 s."""
SAMPLE_INTERVAL = "500ms"
GPUS_PER_NODE = 8
CLIENT_HOST = "client"
USERS = ("alice", "bob", "carol", "dave")
"""The workload's tenants: alice does the mixed work, bob vanishes, carol's and dave's clocks
are wrong."""
ADMIN = "auditor"
STOP_GRACE_S = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]
"""Where `python -m tests.netns....` finds the tests package, whatever the caller's cwd."""


def kaiwo_gpu_command() -> str:
    """The `kaiwo-gpu` script of the Python running the tests."""
    return str(Path(sys.executable).parent / "kaiwo-gpu")


@dataclass
class Process:
    """One process on one host, started, signalled and restarted by pid."""

    name: str
    host: str
    args: list[str]
    log_path: Path
    network: Network
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def start(self) -> None:
        assert not self.alive(), f"{self.name} is running"
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.network.command(self.host, self.args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                start_new_session=True,  # its own group: a wrapper's children get the signals too
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, and the wait that reaps it."""
        if self.alive():
            self._signal(signal.SIGKILL)
            assert self.popen is not None
            self.popen.wait(timeout=STOP_GRACE_S)

    def _signal(self, signum: int) -> None:
        """To the process and whatever it started (libfaketime's wrapper forks, for one)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGCONT (it may be paused), SIGTERM, then SIGKILL if it outstays the grace."""
        if not self.alive():
            return
        assert self.popen is not None
        self.resume()
        self._signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass(frozen=True)
class Certificates:
    """Paths of the CA, certificate and key one holder proves itself with."""

    ca: Path
    cert: Path
    key: Path

    def client_flags(self, prefix: str = "--tls") -> list[str]:
        return [f"{prefix}-ca={self.ca}", f"{prefix}-cert={self.cert}", f"{prefix}-key={self.key}"]


def _certs(directory: Path, role: str, name: str, sans: Sequence[str] = ()) -> Certificates:
    """`kaiwo-gpu certs issue`, exactly as the README tells an operator to run it."""
    san_flags = [f"--san={san}" for san in sans]
    command = [kaiwo_gpu_command(), "certs", "issue", f"--dir={directory}", f"--role={role}"]
    subprocess.run([*command, *san_flags, name], check=True, capture_output=True)
    return Certificates(directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key")


@dataclass
class NetnsCluster:
    """The hosts, the processes on them and their certificates; a context that tears all
    down, also when the body fails or is interrupted."""

    directory: Path
    network: Network = field(default_factory=Network)
    etcd: list[Process] = field(default_factory=list)
    coordinators: list[Process] = field(default_factory=list)
    agents: list[Process] = field(default_factory=list)
    users: dict[str, Certificates] = field(default_factory=dict)
    etcd_client: Certificates | None = None
    faults_files: dict[str, Path] = field(default_factory=dict)

    # Where things are -------------------------------------------------------------------

    def address(self, host: str) -> str:
        return self.network.hosts[host]

    @property
    def etcd_endpoints(self) -> list[str]:
        return [f"{self.address(m.host)}:{ETCD_CLIENT_PORT}" for m in self.etcd]

    @property
    def coordinator_addresses(self) -> list[str]:
        return [f"{self.address(c.host)}:{COORDINATOR_PORT}" for c in self.coordinators]

    def all_processes(self) -> list[Process]:
        return [*self.agents, *self.coordinators, *self.etcd]

    # Building it -------------------------------------------------------------------------

    def __enter__(self) -> NetnsCluster:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _build(self) -> None:
        remove_leftovers()
        self.directory.mkdir(parents=True, exist_ok=True)
        hosts = {f"etcd-{n}": 10 + n for n in range(3)}
        hosts |= {f"coord-{n}": 20 + n for n in range(2)}
        hosts |= {f"agent-{n}": 30 + n for n in range(3)}
        hosts[CLIENT_HOST] = 40
        for host, number in hosts.items():
            self.network.add_host(host, number)
        tls, etcd_tls = self.directory / "tls", self.directory / "etcd-tls"
        for ca_dir in (tls, etcd_tls):
            subprocess.run([kaiwo_gpu_command(), "certs", "init", f"--dir={ca_dir}"],
                           check=True, capture_output=True)  # fmt: skip
        self.etcd_client = _certs(etcd_tls, "coordinator", "coordinator")
        self._add_etcd(etcd_tls)
        self._add_coordinators(tls)
        self._add_agents(tls)
        self.users = {user: _certs(tls, "user", user) for user in USERS}
        self.users[ADMIN] = _certs(tls, "admin", ADMIN)
        for member in self.etcd:
            member.start()
        self.wait_etcd_healthy(timeout_s=30)
        for coordinator in self.coordinators:
            coordinator.start()
        for coordinator in self.coordinators:
            self.wait_serving(coordinator, timeout_s=60)
        for agent in self.agents:
            agent.start()

    def _add_etcd(self, etcd_tls: Path) -> None:
        names = [f"etcd-{n}" for n in range(3)]
        peers = ",".join(f"{n}=https://{self.address(n)}:{ETCD_PEER_PORT}" for n in names)
        for name in names:
            served = _certs(etcd_tls, "coordinator", name, [self.address(name)])
            client_url = f"https://{self.address(name)}:{ETCD_CLIENT_PORT}"
            peer_url = f"https://{self.address(name)}:{ETCD_PEER_PORT}"
            args = [
                find_etcd(), f"--name={name}", f"--data-dir={self.directory / name}",
                "--logger=zap", "--log-level=warn",
                f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster={peers}", "--initial-cluster-state=new",
                "--initial-cluster-token=kaiwo-gpu-netns",
                f"--cert-file={served.cert}", f"--key-file={served.key}",
                f"--trusted-ca-file={served.ca}", "--client-cert-auth",
                f"--peer-cert-file={served.cert}", f"--peer-key-file={served.key}",
                f"--peer-trusted-ca-file={served.ca}", "--peer-client-cert-auth",
            ]  # fmt: skip
            self.etcd.append(self._process(name, name, args))

    def _add_coordinators(self, tls: Path) -> None:
        assert self.etcd_client is not None
        for n in range(2):
            host = f"coord-{n}"
            served = _certs(tls, "coordinator", host, [self.address(host)])
            args = [
                kaiwo_gpu_command(), "coordinator",
                f"--listen={self.address(host)}:{COORDINATOR_PORT}",
                f"--etcd={','.join(self.etcd_endpoints)}",
                *self.etcd_client.client_flags("--etcd"),
                *served.client_flags(),
                f"--node-ttl={NODE_TTL_S}s", f"--sample-interval={SAMPLE_INTERVAL}",
                "--log-format=json",
            ]  # fmt: skip
            self.coordinators.append(self._process(host, host, args))

    def _add_agents(self, tls: Path) -> None:
        addresses = self.coordinator_addresses
        for n in range(3):
            host, node = f"agent-{n}", f"node-{n}"
            # Agent n prefers coordinator n % 2 and fails over to the other.
            preferred = addresses[n % 2 :] + addresses[: n % 2]
            faults = self.directory / f"{node}-faults.yaml"
            faults.write_text("{}\n")
            self.faults_files[node] = faults
            own = _certs(tls, "agent", node)
            args = [
                kaiwo_gpu_command(), "agent", f"--node={node}", "--backend=simulated",
                f"--coordinator={','.join(preferred)}", *own.client_flags(),
                f"--gpus={GPUS_PER_NODE}", "--model=MI300X", f"--seed={n}",
                f"--faults={faults}", "--log-format=json",
            ]  # fmt: skip
            self.agents.append(self._process(host, host, args))

    def _process(self, name: str, host: str, args: list[str]) -> Process:
        return Process(name, host, args, self.directory / f"{name}.log", self.network)

    # Waiting for it ----------------------------------------------------------------------

    def etcdctl(self, *args: str, timeout_s: float = 10.0) -> subprocess.CompletedProcess[str]:
        """etcdctl on the client host, with the etcd client certificate."""
        assert self.etcd_client is not None
        certs = self.etcd_client
        command = [
            "etcdctl", f"--endpoints={','.join(self.etcd_endpoints)}",
            f"--cacert={certs.ca}", f"--cert={certs.cert}", f"--key={certs.key}",
            "--command-timeout=3s", *args,
        ]  # fmt: skip
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run(
            self.network.command(CLIENT_HOST, command),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )

    def wait_etcd_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            done = self.etcdctl("endpoint", "health", "--cluster")
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd is not healthy: {done.stdout}{done.stderr}")
            time.sleep(0.3)

    def etcd_leader(self) -> Process:
        """The member that leads now (asked of every member that answers)."""
        done = self.etcdctl("endpoint", "status", "-w", "json")
        statuses = json.loads(done.stdout or "[]")
        for status in statuses:
            header = status["Status"]["header"]
            if status["Status"]["leader"] == header["member_id"]:
                host = status["Endpoint"].split("//")[-1].rsplit(":", 1)[0]
                return next(m for m in self.etcd if self.address(m.host) == host)
        raise RuntimeError(f"no etcd leader: {done.stdout}{done.stderr}")

    def wait_serving(self, coordinator: Process, timeout_s: float) -> None:
        """Until the coordinator's log says it serves (it waits for etcd itself)."""
        deadline = time.monotonic() + timeout_s
        marker = f"=== start {coordinator.starts} "
        while time.monotonic() < deadline:
            text = coordinator.log_text()
            if "coordinator serving" in text.rpartition(marker)[2]:
                return
            if not coordinator.alive():
                raise RuntimeError(f"{coordinator.name} exited:\n{text[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{coordinator.name} did not serve in {timeout_s} s")

    # Tearing it down ---------------------------------------------------------------------

    def close(self) -> None:
        for process in self.all_processes():
            with contextlib.suppress(Exception):
                process.stop()
        self.network.close()
