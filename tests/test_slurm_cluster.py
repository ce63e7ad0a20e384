"""Real Slurm jobs against a real coordinator: sbatch on a single-node Slurm cluster whose
node runs deploy/slurm's TaskProlog and Epilog, and a `kaiwo-gpu coordinator` process on
the session's etcd that knows the node as 8 simulated MI300X.

The cluster (tests/slurm_cluster.py) starts once for the module. Where Slurm is missing or
this is not root, the module is skipped and says why; KAIWO_GPU_TEST_REQUIRE_SLURM=1 makes
that a failure instead. A job the tests watch while it runs waits for a file the test
creates (a bounded shell loop), so no test sleeps for a fixed time. The one job that must
overrun its time limit (a minute, Slurm's least) is submitted when the module starts and
checked by the module's last test, so that its minute runs beside the other tests.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from kaiwo_gpu.client import Client
from kaiwo_gpu.coordinator.local.coordinator_process import CoordinatorProcess
from kaiwo_gpu.coordinator.local.etcd import LocalEtcd
from kaiwo_gpu.v1 import types_pb2
from tests.slurm_cluster import (
    KAIWO_GPU,
    POLL_S,
    SHARE_GRES,
    SLURM_DIR,
    Job,
    NodeSettings,
    SlurmCluster,
    SlurmUnavailable,
    missing_slurm,
    new_root,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
NODE = "kaiwo-slurm-0"
GPUS = 8
HALF_SHARES = 2 * GPUS
ARRAY_TASKS = 20
INVENTORY = f"nodes:\n  - name: {NODE}\n    gpus: [{{model: MI300X, count: {GPUS}}}]\n"
REQUIRE = "KAIWO_GPU_TEST_REQUIRE_SLURM"
WAIT_S = 60.0
OUTPUT = "--output=%j.out"
ARRAY_OUTPUT = "--output=%A_%a.out"
"""Where jobs write, in the cluster's jobs/: <job id>.out, an array's <array id>_<task>.out."""
STEP_GRANT = (
    'echo "grant $0 id=${KAIWO_GPU_ALLOCATION_ID:-} gpus=${ROCR_VISIBLE_DEVICES:-}'
    ' mask=${HSA_CU_MASK:-} node=${KAIWO_GPU_NODE:-}"'
)
"""What a task saw, for one that srun starts (`sh -c STEP_GRANT WHERE`), where the batch
script's `grant` function is not there."""
SCRIPT_START = (
    """\
#!/bin/sh
go() {  # until the test creates @GO@, at most about 120 s
    i=0
    while [ ! -e @GO@ ] && [ "$i" -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
}
"""
    f"grant() {{ sh -c '{STEP_GRANT}' \"$1\"; }}\n"
)
GRANT_LINE = re.compile(r"^grant (\S+) id=(\S*) gpus=(\S*) mask=(\S*) node=(\S*)$", re.MULTILINE)


@dataclass(frozen=True)
class Grant:
    """What one task saw: `grant WHERE id=... gpus=... mask=... node=...`."""

    where: str
    allocation_id: str
    gpus: str
    mask: str
    node: str


def grants(text: str) -> list[Grant]:
    return [Grant(*match.groups()) for match in GRANT_LINE.finditer(text)]


def job_script(go_file: Path, body: str) -> str:
    return SCRIPT_START.replace("@GO@", str(go_file)) + body


