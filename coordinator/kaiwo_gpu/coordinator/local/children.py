"""Starting the child processes of `kaiwo-gpu up`, tests and benchmarks (etcd members,
coordinators): output to a log file, the pid to a pid file at once, Ctrl-C held meanwhile.

A KeyboardInterrupt that lands inside `subprocess.Popen`, after the fork, loses the child's
pid: nothing then stops the child, and no pid file lets the next `kaiwo-gpu up` find it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT received inside the block is raised as KeyboardInterrupt when it ends.

    Only the main thread can set a signal handler; elsewhere SIGINT never reaches the
    thread anyway, so the block runs as it is. A child starts with the default SIGINT
    action (exec resets a handled signal), so Ctrl-C still reaches it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, _: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def spawn_logged(
    args: Sequence[str],
    log_path: Path,
    pid_path: Path | None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`args` as a child with stdout and stderr appended to `log_path` and its pid written
    to `pid_path`. Call it inside `interrupts_held()`, keeping what it returns before the
    block ends, so a Ctrl-C meanwhile finds the child recorded."""
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    if pid_path is not None:  # at once, so a killed parent's children can be found
        pid_path.write_text(str(child.pid))
    return child
