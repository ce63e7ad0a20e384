"""Runs `kaiwo-gpu run`'s command so that signals reach it and its leftovers are cleaned up.

Where `run` is a job of its own (it leads its process group: an interactive shell's job, or
no terminal at all: a batch job, a service), the command gets its own process group, so a
signal reaches its children too and what it leaves in that group does not outlive the
share; a terminal `run` holds is handed to that group, as a shell does for a foreground job,
and a command stopped by Ctrl-Z stops `run` too. Inside someone else's group (a line of a
script, a stage of a pipeline on a terminal) the command stays in that group, so the
terminal's job control treats them as one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

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
        self._reaping = False
        self._pending: list[int] = []
        self._terminal: _Terminal | None = None
        # A job of its own, or no terminal: the command gets a group of its own.
        self._own_group = os.getpgrp() == os.getpid() or not _has_terminal()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self._starting:  # inside Popen: neither a group to signal nor safe to stop
            self._pending.append(signum)
            return
        if self._reaping:  # impatient: what the command left behind goes now
            self.signal_group(signal.SIGKILL)
            return
        child = self.child
        if child is None or child.returncode is not None:
            raise Interrupted(signum)
        if not self._own_group and _terminal_sent_it_too(signum):
            return  # the command shares our group: the terminal reached it already
        self.signal_group(signum)

    def signal_group(self, signum: int) -> None:
        child = self.child
        if child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._own_group:
                os.killpg(child.pid, signum)
            elif child.returncode is None:
                child.send_signal(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # A signal ignored when `run` started (nohup) stays ignored, for the command too.
        wanted = [s for s in FORWARDED_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
        previous = {s: signal.signal(s, self.handle) for s in wanted}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run(self, argv: list[str], environment: dict[str, str]) -> int:
        """Starts the command, waits for it, cleans up its group; returns its raw status."""
        self._starting = True
        try:
            group = 0 if self._own_group else None
            self.child = subprocess.Popen(argv, env=environment, process_group=group)
        finally:
            self._starting = False
        if self._own_group:
            self._terminal = _Terminal.hand_to(self.child.pid)
        for signum in self._pending:  # arrived while the command was being started
            self.signal_group(signum)
        if self.lost_reason:  # lost while starting: stop it now
            self.stop(self.lost_reason)
        try:
            return self._wait()
        finally:
            if self._terminal is not None:
                self._terminal.take_back()
            self._reap_group()

    def _wait(self) -> int:
        """Waits for the command to end, following it through stops (Ctrl-Z).

        Polls, so a signal handled by another thread of this process is acted on within a
        tenth of a second rather than when the command ends.
        """
        child = self.child
        assert child is not None
        flags = os.WEXITED | os.WSTOPPED | os.WNOWAIT | os.WNOHANG
        while child.returncode is None:
            try:
                seen = os.waitid(os.P_PID, child.pid, flags)
            except ChildProcessError:
                break  # the renewal thread's stop() reaped it; Popen has its status
            if seen is None:
                time.sleep(0.1)
            elif seen.si_code == os.CLD_STOPPED:
                os.waitid(os.P_PID, child.pid, os.WSTOPPED)  # taken note of
                self._follow_stop()
            else:
                break
        return child.wait()

    def _follow_stop(self) -> None:
        """The command stopped (Ctrl-Z, or it read a terminal it did not hold): as its job,
        `run` stops too and gives the terminal back; when continued, it continues it."""
        if not self._own_group or os.getpgrp() != os.getpid():
            return  # not a job of our own: whoever stopped it will continue it
        if self._terminal is not None:
            self._terminal.take_back()
        os.killpg(os.getpgrp(), signal.SIGSTOP)  # until the shell continues us (fg or bg)
        child = self.child
        assert child is not None
        self._terminal = _Terminal.hand_to(child.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGCONT)

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
        if child is None or not self._own_group or not _group_alive(child.pid):
            return
        self._reaping = True
        self.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self._kill_after_s
        while _group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(child.pid):
            self.signal_group(signal.SIGKILL)
        self._reaping = False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _open_terminal() -> int | None:
    """The controlling terminal, or None for a batch job, a service or a test."""
    try:
        return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None


def _in_foreground(terminal: int) -> bool:
    try:
        return os.tcgetpgrp(terminal) == os.getpgrp()
    except OSError:
        return False


def _has_terminal() -> bool:
    terminal = _open_terminal()
    if terminal is not None:
        os.close(terminal)
    return terminal is not None


def _terminal_sent_it_too(signum: int) -> bool:
    """Ctrl-C and Ctrl-\\ reach the whole foreground group: when that is ours, the command
    (in our group) got the signal from the terminal as well."""
    if signum not in (signal.SIGINT, signal.SIGQUIT):
        return False
    terminal = _open_terminal()
    if terminal is None:
        return False
    try:
        return _in_foreground(terminal)
    finally:
        os.close(terminal)


class _Terminal:
    """The controlling terminal while the command's group holds it, and its modes before."""

    def __init__(self, descriptor: int, modes: list[Any]) -> None:
        self.descriptor = descriptor
        self.modes = modes

    @classmethod
    def hand_to(cls, pgid: int) -> _Terminal | None:
        """Makes the group the terminal's foreground when `run` was; None when it was not."""
        descriptor = _open_terminal()
        if descriptor is None:
            return None
        try:
            if not _in_foreground(descriptor):
                os.close(descriptor)
                return None
            modes = termios.tcgetattr(descriptor)
            os.tcsetpgrp(descriptor, pgid)
        except (OSError, termios.error):
            os.close(descriptor)
            return None
        # It may have touched the terminal before it was its own and been stopped for it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGCONT)
        return cls(descriptor, modes)

    def take_back(self) -> None:
        """Foreground and modes as they were (a command killed with `stty -echo` set)."""
        # A background group that sets the foreground gets SIGTTOU unless it ignores it.
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            with contextlib.suppress(OSError, termios.error):
                os.tcsetpgrp(self.descriptor, os.getpgrp())
                termios.tcsetattr(self.descriptor, termios.TCSADRAIN, self.modes)
        finally:
            signal.signal(signal.SIGTTOU, previous)
            os.close(self.descriptor)
