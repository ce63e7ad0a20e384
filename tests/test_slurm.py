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
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from kaiwo_gpu.client.support import COORDINATOR_VARIABLE
from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.errors import InvalidArgumentError
from kaiwo_gpu.common.grant_variables import CU_MASK, GRANT_VARIABLES
from kaiwo_gpu.common.names import is_request_id
from kaiwo_gpu.common.units import parse_duration_s
from kaiwo_gpu.coordinator.local.etcd import free_port
from kaiwo_gpu.v1 import allocation_pb2, types_pb2
from tests.conftest import Running
from tests.fake_coordinator import FlakyCoordinator, serving
from tests.slurm_cluster import KAIWO_GPU, SLURM_DIR

TASK_PROLOG = SLURM_DIR / "task-prolog.sh"
EPILOG = SLURM_DIR / "epilog.sh"
VENV_BIN = KAIWO_GPU.parent
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
    site: Path, job_id: str, node: str = "node-a", **variables: str
) -> dict[str, str]:
    """What a task of job_id on node has: the job's environment plus slurmstepd's additions.
    `site` is the site's file, which says how to reach the coordinator."""
    return {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_USER": "alice",
        "SLURM_JOB_PARTITION": "gpu",
        "SLURM_CLUSTER_NAME": "lab",
        "SLURMD_NODENAME": node,
        "KAIWO_GPU_SLURM_ENV": str(site),
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


def site_file(tmp_path: Path, coordinator: str, **settings: str) -> Path:
    """The site's slurm.env: the coordinator, this checkout's CLI and a 10 s allocate, or
    what `settings` (NAME=value) say instead."""
    values = {
        "KAIWO_GPU_COORDINATOR": coordinator,
        "KAIWO_GPU_BIN": str(KAIWO_GPU),
        "KAIWO_GPU_TIMEOUT": "10s",
        **settings,
    }
    path = tmp_path / "slurm.env"
    path.write_text("".join(f"{variable}={value}\n" for variable, value in values.items()))
    return path


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
async def test_tasks_of_a_job_share_one_allocation_on_their_node(
    running: Running, tmp_path: Path
) -> None:
    coordinator = running.target
    environment = task_environment(
        site_file(tmp_path, coordinator),
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
    assert allocation["request_id"] == "slurm:lab:4242:node-b"
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
    running: Running, tmp_path: Path, isolation: str | None
) -> None:
    """srun in a batch script inherits the batch task's environment, the grant's included."""
    coordinator = running.target
    request = {"KAIWO_GPU_FRACTION": "0.25"}
    if isolation is not None:
        request["KAIWO_GPU_ISOLATION"] = isolation
    batch_environment = task_environment(site_file(tmp_path, coordinator), "77", **request)

    batch = await task_prolog(batch_environment)
    step = await task_prolog(batch.environment(batch_environment))

    assert (batch.status, step.status) == (0, 0), batch.printed + step.printed
    assert step.exports == batch.exports
    assert ("HSA_CU_MASK" in batch.exports) == (isolation in ("cu-mask", "mps"))
    assert len(await listed(coordinator, "slurm/77")) == 1


@pytest.mark.integration
async def test_a_grant_from_elsewhere_neither_shapes_the_request_nor_leaks(
    running: Running, tmp_path: Path
) -> None:
    """sbatch from a shell under `kaiwo-gpu run --isolation cu-mask` that asks for a share."""
    coordinator = running.target
    inherited = {
        "KAIWO_GPU_ALLOCATION_ID": "f00d",
        "KAIWO_GPU_ISOLATION": "cu-mask",
        "HSA_CU_MASK": "0:0-75",
        "KAIWO_GPU_FRACTION": "0.5",
    }
    start = await task_prolog(
        task_environment(site_file(tmp_path, coordinator), "5014", **inherited)
    )
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
    running: Running, tmp_path: Path, inherited: dict[str, str]
) -> None:
    coordinator = running.target

    start = await task_prolog(task_environment(site_file(tmp_path, coordinator), "5", **inherited))

    assert start == TaskStart(0)
    assert await listed(coordinator, "slurm/5") == []


