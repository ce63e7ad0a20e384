"""`kaiwo-gpu coordinator` and `kaiwo-gpu up` as a user runs them: flags, environment, signals."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kaiwo_gpu.agent.service import ENVIRONMENT as AGENT_ENVIRONMENT
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd, free_port
from kaiwo_gpu.v1 import allocation_pb2, allocation_pb2_grpc, types_pb2
from tests.agents import eventually
from tests.harness import audit_etcd, child, request

pytestmark = pytest.mark.integration
KAIWO_GPU = [sys.executable, "-m", "kaiwo_gpu.cli.main"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KAIWO_GPU, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["coordinator", "--default-ttl", "ten minutes"],
        ["coordinator", "--strategy", "tetris"],
        ["coordinator", "--etcd-wait", "-1"],
        ["coordinator", "--listen", "127.0.0.1:99999"],
        ["coordinator", "--listen", "nowhere"],
        ["coordinator", "--etcd", "etcd-a:2379,etcd-b:2379"],
        ["coordinator", "--etcd", "https://etcd:2379"],
        ["coordinator", "--prefix", "no-slashes"],
        ["coordinator", "--default-ttl", "99999h"],
        ["up", "--nodes", "0"],
        ["up", "--model", "H100"],
        ["up", "--gpus", "65"],
        ["up", "--etcd-members", "0"],
        ["up", "--coordinators", "17"],
        ["coordinator", "--node-ttl", "1s"],
        ["coordinator", "--sample-interval", "10ms"],
        ["agent", "--backend", "cuda"],
        ["agent", "--node", "Not_A_Node"],
        ["agent", "--coordinator", "nowhere"],
        ["agent", "--interval", "2h"],
        ["agent", "--labels", "zone"],
        ["agent", "--labels", "zone=a b"],
        ["agent", "--gpus", "0"],
        ["agent", "--model", "H100"],
        ["allocate", "--fraction", "1.5"],
        ["allocate", "--fraction", "0.05"],
        ["allocate", "--memory", "4GB"],
        ["allocate", "--count", "65"],
        ["allocate", "--isolation", "mig"],
        ["allocate", "--ttl", "forever"],
        ["allocate", "--label", "team"],
        # Only the form is checked here: which names exist is the coordinator's to say.
        ["allocate", "--fraction", "0.5", "--strategy", "Tetris!"],
        ["allocate", "--node", "Bad_Node"],
        ["allocate", "--fraction", "0.5", "-o", "xml"],
        ["allocate", "--amd-gpu-unit", "gpu"],
        ["allocate", "--fraction", "0.5", "--coordinator", "nowhere"],
        ["allocate", "--fraction", "0.5", "--timeout", "0s"],
        ["release", "--output", "csv"],
        ["get"],
        ["list", "--label", "team"],
        ["nodes", "-l", "=x"],
        ["watch", "--events", "0"],
        ["stats", "-o", "env"],
        ["top", "--refresh", "1ms"],
        ["run", "--fraction", "2", "--", "true"],
        ["run", "--memory", "lots", "--", "true"],
    ],
)
def test_bad_flags_exit_2_with_one_line(argv: list[str]) -> None:
    done = _run(*argv)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "error:" in done.stderr


@pytest.mark.parametrize(
    ("variable", "value", "flag"),
    [
        ("KAIWO_GPU_DEFAULT_TTL", "soon", "--default-ttl"),
        ("KAIWO_GPU_DEFAULT_STRATEGY", "tetris", "--strategy"),
        ("KAIWO_GPU_LOG_FORMAT", "xml", "--log-format"),
        ("KAIWO_GPU_ETCD_PREFIX", "relative/", "--prefix"),
        ("KAIWO_GPU_NODE_TTL", "forever", "--node-ttl"),
        ("KAIWO_GPU_AGENT_BACKEND", "nvml", "--backend"),
        ("KAIWO_GPU_NODE", "UPPER_case", "--node"),
        ("KAIWO_GPU_SAMPLE_INTERVAL", "0s", "--interval"),
    ],
)
def test_bad_environment_value_is_a_usage_error(variable: str, value: str, flag: str) -> None:
    command = "agent" if variable in AGENT_ENVIRONMENT.values() else "coordinator"
    done = _run(command, env={variable: value})
    assert done.returncode == 2
    assert flag in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_taken_address_is_refused_not_shared(
    etcd: LocalEtcd, prefix: str, inventory: Path, tmp_path: Path
) -> None:
    first = CoordinatorProcess(etcd.endpoint, prefix, inventory, tmp_path / "first.log")
    first.start()
    await first.wait_serving()
    try:
        second = _run(
            "coordinator", f"--listen={first.address}", f"--etcd={etcd.endpoint}", "--etcd-wait=1"
        )
        assert second.returncode == 1
        assert f"cannot listen on {first.address}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        assert first.stop() == 0


def test_sigterm_while_waiting_for_etcd_stops_at_once() -> None:
    args = [*KAIWO_GPU, "coordinator", f"--etcd=127.0.0.1:{free_port()}", "--listen=127.0.0.1:0"]
    with child(args) as waiting:
        assert waiting.stdout is not None
        for line in waiting.stdout:  # bounded: the coordinator gives up after 30 s
            if "waiting for etcd" in line:
                break
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(10) == 0


@pytest.mark.parametrize("backend", ["auto", "amdsmi"])
def test_agent_without_rocm_says_why_and_how_to_fix_it(backend: str) -> None:
    """No ROCm here: amdsmi's import fails with KeyError; the agent must explain, not crash,
    and `auto` must not fall back to simulated GPUs."""
    done = _run("agent", f"--backend={backend}", f"--coordinator=127.0.0.1:{free_port()}")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "libamd_smi.so" in done.stderr
    assert "--backend simulated" in done.stderr
    assert "agent starting" not in done.stdout + done.stderr
    assert ("never falls back to simulated" in done.stderr) == (backend == "auto")


def test_agent_stops_on_sigterm_while_no_coordinator_answers() -> None:
    args = [*KAIWO_GPU, "agent", "--backend=simulated", f"--coordinator=127.0.0.1:{free_port()}"]
    with child(args) as agent:
        assert agent.stdout is not None
        for line in agent.stdout:  # bounded: the agent retries with backoff until stopped
            if "coordinator stream ended" in line:
                break
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0


def test_unreachable_etcd_exits_1_with_a_message() -> None:
    port = free_port()
    done = _run(
        "coordinator", f"--etcd=127.0.0.1:{port}", "--etcd-wait=0.5", "--listen=127.0.0.1:0"
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"kaiwo-gpu: etcd at 127.0.0.1:{port} is unavailable" in done.stderr


def test_bad_inventory_exits_1_naming_the_entry(etcd: LocalEtcd, tmp_path: Path) -> None:
    inventory = tmp_path / "nodes.yaml"
    inventory.write_text("nodes:\n  - name: gpu-01\n    gpus: [{model: MI300X, count: 99}]\n")
    # Port 0: the default 50051 may be taken by a `kaiwo-gpu up` on this machine.
    free = "--listen=127.0.0.1:0"
    done = _run("coordinator", f"--etcd={etcd.endpoint}", f"--inventory={inventory}", free)
    assert done.returncode == 1
    assert "nodes[0].gpus[0].count" in done.stderr
    assert "Traceback" not in done.stderr
    missing = _run(
        "coordinator", f"--etcd={etcd.endpoint}", f"--inventory={tmp_path}/nope.yaml", free
    )
    assert missing.returncode == 1
    assert "--inventory" in missing.stderr


async def test_environment_configures_and_sigterm_stops_gracefully(
    etcd: LocalEtcd, prefix: str, inventory: Path, tmp_path: Path
) -> None:
    process = CoordinatorProcess(etcd.endpoint, "/unused/", inventory, tmp_path / "c.log")
    process.args = [*KAIWO_GPU, "coordinator"]
    os.environ.update(
        KAIWO_GPU_LISTEN=process.address,
        KAIWO_GPU_ETCD_ENDPOINTS=etcd.endpoint,
        KAIWO_GPU_ETCD_PREFIX=prefix,
        KAIWO_GPU_INVENTORY=str(inventory),
        KAIWO_GPU_DEFAULT_TTL="2m",
    )
    try:
        process.start()
    finally:
        for name in (
            "KAIWO_GPU_LISTEN",
            "KAIWO_GPU_ETCD_ENDPOINTS",
            "KAIWO_GPU_ETCD_PREFIX",
            "KAIWO_GPU_INVENTORY",
            "KAIWO_GPU_DEFAULT_TTL",
        ):
            del os.environ[name]
    await process.wait_serving()
    async with grpc.aio.insecure_channel(process.address) as channel:
        api = allocation_pb2_grpc.AllocationServiceStub(channel)
        reply = await api.Allocate(request("env-1", fraction_millis=100))
    lifetime = reply.allocation.expires_at.seconds - reply.allocation.created_at.seconds
    assert 110 <= lifetime <= 130, "KAIWO_GPU_DEFAULT_TTL=2m gives a lease"
    audit = await audit_etcd(etcd.endpoint, prefix)
    assert set(audit.allocations) == {reply.allocation.id}
    assert process.stop(signal.SIGTERM) == 0
    assert "coordinator stopping" in process.log_tail()


async def test_up_runs_etcd_and_a_coordinator_until_interrupted(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    args = ["--nodes=2", "--gpus=2", f"--listen={listen}", f"--state-dir={tmp_path}"]
    async with _up(args, tmp_path) as (up, banner):
        async with grpc.aio.insecure_channel(listen) as channel:
            api = allocation_pb2_grpc.AllocationServiceStub(channel)

            async def agents_in() -> allocation_pb2.GetClusterStatsResponse | None:
                stats = await api.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
                return stats if stats.schedulable_node_count == 2 else None

            stats = await eventually(agents_in)
            assert (stats.node_count, stats.gpu_count) == (2, 4)
            placed = await api.Allocate(request("up-1", fraction_millis=500))
            assert placed.allocation.environment["ROCR_VISIBLE_DEVICES"] in {"0", "1"}
            # The banner's fault file reaches the simulated agent and makes a GPU unhealthy.
            fault_file = banner.split("> ", 1)[1].split()[0]
            Path(fault_file).write_text("1: vanish\n")

            async def gpu_gone() -> types_pb2.GpuStatus | None:
                reply = await api.ListNodes(allocation_pb2.ListNodesRequest())
                node = next(n for n in reply.nodes if n.name == "node-00")
                gpu = node.gpus[1]
                return gpu if gpu.health == types_pb2.HEALTH_UNHEALTHY else None

            assert "not answering" in (await eventually(gpu_gone)).health_reason
        up.send_signal(signal.SIGINT)
        assert up.wait(20) == 0
    etcd_endpoint = banner.split("etcd on ", 1)[1].split(",", 1)[0]
    host, port = etcd_endpoint.rsplit(":", 1)
    assert not _accepts_connections(host, int(port)), "etcd must stop with kaiwo-gpu up"
    assert not (tmp_path / "etcd-0.pid").exists()
    assert not (tmp_path / "coordinator-0.pid").exists()


def _two_free_ports() -> int:
    """A port p with p + 1 free as well (`up --coordinators 2` serves on both)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and _bindable(port + 1):
            return port
    raise AssertionError("no two adjacent free ports on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _etcd_leader(endpoints: list[str]) -> int:
    """The index of the member that says it leads (etcd's JSON gateway, /v3/maintenance/status)."""
    for n, endpoint in enumerate(endpoints):
        status_url = f"http://{endpoint}/v3/maintenance/status"
        with urllib.request.urlopen(status_url, data=b"{}", timeout=5) as reply:
            status = json.load(reply)
        if status["header"]["member_id"] == status["leader"]:
            return n
    raise AssertionError(f"no etcd member of {endpoints} leads")


async def _line_containing(up: subprocess.Popen[str], *parts: str, timeout_s: float) -> str:
    """The next line of `up`'s output holding every one of `parts` (bounded in time)."""
    assert up.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(asyncio.to_thread(up.stdout.readline), timeout_s)
        if all(part in line for part in parts):
            return line
    raise AssertionError(f"no line with {parts} in {timeout_s:g}s")


async def test_up_with_three_etcd_members_and_two_coordinators_survives_losing_one_of_each(
    tmp_path: Path,
) -> None:
    """Issue 16's topology without Docker: each member and coordinator a process of its own;
    what one coordinator grants the other shows at once; the SIGKILL of the etcd leader and
    of a coordinator leaves a cluster that still allocates, and the agents fail over."""
    port = _two_free_ports()
    first, second = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    args = ["--etcd-members=3", "--coordinators=2", "--nodes=2", "--gpus=2"]
    args += [f"--listen={first}", f"--state-dir={tmp_path}"]
    async with _up(args, tmp_path) as (up, banner):
        assert f"coordinators on {first}, {second}, " in banner
        assert f"export KAIWO_GPU_COORDINATOR={first},{second}" in banner
        members = banner.split("etcd on ", 1)[1].split(", 2 simulated", 1)[0].split(", ")
        etcd_pids = [int((tmp_path / f"etcd-{n}.pid").read_text()) for n in range(3)]
        coordinator_pids = [int((tmp_path / f"coordinator-{n}.pid").read_text()) for n in range(2)]
        assert len(members) == 3
        assert len({*etcd_pids, *coordinator_pids, up.pid}) == 6, "one process each"
        async with (
            grpc.aio.insecure_channel(first) as one,
            grpc.aio.insecure_channel(second) as other,
        ):
            api_one = allocation_pb2_grpc.AllocationServiceStub(one)
            api_other = allocation_pb2_grpc.AllocationServiceStub(other)

            async def both_nodes_in() -> bool | None:
                stats = await api_other.GetClusterStats(allocation_pb2.GetClusterStatsRequest())
                return True if stats.schedulable_node_count == 2 else None

            await eventually(both_nodes_in)
            placed = await api_one.Allocate(request("multi-1", fraction_millis=500))
            seen = await api_other.GetAllocation(
                allocation_pb2.GetAllocationRequest(allocation_id=placed.allocation.id)
            )
            assert seen.allocation.node == placed.allocation.node  # at once: no polling

            leader = _etcd_leader(members)
            os.kill(etcd_pids[leader], signal.SIGKILL)
            os.kill(coordinator_pids[0], signal.SIGKILL)

            codes: list[grpc.StatusCode] = []

            async def placed_again() -> allocation_pb2.AllocateResponse | None:
                try:
                    return await api_other.Allocate(
                        request("multi-2", fraction_millis=500), timeout=2
                    )
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
                    return None

            again = await eventually(placed_again, timeout_s=30, every_s=0.5)
            # The outage answers as retryable, never as a refusal or an internal error.
            assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
            listed = await api_other.ListAllocations(allocation_pb2.ListAllocationsRequest())
            assert {a.id for a in listed.allocations} == {
                placed.allocation.id,
                again.allocation.id,
            }
            # node-00's agent streamed to the killed coordinator and fails over to the other.
            await _line_containing(
                up, "registered with coordinator", f"coordinator={second}", "node-00", timeout_s=30
            )
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
    for pid in etcd_pids + coordinator_pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived kaiwo-gpu up"
    assert not sorted(tmp_path.glob("*.pid")), "a stopped process left its pid file"


async def test_up_tls_with_several_members_and_coordinators_fails_over_over_tls(
    tmp_path: Path,
) -> None:
    """TLS to a list of addresses (etcd members, each on its own channel; coordinators);
    the banner's exports reach both coordinators, and the client fails over to the second."""
    port = _two_free_ports()
    first, second = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    args = ["--tls", "--etcd-members=3", "--coordinators=2", "--nodes=1", "--gpus=1"]
    args += [f"--listen={first}", f"--state-dir={tmp_path}"]
    async with _up(args, tmp_path) as (up, banner):
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in banner.splitlines()
            if line.strip().startswith("export KAIWO_GPU_")
        )
        assert exports["KAIWO_GPU_COORDINATOR"] == f"{first},{second}"

        async def node_in() -> str | None:
            nodes = await asyncio.to_thread(_run, "nodes", "--timeout=5", env=exports)
            return nodes.stdout if "node-00" in nodes.stdout else None

        await eventually(node_in)
        os.kill(int((tmp_path / "coordinator-0.pid").read_text()), signal.SIGKILL)
        placed = await asyncio.to_thread(
            _run, "allocate", "--fraction=0.5", "--request-id=tls-failover", env=exports
        )
        assert placed.returncode == 0, placed.stderr
        assert "node:        node-00" in placed.stdout
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0


