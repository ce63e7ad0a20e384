"""The client commands as a user runs them: a real `kaiwo-gpu` process against a real coordinator.

Every command's table and JSON (and YAML where offered) is parsed back and compared with what
the coordinator holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import shlex
import signal
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from kaiwo_gpu.client import Client
from tests.conftest import Running
from tests.fake_coordinator import flaky, serving

pytestmark = pytest.mark.integration
KAIWO_GPU = (sys.executable, "-m", "kaiwo_gpu.cli.main")


async def cli(
    running: Running, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *KAIWO_GPU,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KAIWO_GPU_COORDINATOR": running.target, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    assert b"Traceback" not in err, err
    return process.returncode, out.decode(), err.decode()


async def ok(running: Running, *args: str) -> str:
    code, out, err = await cli(running, *args)
    assert code == 0, err
    return out


def rows(table: str) -> list[dict[str, str]]:
    """Parses an aligned table back into dicts by its header's column names."""
    header, *lines = table.strip().splitlines()
    names = header.split()
    return [dict(zip(names, line.split(), strict=True)) for line in lines if line.strip()]


def details(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" "):
            fields[key] = value.strip()
    return fields


async def test_allocate_get_list_release_in_every_format(running: Running) -> None:
    table = await ok(
        running, "allocate", "--fraction", "0.5", "--memory", "4Gi", "--ttl", "10m",
        "--label", "team=ml", "--owner", "cli/one", "--node-selector", "zone=a",
    )  # fmt: skip
    shown = details(table)
    allocation_id = shown["id"]
    assert shown["node"] == "node-a"
    assert shown["owner"] == "cli/one"
    assert shown["labels"] == "team=ml"
    assert f"KAIWO_GPU_ALLOCATION_ID={allocation_id}" in table
    assert "share 0.5  memory 4Gi" in table

    as_json = json.loads(await ok(running, "get", allocation_id, "-o", "json"))
    assert as_json["id"] == allocation_id
    assert as_json["gpus"][0]["granted_millis"] == 500
    assert as_json["request"]["labels"] == {"team": "ml"}
    as_yaml = yaml.safe_load(await ok(running, "get", allocation_id, "-o", "yaml"))
    assert as_yaml == as_json
    environment = dict(
        line.split("=", 1)
        for line in (await ok(running, "get", allocation_id, "-o", "env")).split()
    )
    assert environment["KAIWO_GPU_ALLOCATION_ID"] == allocation_id
    assert environment["ROCR_VISIBLE_DEVICES"] == str(as_json["gpus"][0]["index"])

    second = json.loads(
        await ok(running, "allocate", "--fraction", "0.25", "--owner", "cli/two", "-o", "json")
    )
    listed = rows(await ok(running, "list"))
    assert {row["ID"] for row in listed} == {allocation_id, second["id"]}
    mine = rows(await ok(running, "list", "--owner", "cli/one"))
    assert [(r["ID"], r["NODE"], r["SHARE"], r["MEMORY"], r["OWNER"]) for r in mine] == [
        (allocation_id, "node-a", "0.5", "4Gi", "cli/one")
    ]
    by_label = json.loads(await ok(running, "list", "-l", "team=ml", "-o", "json"))
    assert [a["id"] for a in by_label["allocations"]] == [allocation_id]
    by_node = yaml.safe_load(await ok(running, "list", "--node", second["node"], "-o", "yaml"))
    assert second["id"] in [a["id"] for a in by_node["allocations"]]

    released = rows(await ok(running, "release", allocation_id))
    assert [r["ID"] for r in released] == [allocation_id]
    code, _, err = await cli(running, "get", allocation_id)
    assert code == 3
    assert allocation_id in err
    released_json = json.loads(await ok(running, "release", "--owner", "cli/two", "-o", "json"))
    assert [a["id"] for a in released_json["allocations"]] == [second["id"]]
    assert json.loads(await ok(running, "list", "-o", "json")) == {"allocations": []}