@dataclass
class RealSlurm:
    cluster: SlurmCluster
    coordinator: str
    client: Client

    def held(self, owner: str = "") -> list[types_pb2.Allocation]:
        """The allocations on the node (of `owner`), as the coordinator has them now."""
        return self.client.list(owner=owner, node=NODE)

    def output(self, name: str) -> str:
        """What job `name` (<job id>, or <array id>_<task>) has written so far."""
        path = self.cluster.jobs_dir / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def slurm(request: pytest.FixtureRequest) -> Iterator[RealSlurm]:
    """The cluster and a coordinator for it; skipped, saying why, where Slurm cannot run."""
    reason = missing_slurm()
    if reason is not None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1, but {reason}")
        pytest.skip(reason)
    etcd: LocalEtcd = request.getfixturevalue("etcd")
    # The coordinator's files sit in the cluster's directory, so that a coordinator a
    # SIGKILL left behind names that directory and the next start() can find it.
    root = new_root()
    state = root / "coordinator"
    state.mkdir()
    inventory = state / "nodes.yaml"
    inventory.write_text(INVENTORY)
    coordinator = CoordinatorProcess(
        etcd.endpoint, f"/kaiwo-slurm-{uuid.uuid4().hex[:8]}/v1/", inventory, state / "log"
    )
    cluster = SlurmCluster(
        root=root,
        node=NodeSettings(
            name=NODE,
            cpus=ARRAY_TASKS + 4,  # the whole array at once, beside the over-time job
            share_millis=1000 * GPUS,
            task_prolog=SLURM_DIR / "task-prolog.sh",
            epilog=SLURM_DIR / "epilog.sh",
            site_env=(
                f"KAIWO_GPU_COORDINATOR={coordinator.address}\n"
                f"KAIWO_GPU_BIN={KAIWO_GPU}\n"
                # 20 TaskProlog CLIs at once on two cores: more than the default 30s to spare.
                "KAIWO_GPU_TIMEOUT=60s\n"
            ),
        ),
    )
    coordinator.start()
    try:
        asyncio.run(coordinator.wait_serving())
        try:
            cluster.start()
        except SlurmUnavailable as error:
            if os.environ.get(REQUIRE) == "1":
                raise
            pytest.skip(f"Slurm is installed but did not start: {error}")
        with Client(coordinator.address) as client:
            yield RealSlurm(cluster, coordinator.address, client)
    finally:
        try:
            left = cluster.stop()
        finally:
            coordinator.stop()
    assert left == [], f"processes of the cluster left after its daemons stopped: {left}"