def test_up_refuses_coordinator_ports_past_the_last_one(tmp_path: Path) -> None:
    done = _run("up", "--coordinators=2", "--listen=127.0.0.1:65535", f"--state-dir={tmp_path}")
    assert done.returncode != 0
    assert "--listen" in done.stderr
    assert "1-65534" in done.stderr
    assert "Traceback" not in done.stderr


@contextlib.asynccontextmanager
async def _up(args: list[str], cwd: Path) -> AsyncIterator[tuple[subprocess.Popen[str], str]]:
    """`kaiwo-gpu up` running until its banner is printed; killed on the way out if needed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with child([*KAIWO_GPU, "up", *args], cwd=cwd, env=env) as up:
        assert up.stdout is not None
        deadline = time.monotonic() + 30
        seen = ""
        while "Ctrl-C stops" not in seen and time.monotonic() < deadline:
            seen += await asyncio.to_thread(up.stdout.readline)
        assert "kaiwo-gpu is up" in seen, seen
        assert "Ctrl-C stops" in seen, seen
        yield up, seen


def _etcd_answers(endpoint: str, ca: Path, holder: Path | None) -> bool:
    """Whether etcd answers /version to a client holding `holder`.crt/.key (or none)."""
    context = ssl.create_default_context(cafile=str(ca))
    if holder is not None:
        context.load_cert_chain(f"{holder}.crt", f"{holder}.key")
    try:
        with urllib.request.urlopen(f"{endpoint}/version", context=context, timeout=5):
            return True
    except (OSError, ssl.SSLError):
        return False


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_a_second_up_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    with (tmp_path / "up.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `up` holds it
        done = _run("up", f"--state-dir={tmp_path}", f"--listen=127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "another kaiwo-gpu up is running" in done.stderr
    assert not (tmp_path / "etcd").exists()


async def test_up_stops_an_etcd_a_killed_up_left_behind(tmp_path: Path) -> None:
    """Found by its pid file, even when the state directory is given as a relative path."""
    state = tmp_path / "state"
    state.mkdir()
    leftover = LocalEtcd(state / "etcd", pid_path=state / "etcd.pid")
    leftover.start()
    assert leftover.process is not None
    args = ["--nodes=1", "--gpus=1", "--state-dir=state", f"--listen=127.0.0.1:{free_port()}"]
    try:
        async with _up(args, tmp_path) as (up, _):
            assert leftover.process.wait(10) is not None, "the leftover etcd must be stopped"
            up.send_signal(signal.SIGINT)
            assert up.wait(20) == 0
    finally:
        leftover.stop(kill=True)


async def test_up_tls_is_mutual_tls_between_every_process_and_owners_are_identities(
    tmp_path: Path,
) -> None:
    """The README's secure set-up, as a person tries it: `up --tls`, the banner's exports,
    a certificate per user, and one user's release of another's allocation refused."""
    listen = f"127.0.0.1:{free_port()}"
    args = ["--tls", "--nodes=2", "--gpus=2", f"--listen={listen}", f"--state-dir={tmp_path}"]
    async with _up(args, tmp_path) as (up, banner):
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in banner.splitlines()
            if line.strip().startswith("export KAIWO_GPU_TLS_")
        )
        assert set(exports) == {"KAIWO_GPU_TLS_CA", "KAIWO_GPU_TLS_CERT", "KAIWO_GPU_TLS_KEY"}
        tls_dir = tmp_path / "tls"
        assert all(Path(path).parent == tls_dir for path in exports.values())
        assert (tls_dir / "ca.key").stat().st_mode & 0o077 == 0
        admin = {**exports, "KAIWO_GPU_COORDINATOR": listen}

        async def agents_in() -> str | None:
            nodes = await asyncio.to_thread(_run, "nodes", env=admin)
            return nodes.stdout if {"node-00", "node-01"} <= set(nodes.stdout.split()) else None

        assert "node-01" in await eventually(agents_in)  # agents registered over mutual TLS
        etcd_endpoint = banner.split("etcd on ", 1)[1].split(",", 1)[0]
        admin_files = Path(exports["KAIWO_GPU_TLS_CERT"]).with_suffix("")
        assert admin_files.with_suffix(".key").exists()  # the admin's certificate opens no etcd
        assert etcd_endpoint.startswith("https://127.0.0.1:")
        assert not _etcd_answers(etcd_endpoint, tls_dir / "etcd" / "ca.crt", None)
        assert not _etcd_answers(etcd_endpoint, tls_dir / "etcd" / "ca.crt", admin_files)
        assert _etcd_answers(
            etcd_endpoint, tls_dir / "etcd" / "ca.crt", tls_dir / "etcd" / "coordinator"
        )
        plaintext = _run("list", "--timeout=2", env={"KAIWO_GPU_COORDINATOR": listen})
        assert plaintext.returncode != 0
        assert "--tls-ca" in plaintext.stderr  # says what is missing

        users = {}
        for name in ("alice", "bob"):
            issued = _run("certs", "issue", "--dir", str(tls_dir), "--role", "user", name)
            assert issued.returncode == 0, issued.stderr
            users[name] = {
                **admin,
                "KAIWO_GPU_TLS_CERT": str(tls_dir / f"{name}.crt"),
                "KAIWO_GPU_TLS_KEY": str(tls_dir / f"{name}.key"),
            }
        placed = _run("allocate", "--fraction=0.25", "--request-id=tls-1", env=users["alice"])
        assert placed.returncode == 0, placed.stderr
        assert "owner:       alice" in placed.stdout  # no --owner: the certificate's name
        allocation_id = placed.stdout.split("id:", 1)[1].split()[0]

        refused = _run("release", allocation_id, env=users["bob"])
        assert refused.returncode == 1
        assert "PERMISSION_DENIED" in refused.stderr
        listed = _run("list", env=admin)
        assert allocation_id in listed.stdout, "bob's release changed nothing"
        assert allocation_id not in _run("list", env=users["bob"]).stdout
        released = _run("release", allocation_id, env=users["alice"])
        assert released.returncode == 0, released.stderr
        up.send_signal(signal.SIGINT)
        assert up.wait(20) == 0
