"""The fast loop's guard: an unmarked test cannot start a process by any of the usual doors."""

from __future__ import annotations

import multiprocessing
import os
import pty
import subprocess

import pytest


def _nothing() -> None:
    return


def _start(how: str) -> None:
    if how == "subprocess":
        subprocess.run(["true"], check=False)
    elif how == "system":
        os.system("true")
    elif how == "posix_spawn":
        os.posix_spawn("/bin/true", ["true"], {})
    elif how == "fork":
        os.fork()
    elif how == "pty":
        pty.fork()
    else:
        context = multiprocessing.get_context(how)
        child = context.Process(target=_nothing)  # type: ignore[attr-defined]
        child.start()
        child.join()


@pytest.mark.parametrize(
    "how", ["subprocess", "system", "posix_spawn", "fork", "pty", "spawn", "forkserver"]
)
def test_an_unmarked_test_cannot_start_a_process(how: str) -> None:
    with pytest.raises(AssertionError, match="starts a process; mark it"):
        _start(how)
