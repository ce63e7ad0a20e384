"""The Slurm front door: deploy/slurm's TaskProlog and Epilog, run the way Slurm runs them.

Each script runs as a subprocess with the environment slurmstepd or slurmd would give it,
against an in-process coordinator and etcd on loopback. Its stdout and stderr are read as
one stream, as Slurm reads a TaskProlog's, and `slurm_reads` turns that stream into the
task's environment and printed lines the way slurmstepd does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kaiwo_gpu.common.grant_variables import CU_MASK, GRANT_VARIABLES
from tests.conftest import Running

SLURM_DIR = Path(__file__).resolve().parent.parent / "deploy" / "slurm"
TASK_PROLOG = SLURM_DIR / "task-prolog.sh"
EPILOG = SLURM_DIR / "epilog.sh"
VENV_BIN = Path(sys.executable).parent
KAIWO_GPU = VENV_BIN / "kaiwo-gpu"
SCRIPT_TIMEOUT_S = 60.0
UNMASKED_GRANT_VARIABLES = frozenset(GRANT_VARIABLES) - {CU_MASK}
"""What a grant without cu-mask isolation sets."""


@dataclass
class TaskStart:
    """What slurmstepd makes of a TaskProlog's output (src/slurmd/slurmstepd/task.c)."""

    status: int
    exports: dict[str, str] = field(default_factory=dict)
    unsets: list[str] = field(default_factory=list)
    printed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def environment(self, before: Mapping[str, str]) -> dict[str, str]:
        """The environment the task starts with, as a later step inherits it."""
        kept = {k: v for k, v in before.items() if k not in self.unsets}
        return {**kept, **self.exports}


def slurm_reads(status: int, output: str) -> TaskStart:
    start = TaskStart(status)
    for line in output.splitlines():
        if line.startswith("print "):
            start.printed.append(line.removeprefix("print ").lstrip())
        elif line.startswith("export ") and "=" in line:
            name, _, value = line.removeprefix("export ").lstrip().partition("=")
            start.exports[name.rstrip()] = value
        elif line.startswith("unset "):
            start.unsets.append(line.removeprefix("unset ").strip())
        elif line.strip():
            start.ignored.append(line)
    return start


@dataclass(frozen=True)
class Ran:
    status: int
    output: str


async def run(argv: list[str], environment: Mapping[str, str]) -> Ran:
    """Runs argv with stdout and stderr as one stream, the way Slurm collects a script's."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(environment),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Ran(process.returncode, output.decode())


async def task_prolog(environment: Mapping[str, str]) -> TaskStart:
    ran = await run([str(TASK_PROLOG)], environment)
    return slurm_reads(ran.status, ran.output)


async def epilog(environment: Mapping[str, str]) -> Ran:
    return await run([str(EPILOG)], environment)


def task_environment(
    coordinator: str, job_id: str, node: str = "node-a", **variables: str
) -> dict[str, str]:
    """What a task of job_id on node has: the job's environment plus slurmstepd's additions."""
    return {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_USER": "alice",
        "SLURM_JOB_PARTITION": "gpu",
        "SLURM_CLUSTER_NAME": "lab",
        "SLURMD_NODENAME": node,
        "KAIWO_GPU_COORDINATOR": coordinator,
        "KAIWO_GPU_SLURM_ENV": "/nonexistent/slurm.env",
        "KAIWO_GPU_TIMEOUT": "10s",
        **variables,
    }


def epilog_environment(env_file: Path, job_id: str, node: str = "node-a") -> dict[str, str]:
    """What slurmd gives an Epilog: SLURM_* only, no PATH; the site's file does the rest."""
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_USER": "alice",
        "SLURM_CLUSTER_NAME": "lab",
        "SLURMD_NODENAME": node,
        "SLURM_SCRIPT_CONTEXT": "epilog_slurmd",
        "KAIWO_GPU_SLURM_ENV": str(env_file),
    }


