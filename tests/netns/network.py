"""Hosts in network namespaces on one switch, and the link faults between them.

Each host is a namespace of its own with one interface, `eth0`, on a private subnet; the
other end of its veth pair sits on a bridge inside a switch namespace, so nothing is added
to the namespace the tests run in and no address outside the namespaces is ever used.
Faults are what an operator sees on a real network: a link down (the host is gone for
everyone), a partition between two hosts (blackhole routes both ways: packets vanish
silently, as behind a broken switch port, and TCP has to time out), latency and loss.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"
"""Every host's address is SUBNET.N/24; the namespaces are private, so two runs (or this
and the machine's own network) never see each other's addresses."""
NAME_PREFIX = "kgnet"
"""Namespaces this harness made are named kgnet<pid>-<host>, so leftovers of a run that
was killed can be found and removed by their dead owner's pid."""


def netns_unavailable() -> str | None:
    """Why hosts in namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the tests as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{NAME_PREFIX}{os.getpid()}-probe"
    made = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def remove_leftovers() -> list[str]:
    """Deletes the namespaces of earlier runs whose process is gone; returns their names."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    removed = []
    for line in listing.stdout.splitlines():
        name = line.split(" ", 1)[0]
        owner = name.removeprefix(NAME_PREFIX).split("-", 1)[0]
        if name.startswith(NAME_PREFIX) and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            removed.append(name)
    return removed


@dataclass
class Network:
    """A switch and the hosts plugged into it; `close()` (or the context) removes them all."""

    run_id: str = field(default_factory=lambda: str(os.getpid()))
    hosts: dict[str, str] = field(default_factory=dict)
    """Host name -> its address."""
    _namespaces: list[str] = field(default_factory=list)
    _blackholes: set[tuple[str, str]] = field(default_factory=set)

    @property
    def switch(self) -> str:
        return self.namespace("switch")

    def namespace(self, host: str) -> str:
        return f"{NAME_PREFIX}{self.run_id}-{host}"

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("link", "set", "lo", "up", namespace=name)

    def add_host(self, host: str, number: int) -> str:
        """A host at SUBNET.`number`, plugged into the switch; returns its address."""
        if not self._namespaces:
            self._add_namespace(self.switch)
            _ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
            _ip("link", "set", "br0", "up", namespace=self.switch)
        namespace = self.namespace(host)
        self._add_namespace(namespace)
        port = self._port(host)
        _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace,
            namespace=self.switch)  # fmt: skip
        _ip("link", "set", port, "master", "br0", "up", namespace=self.switch)
        address = f"{SUBNET}.{number}"
        _ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=namespace)
        _ip("link", "set", "eth0", "up", namespace=namespace)
        self.hosts[host] = address
        return address

    def _port(self, host: str) -> str:
        return f"p-{host}"[:15]  # an interface name has at most 15 characters

    def command(self, host: str, args: Sequence[str]) -> list[str]:
        """`args` as a command that runs on `host` (`ip netns exec` execs it in place, so the
        pid of the started process is the pid of `args[0]`)."""
        return ["ip", "netns", "exec", self.namespace(host), *args]

    def link_down(self, host: str) -> None:
        """`host` is cut off from every other host."""
        _ip("link", "set", self._port(host), "down", namespace=self.switch)

    def link_up(self, host: str) -> None:
        _ip("link", "set", self._port(host), "up", namespace=self.switch)

    def partition(self, side_a: Sequence[str], side_b: Sequence[str]) -> None:
        """No packet passes between a host of `side_a` and one of `side_b` (both ways);
        every other path stays."""
        for a in side_a:
            for b in side_b:
                for here, there in ((a, b), (b, a)):
                    if (here, there) not in self._blackholes:
                        _ip("route", "add", "blackhole", f"{self.hosts[there]}/32",
                            namespace=self.namespace(here))  # fmt: skip
                        self._blackholes.add((here, there))

    def heal(self) -> None:
        """Removes every partition."""
        for here, there in sorted(self._blackholes):
            _ip("route", "del", "blackhole", f"{self.hosts[there]}/32",
                namespace=self.namespace(here))  # fmt: skip
        self._blackholes.clear()

    def degrade(self, host: str, *, delay_ms: int = 0, loss_percent: float = 0.0) -> None:
        """Latency and loss on everything `host` sends (netem on its eth0)."""
        self.restore(host)
        netem = ["delay", f"{delay_ms}ms"] if delay_ms else []
        netem += ["loss", f"{loss_percent}%"] if loss_percent else []
        subprocess.run(
            self.command(host, ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", *netem]),
            check=True,
            capture_output=True,
        )

    def netem_unavailable(self, host: str) -> str | None:
        """Why latency and loss cannot be added here (a kernel without sch_netem), or None."""
        probe = self.command(host, ["tc", "qdisc", "add", "dev", "eth0", "root", "netem",
                                    "delay", "1ms"])  # fmt: skip
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        self.restore(host)
        return None if done.returncode == 0 else f"tc netem: {done.stderr.strip()}"

    def restore(self, host: str) -> None:
        """No latency or loss added on `host` any more."""
        subprocess.run(
            self.command(host, ["tc", "qdisc", "del", "dev", "eth0", "root"]),
            check=False,
            capture_output=True,
        )

    def close(self) -> None:
        """Removes every namespace (their veths go with them); the processes inside must be
        stopped first, since a namespace outlives its deletion while a process holds it."""
        for name in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self._namespaces.clear()
        self._blackholes.clear()