def eventually(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    """Polls until `probe` returns something other than None, bounded in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what}")
        time.sleep(POLL_S)


def waiting_grants(slurm: RealSlurm, name: str, count: int) -> list[Grant]:
    """Job `name`'s grant lines, once it has printed `count` of them and then `waiting`."""

    def printed() -> list[Grant] | None:
        text = slurm.output(name)
        seen = grants(text)
        return seen if len(seen) >= count and text.rstrip().endswith("waiting") else None

    return eventually(printed, f"job {name} printing {count} grant lines and waiting")


@dataclass
class Jobs:
    """One test's jobs: each waits for the test's go file, and is cancelled if left over."""

    slurm: RealSlurm
    go_file: Path
    submitted: list[str] = field(default_factory=list)

    @property
    def cluster(self) -> SlurmCluster:
        return self.slurm.cluster

    def submit(self, body: str, *options: str, export: str) -> str:
        """sbatch --export=ALL,<export> of SCRIPT_START + body; the job id."""
        job_id = self.cluster.sbatch(
            job_script(self.go_file, body), f"--export=ALL,{export}", *options
        )
        self.submitted.append(job_id)
        return job_id

    def go(self) -> None:
        self.go_file.touch()

    def finished(self, job_id: str) -> Job:
        [job] = self.cluster.wait_finished(job_id, WAIT_S)
        return job


@pytest.fixture
def jobs(slurm: RealSlurm) -> Iterator[Jobs]:
    test_jobs = Jobs(slurm, slurm.cluster.jobs_dir / f"go-{uuid.uuid4().hex[:8]}")
    try:
        yield test_jobs
    finally:
        test_jobs.go()
        slurm.cluster.cancel(test_jobs.submitted)


@dataclass(frozen=True)
class OverTimeJob:
    job_id: str
    allocation_id: str
    held_ids: list[str]
    """The coordinator's allocations for the job while it ran."""


@pytest.fixture(scope="module", autouse=True)
def over_time_job(slurm: RealSlurm) -> Iterator[OverTimeJob]:
    """A job with half a GPU that outlives its one-minute limit; autouse, so that it starts
    with the module and its minute overlaps the other tests."""
    body = "grant batch\necho waiting\ngo\ngo\ngo\n"  # up to 6 minutes: Slurm ends it first
    job_id = slurm.cluster.sbatch(
        job_script(slurm.cluster.jobs_dir / "never", body),
        "--export=ALL,KAIWO_GPU_FRACTION=0.5",
        "--time=1",
        f"--gres={SHARE_GRES}:500",  # so that Slurm counts it in the GRES test too
        OUTPUT,
    )
    try:
        [seen] = waiting_grants(slurm, job_id, 1)
        held = [allocation.id for allocation in slurm.held(f"slurm/{job_id}")]
        yield OverTimeJob(job_id, seen.allocation_id, held)
    finally:
        slurm.cluster.cancel([job_id])


def task_count(array_tasks: str) -> int:
    """How many tasks `ArrayTaskId=` names: `3`, `16-19`, `4,7-9`, `0-19%4`."""
    total = 0
    for part in array_tasks.partition("%")[0].split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


@dataclass
class ArrayRun:
    """An array of half-GPU tasks that wait for the go file, and the most allocations the
    coordinator held on the node in any sample taken while it ran."""

    jobs: Jobs
    job_id: str = ""
    peak_held: int = 0
    samples: int = 0

    @property
    def slurm(self) -> RealSlurm:
        return self.jobs.slurm

    def submit(self, *options: str) -> None:
        body = 'grant "$SLURM_ARRAY_TASK_ID"\necho waiting\ngo\n'
        self.job_id = self.jobs.submit(
            body,
            f"--array=0-{ARRAY_TASKS - 1}",
            ARRAY_OUTPUT,
            *options,
            export="KAIWO_GPU_FRACTION=0.5",
        )

    def sample(self) -> list[types_pb2.Allocation]:
        held = self.slurm.held()
        self.peak_held = max(self.peak_held, len(held))
        self.samples += 1
        return held

    def tasks(self) -> list[Job]:
        return self.jobs.cluster.jobs(self.job_id)

    def outputs(self) -> dict[str, str]:
        """Array task index -> what it has written so far."""
        return {
            str(index): self.slurm.output(f"{self.job_id}_{index}") for index in range(ARRAY_TASKS)
        }

    def granted(self) -> dict[str, Grant]:
        """The tasks that got a share and now wait."""
        return {
            index: grants(text)[0]
            for index, text in self.outputs().items()
            if grants(text) and text.rstrip().endswith("waiting")
        }

    def until(
        self, settled: Callable[[list[Job]], bool], what: str
    ) -> tuple[list[types_pb2.Allocation], list[Job]]:
        """Samples until `settled(tasks)`; the allocations on the node then, and the tasks."""

        def probe() -> tuple[list[types_pb2.Allocation], list[Job]] | None:
            self.sample()
            tasks = self.tasks()
            # Sampled again once settled: the first sample may predate the last grant.
            return (self.sample(), tasks) if settled(tasks) else None

        return eventually(probe, f"array {self.job_id}: {what}")

    def finish(self) -> list[Job]:
        """Lets every task go and samples until all have finished."""
        self.jobs.go()
        return self.until(lambda tasks: all(task.finished for task in tasks), "finished")[1]


def test_an_array_of_half_gpu_tasks_never_holds_more_than_the_node_has(
    slurm: RealSlurm, jobs: Jobs, over_time_job: OverTimeJob
) -> None:
    """Slurm starts all 20 tasks at once; the coordinator grants the 16 halves the node has
    (less the over-time job's, which runs beside) and the other tasks fail with its reason."""
    array = ArrayRun(jobs)
    array.submit()

    def settled(tasks: list[Job]) -> bool:
        refused = [task for task in tasks if task.finished]
        return len(refused) + len(array.granted()) == ARRAY_TASKS

    held, _ = array.until(settled, "every task granted or refused")
    granted = array.granted()
    tasks = array.finish()

    beside = [allocation.id for allocation in held if allocation.id != over_time_job.allocation_id]
    refused = {task.array_task: task for task in tasks if task.state == "FAILED"}
    outputs = array.outputs()
    # Every granted task still waited when `held` was read, so it is the node's whole count
    # at that moment: the node full, the over-time job's half (while it lasts) and the tasks'.
    assert len(held) == array.peak_held == HALF_SHARES, f"{array.samples} samples"
    assert sorted(beside) == sorted(grant.allocation_id for grant in granted.values())
    assert len(refused) == ARRAY_TASKS - len(granted) >= ARRAY_TASKS - HALF_SHARES
    assert sorted([*granted, *refused], key=int) == [str(task) for task in range(ARRAY_TASKS)]
    for index, task in refused.items():
        assert task.exit_code == "4:0", outputs[index]
        assert outputs[index].startswith("kaiwo-gpu: no GPU share for job "), outputs[index]
        assert "no GPU can take" in outputs[index]
    per_gpu = Counter(allocation.gpus[0].index for allocation in held)
    assert sorted(per_gpu) == list(range(GPUS)), per_gpu
    assert set(per_gpu.values()) == {2}, per_gpu
    assert Counter(grant.gpus for grant in granted.values()) <= Counter(
        str(index) for index in per_gpu.elements()
    )
    assert {task.state for task in tasks if task.array_task in granted} == {"COMPLETED"}
    owners = {f"slurm/{task.job_id}" for task in tasks}
    assert not [allocation for allocation in slurm.held() if allocation.request.owner in owners]


def test_a_gres_of_shares_makes_slurm_queue_what_the_node_cannot_hold(
    slurm: RealSlurm, jobs: Jobs, over_time_job: OverTimeJob
) -> None:
    """With --gres=kaiwo_share:500 Slurm counts the shares itself: as many tasks run as the
    node has halves (less the over-time job's, which asks for the GRES too), the rest wait."""
    array = ArrayRun(jobs)
    array.submit(f"--gres={SHARE_GRES}:500")

    def settled(tasks: list[Job]) -> bool:
        pending = [task for task in tasks if task.state == "PENDING"]
        waiting = sum(task_count(task.array_task) for task in pending)
        running = sum(task_count(task.array_task) for task in tasks if task.state == "RUNNING")
        return (
            len(array.granted()) == running
            and running + waiting == ARRAY_TASKS
            and all(task.reason == "Resources" for task in pending)
        )

    held, settled_tasks = array.until(settled, "the tasks that fit granted, the rest pending")
    granted = array.granted()
    tasks = array.finish()

    beside = [allocation.id for allocation in held if allocation.id != over_time_job.allocation_id]
    pending = sum(task_count(task.array_task) for task in settled_tasks if task.state == "PENDING")
    # The node full, Slurm holding the rest back; then every task ran, and none was refused.
    assert len(held) == array.peak_held == HALF_SHARES, f"{array.samples} samples"
    assert sorted(beside) == sorted(grant.allocation_id for grant in granted.values())
    assert pending == ARRAY_TASKS - len(granted) >= ARRAY_TASKS - HALF_SHARES
    assert [(task.state, task.exit_code) for task in tasks] == [("COMPLETED", "0:0")] * len(tasks)
    assert sorted(int(task.array_task) for task in tasks) == list(range(ARRAY_TASKS))
    assert all(len(grants(text)) == 1 for text in array.outputs().values())
    owners = {f"slurm/{task.job_id}" for task in tasks}
    assert not [allocation for allocation in slurm.held() if allocation.request.owner in owners]


@pytest.mark.parametrize("isolation", ["none", "cu-mask"])
def test_every_task_and_step_of_a_job_shares_its_one_allocation(
    slurm: RealSlurm, jobs: Jobs, isolation: str
) -> None:
    body = f"""\
grant batch
srun --ntasks=2 sh -c '{STEP_GRANT}' step0
srun --ntasks=1 sh -c '{STEP_GRANT}' step1
echo waiting
go
"""
    job_id = jobs.submit(
        body, "--ntasks=2", OUTPUT, export=f"KAIWO_GPU_FRACTION=0.5,KAIWO_GPU_ISOLATION={isolation}"
    )

    seen = waiting_grants(slurm, job_id, 4)
    [held] = slurm.held(f"slurm/{job_id}")
    jobs.go()
    job = jobs.finished(job_id)

    assert sorted(grant.where for grant in seen) == ["batch", "step0", "step0", "step1"]
    assert {grant.allocation_id for grant in seen} == {held.id}
    assert {grant.node for grant in seen} == {NODE}
    assert {grant.gpus for grant in seen} == {str(held.gpus[0].index)}
    assert [gpu.granted_millis for gpu in held.gpus] == [500]
    assert held.request_id == f"slurm:kaiwo:{job_id}:{NODE}"
    masks = {grant.mask for grant in seen}
    assert len(masks) == 1
    assert (masks != {""}) == (isolation == "cu-mask"), masks
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), slurm.output(job_id)
    assert slurm.held(f"slurm/{job_id}") == []


