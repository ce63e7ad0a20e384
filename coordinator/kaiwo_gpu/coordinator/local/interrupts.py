"""Ctrl-C held off while a child process is started and recorded.

A KeyboardInterrupt that lands inside `subprocess.Popen`, after the fork, loses the child's
pid: nothing then stops the child, and no pid file lets the next `kaiwo-gpu up` find it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
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
