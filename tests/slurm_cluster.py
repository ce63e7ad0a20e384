"""A single-node Slurm cluster for the tests that run real jobs: Debian's munged, slurmctld
and slurmd started as root, every path they write under one temporary directory, and
stopped again (their jobs first). stop() kills whatever still carries the cluster's
SLURM_CONF (a slurmstepd or a job that slurmd left behind) and says so. When the test
process dies without stop() (SIGKILL), the daemons die with it (`setpriv --pdeathsig`), but
a slurmstepd, a job, a coordinator started beside the cluster (new_root) and the directory
stay until the next start(), which kills what names a dead run's directory and removes it.

The node runs deploy/slurm's TaskProlog and Epilog through two-line wrappers that point them
at the cluster's own slurm.env, the file a site keeps at /etc/kaiwo-gpu/slurm.env; slurmd
gives an Epilog no environment of its own to say where the file is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kaiwo_gpu.coordinator.local.etcd import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SLURM_DIR = Path(__file__).resolve().parent.parent / "deploy" / "slurm"
"""deploy/slurm: the TaskProlog and Epilog a site installs."""
KAIWO_GPU = Path(sys.executable).parent / "kaiwo-gpu"
"""This checkout's CLI."""
SHARE_GRES = "kaiwo_share"
"""A count-only GRES the node offers in thousandths of a GPU (see docs/slurm.md)."""
FINISHED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
"""Job states after the Epilog has run: a job whose Epilog still runs is COMPLETING."""
COMMAND_TIMEOUT_S = 30.0
POLL_S = 0.2
ROOT_PREFIX = "kaiwo-slurm-"
OWNER_FILE = "owner"
"""In a cluster's directory: the pid and start time of the process it belongs to."""


class SlurmUnavailable(Exception):
    """Slurm cannot run here; the message says why."""


def missing_slurm() -> str | None:
    """Why this machine cannot start a Slurm cluster for the tests, or None when it can."""
    if os.geteuid() != 0:
        return f"the Slurm tests start munged, slurmctld and slurmd as root, not uid {os.geteuid()}"
    missing = [name for name in DAEMONS + COMMANDS if shutil.which(name, path=SYSTEM_PATH) is None]
    if missing:
        return (
            f"Slurm is not installed here (no {', '.join(missing)}); "
            "Debian: apt-get install munge slurm-wlm"
        )
    return None


@dataclass(frozen=True)
class NodeSettings:
    """The one node: its Slurm name (the coordinator's name for it too), how many tasks it
    runs at once, how many thousandths of a GPU its GRES offers, and the scripts it runs."""

    name: str
    cpus: int
    share_millis: int
    task_prolog: Path
    epilog: Path
    site_env: str
    """The text of the cluster's slurm.env (KAIWO_GPU_COORDINATOR, KAIWO_GPU_BIN, ...)."""


@dataclass(frozen=True)
class Job:
    """One line of `scontrol show job -o`: a job, or one task of an array."""

    job_id: str
    state: str
    exit_code: str
    reason: str
    array_task: str

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def status(self) -> int:
        """The exit status Slurm recorded (ExitCode=status:signal)."""
        return int(self.exit_code.partition(":")[0])


def parse_jobs(text: str) -> list[Job]:
    jobs = []
    for line in text.splitlines():
        fields = dict(word.partition("=")[::2] for word in line.split() if "=" in word)
        if "JobId" in fields:
            jobs.append(
                Job(
                    fields["JobId"],
                    fields.get("JobState", ""),
                    fields.get("ExitCode", "0:0"),
                    fields.get("Reason", ""),
                    fields.get("ArrayTaskId", ""),
                )
            )
    return jobs


def processes_with(variable: bytes) -> list[int]:
    """The ids of the processes whose environment holds `variable` (NAME=value) exactly."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone already, or a kernel thread
            continue
        if variable in environment:
            found.append(int(entry.name))
    return found


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), or None when there is none;
    with the pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def new_root(parent: Path | None = None) -> Path:
    """A fresh directory for one cluster (and what runs beside it), marked as this process's."""
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=parent))
    # munged wants every directory above its socket searchable by all, which pytest's
    # tmp_path (under a 0700 directory) is not.
    root.chmod(0o711)
    (root / OWNER_FILE).write_text(f"{os.getpid()} {process_start(os.getpid())}\n")
    return root


def stale(root: Path) -> bool:
    """Whether the process root belongs to is gone: killed before it could stop its cluster."""
    try:
        pid, _, started = (root / OWNER_FILE).read_text().strip().partition(" ")
    except OSError:
        return False
    return not pid.isdigit() or process_start(int(pid)) != started


