"""Runs `kaiwo-gpu run`'s command as a process group it can signal, stop and clean up.

The command gets its own process group, so a signal reaches its children too and nothing it
started outlives the share. When `run` holds the terminal, the terminal is handed to that
group (as a shell does for a foreground job) and taken back afterwards, so Ctrl-C reaches
the command exactly once and a signal sent to `run` is always forwarded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import FrameType

FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,  # Slurm's --signal warns a job before its time limit this way
    signal.SIGUSR2,
)


class Interrupted(BaseException):
    """A signal that ends `run` before the command started or after it ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def say(message: str) -> None:
    """A line on stderr that cannot fail `run`: stderr may be a pipe that was closed."""
    with contextlib.suppress(OSError):
        print(f"kaiwo-gpu run: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Signal handling for the phases of `run`, and the command's process group.

    Before the command starts, a signal raises Interrupted (the caller withdraws what it
    placed); while it runs, signals go to its group; after it ended, a signal abandons the
    release (the lease lapses). Python runs signal handlers in the main thread only.
    """

    def __init__(self, kill_after_s: float) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.lost_reason = ""
        self._kill_after_s = kill_after_s
        self._starting = False
        self._pending: list[int] = []
        self._terminal: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self._starting:  # inside Popen: neither a group to signal nor safe to stop
            self._pending.append(signum)
            return
        child = self.child
        if child is None or child.returncode is not None:
            raise Interrupted(signum)
        self.signal_group(signum)

    def signal_group(self, signum: int) -> None:
        child = self.child
        if child is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle) for s in FORWARDED_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run(self, argv: list[str], environment: dict[str, str]) -> int:
        """Starts the command, waits for it, cleans up its group; returns its raw status."""
        self._starting = True
        try:
            self.child = subprocess.Popen(argv, env=environment, process_group=0)
        finally:
            self._starting = False
        self._terminal = _hand_terminal_to(self.child.pid)
        for signum in self._pending:  # arrived while the command was being started
            self.signal_group(signum)
        if self.lost_reason:  # lost while starting: stop it now
            self.stop(self.lost_reason)
        try:
            return self.child.wait()
        finally:
            _take_terminal_back(self._terminal)
            self._reap_group()

    def stop(self, reason: str) -> None:
        """From the renewal thread: the share may go to others, so the command must stop."""
        self.lost_reason = reason
        child = self.child
        if child is None or child.poll() is not None:
            return  # not started yet (run() checks) or already over
        self.signal_group(signal.SIGTERM)
        say(
            f"the allocation's lease is gone ({reason}); stopping the command "
            f"(SIGKILL in {self._kill_after_s:g}s if it does not exit)"
        )
        try:
            child.wait(self._kill_after_s)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)

    def _reap_group(self) -> None:
        """What the command left running in its group must not outlive the share."""
        child = self.child
        if child is None or not _group_alive(child.pid):
            return
        self.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self._kill_after_s
        while _group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(child.pid):
            self.signal_group(signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _hand_terminal_to(pgid: int) -> int | None:
    """Makes the command's group the terminal's foreground when `run` was; returns the tty."""
    try:
        terminal = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None  # no controlling terminal: a batch job, a service, a test
    try:
        if os.tcgetpgrp(terminal) != os.getpgrp():
            os.close(terminal)
            return None
        os.tcsetpgrp(terminal, pgid)
    except OSError:
        os.close(terminal)
        return None
    # It may have touched the terminal before it was its own and been stopped for it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGCONT)
    return terminal


def _take_terminal_back(terminal: int | None) -> None:
    if terminal is None:
        return
    # A background group that sets the foreground gets SIGTTOU unless it ignores it.
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(terminal, os.getpgrp())
    finally:
        signal.signal(signal.SIGTTOU, previous)
        os.close(terminal)