@pytest.mark.integration
async def test_the_site_file_names_the_coordinator_over_the_job_environment(
    running: Running, tmp_path: Path
) -> None:
    environment = task_environment(
        site_file(tmp_path, running.target),
        "31",
        KAIWO_GPU_COORDINATOR=f"127.0.0.1:{free_port()}",
        KAIWO_GPU_FRACTION="0.5",
    )

    start = await task_prolog(environment)

    assert start.status == 0, start.printed
    assert len(await listed(running.target, "slurm/31")) == 1


@pytest.mark.integration
async def test_the_epilog_releases_and_can_run_again(running: Running, tmp_path: Path) -> None:
    coordinator = running.target
    env_file = site_file(tmp_path, coordinator)
    environment = task_environment(env_file, "900", KAIWO_GPU_FRACTION="0.5")
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
    env_file = site_file(tmp_path, running.target)
    assert (
        await task_prolog(task_environment(env_file, "700", KAIWO_GPU_FRACTION="1"))
    ).status == 0

    ended = await epilog({**epilog_environment(env_file, "701"), "SLURM_HET_JOB_ID": "700"})

    assert ended.status == 0, ended.output
    assert await listed(running.target, "slurm/700") == []


@pytest.mark.integration
async def test_a_requeued_job_gets_a_new_allocation(running: Running, tmp_path: Path) -> None:
    """A released request id stays taken for a while; the restart count makes a new one."""
    coordinator = running.target
    env_file = site_file(tmp_path, coordinator)
    environment = task_environment(env_file, "901", KAIWO_GPU_FRACTION="0.5")
    first_run = await task_prolog(environment)
    released = await epilog(epilog_environment(env_file, "901"))
    assert (first_run.status, released.status) == (0, 0)

    second_run = await task_prolog({**environment, "SLURM_RESTART_COUNT": "1"})

    assert second_run.status == 0, second_run.printed
    [allocation] = await listed(coordinator, "slurm/901")
    assert allocation["request_id"] == "slurm:lab:901:r1:node-a"
    assert allocation["id"] != first_run.exports["KAIWO_GPU_ALLOCATION_ID"]


@pytest.mark.integration
@pytest.mark.parametrize("strict", ["no", "yes"])
async def test_a_job_on_two_nodes_holds_one_share_on_each_until_its_epilogs(
    running: Running, tmp_path: Path, strict: str
) -> None:
    """Both Epilogs release at once, racing for the same allocations: neither complains,
    and neither would drain its node."""
    coordinator = running.target
    env_file = site_file(tmp_path, coordinator, KAIWO_GPU_EPILOG_STRICT=strict)
    starts = await asyncio.gather(
        *(
            task_prolog(task_environment(env_file, "12", node=node, KAIWO_GPU_FRACTION="0.5"))
            for node in ("node-a", "node-b")
        )
    )
    assert [start.status for start in starts] == [0, 0]
    assert [start.exports["KAIWO_GPU_NODE"] for start in starts] == ["node-a", "node-b"]
    assert len(await listed(coordinator, "slurm/12")) == 2

    ends = await asyncio.gather(
        *(epilog(epilog_environment(env_file, "12", node)) for node in ("node-a", "node-b"))
    )

    assert [(end.status, end.output) for end in ends] == [(0, ""), (0, "")]
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
    running: Running, tmp_path: Path, request_variables: dict[str, str], status: int, reason: str
) -> None:
    coordinator = running.target
    environment = task_environment(
        site_file(tmp_path, coordinator), "66", node="node-b", **request_variables
    )

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
    unreachable = f"127.0.0.1:{free_port()}"
    logger = RecordingCli(tmp_path / "bin", name="logger")
    env_file = site_file(
        tmp_path, unreachable, KAIWO_GPU_TIMEOUT="2s", KAIWO_GPU_EPILOG_TIMEOUT="2s"
    )
    environment = task_environment(env_file, "13", KAIWO_GPU_FRACTION="0.5")
    end_environment = {**epilog_environment(env_file, "13"), "PATH": logger.search_path}

    start = await task_prolog(environment)
    forgiving = await epilog(end_environment)
    strict = await epilog({**end_environment, "KAIWO_GPU_EPILOG_STRICT": "yes"})

    assert start.status == 5
    assert start.exports == {}
    assert start.printed[0] == "kaiwo-gpu: no GPU share for job 13 on node-a (exit 5)"
    assert forgiving.status == 0
    assert "releasing owner slurm/13 failed (exit 5" in forgiving.output
    assert strict.status == 5
    assert len(logger.calls_naming("releasing owner slurm/13 failed")) == 2


