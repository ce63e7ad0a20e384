"""The fault suite: a workload through both coordinators while a schedule breaks things.

`python -m tests.netns.suite [--rounds N]` (root, iproute2) runs it and prints the table;
the test module runs one round. A round injects, one after another: SIGKILL of a
coordinator, of the etcd leader and of a follower; a tenant that vanishes holding leases; a
coordinator partitioned from etcd; an agent partitioned from its coordinator; an agent cut
off past the node TTL; a coordinator frozen (SIGSTOP) past the node TTL; an agent coming
back with half its GPUs under live grants; a GPU whose health verdict flips; an allocation
record deleted by hand; latency and loss on a coordinator's link. Tenants with skewed clocks
run throughout.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.netns import checker
from tests.netns.cluster import (
    ADMIN,
    CLIENT_HOST,
    NODE_TTL_S,
    REPO_ROOT,
    NetnsCluster,
    Process,
)
from tests.netns.network import netns_unavailable
from tests.netns.workload import LEASED_TTL_S

PREFIX = "/kaiwo-gpu/v1/"
ROUND_S = 96.0
FINISH_WITHIN_S = 20.0
CLOCK_SKEWS = {"carol": "+1h", "dave": "-3m"}
"""Tenants whose wall clock is wrong (libfaketime): an hour ahead, three minutes behind
(within the five minutes certificates are back-dated, or TLS itself would refuse)."""


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: `inject` at `offset_s` into a round, `restore` `duration_s` later."""

    name: str
    offset_s: float
    duration_s: float
    inject: Callable[[], dict[str, Any]]
    restore: Callable[[], None]
    cuts_off_node: str = ""