def site_file(tmp_path: Path, coordinator: str, **extra: str) -> Path:
    path = tmp_path / "slurm.env"
    lines = [f"KAIWO_GPU_COORDINATOR={coordinator}", f"KAIWO_GPU_BIN={KAIWO_GPU}"]
    lines.extend(f"{name}={value}" for name, value in extra.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def target(running: Running) -> str:
    return f"127.0.0.1:{running.coordinator.port}"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def listed(coordinator: str, owner: str) -> list[dict[str, Any]]:
    """`kaiwo-gpu list --owner OWNER -o json`, the command docs/slurm.md shows."""
    ran = await run(
        [str(KAIWO_GPU), "list", "--owner", owner, "-o", "json", "--coordinator", coordinator],
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert ran.status == 0, ran.output
    allocations: list[dict[str, Any]] = json.loads(ran.output)["allocations"]
    return allocations


def test_the_task_prolog_unsets_exactly_the_grant_variables() -> None:
    """The script keeps its own list (it cannot import one); this keeps it from drifting."""
    loop = re.search(r"^for name in (.+?); do$", TASK_PROLOG.read_text(), re.MULTILINE | re.DOTALL)
    assert loop is not None, "the TaskProlog's `for name in ...; do` loop is gone"
    names = loop.group(1).replace("\\\n", " ").split()
    assert sorted(names) == sorted(GRANT_VARIABLES)


@pytest.mark.integration
def test_scripts_are_executable_posix_sh() -> None:
    for script in (TASK_PROLOG, EPILOG):
        assert os.access(script, os.X_OK), f"{script} must be executable: Slurm execs it"
        assert script.read_text().startswith("#!/bin/sh\n")
        checked = subprocess.run(
            ["sh", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
        )
        assert checked.returncode == 0, checked.stderr


@pytest.mark.integration
async def test_tasks_of_a_job_share_one_allocation_on_their_node(running: Running) -> None:
    coordinator = target(running)
    environment = task_environment(
        coordinator,
        "4242",
        node="node-b",
        SLURM_JOB_USER="alice@example.org",
        SLURM_JOB_PARTITION="gpu shared (MI210)",
        KAIWO_GPU_FRACTION="0.5",
        KAIWO_GPU_MEMORY="4Gi",
    )

    first, second = await asyncio.gather(task_prolog(environment), task_prolog(environment))

    assert (first.status, first.printed, first.ignored) == (0, [], [])
    assert first.unsets == ["HSA_CU_MASK"]  # no cu-mask granted: none may be inherited
    assert second == first
    assert set(first.exports) >= UNMASKED_GRANT_VARIABLES
    assert first.exports["KAIWO_GPU_NODE"] == "node-b"
    [allocation] = await listed(coordinator, "slurm/4242")
    assert allocation["id"] == first.exports["KAIWO_GPU_ALLOCATION_ID"]
    assert allocation["node"] == "node-b"
    assert allocation["request_id"] == "slurm-lab-4242-node-b"
    assert allocation["environment"] == {
        name: value for name, value in first.exports.items() if name in allocation["environment"]
    }
    assert set(first.exports) - set(allocation["environment"]) == {"KAIWO_GPU_SLURM_ISOLATION"}
    assert allocation["request"]["labels"] == {
        "slurm.job-id": "4242",
        "slurm.user": "alice-example.org",
        "slurm.partition": "gpu-shared--MI210",
    }
    assert [gpu["granted_millis"] for gpu in allocation["gpus"]] == [500]


@pytest.mark.integration
@pytest.mark.parametrize("isolation", [None, "cu-mask", "mps"])
async def test_a_step_started_from_a_granted_task_gets_the_same_allocation(
    running: Running, isolation: str | None
) -> None:
    """srun in a batch script inherits the batch task's environment, the grant's included."""
    coordinator = target(running)
    request = {"KAIWO_GPU_FRACTION": "0.25"}
    if isolation is not None:
        request["KAIWO_GPU_ISOLATION"] = isolation
    batch_environment = task_environment(coordinator, "77", **request)

    batch = await task_prolog(batch_environment)
    step = await task_prolog(batch.environment(batch_environment))

    assert (batch.status, step.status) == (0, 0), batch.printed + step.printed
    assert step.exports == batch.exports
    assert ("HSA_CU_MASK" in batch.exports) == (isolation in ("cu-mask", "mps"))
    assert len(await listed(coordinator, "slurm/77")) == 1


@pytest.mark.integration
async def test_a_grant_from_elsewhere_neither_shapes_the_request_nor_leaks(
    running: Running,
) -> None:
    """sbatch from a shell under `kaiwo-gpu run --isolation cu-mask` that asks for a share."""
    coordinator = target(running)
    inherited = {
        "KAIWO_GPU_ALLOCATION_ID": "f00d",
        "KAIWO_GPU_ISOLATION": "cu-mask",
        "HSA_CU_MASK": "0:0-75",
        "KAIWO_GPU_FRACTION": "0.5",
    }
    start = await task_prolog(task_environment(coordinator, "5014", **inherited))
    assert start.status == 0, start.printed
    assert start.exports["KAIWO_GPU_ISOLATION"] == "none"
    assert "HSA_CU_MASK" not in start.environment(inherited)


@pytest.mark.integration
@pytest.mark.parametrize(
    "inherited",
    [
        {},
        # submitted from a shell under `kaiwo-gpu run`: a grant, but no request
        {"KAIWO_GPU_ALLOCATION_ID": "f00d", "KAIWO_GPU_ISOLATION": "none"},
    ],
)
async def test_a_job_that_asks_for_no_share_gets_nothing(
    running: Running, inherited: dict[str, str]
) -> None:
    coordinator = target(running)

    start = await task_prolog(task_environment(coordinator, "5", **inherited))

    assert start == TaskStart(0)
    assert await listed(coordinator, "slurm/5") == []


@pytest.mark.integration
async def test_the_site_file_names_the_coordinator_over_the_job_environment(
    running: Running, tmp_path: Path
) -> None:
    environment = task_environment(
        f"127.0.0.1:{closed_port()}",
        "31",
        KAIWO_GPU_SLURM_ENV=str(site_file(tmp_path, target(running))),
        KAIWO_GPU_FRACTION="0.5",
    )

    start = await task_prolog(environment)

    assert start.status == 0, start.printed
    assert len(await listed(target(running), "slurm/31")) == 1


@pytest.mark.integration
async def test_the_epilog_releases_and_can_run_again(running: Running, tmp_path: Path) -> None:
    coordinator = target(running)
    env_file = site_file(tmp_path, coordinator)
    environment = task_environment(coordinator, "900", KAIWO_GPU_FRACTION="0.5")
    assert (await task_prolog(environment)).status == 0

    first = await epilog(epilog_environment(env_file, "900"))
    again = await epilog(epilog_environment(env_file, "900"))

    assert (first.status, first.output) == (0, "")
    assert (again.status, again.output) == (0, "")
    assert await listed(coordinator, "slurm/900") == []


@pytest.mark.integration
async def test_the_epilog_of_a_heterogeneous_component_releases_the_leaders_shares(
    running: Running, tmp_path: Path
) -> None:
    """Tasks of every component see the leader's id; the Epilog sees it as SLURM_HET_JOB_ID."""
    coordinator = target(running)
    assert (
        await task_prolog(task_environment(coordinator, "700", KAIWO_GPU_FRACTION="1"))
    ).status == 0

    ended = await epilog(
        {**epilog_environment(site_file(tmp_path, coordinator), "701"), "SLURM_HET_JOB_ID": "700"}
    )

    assert ended.status == 0, ended.output
    assert await listed(coordinator, "slurm/700") == []


@pytest.mark.integration
async def test_a_requeued_job_gets_a_new_allocation(running: Running, tmp_path: Path) -> None:
    """A released request id stays taken for a while; the restart count makes a new one."""
    coordinator = target(running)
    environment = task_environment(coordinator, "901", KAIWO_GPU_FRACTION="0.5")
    first_run = await task_prolog(environment)
    released = await epilog(epilog_environment(site_file(tmp_path, coordinator), "901"))
    assert (first_run.status, released.status) == (0, 0)

    second_run = await task_prolog({**environment, "SLURM_RESTART_COUNT": "1"})

    assert second_run.status == 0, second_run.printed
    [allocation] = await listed(coordinator, "slurm/901")
    assert allocation["request_id"] == "slurm-lab-901-r1-node-a"
    assert allocation["id"] != first_run.exports["KAIWO_GPU_ALLOCATION_ID"]


@pytest.mark.integration
async def test_a_job_on_two_nodes_holds_one_share_on_each_until_its_epilogs(
    running: Running, tmp_path: Path
) -> None:
    coordinator = target(running)
    env_file = site_file(tmp_path, coordinator)
    starts = await asyncio.gather(
        *(
            task_prolog(task_environment(coordinator, "12", node=node, KAIWO_GPU_FRACTION="0.5"))
            for node in ("node-a", "node-b")
        )
    )
    assert [start.status for start in starts] == [0, 0]
    assert [start.exports["KAIWO_GPU_NODE"] for start in starts] == ["node-a", "node-b"]
    assert len(await listed(coordinator, "slurm/12")) == 2

    ends = await asyncio.gather(
        *(epilog(epilog_environment(env_file, "12", node)) for node in ("node-a", "node-b"))
    )

    assert [end.status for end in ends] == [0, 0], [end.output for end in ends]
    assert await listed(coordinator, "slurm/12") == []


@pytest.mark.integration
@pytest.mark.parametrize(
    ("request_variables", "status", "reason"),
    [
        ({"KAIWO_GPU_FRACTION": "abc"}, 2, "fraction"),
        ({"KAIWO_GPU_FRACTION": "1", "KAIWO_GPU_COUNT": "3"}, 4, ""),
        ({"KAIWO_GPU_FRACTION": "0.5", "SLURMD_NODENAME": ""}, 2, "SLURMD_NODENAME"),
    ],
    ids=["bad-fraction", "no-capacity", "not-under-slurm"],
)
async def test_a_request_that_cannot_be_granted_fails_the_task_with_a_printed_reason(
    running: Running, request_variables: dict[str, str], status: int, reason: str
) -> None:
    coordinator = target(running)
    environment = task_environment(coordinator, "66", node="node-b", **request_variables)

    start = await task_prolog(environment)

    assert start.status == status
    assert start.exports == {}
    assert start.printed, "the user must see why the task did not start"
    assert all(line.startswith("kaiwo-gpu: ") for line in start.printed)
    assert reason in "\n".join(start.printed)
    assert await listed(coordinator, "slurm/66") == []


@pytest.mark.integration
async def test_an_unreachable_coordinator_fails_the_task_but_not_the_node(
    tmp_path: Path,
) -> None:
    unreachable = f"127.0.0.1:{closed_port()}"
    logged = tmp_path / "syslog"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    logger = fake_bin / "logger"
    logger.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{logged}"\n')
    logger.chmod(0o755)
    environment = task_environment(
        unreachable, "13", KAIWO_GPU_FRACTION="0.5", KAIWO_GPU_TIMEOUT="2s"
    )
    end_environment = {
        **epilog_environment(site_file(tmp_path, unreachable, KAIWO_GPU_EPILOG_TIMEOUT="2s"), "13"),
        "PATH": f"{fake_bin}:/usr/bin:/bin",
    }

    start = await task_prolog(environment)
    forgiving = await epilog(end_environment)
    strict = await epilog({**end_environment, "KAIWO_GPU_EPILOG_STRICT": "yes"})

    assert start.status == 5
    assert start.exports == {}
    assert start.printed[0] == "kaiwo-gpu: no GPU share for job 13 on node-a (exit 5)"
    assert forgiving.status == 0
    assert "releasing owner slurm/13 failed (exit 5" in forgiving.output
    assert strict.status == 5
    assert logged.read_text().count("releasing owner slurm/13 failed") == 2