RECORDING_CLI = """\
#!{python}
import json, os, pathlib, sys
directory = pathlib.Path({directory!r})
call = len(list(directory.glob("call-*.json")))
record = {{"argv": sys.argv[1:], "environment": dict(os.environ)}}
(directory / f"call-{{call:03d}}.json").write_text(json.dumps(record))
answers = json.loads((directory / "answers.json").read_text())
status, output = answers[min(call, len(answers) - 1)]
sys.stdout.write(output)
sys.exit(status)
"""


@dataclass(frozen=True)
class Call:
    argv: list[str]
    environment: dict[str, str]

    def option(self, name: str) -> str | None:
        """The value after `name`, or None when the call has no such option."""
        return self.argv[self.argv.index(name) + 1] if name in self.argv else None


class RecordingCli:
    """A KAIWO_GPU_BIN (or, by `name`, another command the scripts run, such as `logger`)
    that records each call (arguments, environment) and answers with the (status, output)
    pairs it was given, in turn, the last one repeating."""

    def __init__(self, directory: Path, *answers: tuple[int, str], name: str = "kaiwo-gpu") -> None:
        directory.mkdir()
        self.directory = directory
        self.path = directory / name
        (directory / "answers.json").write_text(json.dumps(list(answers) or [(0, "")]))
        self.path.write_text(RECORDING_CLI.format(python=sys.executable, directory=str(directory)))
        self.path.chmod(0o755)

    @property
    def search_path(self) -> str:
        """A PATH that finds this command first."""
        return f"{self.directory}:/usr/bin:/bin"

    def calls(self) -> list[Call]:
        return [
            Call(**json.loads(path.read_text()))
            for path in sorted(self.directory.glob("call-*.json"))
        ]

    def calls_naming(self, text: str) -> list[Call]:
        """The calls with `text` in one of their arguments."""
        return [call for call in self.calls() if any(text in arg for arg in call.argv)]


CONNECTION_VARIABLES = frozenset({COORDINATOR_VARIABLE, *credentials.VARIABLES.values()})
"""How the CLI reaches the coordinator and proves who it is: the site's, never the job's."""
SITE_CREDENTIALS = {
    credentials.VARIABLES[field]: f"/etc/kaiwo-gpu/tls/{file}"
    for field, file in (("tls_ca", "ca.crt"), ("tls_cert", "slurm.crt"), ("tls_key", "slurm.key"))
}
JOB_SETTINGS = {
    COORDINATOR_VARIABLE: "job.example:50051",
    **{variable: f"/home/alice/{field}" for field, variable in credentials.VARIABLES.items()},
    "KAIWO_GPU_BIN": "/home/alice/bin/kaiwo-gpu",
    "KAIWO_GPU_TIMEOUT": "1h",
}
"""What a job may carry, e.g. submitted from a shell under `kaiwo-gpu run`."""


