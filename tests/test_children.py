"""Children of `kaiwo-gpu up`: logged, their pid on file at once, and a Ctrl-C while one
starts raised only once it is recorded, so it is stopped (a review found etcd members left
running with no pid file after a Ctrl-C inside Popen)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from kaiwo_gpu.coordinator.local.children import interrupts_held, spawn_logged


def test_ctrl_c_inside_the_block_is_raised_once_the_block_has_finished() -> None:
    recorded: list[str] = []
    before = signal.getsignal(signal.SIGINT)

    def start_and_record() -> None:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)  # as if it landed inside Popen, after the fork
            recorded.append("pid file written")

    with pytest.raises(KeyboardInterrupt):
        start_and_record()
    assert recorded == ["pid file written"]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_block_without_ctrl_c_raises_nothing_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGINT)
    with interrupts_held():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_the_block_runs_as_it_is() -> None:
    outcome: list[object] = []

    def starter() -> None:
        with interrupts_held():
            outcome.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=starter)
    thread.start()
    thread.join(10)
    assert outcome == [signal.getsignal(signal.SIGINT)]


@pytest.mark.integration
def test_a_spawned_child_logs_to_its_file_and_its_pid_is_on_file_at_once(tmp_path: Path) -> None:
    log, pid_file = tmp_path / "child.log", tmp_path / "child.pid"
    log.write_text("earlier run\n")
    with interrupts_held():
        child = spawn_logged(["sh", "-c", "echo out; echo err >&2"], log, pid_file)
        assert pid_file.read_text() == str(child.pid)
    assert child.wait(30) == 0
    assert log.read_text().splitlines() == ["earlier run", "out", "err"]  # appended, both