async def test_nodes_and_stats_tables_match_their_json(running: Running) -> None:
    placed = json.loads(await ok(running, "allocate", "--fraction", "0.25", "-o", "json"))
    table = rows(await ok(running, "nodes"))
    assert len(table) == 6  # node-a 4 x MI300X, node-b 2 x MI210
    nodes = json.loads(await ok(running, "nodes", "-o", "json"))["nodes"]
    by_gpu = {(n["name"], g["inventory"]["index"]): g for n in nodes for g in n["gpus"]}
    for row in table:
        gpu = by_gpu[(row["NODE"], int(row["GPU"]))]
        assert row["MODEL"] == gpu["inventory"]["model"]
        assert row["HEALTH"] == "healthy"
        expected = "0.25/1" if gpu["allocated_millis"] == 250 else "0/1"
        assert row["ALLOCATED"] == expected
    assert sum(row["ALLOCATED"] == "0.25/1" for row in table) == 1
    zone_b = rows(await ok(running, "nodes", "-l", "zone=b"))
    assert {row["NODE"] for row in zone_b} == {"node-b"}

    stats_table = details(await ok(running, "stats"))
    stats = json.loads(await ok(running, "stats", "-o", "json"))
    assert stats_table["allocations"] == str(stats["allocation_count"]) == "1"
    assert stats_table["gpus"] == f"{stats['healthy_gpu_count']} healthy of {stats['gpu_count']}"
    assert yaml.safe_load(await ok(running, "stats", "-o", "yaml")) == stats
    await ok(running, "release", placed["id"])


async def test_watch_prints_events_as_json_lines_and_table_rows(running: Running) -> None:
    with Client(running.target) as client:
        first = await asyncio.to_thread(client.allocate, fraction=0.25, owner="watch/me")
        second = await asyncio.to_thread(client.allocate, fraction=0.25, owner="watch/me")
    lines = await ok(running, "watch", "--owner", "watch/me", "--events", "2", "-o", "json")
    events = [json.loads(line) for line in lines.splitlines()]
    assert [e["kind"] for e in events] == ["KIND_ADDED", "KIND_ADDED"]
    assert {e["allocation"]["id"] for e in events} == {first.id, second.id}
    table = rows(await ok(running, "watch", "--owner", "watch/me", "--events", "2"))
    assert {(r["EVENT"], r["ID"]) for r in table} == {("ADDED", first.id), ("ADDED", second.id)}
    documents = list(
        yaml.safe_load_all(
            await ok(running, "watch", "--owner", "watch/me", "--events", "1", "-o", "yaml")
        )
    )
    assert documents[0]["kind"] == "KIND_ADDED"


async def test_top_once_shows_nodes_gpus_and_allocations(running: Running) -> None:
    placed = json.loads(
        await ok(running, "allocate", "--fraction", "0.5", "--owner", "top/one", "-o", "json")
    )
    code, out, err = await cli(running, "top", "--once", env={"COLUMNS": "140"})
    assert code == 0, err
    assert "node-a" in out
    assert "node-b" in out
    assert placed["id"] in out
    assert "0.5/1" in out


async def test_exit_codes_scripts_can_rely_on(running: Running) -> None:
    code, _, err = await cli(running, "get", "0123456789abcdef")
    assert (code, err.count("\n")) == (3, 1)
    code, _, err = await cli(running, "allocate", "--fraction", "1", "--count", "9")
    assert code == 4
    assert "no GPU can take" in err
    await ok(running, "allocate", "--fraction", "0.25", "--request-id", "cli-reused")
    code, _, err = await cli(running, "allocate", "--fraction", "0.5", "--request-id", "cli-reused")
    assert code == 6
    assert "cli-reused" in err
    code, _, err = await cli(running, "list", "--coordinator", "127.0.0.1:1", "--timeout", "1s")
    assert code == 5
    assert err.startswith("kaiwo-gpu list: ")
    code, _, err = await cli(running, "release")
    assert code == 2
    assert "--owner" in err
    code, _, err = await cli(running, "allocate", "--count", "2")
    assert code == 2
    assert "--fraction 0.5, --memory 16Gi or both" in err