@pytest.mark.parametrize("script", [TASK_PROLOG, EPILOG], ids=lambda script: script.name)
def test_the_scripts_pass_on_exactly_the_connection_variables(script: Path) -> None:
    """The scripts keep their own list (they cannot import one); this keeps it from drifting."""
    loop = re.search(r"^for variable in (.+?); do$", script.read_text(), re.MULTILINE | re.DOTALL)
    assert loop is not None, f"{script.name}'s `for variable in ...; do` loop is gone"
    assert sorted(loop.group(1).replace("\\\n", " ").split()) == sorted(CONNECTION_VARIABLES)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("site", "timeout"),
    [({**SITE_CREDENTIALS, "KAIWO_GPU_TIMEOUT": "7s"}, "7s"), ({}, None)],
    ids=["site-sets-credentials", "site-sets-none"],
)
async def test_the_task_prolog_calls_with_the_sites_settings_never_the_jobs(
    tmp_path: Path, site: dict[str, str], timeout: str | None
) -> None:
    """A job's own token would beat the site's certificate and run the call as its user; a
    site that sets no timeout leaves the CLI's default (no --timeout), not the job's 1h."""
    cli = RecordingCli(tmp_path / "cli", (0, "KAIWO_GPU_ALLOCATION_ID=a1\n"))
    env_file = tmp_path / "slurm.env"
    settings = {"KAIWO_GPU_COORDINATOR": "site.example:50051", "KAIWO_GPU_BIN": str(cli.path)}
    settings.update(site)
    env_file.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    environment = task_environment(env_file, "3", **JOB_SETTINGS, KAIWO_GPU_FRACTION="0.5")

    start = await task_prolog(environment)

    assert start.status == 0, start.printed
    [call] = cli.calls()
    assert call.option("--timeout") == timeout
    assert call.argv.count("--timeout") == (timeout is not None)
    sent = {name: value for name, value in call.environment.items() if name in CONNECTION_VARIABLES}
    assert sent == {name: value for name, value in settings.items() if name in CONNECTION_VARIABLES}


@pytest.mark.integration
async def test_the_site_file_cannot_change_or_add_to_the_request(tmp_path: Path) -> None:
    """The TaskProlog reads the request before it sources the site's file."""
    cli = RecordingCli(tmp_path / "cli", (0, "KAIWO_GPU_ALLOCATION_ID=a1\n"))
    env_file = site_file(
        tmp_path,
        "site.example:50051",
        KAIWO_GPU_BIN=str(cli.path),
        KAIWO_GPU_FRACTION="1",
        KAIWO_GPU_MEMORY="8Gi",
        KAIWO_GPU_ISOLATION="cu-mask",
    )

    start = await task_prolog(task_environment(env_file, "8", KAIWO_GPU_FRACTION="0.5"))

    assert start.status == 0, start.printed
    [call] = cli.calls()
    assert call.option("--fraction") == "0.5"
    assert [name for name in ("--memory", "--isolation") if name in call.argv] == []


@pytest.mark.integration
async def test_a_failing_call_shows_its_message_but_not_its_usage(tmp_path: Path) -> None:
    """argparse's usage (and its indented continuation lines) says nothing to a job's user."""
    refusal = "kaiwo-gpu allocate: error: argument --fraction: 'half' is not a fraction"
    cli = RecordingCli(
        tmp_path / "cli",
        (
            2,
            "usage: kaiwo-gpu allocate [-h] [--fraction F]\n"
            "                          [--memory MEMORY]\n"
            "\n"
            f"{refusal}\n",
        ),
    )
    env_file = site_file(tmp_path, "site.example:50051", KAIWO_GPU_BIN=str(cli.path))

    start = await task_prolog(task_environment(env_file, "9", KAIWO_GPU_FRACTION="half"))

    assert start == TaskStart(
        2,
        unsets=[],
        printed=["kaiwo-gpu: no GPU share for job 9 on node-a (exit 2)", f"kaiwo-gpu: {refusal}"],
    )