def processes_naming(root: Path) -> list[int]:
    """The processes whose environment has root's SLURM_CONF or whose command line names a
    path under root."""
    mark = f"SLURM_CONF={root / 'slurm.conf'}".encode()
    inside = f"{root}/".encode()
    found = set(processes_with(mark))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if inside in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def remove_stale_roots(parent: Path | None = None) -> list[int]:
    """Kills what names a stale cluster directory under parent (the system's temporary
    directory) and removes the directory; the ids of the processes it killed."""
    killed = []
    for root in Path(parent or tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*"):
        if not root.is_dir() or not stale(root):
            continue
        for pid in processes_naming(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        shutil.rmtree(root, ignore_errors=True)
    return killed


class Daemon:
    """A daemon in the foreground as our child, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, environment: dict[str, str]):
        self.name = name
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it is still there after timeout_s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)


class SlurmCluster:
    """slurmctld and one slurmd with munged, on free loopback ports, under `root`."""

    def __init__(self, node: NodeSettings, root: Path | None = None) -> None:
        self.node = node
        self.root = root or new_root()
        self.conf = self.root / "slurm.conf"
        self.jobs_dir = self.root / "jobs"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"
        self.daemons: list[Daemon] = []

    @property
    def environment(self) -> dict[str, str]:
        """What the Slurm commands run with: this cluster's slurm.conf and the system PATH,
        nothing of the caller's (a job submitted with --export=ALL inherits it)."""
        return {
            "PATH": SYSTEM_PATH,
            "HOME": str(self.jobs_dir),
            "LANG": "C.UTF-8",
            "SLURM_CONF": str(self.conf),
        }

    # -- files ---------------------------------------------------------------------------

    def _write_files(self) -> None:
        for directory in ("munge", "state", "spool", "log", "jobs", "scripts"):
            (self.root / directory).mkdir(mode=0o711, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        site_env = self.root / "scripts" / "slurm.env"
        site_env.write_text(self.node.site_env)
        site_env.chmod(0o644)
        wrappers = {}
        for role, script in (("task-prolog", self.node.task_prolog), ("epilog", self.node.epilog)):
            wrapper = self.root / "scripts" / f"{role}.sh"
            wrapper.write_text(
                f"#!/bin/sh\nKAIWO_GPU_SLURM_ENV={site_env}\nexport KAIWO_GPU_SLURM_ENV\n"
                f'exec {script} "$@"\n'
            )
            wrapper.chmod(0o755)
            wrappers[role] = wrapper
        plugstack = self.root / "plugstack.conf"  # no SPANK plugins from /etc/slurm
        plugstack.write_text("")
        (self.root / "gres.conf").write_text(
            f"NodeName={self.node.name} Name={SHARE_GRES} Count={self.node.share_millis}\n"
        )
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=kaiwo",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.logs / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=debug",
                    f"PlugStackConfig={plugstack}",
                    # Processes by parent id: no cgroups needed, so it runs in a container.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SwitchType=switch/none",
                    "MpiDefault=none",
                    "SchedulerType=sched/builtin",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    # The node claims more CPUs than the machine has, so that many jobs run
                    # at once; slurmd would drain a node that claims more than it finds.
                    "SlurmdParameters=config_overrides",
                    "ReturnToService=2",
                    # A job past its time limit is killed at once, its steps 2 s after SIGTERM.
                    "OverTimeLimit=0",
                    "KillWait=2",
                    "InactiveLimit=0",
                    # Finished jobs stay visible to scontrol for the tests to read.
                    "MinJobAge=600",
                    "MessageTimeout=10",
                    "PrologEpilogTimeout=60",
                    f"TaskProlog={wrappers['task-prolog']}",
                    f"Epilog={wrappers['epilog']}",
                    f"GresTypes={SHARE_GRES}",
                    f"NodeName={self.node.name} NodeAddr=127.0.0.1 CPUs={self.node.cpus} "
                    f"Gres={SHARE_GRES}:{self.node.share_millis} State=UNKNOWN",
                    f"PartitionName=kaiwo Nodes={self.node.name} Default=YES MaxTime=INFINITE "
                    "State=UP",
                    "",
                ]
            )
        )

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        """Writes the files, starts the daemons and returns once the node is idle; raises
        SlurmUnavailable with the daemons' logs when it is not within timeout_s."""
        deadline = time.monotonic() + timeout_s
        remove_stale_roots(self.root.parent)
        self._write_files()
        munge = self.root / "munge"
        self._start(
            "munged",
            [
                "--foreground",
                f"--key-file={munge / 'munge.key'}",
                f"--socket={self.munge_socket}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={self.logs / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        self._wait("munged's socket", deadline, self.munge_socket.exists)
        self._start("slurmctld", ["-D"])
        self._wait("slurmctld", deadline, lambda: self._answers("scontrol", "ping"))
        self._start("slurmd", ["-D", "-N", self.node.name])
        self._wait(f"node {self.node.name} idle", deadline, lambda: self.node_state() == "idle")

    def _start(self, name: str, args: Sequence[str]) -> None:
        binary = shutil.which(name, path=SYSTEM_PATH)
        if binary is None:
            raise SlurmUnavailable(f"{name} is not installed")
        log = self.logs / f"{name}.out"
        # The kernel kills the daemon when the test process dies, even by SIGKILL, so that
        # a run killed from outside leaves none behind (setpriv is in Debian's util-linux,
        # which every Debian has; preexec_fn would be unsafe beside the gRPC threads).
        setpriv = shutil.which("setpriv", path=SYSTEM_PATH)
        guard = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
        self.daemons.append(Daemon(name, [*guard, binary, *args], log, self.environment))

    def _wait(self, what: str, deadline: float, ready: Callable[[], bool]) -> None:
        while time.monotonic() < deadline:
            dead = [daemon.name for daemon in self.daemons if not daemon.alive()]
            if dead:
                raise SlurmUnavailable(f"{', '.join(dead)} exited:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(POLL_S)
        raise SlurmUnavailable(f"{what}: not ready in time\n{self.log_tail()}")

    def _answers(self, *argv: str) -> bool:
        try:
            return self.command(*argv, check=False, timeout_s=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def node_state(self) -> str:
        done = self.command("sinfo", "-h", "-n", self.node.name, "-o", "%T", check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """Cancels what still runs, waits for its Epilogs, stops the daemons, kills what of
        the cluster is left and removes root; the ids of the processes it had to kill."""
        try:
            if self.daemons and all(daemon.alive() for daemon in self.daemons):
                self.cancel_all(timeout_s)
        finally:
            for daemon in reversed(self.daemons):
                daemon.stop()
            self.daemons.clear()
            left = self.kill_leftovers()
            shutil.rmtree(self.root, ignore_errors=True)
        return left

    def kill_leftovers(self, grace_s: float = 10.0) -> list[int]:
        """Waits up to grace_s for the processes that carry this cluster's SLURM_CONF (a
        slurmstepd that was still exiting, say) to end, then kills them; their ids."""
        mark = f"SLURM_CONF={self.conf}".encode()
        deadline = time.monotonic() + grace_s
        while (left := processes_with(mark)) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def cancel_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        listed = self.command("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if listed:
            self.command("scancel", *listed, check=False)
        while time.monotonic() < deadline:
            if not self.command("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                return
            time.sleep(POLL_S)

    # -- commands and jobs ---------------------------------------------------------------

    def command(
        self, *argv: str, check: bool = True, timeout_s: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            env=self.environment,
            cwd=self.jobs_dir,
            timeout=timeout_s,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {done.returncode}: {done.stdout}{done.stderr}"
            )
        return done

    def sbatch(self, script: str, *options: str) -> str:
        """Submits `script` (its text) with sbatch's options; the job id."""
        with tempfile.NamedTemporaryFile(
            "w", dir=self.jobs_dir, prefix="job-", suffix=".sh", delete=False
        ) as file:
            file.write(script)
        done = self.command("sbatch", "--parsable", *options, file.name)
        return done.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[Job]:
        """The job, or every task of an array job, as scontrol sees it now."""
        return parse_jobs(self.command("scontrol", "show", "job", "-o", job_id).stdout)

    def wait_finished(self, job_id: str, timeout_s: float = 60.0) -> list[Job]:
        """Polls until the job (every task of an array) is finished, its Epilog done."""
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = self.jobs(job_id)
            if jobs and all(job.finished for job in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not finished in {timeout_s:g}s: {jobs}")
            time.sleep(POLL_S)

    def cancel(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            self.command("scancel", *ids, check=False)

    def log_tail(self, characters: int = 2000) -> str:
        tails = []
        for log in sorted(self.logs.glob("*")):
            text = log.read_text(errors="replace")[-characters:]
            tails.append(f"== {log.name}\n{text}")
        return "\n".join(tails)