async def test_the_coordinator_not_the_client_says_which_strategies_exist(
    running: Running,
) -> None:
    code, _, err = await cli(
        running, "allocate", "--fraction", "0.5", "--strategy", "no-such-strategy"
    )
    assert code == 2
    assert err.startswith("kaiwo-gpu allocate: strategy: 'no-such-strategy' is not allowed")
    assert "best-fit" in err  # the coordinator lists the strategies it has
    code, _, err = await cli(running, "allocate", "--fraction", "0.5", "--strategy", "Best_Fit")
    assert code == 2  # a malformed name is a usage error before any call
    assert "argument --strategy: strategy: 'Best_Fit' is not allowed" in err


POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: trainer
  namespace: ml
  uid: 4a3c
  labels: {app: trainer}
  annotations:
    kaiwo.ai/gpu-memory: "16384"
    kaiwo.ai/gpu-isolation: mps
spec:
  nodeSelector: {zone: a}
  containers:
    - name: main
      image: rocm/pytorch
      resources:
        limits: {amd.com/gpu: 500}
"""


async def test_allocate_from_a_pod_manifest(running: Running, tmp_path: Path) -> None:
    pod = tmp_path / "pod.yaml"
    pod.write_text(POD)
    placed = json.loads(
        await ok(running, "allocate", "--from-pod", str(pod), "--ttl", "5m", "-o", "json")
    )
    assert placed["request"]["owner"] == "ml/trainer"
    assert placed["request_id"] == "k8s:ml/trainer:4a3c"
    assert placed["node"] == "node-a"
    assert placed["isolation"] == "ISOLATION_CU_MASK"
    assert "mps" in placed["isolation_note"]
    assert placed["gpus"][0]["granted_memory_mib"] == "16384"
    assert placed["request"]["ttl_seconds"] == 300
    assert placed["request"]["labels"] == {"app": "trainer"}
    again = json.loads(
        await ok(running, "allocate", "--from-pod", str(pod), "--ttl", "5m", "-o", "json")
    )
    assert again["id"] == placed["id"]  # the pod's identity makes it idempotent

    broken = tmp_path / "broken.yaml"
    broken.write_text(POD.replace("kaiwo.ai/gpu-memory", "kaiwo.ai/gpu-memroy"))
    code, _, err = await cli(running, "allocate", "--from-pod", str(broken))
    assert code == 2
    assert "kaiwo.ai/gpu-memroy" in err
    assert err.count("\n") == 1
    code, _, err = await cli(running, "allocate", "--from-pod", str(pod), "--fraction", "0.5")
    assert code == 2
    assert "--fraction" in err
    code, _, err = await cli(running, "allocate", "--from-pod", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert "missing.yaml" in err
    code, _, err = await cli(running, "allocate", "--from-pod", str(pod), "--label", "app=web")
    assert code == 2
    assert "app=trainer" in err


async def test_a_hand_written_pod_gets_a_new_request_each_time(
    running: Running, tmp_path: Path
) -> None:
    pod = tmp_path / "pod.yaml"
    pod.write_text(
        POD.replace("  uid: 4a3c\n", "").replace("nodeSelector: {zone: a}", "nodeName: node-a")
    )
    first = json.loads(await ok(running, "allocate", "--from-pod", str(pod), "-o", "json"))
    assert first["request"]["selector"]["nodes"] == ["node-a"]
    await ok(running, "release", first["id"])
    second = json.loads(await ok(running, "allocate", "--from-pod", str(pod), "-o", "json"))
    assert second["id"] != first["id"]
    code, _, err = await cli(running, "allocate", "--from-pod", str(pod), "--node", "node-b")
    assert code == 2
    assert "--node" in err


CHILD = """\
import os, signal, sys, time
print(os.environ["ROCR_VISIBLE_DEVICES"], os.environ["KAIWO_GPU_ALLOCATION_ID"],
      os.environ["PASSED_THROUGH"], flush=True)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(7)
if mode == "trap":
    signal.signal(signal.SIGTERM, lambda *_: (print("got TERM", flush=True), sys.exit(3)))