@pytest.mark.integration
async def test_request_ids_of_different_jobs_cannot_run_into_each_other(tmp_path: Path) -> None:
    """Job 12 on node r1-c01 and job 12 restarted once on node c01 are two requests."""
    cli = RecordingCli(tmp_path / "cli", (0, "KAIWO_GPU_ALLOCATION_ID=a1\n"))
    env_file = site_file(tmp_path, "site.example:50051", KAIWO_GPU_BIN=str(cli.path))

    for node, restarts in (("r1-c01", "0"), ("c01", "1")):
        environment = task_environment(
            env_file, "12", node=node, SLURM_RESTART_COUNT=restarts, KAIWO_GPU_FRACTION="0.5"
        )
        assert (await task_prolog(environment)).status == 0

    ids = [call.option("--request-id") for call in cli.calls()]
    assert len(set(ids)) == 2, ids
    assert ids == ["slurm:lab:12:r1-c01", "slurm:lab:12:r1:c01"]
    assert all(is_request_id(request_id) for request_id in ids)


@pytest.mark.integration
@pytest.mark.parametrize(("budget", "budget_s"), [("9s", 9), ("2m", 120), ("2h", 3600)])
async def test_the_epilog_passes_what_is_left_of_its_budget_as_the_timeout(
    tmp_path: Path, budget: str, budget_s: int
) -> None:
    """budget_s is what the first call may take: the budget, or the CLI's most, 1h."""
    cli = RecordingCli(tmp_path / "cli")
    env_file = site_file(
        tmp_path, "site.example:50051", KAIWO_GPU_BIN=str(cli.path), KAIWO_GPU_EPILOG_TIMEOUT=budget
    )

    ended = await epilog(epilog_environment(env_file, "5"))

    assert (ended.status, ended.output) == (0, "")
    [call] = cli.calls()
    assert call.argv[:3] == ["release", "--owner", "slurm/5"]
    timeout = call.option("--timeout")
    assert timeout is not None, call.argv
    assert re.fullmatch(r"[0-9]+s", timeout), call.argv
    assert budget_s - 5 <= int(timeout[:-1]) <= budget_s, call.argv
    if budget == "2h":
        assert timeout == "3600s"


DURATIONS = ["90", "90s", "10m", "2h", "1d", "010s", "000000020s", "999999999s", "0s", "000"]
"""Durations the CLI takes, leading zeros and 0 among them."""
NOT_DURATIONS = ["20x", "0000000000020s", "1234567890", "s", "", "20sm", " 5s", "5 s", "\u0663s"]
"""What the CLI refuses: no digits, a unit it lacks, more than 9 digits (leading zeros
count), a space, a non-ASCII digit."""


def cli_duration_s(value: str) -> int | None:
    try:
        return parse_duration_s(value)
    except InvalidArgumentError:
        return None