class Suite:
    """One cluster, its workload processes and the fault log."""

    def __init__(self, cluster: NetnsCluster, directory: Path) -> None:
        self.cluster = cluster
        self.directory = directory
        self.log: list[dict[str, Any]] = []
        self.workloads: dict[str, Process] = {}
        self.stamper: Process | None = None
        self.netem_missing: str | None = None
        self.ends_at = 0.0
        self.rebirths = 0
        self.started_at = 0.0

    # Workload processes on the client host ------------------------------------------

    def _workload_args(self, mode: str, user: str, **flags: object) -> list[str]:
        certs = self.cluster.users[user]
        args = [
            sys.executable, "-m", "tests.netns.workload", mode,
            f"--coordinators={','.join(self.cluster.coordinator_addresses)}",
            f"--ca={certs.ca}", f"--cert={certs.cert}", f"--key={certs.key}", f"--user={user}",
        ]  # fmt: skip
        return args + [f"--{name.replace('_', '-')}={value}" for name, value in flags.items()]

    def start_workloads(self, duration_s: float, seed: int) -> None:
        histories = self.directory / "histories"
        histories.mkdir(exist_ok=True)

        def start(name: str, args: list[str]) -> None:
            process = Process(name, CLIENT_HOST, args, self.directory / f"{name}.log",
                              self.cluster.network)  # fmt: skip
            process.start()
            self.workloads[name] = process

        start("alice", self._workload_args("mixed", "alice", duration=duration_s, seed=seed,
              history=histories / "alice.jsonl", finish_within=FINISH_WITHIN_S))  # fmt: skip
        vanishing = checker.VANISHING_TENANT
        start(vanishing, self._workload_args("vanish", vanishing, duration=duration_s, seed=seed,
              tenants=2, history=histories / "bob.jsonl"))  # fmt: skip
        faketime = shutil.which("faketime")
        for user, skew in CLOCK_SKEWS.items():
            args = self._workload_args("library", user, duration=duration_s, seed=seed,
                                       history=histories / f"{user}.jsonl")  # fmt: skip
            if faketime:
                args = ["env", "FAKETIME_DONT_FAKE_MONOTONIC=1", faketime, "-f", skew, *args]
            start(user, args)
            self.record(name=f"clock of tenant {user} skewed {skew}" if faketime else
                        f"clock skew of {user} skipped: faketime is not installed",
                        kind="note")  # fmt: skip

    def query(self, mode: str) -> dict[str, Any]:
        """`workload nodes` or `workload stats` as the admin, on the client host."""
        done = subprocess.run(
            self.cluster.network.command(CLIENT_HOST, self._workload_args(mode, ADMIN)),
            capture_output=True, text=True, timeout=30, check=False, cwd=REPO_ROOT,
        )  # fmt: skip
        try:
            answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            answer = {"error": {"error": done.stderr[-500:]}}
        return answer

    def record(self, **entry: Any) -> None:
        self.log.append({"at": time.monotonic(), **entry})

    # The schedule ----------------------------------------------------------------------

    def schedule(self) -> list[Fault]:
        c = self.cluster
        coord_0, coord_1 = c.coordinators
        agent_0, agent_1, agent_2 = c.agents
        state: dict[str, Any] = {}

        def kill(process: Process) -> Callable[[], dict[str, Any]]:
            def inject() -> dict[str, Any]:
                process.kill()
                return {"target": process.name}

            return inject

        def restart(process: Process) -> Callable[[], None]:
            return lambda: process.start() if not process.alive() else None

        def vanished_tenant_reborn() -> None:
            """A new holder, with request ids of its own, for the next round's kill."""
            left_s = self.ends_at - time.monotonic()
            if left_s < ROUND_S / 2:
                return
            vanishing = self.workloads[checker.VANISHING_TENANT]
            self.rebirths += 1
            replaced = {"--seed": f"{self.rebirths * 1000}", "--duration": f"{left_s:.0f}"}
            vanishing.args = [
                f"{flag}={replaced[flag]}" if (flag := arg.split("=", 1)[0]) in replaced else arg
                for arg in vanishing.args
            ]
            vanishing.start()

        def restart_member(which: str) -> None:
            restart(state[which])()

        def kill_leader() -> dict[str, Any]:
            state["leader"] = c.etcd_leader()
            state["leader"].kill()
            return {"target": state["leader"].name}

        def kill_follower() -> dict[str, Any]:
            leader = c.etcd_leader()
            state["follower"] = next(m for m in c.etcd if m is not leader)
            state["follower"].kill()
            return {"target": state["follower"].name}

        def partition(a: list[str], b: list[str]) -> Callable[[], dict[str, Any]]:
            def inject() -> dict[str, Any]:
                c.network.partition(a, b)
                return {"target": f"{a} | {b}"}

            return inject

        def cut_off(process: Process) -> dict[str, Any]:
            c.network.link_down(process.host)
            return {"target": process.host}

        def degrade(process: Process) -> Callable[[], dict[str, Any]]:
            def inject() -> dict[str, Any]:
                c.network.degrade(process.host, delay_ms=150, loss_percent=10)
                return {"target": process.host}

            return inject

        def pause(process: Process) -> dict[str, Any]:
            process.pause()
            return {"target": process.name}

        def shrink_agent() -> dict[str, Any]:
            agent_2.kill()
            state["agent_2_args"] = list(agent_2.args)
            agent_2.args = [re.sub(r"^--gpus=\d+$", "--gpus=4", a) for a in agent_2.args]
            agent_2.start()
            return {"target": agent_2.name}

        def unshrink_agent() -> None:
            agent_2.kill()
            agent_2.args = state["agent_2_args"]
            agent_2.start()

        def flip_verdicts() -> dict[str, Any]:
            faults = c.faults_files["node-0"]
            for n in range(16):  # overheats and cools every 0.3 s, 16 times
                faults.write_text("0: overheat\n" if n % 2 == 0 else "{}\n")
                time.sleep(0.3)
            return {"target": "node-0 GPU 0"}

        def delete_by_hand() -> dict[str, Any]:
            listed = c.etcdctl("get", "--prefix", f"{PREFIX}allocations/", "--keys-only")
            keys = [k for k in listed.stdout.split() if k.startswith(PREFIX)]
            if not keys:
                return {"target": "no allocation to delete", "allocation_ids": []}
            key = keys[len(keys) // 2]
            c.etcdctl("del", key)
            return {"target": key, "allocation_ids": [key.rsplit("/", 1)[1]]}

        nothing: Callable[[], None] = lambda: None  # noqa: E731
        over_ttl = NODE_TTL_S + 4
        return [
            Fault("SIGKILL coordinator coord-0, restart", 6, 5, kill(coord_0), restart(coord_0)),
            Fault("SIGKILL the etcd leader, restart", 14, 6, kill_leader,
                  lambda: restart_member("leader")),
            Fault("SIGKILL an etcd follower, restart", 24, 5, kill_follower,
                  lambda: restart_member("follower")),
            Fault("a tenant vanishes holding leases (SIGKILL bob)", 31, 0,
                  kill(self.workloads[checker.VANISHING_TENANT]), vanished_tenant_reborn),
            Fault("partition coord-1 from etcd", 33, 8,
                  partition([coord_1.host], [m.host for m in c.etcd]), c.network.heal),
            Fault("partition agent-0 from its coordinator", 44, 6,
                  partition([agent_0.host], [coord_0.host]), c.network.heal),
            Fault("cut agent-1 off past the node TTL (link down)", 53, over_ttl,
                  lambda: cut_off(agent_1), lambda: c.network.link_up(agent_1.host),
                  cuts_off_node="node-1"),
            Fault("SIGSTOP coord-0 past the node TTL", 64, NODE_TTL_S + 2,
                  lambda: pause(coord_0), coord_0.resume),
            Fault("agent-2 back with 4 of 8 GPUs under live grants", 73, 6,
                  shrink_agent, unshrink_agent),
            Fault("a GPU's health verdict flips every 0.3 s", 81, 0, flip_verdicts, nothing),
            Fault("an allocation record deleted by hand", 88, 0, delete_by_hand, nothing),
            *([Fault("150 ms latency and 10% loss on coord-1's link", 90, 5, degrade(coord_1),
                     lambda: c.network.restore(coord_1.host))]
              if self.netem_missing is None else []),
        ]  # fmt: skip

    def run_round(self, round_start: float) -> None:
        """The schedule once, each fault restored before the next is injected."""
        for fault in self.schedule():
            _sleep_until(round_start + fault.offset_s)
            started = time.monotonic()
            details = fault.inject()
            if fault.cuts_off_node:
                _sleep_until(round_start + fault.offset_s + NODE_TTL_S + 2.5)
                self.record(kind="nodes", node=fault.cuts_off_node, answers=self.query("nodes"))
            _sleep_until(round_start + fault.offset_s + fault.duration_s)
            fault.restore()
            ended = time.monotonic()
            self.record(kind="fault", name=fault.name, start=started, end=ended,
                        offset_s=started - self.started_at, duration_s=ended - started,
                        cuts_off_node=fault.cuts_off_node, **details)  # fmt: skip

    def run(self, rounds: int, seed: int) -> checker.Report:
        self.netem_missing = self.cluster.network.netem_unavailable(CLIENT_HOST)
        if self.netem_missing is not None:
            self.record(kind="note", name=f"latency and loss skipped: {self.netem_missing}")
        self.started_at = time.monotonic()
        self.ends_at = self.started_at + rounds * ROUND_S
        self.record(kind="clock", wall=time.time(), monotonic=time.monotonic())
        self.start_stamps(rounds * ROUND_S + FINISH_WITHIN_S + LEASED_TTL_S + 120)
        self.start_workloads(rounds * ROUND_S, seed)
        for n in range(rounds):
            self.run_round(self.started_at + n * ROUND_S)
        for name, process in self.workloads.items():
            if process.alive():
                assert process.popen is not None
                process.popen.wait(timeout=ROUND_S / 2 + FINISH_WITHIN_S + 30)
            if name == "alice" and process.popen is not None and process.popen.returncode:
                raise RuntimeError(f"the workload failed:\n{process.log_text()[-3000:]}")
        time.sleep(LEASED_TTL_S + 4)  # every abandoned lease lapses
        self.record(kind="stats", answers=self.query("stats"))
        return self.judge()

    def _etcd_dump_args(self, *flags: str) -> list[str]:
        certs = self.cluster.etcd_client
        assert certs is not None
        return [
            sys.executable, "-m", "tests.netns.etcd_dump",
            f"--endpoints={','.join(self.cluster.etcd_endpoints)}",
            f"--ca={certs.ca}", f"--cert={certs.cert}", f"--key={certs.key}",
            f"--prefix={PREFIX}", *flags,
        ]  # fmt: skip

    def start_stamps(self, for_s: float) -> None:
        """A watcher on the client host noting when each revision arrives (etcd keeps no
        time), so the checker can tell an early expiry no call noticed."""
        stamper = Process("stamps", CLIENT_HOST,
                          self._etcd_dump_args(f"--stamps={self.directory / 'stamps.jsonl'}",
                                               f"--for={for_s}"),
                          self.directory / "stamps.log", self.cluster.network)  # fmt: skip
        stamper.start()
        self.stamper = stamper

    def judge(self) -> checker.Report:
        if self.stamper is not None:
            self.stamper.stop()
        out = self.directory / "etcd-history.jsonl"
        subprocess.run(
            self.cluster.network.command(CLIENT_HOST, self._etcd_dump_args(f"--out={out}")),
            check=True, capture_output=True, timeout=120, cwd=REPO_ROOT,
        )  # fmt: skip
        history = [
            line
            for path in sorted((self.directory / "histories").glob("*.jsonl"))
            for line in checker.read_lines(path)
        ]
        (self.directory / "faults.json").write_text(json.dumps(self.log, indent=1))
        stamps = checker.Stamps.of(checker.read_lines(self.directory / "stamps.jsonl"))
        return checker.check(history, checker.read_changes(out), self.log, prefix=PREFIX,
                             node_ttl_s=NODE_TTL_S, stamps=stamps)  # fmt: skip

    def stop_workloads(self) -> None:
        for process in [*self.workloads.values(), *filter(None, [self.stamper])]:
            process.stop()


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def run_suite(directory: Path, rounds: int = 1, seed: int = 0) -> checker.Report:
    """Builds the cluster, runs the rounds, tears it all down (also on failure)."""
    with NetnsCluster(directory) as cluster:
        suite = Suite(cluster, directory)
        try:
            return suite.run(rounds, seed)
        finally:
            suite.stop_workloads()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netns.suite")
    parser.add_argument("--rounds", type=int, default=1, help=f"rounds of {ROUND_S:.0f} s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write logs and histories here")
    args = parser.parse_args(argv)
    if (why := netns_unavailable()) is not None:
        sys.exit(f"cannot run the fault suite: {why}")
    directory = args.keep or Path(tempfile.mkdtemp(prefix="kaiwo-gpu-faults-"))
    if directory.exists() and any(directory.iterdir()):
        sys.exit(f"--keep {directory} is not empty: its certificates and histories would mix in")
    directory.mkdir(parents=True, exist_ok=True)
    report = run_suite(directory, args.rounds, args.seed)
    print(checker.table(report))
    print(f"(logs, histories and etcd's history under {directory})")
    sys.exit(1 if report.violation_count else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