elif mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
print("ready", flush=True)
time.sleep(60)
"""


async def start_run(running: Running, owner: str, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *KAIWO_GPU, "run", "--node", "node-a", "--fraction", "0.25", "--owner", owner,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KAIWO_GPU_COORDINATOR": running.target, "PASSED_THROUGH": "yes"},
    )  # fmt: skip


async def owned(running: Running, owner: str) -> list[str]:
    listing = json.loads(await ok(running, "list", "--owner", owner, "-o", "json"))
    return [a["id"] for a in listing["allocations"]]


async def test_run_passes_environment_and_exit_status_and_releases(running: Running) -> None:
    process = await start_run(running, "run/exit", "--", sys.executable, "-c", CHILD, "exit")
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 7, err
    devices, allocation_id, passed = out.decode().split()
    assert passed == "yes"
    assert devices.isdigit()
    assert f"allocation {allocation_id} on node-a" in err.decode()
    assert await owned(running, "run/exit") == []


@pytest.mark.parametrize(
    ("signum", "mode", "status"),
    [(signal.SIGTERM, "trap", 3), (signal.SIGINT, "default", 128 + signal.SIGINT)],
)
async def test_run_forwards_signals_and_releases(
    running: Running, signum: int, mode: str, status: int
) -> None:
    owner = f"run/{mode}"
    process = await start_run(running, owner, "--", sys.executable, "-c", CHILD, mode)
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 60)
    assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    allocation_id = first.decode().split()[1]
    assert await owned(running, owner) == [allocation_id]
    process.send_signal(signum)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == status
    assert (b"got TERM" in out) == (mode == "trap")
    assert await owned(running, owner) == []


async def test_run_stops_the_command_when_the_lease_is_lost(running: Running) -> None:
    process = await start_run(
        running, "run/lost", "--ttl", "3s", "--", sys.executable, "-c", CHILD, "trap"
    )
    assert process.stdout is not None
    allocation_id = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().split()[1]
    assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    await ok(running, "release", allocation_id)  # an operator takes it away
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 3
    assert b"got TERM" in out
    assert b"lease is gone" in err


async def test_run_kills_a_command_that_ignores_sigterm_after_a_lost_lease(
    running: Running,
) -> None:
    process = await start_run(
        running, "run/ignore", "--ttl", "3s", "--kill-after", "1s",
        "--", sys.executable, "-c", CHILD, "ignore",
    )  # fmt: skip
    assert process.stdout is not None
    allocation_id = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().split()[1]
    assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    await ok(running, "release", allocation_id)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 128 + signal.SIGKILL
    assert b"SIGKILL in 1s" in err


def handles(pid: int, signum: int) -> bool:
    """Whether a process has installed a handler for `signum` (SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


async def test_run_stops_at_once_when_signalled_while_allocating() -> None:
    process = await asyncio.create_subprocess_exec(
        *KAIWO_GPU, "run", "--coordinator", "127.0.0.1:1", "--timeout", "60s", "--any-node",
        "--fraction", "0.25", "--", "true",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    for _ in range(600):  # bounded: 30 s for the interpreter to start
        if handles(process.pid, signal.SIGTERM):
            break
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), 30)  # far less than --timeout
    assert process.returncode == 128 + signal.SIGTERM
    assert b"stopped by SIGTERM" in err