def test_a_cancelled_job_gives_its_share_back(slurm: RealSlurm, jobs: Jobs) -> None:
    job_id = jobs.submit("grant batch\necho waiting\ngo\n", OUTPUT, export="KAIWO_GPU_FRACTION=0.5")
    [seen] = waiting_grants(slurm, job_id, 1)
    [held] = slurm.held(f"slurm/{job_id}")

    jobs.cluster.command("scancel", job_id)
    job = jobs.finished(job_id)

    assert seen.allocation_id == held.id
    assert job.state == "CANCELLED"
    assert slurm.held(f"slurm/{job_id}") == []


def test_a_job_whose_task_fails_gives_its_share_back(slurm: RealSlurm, jobs: Jobs) -> None:
    body = f"srun --ntasks=2 sh -c '{STEP_GRANT}; exit $((SLURM_PROCID * 3))' task\n"
    job_id = jobs.submit(body, "--ntasks=2", OUTPUT, export="KAIWO_GPU_FRACTION=0.5")

    job = jobs.finished(job_id)

    output = slurm.output(job_id)
    seen = grants(output)
    assert [grant.where for grant in seen] == ["task", "task"], output
    assert len({grant.allocation_id for grant in seen}) == 1
    assert seen[0].allocation_id != ""
    assert (job.state, job.status) == ("FAILED", 3), output
    assert slurm.held(f"slurm/{job_id}") == []