@pytest.mark.integration
@pytest.mark.parametrize("value", DURATIONS + NOT_DURATIONS)
def test_the_epilog_reads_a_duration_by_the_clis_rule(value: str) -> None:
    """The Epilog keeps its own copy of parse_duration_s (it cannot import one); this keeps
    the copy from drifting."""
    function = re.search(r"^duration_s\(\) \{$.*?^\}$", EPILOG.read_text(), re.M | re.S)
    assert function is not None, "the Epilog's duration_s function is gone"
    ran = subprocess.run(
        ["sh", "-c", f'{function.group(0)}\nduration_s "$1" || echo invalid', "sh", value],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    expected = cli_duration_s(value)
    assert ran.stdout.strip() == ("invalid" if expected is None else str(expected))
    assert (expected is not None) == (value in DURATIONS)


@pytest.mark.integration
@pytest.mark.parametrize("budget", ["20x", "0s", "0000000000020s"])
async def test_a_budget_that_is_no_duration_still_releases_within_the_default(
    tmp_path: Path, budget: str
) -> None:
    """A typo in slurm.env must not leak every job's share: the Epilog says so (in its output
    and to syslog) and releases within the default 20s, as if the budget were unset."""
    assert not cli_duration_s(budget), "a budget of 1s or more by the CLI's rule"
    cli = RecordingCli(tmp_path / "cli")
    logger = RecordingCli(tmp_path / "bin", name="logger")
    env_file = site_file(
        tmp_path, "site.example:50051", KAIWO_GPU_BIN=str(cli.path), KAIWO_GPU_EPILOG_TIMEOUT=budget
    )

    ended = await epilog({**epilog_environment(env_file, "5"), "PATH": logger.search_path})

    complaint = f"KAIWO_GPU_EPILOG_TIMEOUT={budget} is not a duration"
    assert ended.status == 0, ended.output
    assert complaint in ended.output
    assert len(logger.calls_naming(complaint)) == 1
    [call] = cli.calls()
    assert call.argv[:3] == ["release", "--owner", "slurm/5"]
    timeout = call.option("--timeout")
    assert timeout is not None, call.argv
    assert re.fullmatch(r"[0-9]+s", timeout), call.argv
    assert 20 - 5 <= int(timeout[:-1]) <= 20, call.argv


@pytest.mark.integration
async def test_the_epilog_retries_what_another_node_released_first(tmp_path: Path) -> None:
    """The other node released one of the listed allocations in between: NOT_FOUND (3)."""
    cli = RecordingCli(
        tmp_path / "cli", (3, "kaiwo-gpu release: allocation a1 not found\n"), (0, "")
    )
    env_file = site_file(
        tmp_path, "site.example:50051", KAIWO_GPU_BIN=str(cli.path), KAIWO_GPU_EPILOG_STRICT="yes"
    )

    ended = await epilog(epilog_environment(env_file, "6"))

    assert (ended.status, ended.output) == (0, "")
    assert [call.argv[:3] for call in cli.calls()] == [["release", "--owner", "slurm/6"]] * 2


class StalledReleases(FlakyCoordinator):
    """Lists `count` allocations for any owner, then answers no Release: a coordinator that
    stalls behind its list."""

    def __init__(self, count: int) -> None:
        super().__init__(0, grpc.StatusCode.OK, [])
        self.count = count

    async def ListAllocations(
        self, request: Any, context: Any
    ) -> allocation_pb2.ListAllocationsResponse:
        allocations = [types_pb2.Allocation(id=f"a{i}", node=f"n{i}") for i in range(self.count)]
        return allocation_pb2.ListAllocationsResponse(allocations=allocations)

    async def Release(self, request: Any, context: Any) -> allocation_pb2.ReleaseResponse:
        self.release_calls += 1
        await asyncio.sleep(SCRIPT_TIMEOUT_S)  # cancelled when the server stops
        return allocation_pb2.ReleaseResponse()


@pytest.mark.integration
async def test_a_stalled_coordinator_holds_the_epilog_no_longer_than_its_budget(
    tmp_path: Path,
) -> None:
    """A 3 s timeout per call would let 8 stalled releases take 24 s and more (up to 3 rounds
    of them), and Slurm drains a node whose Epilog outlasts PrologEpilogTimeout. The bound is
    the budget, 2 s for coreutils' timeout to kill, and slack for a loaded machine."""
    stalled = StalledReleases(8)  # type: ignore[abstract]
    async with serving(stalled) as coordinator:
        env_file = site_file(
            tmp_path, coordinator, KAIWO_GPU_EPILOG_TIMEOUT="3s", KAIWO_GPU_EPILOG_STRICT="yes"
        )
        started = asyncio.get_running_loop().time()
        ended = await epilog(epilog_environment(env_file, "42"))
        took_s = asyncio.get_running_loop().time() - started

    assert ended.status == 5, ended.output
    assert "releasing owner slurm/42 failed (exit 5 after 1 round(s))" in ended.output
    assert stalled.release_calls >= 1
    assert stalled.release_calls == 1  # the first stalls past the budget: no second starts
    assert took_s < 3 + 2 + 7, ended.output