async def test_run_reports_the_commands_status_when_the_release_fails() -> None:
    fake = flaky(release=[grpc.StatusCode.UNAVAILABLE])
    async with serving(fake) as target:
        process = await asyncio.create_subprocess_exec(
            *KAIWO_GPU, "run", "--coordinator", target, "--timeout", "2s", "--any-node",
            "--fraction", "0.5", "--", sys.executable, "-c", "raise SystemExit(7)",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 7
    assert b"could not release a1" in err
    assert fake.release_calls >= 1


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody has reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def test_run_signals_and_cleans_up_the_commands_whole_group(running: Running) -> None:
    # The command leaves a background sleeper behind and a foreground one running.
    script = "sleep 300 & echo $!; sleep 300 & echo $!; echo ready; wait"
    process = await start_run(running, "run/group", "--", "sh", "-c", script)
    assert process.stdout is not None
    left = [int(await asyncio.wait_for(process.stdout.readline(), 60)) for _ in range(2)]
    assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 128 + signal.SIGTERM
    assert all(gone(pid) for pid in left)
    assert await owned(running, "run/group") == []

    # A command that exits leaving a process behind: the group is cleaned up too.
    process = await start_run(running, "run/left", "--", "sh", "-c", "sleep 300 & echo $!")
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    assert gone(int(out))


async def test_run_treats_a_lease_it_cannot_renew_for_a_ttl_as_lost() -> None:
    fake = flaky(keepalive_status=grpc.StatusCode.UNAVAILABLE)
    async with serving(fake) as target:
        process = await asyncio.create_subprocess_exec(
            *KAIWO_GPU, "run", "--coordinator", target, "--ttl", "2s", "--timeout", "2s",
            "--any-node", "--fraction", "0.5", "--", "sleep", "60",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 128 + signal.SIGTERM
    assert b"no renewal succeeded for 2s" in err
    assert fake.keepalive_calls >= 1


async def test_run_replaces_an_inherited_grant_environment() -> None:
    show = 'echo "mask=${HSA_CU_MASK-unset} dev=$ROCR_VISIBLE_DEVICES"'
    async with serving(flaky()) as target:
        process = await asyncio.create_subprocess_exec(
            *KAIWO_GPU, "run", "--coordinator", target, "--any-node", "--fraction", "0.5",
            "--quiet", "--", "sh", "-c", show,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "HSA_CU_MASK": "0:0-75", "ROCR_VISIBLE_DEVICES": "3"},
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert out.decode().split() == ["mask=unset", "dev=0"]


async def test_run_withdraws_what_it_placed_when_signalled_during_allocate() -> None:
    fake = flaky(first_delay_s=30)  # the first Allocate hangs; a replay answers at once
    async with serving(fake) as target:
        process = await asyncio.create_subprocess_exec(
            *KAIWO_GPU, "run", "--coordinator", target, "--timeout", "60s", "--any-node",
            "--fraction", "0.5", "--", "true",
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        for _ in range(600):  # bounded: until the first Allocate has arrived
            if fake.request_ids:
                break
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 128 + signal.SIGTERM
    assert len(fake.request_ids) == 2
    assert len(set(fake.request_ids)) == 1  # replayed under the same request id
    assert fake.release_calls == 1, err


async def test_run_on_a_host_that_is_no_node_says_so_and_what_to_pass(running: Running) -> None:
    """Issue 16: a laptop against `kaiwo-gpu up` heard only "do not match the selector"."""
    laptop = {"KAIWO_GPU_NODE": "laptop"}
    code, _, err = await cli(running, "run", "--fraction=0.5", "--", "true", env=laptop)
    assert code != 0
    assert "this host (laptop, from $KAIWO_GPU_NODE or the host name) is not a node" in err
    assert "node-a, node-b" in err  # the known nodes, by name
    assert "--node NAME" in err
    assert "--any-node" in err
    # On a node of the cluster a refusal is only the coordinator's reason.
    full = {"KAIWO_GPU_NODE": "node-a"}
    code, _, err = await cli(running, "run", "--fraction=1", "--count=8", "--", "true", env=full)
    assert code != 0
    assert "is not a node" not in err


async def test_run_reports_a_missing_command(running: Running) -> None:
    code, _, err = await cli(
        running, "run", "--any-node", "--fraction", "0.25", "--", "no-such-cmd"
    )
    assert code == 127
    assert "no-such-cmd: command not found" in err
    code, _, err = await cli(running, "run", "--fraction", "0.25")
    assert code == 2
    assert "no command" in err


TERMINAL_CHILD = """\
import os, signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda *_: got.append(1))
print("fg", os.tcgetpgrp(0) == os.getpgrp(), os.getpgrp() != os.getsid(0), flush=True)
print("ready", flush=True)
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # a second, forwarded SIGINT would land here
print("sigints", len(got), flush=True)
sys.exit(5)
"""
# Makes the pty its controlling terminal, as a login shell's session would have it.
SESSION = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """A pty that is the controlling terminal of a new session running `argv`."""

    def __init__(self, primary: int, process: asyncio.subprocess.Process) -> None:
        self.primary = primary
        self.process = process
        self.seen = b""

    @classmethod
    async def start(cls, running: Running, *argv: str) -> Terminal:
        primary, secondary = pty.openpty()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SESSION, *argv,
            stdin=secondary, stdout=secondary, stderr=secondary,
            env={**os.environ, "KAIWO_GPU_COORDINATOR": running.target},
        )  # fmt: skip
        os.close(secondary)
        return cls(primary, process)

    async def read_until(self, marker: bytes) -> str:
        loop = asyncio.get_running_loop()
        while marker not in self.seen:
            chunk = loop.run_in_executor(None, os.read, self.primary, 1024)
            self.seen += await asyncio.wait_for(chunk, 60)
        return self.seen.decode(errors="replace")

    async def read_line_with(self, marker: bytes) -> str:
        """Everything up to the end of the line that holds `marker`."""
        await self.read_until(marker)
        while b"\n" not in self.seen[self.seen.index(marker) :]:
            loop = asyncio.get_running_loop()
            chunk = loop.run_in_executor(None, os.read, self.primary, 1024)
            self.seen += await asyncio.wait_for(chunk, 60)
        return self.seen.decode(errors="replace")

    def type(self, keys: bytes) -> None:
        os.write(self.primary, keys)

    async def finish(self) -> int:
        await asyncio.wait_for(self.process.wait(), 60)
        os.close(self.primary)
        assert self.process.returncode is not None
        return self.process.returncode


RUN_ON_TERMINAL = (*KAIWO_GPU, "run", "--node", "node-a", "--fraction", "0.25", "--quiet", "--")


async def test_run_hands_the_terminal_to_the_command_so_ctrl_c_arrives_once(
    running: Running,
) -> None:
    terminal = await Terminal.start(running, *RUN_ON_TERMINAL, sys.executable, "-c", TERMINAL_CHILD)
    await terminal.read_until(b"ready")
    terminal.type(b"\x03")  # Ctrl-C, as typed
    text = await terminal.read_line_with(b"sigints")  # the count too
    assert await terminal.finish() == 5
    assert "fg True True" in text  # its own group, and the terminal's foreground
    assert "sigints 1" in text


async def test_run_inside_a_script_leaves_the_command_in_the_scripts_group(
    running: Running,
) -> None:
    line = shlex.join([*RUN_ON_TERMINAL, sys.executable, "-c", TERMINAL_CHILD])
    terminal = await Terminal.start(running, "/bin/sh", "-c", f"{line}; echo after=$?")
    await terminal.read_until(b"ready")
    terminal.type(b"\x03")
    # The whole line: reading up to "sigints" alone could stop before its number came.
    text = await terminal.read_line_with(b"sigints")
    await terminal.finish()
    assert "fg True False" in text  # the script's group holds the terminal, the command too
    assert "sigints 1" in text  # from the terminal only: run did not forward it again


STOPPABLE_CHILD = """import os, sys, time
print("ready", flush=True)
deadline = time.monotonic() + 30
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.05)
print("done", flush=True)
sys.exit(4)
"""


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_ctrl_z_stops_run_with_its_command_and_continuing_resumes_both(
    running: Running, tmp_path: Path
) -> None:
    marker = tmp_path / "go"
    terminal = await Terminal.start(
        running, *RUN_ON_TERMINAL, sys.executable, "-c", STOPPABLE_CHILD, str(marker)
    )
    await terminal.read_until(b"ready")
    terminal.type(b"\x1a")  # Ctrl-Z
    run_pid = terminal.process.pid  # the session wrapper exec'd into run
    for _ in range(600):  # bounded: 30 s
        if state(run_pid) == "T":
            break
        await asyncio.sleep(0.05)
    assert state(run_pid) == "T"  # stopped with its command, as a shell's job is
    os.kill(run_pid, signal.SIGCONT)  # what `fg` does
    marker.touch()
    await terminal.read_until(b"done")
    assert await terminal.finish() == 4


async def test_a_hangup_ignored_by_nohup_stays_ignored(running: Running) -> None:
    ignoring = (
        "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ignoring, *KAIWO_GPU, "run", "--node", "node-a",
        "--fraction", "0.25", "--quiet", "--", sys.executable, "-c",
        "import time; print('ready', flush=True); time.sleep(1); raise SystemExit(6)",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "KAIWO_GPU_COORDINATOR": running.target},
    )  # fmt: skip
    assert process.stdout is not None
    assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    process.send_signal(signal.SIGHUP)
    await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 6