def test_a_share_that_cannot_be_placed_fails_the_job_with_the_coordinators_reason(
    slurm: RealSlurm, jobs: Jobs
) -> None:
    asked = subprocess.run(
        [str(KAIWO_GPU), "allocate", "--fraction", "1", "--count", "9", "--node", NODE],
        env={"KAIWO_GPU_COORDINATOR": slurm.coordinator},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert asked.returncode == 4, asked.stderr
    reason = asked.stderr.strip()

    job_id = jobs.submit("echo started\n", OUTPUT, export="KAIWO_GPU_FRACTION=1,KAIWO_GPU_COUNT=9")
    job = jobs.finished(job_id)

    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("FAILED", "4:0"), output
    assert output.splitlines()[:2] == [
        f"kaiwo-gpu: no GPU share for job {job_id} on {NODE} (exit 4)",
        f"kaiwo-gpu: {reason}",
    ]
    assert "started" not in output
    assert slurm.held(f"slurm/{job_id}") == []


def test_a_requeued_job_gets_a_new_allocation(slurm: RealSlurm, jobs: Jobs) -> None:
    body = 'grant "run${SLURM_RESTART_COUNT:-0}"\necho waiting\ngo\n'
    job_id = jobs.submit(
        body, "--requeue", "--open-mode=append", OUTPUT, export="KAIWO_GPU_FRACTION=0.5"
    )
    [first] = waiting_grants(slurm, job_id, 1)

    jobs.cluster.command("scontrol", "requeue", job_id)
    eventually(
        lambda: True if jobs.cluster.jobs(job_id)[0].state == "PENDING" else None,
        f"job {job_id} pending again",
    )
    released = slurm.held(f"slurm/{job_id}")
    # A requeued job may start again two minutes later; this one at once.
    jobs.cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    again, second = waiting_grants(slurm, job_id, 2)
    [held] = slurm.held(f"slurm/{job_id}")
    jobs.go()
    job = jobs.finished(job_id)

    assert (again, first.where, second.where) == (first, "run0", "run1")
    assert released == []
    assert held.id == second.allocation_id != first.allocation_id
    assert held.request_id == f"slurm:kaiwo:{job_id}:r1:{NODE}"
    assert job.state == "COMPLETED"
    assert slurm.held(f"slurm/{job_id}") == []


@pytest.mark.timeout(200)
def test_a_job_over_its_time_limit_gives_its_share_back(
    slurm: RealSlurm, over_time_job: OverTimeJob
) -> None:
    """Slurm's least limit is a minute, checked every 30 s: the job ends 60-90 s after it
    started, and this test, the module's last, waits for what is left of that."""
    [job] = slurm.cluster.wait_finished(over_time_job.job_id, timeout_s=150)

    output = slurm.output(over_time_job.job_id)
    assert job.state == "TIMEOUT", output
    assert "DUE TO TIME LIMIT" in output
    assert over_time_job.held_ids == [over_time_job.allocation_id]
    assert slurm.held(f"slurm/{over_time_job.job_id}") == []
